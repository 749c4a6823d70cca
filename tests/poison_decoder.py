"""A decoder that crashes or hangs: installed in Ray's worker processes
(``worker_process_setup_hook``), it makes Pillow's ``Image.open`` kill its process with SIGSEGV
on bytes that start with :data:`MARK`, as a bug in a native decoder does on the malformed file
that triggers it, and never return on bytes that start with :data:`HANG`, as a decoder caught
in a loop. The tar reader gets the same SIGSEGV at a member whose name holds :data:`MARK`, as
a shard reader does at the part of a shard that crashes it, or the out-of-memory killer at a
member that inflates to more than the node has (a ``.tar.gz`` bomb). Reading a local file whose
name holds :data:`HANG` never returns, as a read from a stuck network or FUSE mount."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time

MARK = b"SEGFAULT-ME"
HANG = b"HANG-ME"


def install() -> None:
    from PIL import Image

    real_open = Image.open

    def open_(fp, *args, **kwargs):
        if isinstance(fp, io.BytesIO):
            if fp.getvalue().startswith(MARK):
                os.kill(os.getpid(), signal.SIGSEGV)
            if fp.getvalue().startswith(HANG):
                while True:
                    time.sleep(60)
        return real_open(fp, *args, **kwargs)

    Image.open = open_

    real_next = tarfile.TarFile.next

    def next_(self):
        member = real_next(self)
        if member is not None and MARK.decode() in member.name:
            os.kill(os.getpid(), signal.SIGSEGV)
        return member

    tarfile.TarFile.next = next_

    from pipeline import read

    real_load = read._load_local

    def load(path: str) -> bytes:
        if HANG.decode() in os.path.basename(path):
            while True:
                time.sleep(60)
        return real_load(path)

    read._load_local = load
