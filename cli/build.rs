//! Link options for the `vmedge` binary.
//!
//! - Relative relocations packed (`DT_RELR`, glibc 2.36 and binutils 2.38 or later, as
//!   on Debian 12): the binary is position independent, and the dynamic loader fixes up
//!   ~42k pointers at every start. As `RELA` entries those were a 1 MB table that the
//!   loader reads and that stays resident; packed, they are 12 kB. A release build of
//!   the edge starts ~1.5 MB smaller (bench/RESULTS.md, session 17), and the address
//!   layout is as random as before.
//! - `text-layout.ld` groups the code of each role of the binary (SSH gateway, DNS gate,
//!   worker, start-up only, never run) after the code the edge runs, so that a process
//!   maps less of the code it does not run (bench/RESULTS.md, session 18). It reads the
//!   crates in v0 symbol names, which `.cargo/config.toml` asks for.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/text-layout.ld");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=text-layout.ld");
}
