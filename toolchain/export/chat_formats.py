"""The chat formats we can write as an Ollama TEMPLATE: each one's Go template, stop tokens,
the markers that identify its Jinja template, and its default system prompt.

A format is found by name-free evidence: every one of its markers must occur in the model's
Jinja chat template, tried from the most specific format (Qwen3, with tools and thinking) to
the plainest (ChatML); `ollama.check_translation` then proves the pick on sample conversations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toolchain.errors import UserError


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]  # strings only this format's Jinja templates contain (all of them)
    go_template: str
    stops: tuple[str, ...]
    # regex pulling a default system prompt out of the Jinja source, if the template has one
    default_system: str | None = None
    tools: bool = False  # the template renders tools, tool calls and tool results


# The templates leave BOS out (and the newer ones use no "{{-": they are one line, and Go's
# trimming would also eat a newline a turn ends with): llama.cpp (and so Ollama) adds it when the GGUF says add_bos,
# and a BOS written in the template too would be doubled. Ollama injects the Modelfile's
# SYSTEM as a system message when a conversation has none, so a template's default system
# prompt becomes SYSTEM instead of template text.
CHATML = ChatFormat(
    name="chatml",
    markers=("<|im_start|>",),
    go_template=(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    stops=("<|im_end|>", "<|im_start|>"),
    default_system=r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>",
)

# Qwen2.5 / Qwen3: ChatML plus tools in the system turn, <tool_call> blocks in assistant turns
# and consecutive tool results in one user turn of <tool_response> blocks. Tool schemas and
# call arguments are marshalled by Ollama (Go's encoding/json: compact, keys sorted), which no
# Go template can re-space; the check compares such JSON by value (see `same_prompt`).
_QWEN_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{{ range $.Tools }}\n{{ json . }}{{ end }}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
_QWEN_TURNS = (
    "{{ $intool := false }}"
    "{{ range $i, $m := .Messages }}"
    '{{ if and $intool (ne $m.Role "tool") }}<|im_end|>\n{{ $intool = false }}{{ end }}'
    '{{ if eq $m.Role "tool" }}{{ if not $intool }}<|im_start|>user{{ $intool = true }}{{ end }}'
    "\n<tool_response>\n{{ $m.Content }}\n</tool_response>"
    '{{ else if and (eq $i 0) (eq $m.Role "system") }}{{ continue_system }}'
    '{{ else if eq $m.Role "assistant" }}<|im_start|>assistant{{ assistant_body }}<|im_end|>\n'
    "{{ else }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}"
    "{{ end }}{{ if $intool }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_QWEN_CALLS = (
    '{{ range $j, $c := $m.ToolCalls }}{{ calls_sep }}<tool_call>\n{"name": "{{ $c.Function.Name }}", '
    '"arguments": {{ json $c.Function.Arguments }}}\n</tool_call>{{ end }}'
)
QWEN25 = ChatFormat(
    name="qwen2.5",
    markers=("<|im_start|>", "<tool_call>", "<tool_response>"),
    go_template=(
        '{{ if and .Tools (or (not .Messages) (ne (index .Messages 0).Role "system")) }}'
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        + _QWEN_TOOLS
        + "<|im_end|>\n{{ end }}"
        + _QWEN_TURNS.replace(
            "{{ continue_system }}",
            "<|im_start|>system\n{{ $m.Content }}{{ if $.Tools }}" + _QWEN_TOOLS + "{{ end }}<|im_end|>\n",
        ).replace(
            "{{ assistant_body }}",
            "{{ if $m.ToolCalls }}{{ if $m.Content }}\n{{ $m.Content }}{{ end }}"
            + _QWEN_CALLS.replace("{{ calls_sep }}", "\n")
            + "{{ else }}\n{{ $m.Content }}{{ end }}",
        )
    ),
    stops=("<|im_end|>", "<|im_start|>"),
    default_system=r"(You are Qwen, created by Alibaba Cloud\. You are a helpful assistant\.)",
    tools=True,
)
# Qwen3 adds no default system prompt, and shows the reasoning (Ollama's .Thinking) of
# assistant turns after the last user query as a <think> block.
QWEN3 = ChatFormat(
    name="qwen3",
    markers=("<|im_start|>", "<tool_call>", "<think>"),
    go_template=(
        '{{ $query := -1 }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $query = $i }}{{ end }}{{ end }}'
        '{{ if and .Tools (or (not .Messages) (ne (index .Messages 0).Role "system")) }}'
        "<|im_start|>system\n"
        + _QWEN_TOOLS[2:]
        + "<|im_end|>\n{{ end }}"
        + _QWEN_TURNS.replace(
            "{{ continue_system }}",
            "<|im_start|>system\n{{ $m.Content }}{{ if $.Tools }}" + _QWEN_TOOLS + "{{ end }}<|im_end|>\n",
        ).replace(
            "{{ assistant_body }}",
            "\n{{ if and $m.Thinking (gt $i $query) }}<think>\n{{ $m.Thinking }}\n</think>\n\n{{ end }}"
            "{{ $m.Content }}" + _QWEN_CALLS.replace("{{ calls_sep }}", "{{ if or $j $m.Content }}\n{{ end }}"),
        )
        + "{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}"
    ),
    stops=("<|im_end|>", "<|im_start|>"),
    tools=True,
)
LLAMA3 = ChatFormat(
    name="llama3",
    markers=("<|start_header_id|>",),
    go_template=(
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
)
# Llama 3.1 / 3.2 / 3.3: a system turn with the knowledge cut-off and date (transformers
# renders the template's own default date unless the caller passes date_string), tools in the
# first user turn, calls as {"name", "parameters"} and tool results as "ipython" turns.
LLAMA31 = ChatFormat(
    name="llama3.1",
    markers=("<|start_header_id|>", "Cutting Knowledge Date"),
    go_template=(
        '{{ $sys := "" }}{{ $start := 0 }}'
        '{{ if and .Messages (eq (index .Messages 0).Role "system") }}'
        "{{ $sys = (index .Messages 0).Content }}{{ $start = 1 }}{{ end }}"
        "<|start_header_id|>system<|end_header_id|>\n\n{{ if .Tools }}Environment: ipython\n{{ end }}"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ $sys }}<|eot_id|>"
        "{{ range $i, $m := .Messages }}"
        "{{ if lt $i $start }}"
        "{{ else if and $.Tools (eq $i $start) }}<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper "
        'arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, '
        '"parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
        "{{ range $.Tools }}{{ json . }}\n\n{{ end }}{{ $m.Content }}<|eot_id|>"
        "{{ else if $m.ToolCalls }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{{ range $m.ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": {{ json .Function.Arguments }}}'
        "{{ end }}<|eot_id|>"
        '{{ else if eq $m.Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ json $m.Content }}<|eot_id|>'
        "{{ else }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>{{ end }}"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    tools=True,
)
# Gemma has no system role: HF's template puts the system text, then a blank line, at the
# start of the first user turn; "assistant" is called "model".
GEMMA = ChatFormat(
    name="gemma",
    markers=("<start_of_turn>",),
    go_template=(
        '{{- $sys := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $sys = .Content }}'
        '{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        '{{ if $sys }}{{ $sys }}\n\n{{ $sys = "" }}{{ end }}{{ .Content }}<end_of_turn>\n{{ end }}'
        "{{- end }}<start_of_turn>model\n"
    ),
    stops=("<end_of_turn>",),
)
# most specific first: a Qwen3 template also carries every Qwen2.5 marker but one
FORMATS = (QWEN3, QWEN25, CHATML, LLAMA31, LLAMA3, GEMMA)


def detect_format(chat_template: str | None) -> ChatFormat:
    if not chat_template:
        raise UserError(
            "the model has no chat template; an Ollama TEMPLATE cannot be derived (add one to the tokenizer)"
        )
    for fmt in FORMATS:
        if all(m in chat_template for m in fmt.markers):
            return fmt
    raise UserError(
        "the model's chat template is not one we can translate to Ollama's syntax "
        f"(known: {', '.join(f.name for f in FORMATS)})"
    )


def default_system(fmt: ChatFormat, chat_template: str) -> str | None:
    if not fmt.default_system:
        return None
    m = re.search(fmt.default_system, chat_template, re.S)
    return m.group(1).replace("\\n", "\n") if m else None
