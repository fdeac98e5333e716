"""Open an app bundle written by `toolchain pack`, refusing one whose files changed.

Torch-free (the stdlib and the package's stdlib-only fileio): an app ships this with
llama-cpp-python or onnxruntime.

A bundle is a folder with `manifest.json` (every other file with its bytes and sha256) and
`manifest.sha256` (the digest of manifest.json itself). Opening checks both, so one changed,
missing or truncated byte anywhere makes the bundle refuse to load instead of answering with
weights nobody verified.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from toolchain.errors import UserError
from toolchain.fileio import sha256_file as sha256_of

MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = "manifest.sha256"
BUNDLE_FORMAT = "toolchain-bundle/1"


def bad_files(root: Path, files: list[dict]) -> list[str]:
    """'path (why)' for each listed file that is missing or whose size or sha256 differ."""
    bad = []
    for f in files:
        p = root / f["path"]
        if not p.is_file():
            bad.append(f"{f['path']} (missing)")
        elif p.stat().st_size != f["bytes"]:
            bad.append(f"{f['path']} ({p.stat().st_size} bytes, manifest says {f['bytes']})")
        elif sha256_of(p) != f["sha256"]:
            bad.append(f"{f['path']} (sha256 differs)")
    return bad


def read_manifest(root: str | os.PathLike, verify: bool = True) -> dict:
    """The bundle's manifest, after checking it and (with `verify`) every file it lists."""
    root = Path(root)
    m, d = root / MANIFEST_FILE, root / MANIFEST_DIGEST_FILE
    if not m.is_file():
        raise UserError(
            f"{root} is not a bundle (no {MANIFEST_FILE}); make one with `toolchain pack RUN_DIR --out DIR`"
        )
    if not d.is_file():
        raise UserError(f"{root} has no {MANIFEST_DIGEST_FILE}: the bundle is incomplete; pack it again")
    recorded = d.read_text().split()[:1]
    if recorded != [sha256_of(m)]:
        raise UserError(
            f"{root}: {MANIFEST_FILE} does not match {MANIFEST_DIGEST_FILE}: the bundle was changed; pack it again"
        )
    try:
        manifest = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{m} is not valid JSON ({e}); pack the bundle again") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{m}: format {manifest.get('format')!r} is not {BUNDLE_FORMAT!r}")
    if verify:
        bad = bad_files(root, manifest["files"])
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise UserError(
                f"{root}: {len(bad)} file(s) differ from the manifest: {', '.join(bad[:3])}{more}; "
                "the bundle was changed or damaged: pack it again"
            )
    return manifest


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | os.PathLike, verify: bool = True) -> Bundle:
        return cls(Path(root), read_manifest(root, verify))

    def model(self, fmt: str, quant: str | None = None) -> dict:
        """The manifest entry of a packed model ('gguf' or 'onnx'); the first one without `quant`."""
        found = [m for m in self.manifest["models"] if m["format"] == fmt and quant in (None, m["quant"])]
        if not found:
            have = ", ".join(f"{m['format']} {m['quant']}" for m in self.manifest["models"])
            raise UserError(f"{self.root} has no {fmt} {quant or ''} model (it has: {have})".replace("  ", " "))
        return found[0]

    def path(self, entry: dict) -> Path:
        return self.root / entry["path"]

    @property
    def generation(self) -> dict:
        return self.manifest["generation"]
