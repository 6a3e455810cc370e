#!/usr/bin/env python3
"""Runs a command (ssh -tt ...) on a pseudo-terminal of 24x80, resizes it to 40x100 once
the command has printed its first `stty size`, then presses Enter; prints everything the
command wrote and exits with its status. The remote side is expected to run
`stty size; read x; stty size`."""
import fcntl
import os
import pty
import struct
import sys
import termios
import time


def set_size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def main():
    pid, fd = pty.fork()
    if pid == 0:
        set_size(sys.stdin.fileno(), 24, 80)
        os.execvp(sys.argv[1], sys.argv[1:])
    seen = b""
    resized = False
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
        if not resized and b"24 80" in seen:
            # The kernel sends SIGWINCH to ssh, which sends window-change.
            set_size(fd, 40, 100)
            time.sleep(0.5)
            os.write(fd, b"\n")
            resized = True
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(seen.decode(errors="replace"))
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
