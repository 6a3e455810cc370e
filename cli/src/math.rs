//! The C math functions the binary calls (`pow` from tokio's scheduler statistics,
//! `exp2` from the worker's histogram buckets, `log2f` from brotli, which pingora links
//! and nothing runs; `log2` in debug builds), defined here from the `libm` crate, Rust's
//! port of musl's.
//!
//! With no symbol left for it, the linker (`--as-needed`) drops glibc's `libm.so.6`, and
//! no `vmedge` process maps it: ~450 kB less resident in each, as measured on the edge
//! (its ifunc resolvers and loader tables alone fault in 64 kB windows of it at start).
//! A new call to another C math function brings the library back, whole; the test
//! `the_binary_does_not_load_libm` in `cli/tests/cli.rs` says so.

// SAFETY (each function): an exported name only replaces glibc's function of the same
// name and signature at link time; the bodies are safe Rust.

#[allow(unsafe_code)]
#[no_mangle]
extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[allow(unsafe_code)]
#[no_mangle]
extern "C" fn exp2(x: f64) -> f64 {
    libm::exp2(x)
}

#[allow(unsafe_code)]
#[no_mangle]
extern "C" fn log2f(x: f32) -> f32 {
    libm::log2f(x)
}

#[allow(unsafe_code)]
#[no_mangle]
extern "C" fn log2(x: f64) -> f64 {
    libm::log2(x)
}
