"""The subset of Go's text/template that our Ollama TEMPLATEs use, rendered in Python.

Ollama renders a Modelfile TEMPLATE with Go's text/template over {.Messages, .System, .Tools,
...}. We render the same template here so the exporter can prove, before writing a Modelfile,
that it produces exactly the prompt the model's Jinja chat template produces.

Supported: text; `{{- ` / ` -}}` whitespace trimming; `.Field`, `$`, `$.Field`, `$var`,
`$var.Field`, `(pipeline).Field`; string and integer literals; parenthesised sub-pipelines;
`$x := v` and `$x = v`; `if` / `else if` / `else` / `end`; `range $i, $m := PIPE` and
`range PIPE`; Go's eq, ne, lt, le, gt, ge, not, and, or, len, index, slice, and Ollama's json
(Go's json.Marshal: compact, keys sorted, <, > and & escaped). Anything else raises
ValueError, so an unsupported template is caught, never mis-rendered.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from typing import Any

_ACTION = re.compile(r"{{(-\s)?\s*(.*?)\s*(\s-)?}}", re.S)


def _tokenize(src: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
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
            inner, i, _end = _parse(parts, i + 1, ("end",))
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


class Obj(dict):
    """A Go struct as the template sees it: fields by Go name; `json` marshals `json_value`
    (Ollama's types carry lower-case JSON tags, so a tool marshals as the OpenAI-style dict)."""

    def __init__(self, fields: dict, json_value=None):
        super().__init__(fields)
        self.json_value = json_value


def go_json(value) -> str:
    """Go's json.Marshal as Ollama's `json` template function calls it."""

    def plain(v):
        if isinstance(v, Obj):
            return v.json_value
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    text = json.dumps(plain(value), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


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
    if tok in ("true", "false"):
        return tok == "true"
    raise ValueError(f"unsupported term {tok!r}")


def _index(a, *keys):
    for k in keys:
        a = a[k]
    return a


def _slice(a, *bounds):
    if len(bounds) > 2:
        raise ValueError("slice with a capacity bound is not supported")
    return a[slice(*bounds)]


_FUNCS: dict[str, Callable[..., Any]] = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not _truthy(a),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "len": lambda a: len(a),
    "index": _index,
    "slice": _slice,
    "json": go_json,
}

_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|[^\s()]+')


def _group(expr: str) -> list:
    """Tokens nested by parentheses; a `.Field` written right after `)` is kept as ("field", name)."""
    stack: list[list] = [[]]
    prev_end = -1
    for m in _TOKEN.finditer(expr):
        tok = m.group(0)
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise ValueError(f"unbalanced ')' in {expr!r}")
            inner = stack.pop()
            stack[-1].append(("group", inner))
        elif tok.startswith(".") and m.start() == prev_end and stack[-1] and isinstance(stack[-1][-1], tuple):
            kind, inner = stack[-1].pop()
            stack[-1].append(("field", (kind, inner), tok))
        else:
            stack[-1].append(tok)
        prev_end = m.end()
    if len(stack) != 1:
        raise ValueError(f"unbalanced '(' in {expr!r}")
    return stack[0]


def _operand(item, dot, scope: _Scope):
    if isinstance(item, tuple):
        if item[0] == "group":
            return _command(item[1], dot, scope)
        return _field(_operand(item[1], dot, scope), item[2])
    return _term(item, dot, scope)


def _command(items: list, dot, scope: _Scope):
    if not items:
        raise ValueError("empty action")
    head = items[0]
    if head in ("and", "or"):  # Go evaluates these lazily: `and .Messages (index .Messages 0)`
        value = None
        for t in items[1:]:
            value = _operand(t, dot, scope)
            if _truthy(value) != (head == "and"):
                return value
        return value
    if isinstance(head, str) and head in _FUNCS:
        return _FUNCS[head](*[_operand(t, dot, scope) for t in items[1:]])
    if len(items) != 1:
        raise ValueError(f"unsupported pipeline {items!r}")
    return _operand(head, dot, scope)


def _eval(expr: str, dot, scope: _Scope):
    return _command(_group(expr), dot, scope)


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
