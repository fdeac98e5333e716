"""Graders: did a model's answer do the task? One function per kind, shared by every model and runtime.

Each grader turns the gold answer and the model's output into comparable values with the same
normalisation, so a torch run, a GGUF in llama.cpp and an ONNX file are scored identically:

- exact     the output, stripped and with runs of whitespace collapsed, equals the gold
- label     the first line (else its first word), lower-cased and stripped of quotes, markdown and
            punctuation, is one of `labels` and equals the gold label
- contains  the gold appears in the output (case-insensitive, whitespace collapsed)
- regex     the first match of `pattern` (its first group if it has one) equals the gold's
- number    the first number in the output ("1,000", "1e3", "-2.5", "$3", "40%") equals the gold
            number within a relative 1e-6
- json      the output holds a JSON object (a ```json fence is fine) with every key in `keys`; when
            the gold is a JSON object, those keys' values equal the gold's
No torch here: the config validation checks every gold answer before any stage spends time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from toolchain.errors import UserError

GRADERS = ("exact", "label", "contains", "regex", "number", "json")


@dataclass
class GraderConfig:
    kind: str = "exact"  # exact | label | contains | regex | number | json
    labels: list[str] = field(default_factory=list)  # label: the label set
    pattern: str | None = None  # regex: what to extract from the output (and from the gold)
    keys: list[str] = field(default_factory=list)  # json: keys the object must have

    def validate(self, where: str) -> None:
        if self.kind not in GRADERS:
            raise UserError(f"{where}.kind: unknown grader '{self.kind}'; graders: {', '.join(GRADERS)}")
        if self.kind == "label" and not self.labels:
            raise UserError(f"{where}.labels: the label grader needs its label set, e.g. labels: [spam, ham]")
        if self.kind == "regex":
            if not self.pattern:
                raise UserError(f"{where}.pattern: the regex grader needs a pattern, e.g. 'answer: (\\w+)'")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise UserError(f"{where}.pattern: not a valid regular expression ({e})") from None
        if self.kind == "json" and not self.keys:
            raise UserError(f"{where}.keys: the json grader needs the keys an answer must have")


class Ungradable(ValueError):
    """The gold answer itself cannot be read by its grader (a data error, not a wrong answer)."""


# ---------------------------------------------------------------------------- normalising


def _squash(text: str) -> str:
    return " ".join(text.split())


_LABEL_STRIP = " \t\"'`*_.,:;!?()[]{}<>#-"


def _label_of(text: str, labels: list[str]) -> str | None:
    """The label an output names: its first non-empty line, else that line's first word."""
    known = {lab.lower(): lab.lower() for lab in labels}
    for line in text.splitlines():
        line = line.strip().strip(_LABEL_STRIP).lower()
        if not line:
            continue
        if line in known:
            return line
        first = line.split()[0].strip(_LABEL_STRIP)
        return known.get(first)
    return None


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _number_of(text: str) -> float | None:
    """The first number written in `text`; thousands separators and exponents allowed."""
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if not any(c.isdigit() for c in s):
            continue
        try:
            return float(s.replace(",", ""))
        except ValueError:
            continue
    return None


def _json_object_of(text: str) -> dict | None:
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    candidates = [fence.group(1)] if fence else []
    start = text.find("{")
    if start >= 0:
        candidates.append(text[start : text.rfind("}") + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _extract(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    if m is None:
        return None
    return _squash(m.group(1) if pattern.groups else m.group(0))


# ---------------------------------------------------------------------------- grading


def make_grader(cfg: GraderConfig) -> Callable[[str, str], bool]:
    """`grade(gold, output) -> correct?`; raises Ungradable when the gold cannot be read."""
    if cfg.kind == "exact":
        return lambda gold, out: _squash(out) == _squash(gold)
    if cfg.kind == "contains":
        return lambda gold, out: _squash(gold).lower() in _squash(out).lower()
    if cfg.kind == "label":
        labels = list(cfg.labels)

        def label(gold: str, out: str) -> bool:
            want = _label_of(gold, labels)
            if want is None:
                raise Ungradable(f"gold answer {gold[:60]!r} is none of the labels {', '.join(labels)}")
            return _label_of(out, labels) == want

        return label
    if cfg.kind == "regex":
        pattern = re.compile(cfg.pattern or "")

        def regex(gold: str, out: str) -> bool:
            want = _extract(pattern, gold)
            # a gold answer that is the bare value (no surrounding text) is taken as it is
            want = want if want is not None else _squash(gold)
            return _extract(pattern, out) == want

        return regex
    if cfg.kind == "number":

        def number(gold: str, out: str) -> bool:
            want = _number_of(gold)
            if want is None:
                raise Ungradable(f"gold answer {gold[:60]!r} holds no number")
            got = _number_of(out)
            return got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)

        return number
    if cfg.kind == "json":
        keys = list(cfg.keys)

        def json_grade(gold: str, out: str) -> bool:
            obj = _json_object_of(out)
            if obj is None or any(k not in obj for k in keys):
                return False
            want = _json_object_of(gold)
            return want is None or all(obj[k] == want.get(k) for k in keys if k in want)

        return json_grade
    raise UserError(f"unknown grader '{cfg.kind}'; graders: {', '.join(GRADERS)}")


def check_gold(cfg: GraderConfig, gold: str) -> None:
    """Raise Ungradable if `gold` cannot be read by this grader (empty, no number, not a label)."""
    if not gold.strip():
        raise Ungradable("the gold answer is empty")
    correct = make_grader(cfg)(gold, gold)
    # a regex's gold may be the bare value; every other gold must pass its own grader
    if not correct and cfg.kind == "json":
        raise Ungradable(f"gold answer {gold[:60]!r} is not a JSON object with the keys {', '.join(cfg.keys)}")
