#!/usr/bin/env bash
# bench/edge: the edge against nginx and haproxy (HTTP/1.1 keep-alive with wrk, h2c with
# h2load, TLS handshakes with openssl s_time, memory of idle keep-alive connections), all
# in front of the same backend in a VM namespace, one worker thread each. Needs root.
# --quick: a debug build and short runs, so CI proves it still works; the numbers in
# RESULTS.md come from a full run (the edge built as it ships: profile dist).
set -euo pipefail
cd "$(dirname "$0")/../.."
# The idle-connection test holds thousands of sockets in this process.
ulimit -n "$(ulimit -Hn)"
if [ "${1:-}" = "--quick" ]; then
    cargo build --locked -q -p vmedge-cli
    VMEDGE_BIN=$PWD/target/debug/vmedge cargo run --locked -q -p vmedge-bench --example edge_load -- --quick
else
    # The edge as it ships (Cargo.toml, profile.dist).
    cargo build --locked -q --profile dist -p vmedge-cli
    VMEDGE_BIN=$PWD/target/dist/vmedge cargo run --locked -q --release -p vmedge-bench --example edge_load
fi
