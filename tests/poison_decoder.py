"""A decoder that crashes: installed in Ray's worker processes (``worker_process_setup_hook``),
it makes Pillow's ``Image.open`` kill its process with SIGSEGV on bytes that start with
:data:`MARK`, as a bug in a native decoder does on the malformed file that triggers it."""

from __future__ import annotations

import io
import os
import signal

MARK = b"SEGFAULT-ME"


def install() -> None:
    from PIL import Image

    real_open = Image.open

    def open_(fp, *args, **kwargs):
        if isinstance(fp, io.BytesIO) and fp.getvalue().startswith(MARK):
            os.kill(os.getpid(), signal.SIGSEGV)
        return real_open(fp, *args, **kwargs)

    Image.open = open_
