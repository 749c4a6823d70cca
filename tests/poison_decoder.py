"""A decoder that crashes or hangs: installed in Ray's worker processes
(``worker_process_setup_hook``), it makes Pillow's ``Image.open`` kill its process with SIGSEGV
on bytes that start with :data:`MARK`, as a bug in a native decoder does on the malformed file
that triggers it, and never return on bytes that start with :data:`HANG`, as a decoder caught
in a loop."""

from __future__ import annotations

import io
import os
import signal
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
