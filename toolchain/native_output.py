"""Capture what native libraries (llama.cpp) print straight to the process's stdout/stderr.

llama.cpp's quantizer writes a line per tensor to fd 1/2, bypassing Python; we send it to a
log file so the user sees our summary, and the details stay available.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def captured_native_output() -> Iterator[list[str]]:
    """Redirect fds 1 and 2 to a temp file; the yielded list receives its lines on exit."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())
