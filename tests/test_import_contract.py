"""The package's dependency rules, read from the source (function-local imports included):
no import cycle between modules, and every import points down the layers or forward along
the data flow. Layers, lowest first (see docs/ARCHITECTURE.md):

  base     errors, fileio, native_output, formats, the package root
  shared   targets, data, config, models, runtime, devices (may use base and each other, acyclically)
  stages   finetune -> student -> prune -> distill -> quantize -> export -> verify -> eval -> bench -> pack -> report,
           and inspect_model;
           a stage uses base, shared and earlier stages only
  top      pipeline, commands, cli, __main__
"""

import ast
from pathlib import Path

import toolchain

ROOT = Path(toolchain.__file__).parent
BASE = {"toolchain", "errors", "fileio", "native_output", "formats"}
SHARED = {"targets", "data", "config", "models", "runtime", "devices"}
STAGES = [
    "finetune",
    "student",
    "prune",
    "distill",
    "quantize",
    "export",
    "verify",
    "eval",
    "bench",
    "pack",
    "report",
    "inspect_model",
]
TOP = {"pipeline", "commands", "cli", "__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = ("toolchain",) + f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if n in mods and n != mod:
                    graph[mod].add(n)
    return graph


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "toolchain"


def _layer(unit: str) -> tuple[int, int]:
    if unit in BASE:
        return 0, 0
    if unit in SHARED:
        return 1, 0
    if unit in STAGES:
        return 2, STAGES.index(unit)
    assert unit in TOP, f"toolchain.{unit} belongs to no layer: add it to the contract"
    return 3, 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers_and_along_the_data_flow():
    wrong = []
    for mod, deps in _graph().items():
        a = _unit(mod)
        for dep in deps:
            b = _unit(dep)
            if a == b or b in BASE:
                continue
            la, lb = _layer(a), _layer(b)
            if lb[0] > la[0] or (la[0] == lb[0] == 2 and lb[1] > la[1]):
                wrong.append(f"{mod} -> {dep}")
    assert wrong == []


def test_the_contract_sees_a_wrong_way_import():
    graph = {"toolchain.config": {"toolchain.bench.run"}, "toolchain.bench.run": set()}
    a, b = _layer(_unit("toolchain.config")), _layer(_unit("toolchain.bench.run"))
    assert b[0] > a[0]
    graph["toolchain.bench.run"].add("toolchain.config")
    assert _cycles(graph) == [["toolchain.bench.run", "toolchain.config"]]
