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


def this_node() -> str | None:
    """The Ray node this process runs on; None outside Ray (or in a Ray Client driver)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not a Ray node (a Ray Client driver, say)
        return None


def where() -> str:
    """This node, for messages: its address and host name ("node IP (HOST)" in a Ray
    worker or driver, "host HOST" outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return f"node {ray.util.get_node_ip_address()} ({socket.gethostname()})"
    except ImportError:
        pass
    return f"host {socket.gethostname()}"
