#!/usr/bin/env bash
# bench/dns: the DNS gate against dnsmasq and unbound (cached answers per second, all
# forwarding to the same NSD, dnsperf from a VM namespace), and the latency an fqdn set
# insert adds. Needs root (namespaces, nftables).
# --quick: a debug build and 2-second runs, so CI proves it still works; the numbers in
# RESULTS.md come from a full (release) run.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--quick" ]; then
    cargo run --locked -q -p vmedge-bench --example dns_load -- --quick
else
    cargo run --locked -q --release -p vmedge-bench --example dns_load
fi
