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


CHATML = ChatFormat(
    name="chatml",
    marker="<|im_start|>",
    go_template=(
        "{{- range $i, $_ := .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    stops=("<|im_end|>", "<|im_start|>"),
    default_system=r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>",
)
LLAMA3 = ChatFormat(
    name="llama3",
    marker="<|start_header_id|>",
    go_template=(
        "{{- range $i, $_ := .Messages }}{{ if eq $i 0 }}<|begin_of_text|>{{ end }}"
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
)
GEMMA = ChatFormat(
    name="gemma",
    marker="<start_of_turn>",
    go_template=(
        "{{- range $i, $_ := .Messages }}{{ if eq $i 0 }}<bos>{{ end }}<start_of_turn>"
        "{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n"
        "{{ end }}<start_of_turn>model\n"
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


def render_modelfile(gguf_name: str, chat_template: str | None, context_length: int,
                     license_text: str | None = None, generation: dict | None = None) -> str:
    fmt = detect_format(chat_template)
    lines = [f"# Ollama Modelfile ({fmt.name} chat format). Create the model with:",
             "#   ollama create NAME -f Modelfile", f"FROM ./{gguf_name}", f"TEMPLATE {_quote(fmt.go_template)}"]
    system = _default_system(fmt, chat_template)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in fmt.stops:
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
    text = render_modelfile(gguf_path.name, tok.chat_template, int(config.get("max_position_embeddings", 2048)),
                            meta.get("license"), generation)
    return write_text(out_path or gguf_path.parent / "Modelfile", text)
