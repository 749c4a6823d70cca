"""Which machine, and which view of it, this process has: to tell whether a pid or a path
recorded by another process means the same thing here."""

from __future__ import annotations

import os
import socket


def identity(namespace: str) -> str:
    """'HOST/BOOT/NAMESPACE' for Linux namespace ``namespace`` ("pid": a pid names the same
    process; "mnt": a path names the same file). Two containers may share a host name and a
    boot, never a namespace; '?' stands for what this system does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        space = os.readlink(f"/proc/self/ns/{namespace}")
    except OSError:
        space = "?"
    return f"{socket.gethostname()}/{boot}/{space}"
