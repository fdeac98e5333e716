"""The small subset of Go's text/template that our Ollama TEMPLATEs use, rendered in Python.

Ollama renders a Modelfile TEMPLATE with Go's text/template over {.Messages, .System, ...}. We
render the same template here so the exporter can prove, before writing a Modelfile, that it
produces exactly the prompt the model's Jinja chat template produces (and refuse otherwise).

Supported: text; `{{- ` / ` -}}` whitespace trimming; `.Field`, `$`, `$.Field`, `$var`,
`$var.Field`; string literals; `$x := v` and `$x = v`; `if` / `else if` / `else` / `end`;
`range $i, $m := PIPE` and `range PIPE`; functions eq, ne, not, and, or, len. Anything else
raises ValueError, so an unsupported template is caught, never mis-rendered.
"""

from __future__ import annotations

import re
import shlex

_ACTION = re.compile(r"{{(-\s)?\s*(.*?)\s*(\s-)?}}", re.S)


def _tokenize(src: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            parts.append(("text", text))
        parts.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = src[pos:]
    if trim_next:
        text = text.lstrip()
    if text:
        parts.append(("text", text))
    return parts


def _parse(parts, i=0, stop=("end",)):
    """Nodes until an action whose keyword is in stop; returns (nodes, index, stopping action)."""
    nodes = []
    while i < len(parts):
        kind, body = parts[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop or (body.startswith("else") and "else" in stop):
            return nodes, i, body
        if word == "if":
            branches, i = _parse_if(parts, i, body[2:].strip())
            nodes.append(("if", branches))
        elif word == "range":
            head = body[5:].strip()
            m = re.match(r"^(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=\s*(.+)$", head)
            names, pipe = ((m.group(1), m.group(2)), m.group(3)) if m else ((None, None), head)
            inner, i, end = _parse(parts, i + 1, ("end",))
            nodes.append(("range", names, pipe, inner))
            i += 1
        elif re.match(r"^\$\w+\s*:?=", body):
            name, op, expr = re.match(r"^(\$\w+)\s*(:?=)\s*(.+)$", body).groups()
            nodes.append(("set", name, expr, op == ":="))
            i += 1
        elif word in ("end", "else"):
            raise ValueError(f"unexpected {{{{{body}}}}}")
        else:
            nodes.append(("expr", body))
            i += 1
    if stop != ("<eof>",):
        raise ValueError("template ends inside a block (missing {{ end }})")
    return nodes, i, None


def _parse_if(parts, i, cond):
    branches = []
    while True:
        inner, i, stop = _parse(parts, i + 1, ("end", "else"))
        branches.append((cond, inner))
        if stop == "end":
            return branches, i + 1
        rest = stop[4:].strip()
        if rest.startswith("if "):
            cond = rest[3:].strip()
        elif not rest:
            cond = None
        else:
            raise ValueError(f"unsupported {{{{{stop}}}}}")


def _truthy(v) -> bool:
    return bool(v) if v is not None else False


class _Scope:
    def __init__(self, root):
        self.vars = [{"$": root}]

    def get(self, name):
        for frame in reversed(self.vars):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")

    def set(self, name, value, declare):
        if declare:
            self.vars[-1][name] = value
            return
        for frame in reversed(self.vars):
            if name in frame:
                frame[name] = value
                return
        raise ValueError(f"assignment to undeclared variable {name}")


def _field(obj, path: str):
    for part in [p for p in path.split(".") if p]:
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def _term(tok: str, dot, scope: _Scope):
    if tok.startswith('"'):
        return shlex.split(tok)[0] if tok != '""' else ""
    if tok == ".":
        return dot
    if tok.startswith("."):
        return _field(dot, tok)
    if tok.startswith("$"):
        name, _, rest = tok.partition(".")
        return _field(scope.get(name), rest)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    raise ValueError(f"unsupported term {tok!r}")


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "len": lambda a: len(a),
}


def _eval(expr: str, dot, scope: _Scope):
    toks = re.findall(r'"(?:\\.|[^"\\])*"|\S+', expr)
    if not toks:
        raise ValueError("empty action")
    if toks[0] in _FUNCS:
        return _FUNCS[toks[0]](*[_term(t, dot, scope) for t in toks[1:]])
    if len(toks) != 1:
        raise ValueError(f"unsupported pipeline {expr!r}")
    return _term(toks[0], dot, scope)


def _run(nodes, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            v = _eval(node[1], dot, scope)
            out.append("" if v is None else str(v))
        elif kind == "set":
            scope.set(node[1], _eval(node[2], dot, scope), node[3])
        elif kind == "if":
            for cond, inner in node[1]:
                if cond is None or _truthy(_eval(cond, dot, scope)):
                    scope.vars.append({})
                    _run(inner, dot, scope, out)
                    scope.vars.pop()
                    break
        elif kind == "range":
            (iname, vname), pipe, inner = node[1], node[2], node[3]
            for i, item in enumerate(_eval(pipe, dot, scope) or []):
                frame = {}
                if iname and vname:
                    frame = {iname: i, vname: item}
                elif iname:
                    frame = {iname: item}
                scope.vars.append(frame)
                _run(inner, item, scope, out)
                scope.vars.pop()


def render(template: str, data: dict) -> str:
    """Render `template` with `data` (e.g. {"Messages": [{"Role": ..., "Content": ...}], "System": ...})."""
    nodes, _, _ = _parse(_tokenize(template), 0, ("<eof>",))
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)
