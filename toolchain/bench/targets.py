"""Target profiles (targets/*.yaml): the device a benchmark stands for."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from toolchain.errors import UserError

KINDS = ("cpu", "cuda", "mobile-class")
_REPO_TARGETS = Path(__file__).resolve().parents[2] / "targets"


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    threads: int
    memory_budget_mb: int
    memory_bandwidth_gbps: float
    runtimes: list = field(default_factory=list)
    quant_types: list = field(default_factory=list)
    context: int = 2048

    def effective_threads(self) -> int:
        # never more threads than cores we may run on: oversubscription makes llama.cpp's
        # spin-waiting threads collapse
        return max(1, min(self.threads, len(os.sched_getaffinity(0))))


def find_target(spec: str) -> Path:
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"target file not found: {path}")
        return path
    for base in (Path.cwd() / "targets", _REPO_TARGETS):
        cand = base / f"{spec}.yaml"
        if cand.is_file():
            return cand
    known = sorted(p.stem for p in _REPO_TARGETS.glob("*.yaml")) if _REPO_TARGETS.is_dir() else []
    raise UserError(f"unknown target '{spec}'; known: {', '.join(known) or 'none'} (or give a path to a target YAML)")


def load_target(spec: str) -> Target:
    path = find_target(spec)
    data = yaml.safe_load(path.read_text()) or {}
    names = [f.name for f in dataclasses.fields(Target)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(names)}")
    missing = [n for n in ("name", "kind", "threads", "memory_budget_mb", "memory_bandwidth_gbps") if n not in data]
    if missing:
        raise UserError(f"{path}: missing key '{missing[0]}'")
    if data["kind"] not in KINDS:
        raise UserError(f"{path}: kind '{data['kind']}' is not one of {', '.join(KINDS)}")
    if not isinstance(data["threads"], int) or data["threads"] < 1:
        raise UserError(f"{path}: threads must be a positive integer")
    return Target(**data)
