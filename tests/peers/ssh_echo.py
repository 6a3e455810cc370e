#!/usr/bin/env python3
"""Interactive echo latency through an ssh command that runs `cat` on a remote pty
(`ssh -tt ... cat`), typed on a local pseudo-terminal as a user would (so ssh treats the
session as interactive: raw mode, TCP_NODELAY): sends "x" and Enter N times, each after
the previous came back twice (the remote pty's echo, then cat's), and prints
{"p50_ms": .., "p99_ms": .., "n": N} as JSON.

A round trip that takes over 20 s counts as a stall: the script then prints
{"stalled_after": K} and exits 0, so a benchmark reports it instead of hanging.

usage: ssh_echo.py N ssh [args...]"""
import json
import os
import pty
import select
import sys
import time


def main():
    n = int(sys.argv[1])
    pid, out = pty.fork()
    if pid == 0:
        os.execvp(sys.argv[2], sys.argv[2:])

    def round_trip():
        start = time.perf_counter()
        os.write(out, b"x\r")
        got = b""
        while got.count(b"x") < 2:
            ready, _, _ = select.select([out], [], [], 20)
            if not ready:
                return None
            try:
                chunk = os.read(out, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise SystemExit("ssh closed the stream: " + got.decode(errors="replace"))
            got += chunk
        return time.perf_counter() - start

    samples = []
    for i in range(5 + n):  # the first five warm up: the session and the remote cat run
        took = round_trip()
        if took is None:
            os.kill(pid, 9)
            print(json.dumps({"stalled_after": i}))
            return
        if i >= 5:
            samples.append(took)
    samples.sort()
    os.kill(pid, 15)
    os.waitpid(pid, 0)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1000
    print(json.dumps({"p50_ms": round(pick(0.50), 3), "p99_ms": round(pick(0.99), 3), "n": n}))


if __name__ == "__main__":
    main()
