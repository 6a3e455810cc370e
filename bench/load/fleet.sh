#!/usr/bin/env bash
# bench/fleet: a three-member etcd cluster and a real `vmedge edge` following it: change
# propagation etcd -> edge routing with 10k VMs loaded (p99), and the edge's memory
# holding 100k VMs (from etcd and from a file). Needs root (a namespace) and etcd.
# --quick: a debug build, 1k VMs and 10 changes, so CI proves it still works; the numbers
# in RESULTS.md come from a full (release) run.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--quick" ]; then
    cargo build --locked -q -p vmedge-cli
    VMEDGE_BIN=$PWD/target/debug/vmedge cargo run --locked -q -p vmedge-bench --example fleet -- --quick
else
    cargo build --locked -q --release -p vmedge-cli
    VMEDGE_BIN=$PWD/target/release/vmedge cargo run --locked -q --release -p vmedge-bench --example fleet
fi
