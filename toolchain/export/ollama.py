"""Ollama Modelfile for an exported GGUF.

Ollama only recognises a GGUF's Jinja chat template when it matches one it already knows; a
fine-tuned or distilled model otherwise loses its template and never stops. So we write the
TEMPLATE in Ollama's Go-template syntax ourselves, for the chat formats we can identify, with
their stop tokens, and refuse (rather than guess) for a template we do not recognise.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from toolchain.errors import UserError
from toolchain.fileio import write_text


@dataclass(frozen=True)
class ChatFormat:
    name: str
    marker: str  # a string only this format's Jinja template contains
    go_template: str
    stops: tuple[str, ...]
    # regex pulling a default system prompt out of the Jinja source, if the template has one
    default_system: str | None = None


# The templates leave BOS out: llama.cpp (and so Ollama) adds it when the GGUF says add_bos,
# and a BOS written in the template too would be doubled. Ollama injects the Modelfile's
# SYSTEM as a system message when a conversation has none, so a template's default system
# prompt becomes SYSTEM instead of template text.
CHATML = ChatFormat(
    name="chatml",
    marker="<|im_start|>",
    go_template=(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    stops=("<|im_end|>", "<|im_start|>"),
    default_system=r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>",
)
LLAMA3 = ChatFormat(
    name="llama3",
    marker="<|start_header_id|>",
    go_template=(
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
)
# Gemma has no system role: HF's template puts the system text, then a blank line, at the
# start of the first user turn; "assistant" is called "model".
GEMMA = ChatFormat(
    name="gemma",
    marker="<start_of_turn>",
    go_template=(
        '{{- $sys := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $sys = .Content }}'
        '{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        '{{ if $sys }}{{ $sys }}\n\n{{ $sys = "" }}{{ end }}{{ .Content }}<end_of_turn>\n{{ end }}'
        "{{- end }}<start_of_turn>model\n"
    ),
    stops=("<end_of_turn>",),
)
FORMATS = (CHATML, LLAMA3, GEMMA)


def detect_format(chat_template: str | None) -> ChatFormat:
    if not chat_template:
        raise UserError("the model has no chat template; an Ollama TEMPLATE cannot be derived (add one to the tokenizer)")
    for fmt in FORMATS:
        if fmt.marker in chat_template:
            return fmt
    raise UserError(
        "the model's chat template is not one we can translate to Ollama's syntax "
        f"(known: {', '.join(f.name for f in FORMATS)}); write the Modelfile TEMPLATE by hand"
    )


def _default_system(fmt: ChatFormat, chat_template: str) -> str | None:
    if not fmt.default_system:
        return None
    m = re.search(fmt.default_system, chat_template, re.S)
    return m.group(1).replace("\\n", "\n") if m else None


def _quote(s: str) -> str:
    if '"""' in s:
        raise UserError('a Modelfile value cannot contain three double quotes (""")')
    return f'"""{s}"""'


# conversations the translation must reproduce exactly (system / none, multi-turn)
CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And times 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another?"}],
)


def ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """What Ollama hands the template: Role/Content, with SYSTEM injected when none is given."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and not any(m["Role"] == "system" for m in msgs):
        msgs.insert(0, {"Role": "system", "Content": system})
    return msgs


def check_translation(fmt: ChatFormat, render_jinja, system: str | None, bos_text: str | None) -> None:
    """Refuse a translation that does not reproduce the Jinja prompt on every check conversation.

    `render_jinja(messages, add_generation_prompt)` renders the model's own template (as
    transformers' apply_chat_template does); `bos_text` is stripped from its start when the
    GGUF makes llama.cpp add BOS itself.
    """
    from toolchain.export.go_template import render

    for conv in CHECK_CONVERSATIONS:
        try:
            want = render_jinja(conv, True)
        except Exception as e:  # a template may reject a shape (e.g. no system role): skip that shape
            if conv[0]["role"] == "system":
                continue
            raise UserError(f"the model's chat template fails on a plain conversation ({e})") from None
        if bos_text and want.startswith(bos_text):
            want = want[len(bos_text):]
        got = render(fmt.go_template, {"Messages": ollama_messages(conv, system), "System": system or ""})
        if got != want:
            raise UserError(
                f"the chat template looks like {fmt.name} but our Ollama translation renders it differently "
                f"(expected {want!r}, got {got!r}); write the Modelfile TEMPLATE by hand"
            )


def render_modelfile(gguf_name: str, chat_template: str | None, context_length: int,
                     license_text: str | None = None, generation: dict | None = None,
                     render_jinja=None, bos_text: str | None = None, extra_stops: tuple[str, ...] = ()) -> str:
    if not chat_template:
        # a base model: Ollama sends the raw prompt (no chat turns to translate)
        lines = ["# Ollama Modelfile (no chat template: plain completion). Create the model with:",
                 "#   ollama create NAME -f Modelfile", f"FROM ./{gguf_name}", 'TEMPLATE """{{ .Prompt }}"""']
        fmt, system = None, None
    else:
        fmt = detect_format(chat_template)
        system = _default_system(fmt, chat_template)
        if render_jinja is not None:
            check_translation(fmt, render_jinja, system, bos_text)
        lines = [f"# Ollama Modelfile ({fmt.name} chat format). Create the model with:",
                 "#   ollama create NAME -f Modelfile", f"FROM ./{gguf_name}", f"TEMPLATE {_quote(fmt.go_template)}"]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    stops = list(fmt.stops if fmt else ()) + [s for s in extra_stops if s and s not in (fmt.stops if fmt else ())]
    for stop in stops:
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append(f"PARAMETER num_ctx {min(context_length, 8192)}")
    for key in ("temperature", "top_p", "top_k"):
        if generation and generation.get(key) is not None:
            lines.append(f"PARAMETER {key} {generation[key]}")
    if license_text:
        lines.append(f"LICENSE {_quote(license_text)}")
    return "\n".join(lines) + "\n"


def write_modelfile(model_dir: str | os.PathLike, gguf_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Write a Modelfile next to `gguf_path` (or at out_path) for the model in model_dir."""
    from transformers import AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    meta_file = model_dir / "toolchain.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    gen_file = model_dir / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    def render_jinja(messages, add_generation_prompt):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    adds_bos = tok.bos_token is not None and len(tok("a").input_ids) > len(tok("a", add_special_tokens=False).input_ids)
    text = render_modelfile(gguf_path.name, tok.chat_template, int(config.get("max_position_embeddings", 2048)),
                            meta.get("license"), generation, render_jinja=render_jinja,
                            bos_text=tok.bos_token if adds_bos else None,
                            extra_stops=(tok.eos_token,) if tok.chat_template and tok.eos_token else ())
    return write_text(out_path or gguf_path.parent / "Modelfile", text)
