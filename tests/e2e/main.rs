//! End-to-end tests: one binary; each module is one part of the system with real peers.
//! The address plan is in the harness (`vmedge_tests`, tests/src/lib.rs).
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod dns;
mod firewall;
mod harness;
mod worker;
