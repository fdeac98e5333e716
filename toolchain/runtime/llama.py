"""Open a GGUF in llama.cpp (llama-cpp-python) for checks that read its logits."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from toolchain.errors import UserError, VerificationError


@contextlib.contextmanager
def open_llama(gguf_path: str | os.PathLike, n_ctx: int = 1024, threads: int = 0, logits_all: bool = True):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("verifying a GGUF needs llama-cpp-python: pip install llama-cpp-python") from None
    path = Path(gguf_path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            verbose=False,
            n_threads=threads or (os.cpu_count() or 1),
            n_batch=n_ctx,
        )
    except ValueError as e:
        raise VerificationError(f"llama.cpp failed to load {path}: {e}") from None
    try:
        yield llm
    finally:
        llm.close()


def last_logits(llm):
    """Logits after the last token fed to `llm` (a numpy view), also when it was opened with
    logits_all=False: llama-cpp-python then keeps no `scores` rows, but llama.cpp has the last one."""
    import ctypes

    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),))
