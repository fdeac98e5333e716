"""Answer with the bundle's student; hand a request to a fallback when the student is unsure.

Torch-free: llama-cpp-python runs the bundle's GGUF, jinja2 renders its chat template (as
Hugging Face tokenizers do), numpy computes the confidence. The threshold and temperature come
from the bundle's calibration (`toolchain pack` on a run with a task). The fallback is the
teacher's GGUF, any callable taking the chat messages, or the URL of an OpenAI-compatible chat
completions endpoint.

    from toolchain.runtime.router import Router
    router = Router("bundle/", fallback="teacher-F16.gguf")
    reply = router.answer([{"role": "user", "content": "Is this spam? ..."}])
    reply.text, reply.source, reply.confidence
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.errors import UserError
from toolchain.runtime.bundle import Bundle
from toolchain.runtime.confidence import NEVER, answer_confidence, token_stats


@dataclass
class Reply:
    text: str
    source: str  # "student" or "fallback"
    confidence: float  # the student's, also when it handed the request on


def _render_template(template: str, messages: list[dict], special: dict) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UserError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


class LlamaChat:
    """Greedy chat answers from a GGUF in llama.cpp, with each answer token's confidence stats."""

    def __init__(self, gguf: str | os.PathLike, template: str | None = None, special: dict | None = None,
                 stops: list[int] | None = None, n_ctx: int = 2048, threads: int = 0):  # fmt: skip
        from llama_cpp import Llama

        if not Path(gguf).is_file():
            raise UserError(f"GGUF file not found: {gguf}")
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, verbose=False, n_threads=threads or os.cpu_count())
        found = template or self.llm.metadata.get("tokenizer.chat_template")
        if not found:
            raise UserError(f"{gguf} has no chat template; give one")
        self.template: str = found
        self.special = special if special is not None else self._special_from_gguf()
        self.stops = stops if stops is not None else sorted({self.llm.token_eos(), *self._end_of_turn()})

    def _text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _special_from_gguf(self) -> dict:
        return {"bos_token": self._text(self.llm.token_bos()), "eos_token": self._text(self.llm.token_eos())}

    def _end_of_turn(self) -> list[int]:
        ids = []
        for text in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
            t = self.llm.tokenize(text.encode(), add_bos=False, special=True)
            if len(t) == 1:
                ids.append(t[0])
        return ids

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = _render_template(self.template, messages, self.special)
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def generate(self, messages: list[dict], max_new_tokens: int) -> tuple[str, list[int], list[list[float]]]:
        from toolchain.runtime.llama import last_logits

        self.llm.reset()
        self.llm.eval(self.prompt_ids(messages))
        tokens: list[int] = []
        stats = []
        for _ in range(max_new_tokens):
            logits = last_logits(self.llm)
            tok = int(np.argmax(logits))
            tokens.append(tok)
            stats.append(token_stats(logits, tok))
            if tok in self.stops:
                break
            self.llm.eval([tok])
        text = self.llm.detokenize([t for t in tokens if t not in self.stops]).decode("utf-8", errors="replace")
        return text.strip(), tokens, stats


def _http_fallback(url: str) -> Callable[[list[dict]], str]:
    def ask(messages: list[dict]) -> str:
        body = json.dumps({"messages": messages, "temperature": 0}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]

    return ask


def _fallback(spec, max_new_tokens: int, threads: int) -> Callable[[list[dict]], str] | None:
    if spec is None or callable(spec):
        return spec
    if str(spec).startswith(("http://", "https://")):
        return _http_fallback(str(spec))
    teacher = LlamaChat(spec, threads=threads)
    return lambda messages: teacher.generate(messages, max_new_tokens)[0]


class Router:
    """The bundle's student first; below the calibrated threshold, the fallback answers."""

    def __init__(self, bundle: str | os.PathLike | Bundle, fallback=None, quant: str | None = None,
                 threads: int = 0, threshold: float | None = None):  # fmt: skip
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        m = self.bundle.manifest
        entry = self.bundle.model("gguf", quant)
        gen = m["generation"]
        tok_cfg = json.loads((self.bundle.root / "tokenizer" / "tokenizer_config.json").read_text())
        special = {k: tok_cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = (self.bundle.root / gen["chat_template"]).read_text() if gen.get("chat_template") else None
        self.student = LlamaChat(self.bundle.path(entry), template, special, gen["stop_token_ids"],
                                 n_ctx=min(m["context_length"], 4096), threads=threads)  # fmt: skip
        self.max_new_tokens = gen["max_new_tokens"]
        cal = m.get("calibration") or {}
        self.temperature = float(cal.get("temperature", 1.0))
        self.threshold = threshold if threshold is not None else cal.get("threshold")
        self.fallback = _fallback(fallback, self.max_new_tokens, threads)
        if self.fallback is not None and self.threshold is None:
            raise UserError(f"{self.bundle.root} has no calibrated threshold (pack a run with a task); pass threshold=")

    def answer(self, messages: list[dict]) -> Reply:
        text, tokens, stats = self.student.generate(messages, self.max_new_tokens)
        conf = answer_confidence(stats, self.student.stops, tokens, self.temperature)
        unsure = self.threshold is not None and (self.threshold >= NEVER or conf < self.threshold)
        if self.fallback is not None and unsure:
            return Reply(self.fallback(messages).strip(), "fallback", conf)
        return Reply(text, "student", conf)
