"""Ollama Modelfile for an exported GGUF.

Ollama only recognises a GGUF's Jinja chat template when it matches one it already knows; a
fine-tuned or distilled model otherwise loses its template and never stops. So we write the
TEMPLATE in Ollama's Go-template syntax ourselves, for the chat formats we can identify, with
their stop tokens, and refuse (rather than guess) for a template we do not recognise.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from toolchain.errors import UserError
from toolchain.export.chat_formats import ChatFormat, default_system, detect_format
from toolchain.export.go_template import Obj
from toolchain.fileio import write_text

log = logging.getLogger(__name__)


def _quote(s: str) -> str:
    if '"""' in s:
        raise UserError('a Modelfile value cannot contain three double quotes (""")')
    return f'"""{s}"""'


# conversations the translation must reproduce exactly (system / none, multi-turn)
CHECK_CONVERSATIONS: tuple[list[dict[str, Any]], ...] = (
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
    ],
)
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city"],
        },
    },
}
_CALL: dict[str, Any] = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}
    ],
}
# ...and, for a template that renders tools: offered tools, a call, its result, an answer
TOOL_CONVERSATIONS: tuple[list[dict[str, Any]], ...] = (
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Weather in Paris?"}],
    [{"role": "user", "content": "Weather in Paris?"}, _CALL, {"role": "tool", "content": "18 degrees, sunny"}],
    [
        {"role": "user", "content": "Weather in Paris?"},
        _CALL,
        {"role": "tool", "content": "18 degrees, sunny"},
        {"role": "assistant", "content": "It is 18 degrees and sunny."},
        {"role": "user", "content": "Thanks!"},
    ],
)


def ollama_tools(tools: list[dict] | None) -> list[Obj]:
    """Tools as Ollama's template sees them (.Type, .Function.Name, ...; `json` gives the dict)."""
    out = []
    for t in tools or []:
        f = t.get("function", {})
        fields = {"Name": f.get("name"), "Description": f.get("description"), "Parameters": f.get("parameters")}
        out.append(Obj({"Type": t.get("type", "function"), "Function": Obj(fields, f)}, t))
    return out


def ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """What Ollama hands the template: Role/Content/Thinking/ToolCalls, with SYSTEM injected when none is given."""
    msgs = []
    for m in messages:
        calls = [
            {"Function": {"Name": c["function"]["name"], "Arguments": c["function"]["arguments"]}}
            for c in m.get("tool_calls") or []
        ]
        msgs.append(
            {
                "Role": m["role"],
                "Content": m.get("content") or "",
                "Thinking": m.get("reasoning_content", ""),
                "ToolCalls": calls,
                "ToolName": m.get("name", ""),
            }
        )
    if system and not any(m["Role"] == "system" for m in msgs):
        msgs.insert(0, {"Role": "system", "Content": system, "Thinking": "", "ToolCalls": [], "ToolName": ""})
    return msgs


def template_data(messages: list[dict], system: str | None, tools: list[dict] | None = None) -> dict:
    msgs = ollama_messages(messages, system)
    return {
        "Messages": msgs,
        "Tools": ollama_tools(tools),
        "Think": False,
        "IsThinkSet": False,
        "System": "\n\n".join(m["Content"] for m in msgs if m["Role"] == "system"),
    }


def _canonical_json(text: str) -> str:
    """`text` with every embedded JSON object or array rewritten compactly with sorted keys."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                value, end = None, None
            if end is not None and isinstance(value, (dict, list)):
                out.append(json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def same_prompt(want: str, got: str, tools: bool) -> bool:
    """Equal prompts; with tools, JSON values (schemas, arguments) compare by value: Ollama
    marshals them itself (compact, keys sorted) where transformers' tojson spaces them."""
    return want == got or (tools and _canonical_json(want) == _canonical_json(got))


def check_translation(fmt: ChatFormat, render_jinja, system: str | None, bos_text: str | None) -> str | None:
    """Why the translation does not reproduce the Jinja prompt on every check conversation, or None.

    `render_jinja(messages, add_generation_prompt, tools)` renders the model's own template (as
    transformers' apply_chat_template does); `bos_text` is stripped from its start when the
    GGUF makes llama.cpp add BOS itself.
    """
    from toolchain.export.go_template import render

    cases = [(c, None) for c in CHECK_CONVERSATIONS] + (
        [(c, [WEATHER_TOOL]) for c in TOOL_CONVERSATIONS] if fmt.tools else []
    )
    for conv, tools in cases:
        try:
            want = render_jinja(conv, True, tools)
        except Exception as e:  # a template may reject a shape (e.g. no system role): skip that shape
            if conv[0]["role"] == "system":
                continue
            return f"the model's chat template fails on a plain conversation ({str(e).splitlines()[0][:120]})"
        if bos_text and want.startswith(bos_text):
            want = want[len(bos_text) :]
        try:
            got = render(fmt.go_template, template_data(conv, system, tools))
        except ValueError as e:
            return f"our {fmt.name} Ollama template does not render ({e})"
        if not same_prompt(want, got, tools is not None):
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            return (
                f"the chat template looks like {fmt.name} but our Ollama translation renders a "
                f"{'tool ' if tools else ''}conversation differently from character {at} "
                f"(expected {want[at : at + 40]!r}, got {got[at : at + 40]!r})"
            )
    return None


def _go_template(
    chat_template: str, render_jinja, bos_text: str | None
) -> tuple[ChatFormat | None, str | None, str | None]:
    """(format, default system prompt, None) for a template we translate and check, else
    (None, None, the reason)."""
    try:
        fmt = detect_format(chat_template)
    except UserError as e:
        return None, None, str(e)
    system = default_system(fmt, chat_template)
    problem = check_translation(fmt, render_jinja, system, bos_text) if render_jinja is not None else None
    return (None, None, problem) if problem else (fmt, system, None)


def render_modelfile(
    gguf_name: str,
    chat_template: str | None,
    context_length: int,
    license_text: str | None = None,
    generation: dict | None = None,
    render_jinja=None,
    bos_text: str | None = None,
    extra_stops: tuple[str, ...] = (),
) -> tuple[str, str | None]:
    """(Modelfile text, warning or None). A chat template we cannot translate exactly never
    fails the export: the Modelfile then has no TEMPLATE, Ollama reads the GGUF's embedded
    Jinja template itself, and the warning says why."""
    warning = None
    fmt, system = None, None
    if not chat_template:
        # a base model: Ollama sends the raw prompt (no chat turns to translate)
        lines = [
            "# Ollama Modelfile (no chat template: plain completion). Create the model with:",
            "#   ollama create NAME -f Modelfile",
            f"FROM ./{gguf_name}",
            'TEMPLATE """{{ .Prompt }}"""',
        ]
    else:
        fmt, system, reason = _go_template(chat_template, render_jinja, bos_text)
        if fmt is None:
            warning = (
                f"Modelfile written without TEMPLATE: {reason}; Ollama will use the chat template embedded in the GGUF"
            )
            lines = [
                "# Ollama Modelfile (no TEMPLATE: Ollama uses the GGUF's own chat template). Create the model with:",
                "#   ollama create NAME -f Modelfile",
                f"FROM ./{gguf_name}",
            ]
        else:
            lines = [
                f"# Ollama Modelfile ({fmt.name} chat format). Create the model with:",
                "#   ollama create NAME -f Modelfile",
                f"FROM ./{gguf_name}",
                f"TEMPLATE {_quote(fmt.go_template)}",
            ]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    known = fmt.stops if fmt else ()
    for stop in list(known) + [s for s in extra_stops if s and s not in known]:
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append(f"PARAMETER num_ctx {min(context_length, 8192)}")
    for key in ("temperature", "top_p", "top_k"):
        if generation and generation.get(key) is not None:
            lines.append(f"PARAMETER {key} {generation[key]}")
    if license_text:
        lines.append(f"LICENSE {_quote(license_text)}")
    return "\n".join(lines) + "\n", warning


def write_modelfile(
    model_dir: str | os.PathLike, gguf_path: str | os.PathLike, out_path: str | os.PathLike | None = None
) -> tuple[Path, str | None]:
    """Write a Modelfile next to `gguf_path` (or at out_path) for the model in model_dir;
    returns its path and a warning when it had to be written without TEMPLATE."""
    from transformers import AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    meta_file = model_dir / "toolchain.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    gen_file = model_dir / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None

    def render_jinja(messages, add_generation_prompt, tools=None):
        return tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    adds_bos = tok.bos_token is not None and len(tok("a").input_ids) > len(tok("a", add_special_tokens=False).input_ids)
    text, warning = render_modelfile(
        gguf_path.name,
        tok.chat_template,
        int(config.get("max_position_embeddings", 2048)),
        meta.get("license"),
        generation,
        render_jinja=render_jinja,
        bos_text=tok.bos_token if adds_bos else None,
        extra_stops=(tok.eos_token,) if tok.chat_template and tok.eos_token else (),
    )
    if warning:
        log.warning("%s", warning)
    return write_text(out_path or gguf_path.parent / "Modelfile", text), warning
