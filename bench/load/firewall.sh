#!/usr/bin/env bash
# bench/firewall, the packet path: iperf3 across the worker between two VM namespaces,
# with no table and with 1k VMs x 100 rules loaded. Needs root (namespaces, nftables).
# --quick: a debug build, 50 VMs and 2-second runs, so CI proves it still works; the
# numbers in RESULTS.md come from a full (release) run. (Compile and sync times are the
# criterion bench `firewall` and the example `firewall_scale`.)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--quick" ]; then
    cargo run --locked -q -p vmedge-bench --example firewall_path -- --quick
else
    cargo run --locked -q --release -p vmedge-bench --example firewall_path
fi
