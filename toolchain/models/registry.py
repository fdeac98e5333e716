"""Per-architecture code, found by the HF config's `model_type`.

Each supported family has one module in this package (llama.py, ...) exposing an `ARCH`
object. A small alias map lets related model types share a module (as mlx-lm does), so adding
an architecture is adding a file and a line here, never an if-chain elsewhere.
"""

from __future__ import annotations

import importlib

from toolchain.errors import UserError

# model_type -> module in toolchain.models
_MODULES = {
    "llama": "llama",
    "mistral": "llama",
    "gemma3_text": "gemma3",
}


def supported_model_types() -> list[str]:
    return sorted(_MODULES)


def get_arch(model_type: str):
    """The architecture spec for `model_type`, or a UserError listing the supported ones."""
    module = _MODULES.get(model_type)
    if module is None:
        raise UserError(
            f"architecture '{model_type}' is not supported yet; supported: {', '.join(supported_model_types())}"
        )
    return importlib.import_module(f"toolchain.models.{module}").ARCH
