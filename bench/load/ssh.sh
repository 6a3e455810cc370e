#!/usr/bin/env bash
# bench/ssh: the SSH gateway against `ssh -J` through an OpenSSH jump host to the same VM
# sshd (bulk cat and sftp, echo latency idle and under a bulk transfer on the same
# connection, 100 parallel logins, memory per idle session). Needs root.
# --quick: a debug build and short runs, so CI proves it still works; the numbers in
# RESULTS.md come from a full (release) run.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--quick" ]; then
    cargo build --locked -q -p vmedge-cli
    VMEDGE_BIN=$PWD/target/debug/vmedge cargo run --locked -q -p vmedge-bench --example ssh_load -- --quick
else
    cargo build --locked -q --release -p vmedge-cli
    VMEDGE_BIN=$PWD/target/release/vmedge cargo run --locked -q --release -p vmedge-bench --example ssh_load
fi
