"""Target profiles: the device a benchmark stands for (the YAML files beside this module, or a
./targets/<name>.yaml of the user's own, which is found first).

A profile says how many threads to emulate, how much memory a model may take (weights + KV
cache at `context`), the device's memory bandwidth (for the decode roofline projection), and
which runtimes and quant types ship there. Every field is checked on load; a bad file gives a
UserError naming the file and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from toolchain.errors import UserError

KINDS = ("cpu", "cuda", "mobile-class")
RUNTIMES = ("llama_cpp", "onnxruntime", "torch")
_SHIPPED = Path(__file__).resolve().parent  # the profiles ship inside the package (package data)


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    threads: int
    memory_budget_mb: int
    memory_bandwidth_gbps: float
    runtimes: list = field(default_factory=lambda: list(RUNTIMES))
    quant_types: list = field(default_factory=list)  # empty: any quant type
    context: int = 2048

    def effective_threads(self) -> int:
        # never more threads than cores we may run on: oversubscription makes llama.cpp's
        # spin-waiting threads collapse
        return max(1, min(self.threads, len(os.sched_getaffinity(0))))

    def allows_quant(self, quant: str) -> bool:
        return not self.quant_types or quant.lower() in {q.lower() for q in self.quant_types}


def _check(path, data: dict) -> None:
    """Raise a UserError naming the first missing or wrong field."""
    names = [f.name for f in fields(Target)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(names)}")
    for n in ("name", "kind", "threads", "memory_budget_mb", "memory_bandwidth_gbps"):
        if n not in data:
            raise UserError(f"{path}: missing key '{n}'")

    def bad(key, want):
        return UserError(f"{path}: {key} must be {want}, got {data[key]!r}")

    if not isinstance(data["name"], str) or not data["name"]:
        raise bad("name", "a non-empty string")
    if data["kind"] not in KINDS:
        raise UserError(f"{path}: kind '{data['kind']}' is not one of {', '.join(KINDS)}")
    # bool is an int subclass in Python: refuse `threads: yes`
    for key in ("threads", "memory_budget_mb", "context"):
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 1):
            raise bad(key, "a positive integer")
    bw = data["memory_bandwidth_gbps"]
    if isinstance(bw, bool) or not isinstance(bw, (int, float)) or bw <= 0:
        raise bad("memory_bandwidth_gbps", "a positive number (GB/s)")
    for key in ("runtimes", "quant_types"):
        if key in data and (not isinstance(data[key], list) or not all(isinstance(x, str) for x in data[key])):
            raise bad(key, "a list of strings")
    for r in data.get("runtimes", []):
        if r not in RUNTIMES:
            raise UserError(f"{path}: runtimes: '{r}' is not one of {', '.join(RUNTIMES)}")


def find_target(spec: str) -> Path:
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"target file not found: {path}")
        return path
    for base in (Path.cwd() / "targets", _SHIPPED):  # a ./targets/ of the user's own first
        cand = base / f"{spec}.yaml"
        if cand.is_file():
            return cand
    raise UserError(
        f"unknown target '{spec}'; known: {', '.join(known_targets()) or 'none'} (or give a path to a target YAML)"
    )


def known_targets() -> list[str]:
    return sorted(p.stem for p in _SHIPPED.glob("*.yaml"))


def load_target(spec: str) -> Target:
    """A target by name (targets/<name>.yaml) or by YAML path, validated."""
    path = find_target(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of target fields")
    _check(path, data)
    return Target(**data)
