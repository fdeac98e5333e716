"""The chat templates models actually ship (official tokenizer_config.json texts, in
tests/fixtures/chat_templates) become Ollama TEMPLATEs that render the prompt transformers
renders: with and without a system prompt (Qwen2.5's default one inserted), multi-turn, with
tools, a tool call and its result. A template we cannot translate leaves the Modelfile
without TEMPLATE, with a warning, and the export goes on."""

from pathlib import Path

import pytest
from conftest import make_tiny_causal_lm
from transformers import AutoTokenizer

from toolchain.cli import main
from toolchain.export import go_template
from toolchain.export.ollama import (
    CHECK_CONVERSATIONS,
    TOOL_CONVERSATIONS,
    WEATHER_TOOL,
    detect_format,
    render_modelfile,
    same_prompt,
    template_data,
    write_modelfile,
)

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
CONVERSATIONS = [(c, None) for c in CHECK_CONVERSATIONS] + [(c, [WEATHER_TOOL]) for c in TOOL_CONVERSATIONS]
# Qwen3 shows an assistant turn's reasoning after the last user query (Ollama's .Thinking)
THINKING = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the tool.",
        "tool_calls": TOOL_CONVERSATIONS[2][1]["tool_calls"],
    },
    {"role": "tool", "content": "18 degrees, sunny"},
]


def modelfile_parts(text: str) -> tuple[str, str | None]:
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else None
    return template, system


@pytest.fixture(scope="module")
def qwen_models(tiny_dir, tmp_path_factory):
    """Tiny random Qwen2 / Qwen3 decoders carrying the official Qwen2.5 / Qwen3 templates."""
    out = {}
    for model_type, name in (("qwen2", "qwen2.5"), ("qwen3", "qwen3")):
        d = make_tiny_causal_lm(tmp_path_factory.mktemp(name) / "model", tiny_dir, model_type, layers=2)
        tok = AutoTokenizer.from_pretrained(d)
        tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
        tok.save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3"])
def test_qwen_modelfile_renders_the_official_template(name, qwen_models, tmp_path):
    model_dir = qwen_models[name]
    gguf = tmp_path / "model-Q8_0.gguf"
    gguf.write_bytes(b"")
    path, warning = write_modelfile(model_dir, gguf)
    assert warning is None
    template, system = modelfile_parts(path.read_text())
    assert (system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") == (name == "qwen2.5")
    tok = AutoTokenizer.from_pretrained(model_dir)
    cases = CONVERSATIONS + ([(THINKING, [WEATHER_TOOL])] if name == "qwen3" else [])
    assert len(cases) >= 8
    for conv, tools in cases:
        want = tok.apply_chat_template(conv, tools=tools, tokenize=False, add_generation_prompt=True)
        got = go_template.render(template, template_data(conv, system, tools))
        assert same_prompt(want, got, tools is not None), (conv, want, got)
        if tools is None:
            assert want == got  # without tools: character for character
        else:
            assert "<tools>" in got and '"get_weather"' in got
    if name == "qwen2.5":  # no system given: Ollama inserts SYSTEM, the template's default prompt
        got = go_template.render(template, template_data(CHECK_CONVERSATIONS[0], system))
        assert got.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    else:
        got = go_template.render(template, template_data(THINKING, None, [WEATHER_TOOL]))
        assert "<think>\nI should call the tool.\n</think>\n\n<tool_call>" in got


def test_llama31_template_with_tools_and_date(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = (TEMPLATES / "llama3.1.jinja").read_text()
    bos = "<|begin_of_text|>"
    tok.bos_token = bos

    def render_jinja(messages, gen, tools=None):
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)

    text, warning = render_modelfile("m.gguf", tok.chat_template, 8192, render_jinja=render_jinja, bos_text=bos)
    assert warning is None and "llama3.1 chat format" in text and 'PARAMETER stop "<|eom_id|>"' in text
    template, system = modelfile_parts(text)
    assert system is None and detect_format(tok.chat_template).name == "llama3.1"
    for conv, tools in CONVERSATIONS:
        want = render_jinja(conv, True, tools)[len(bos) :]
        got = go_template.render(template, template_data(conv, None, tools))
        assert same_prompt(want, got, tools is not None), (conv, want, got)
        assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in got
    with_tools = go_template.render(template, template_data(TOOL_CONVERSATIONS[2], None, [WEATHER_TOOL]))
    assert "Environment: ipython" in with_tools and "<|start_header_id|>ipython<|end_header_id|>" in with_tools


def test_a_shipped_template_we_do_not_translate_never_fails_the_export(tiny_dir, tmp_path, capsys):
    """Mistral's [INST] template: no translation of ours; the GGUF export still succeeds."""
    model_dir = make_tiny_causal_lm(tmp_path / "mistral-like", tiny_dir, "llama", layers=2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = (TEMPLATES / "mistral.jinja").read_text()
    tok.save_pretrained(model_dir)
    code = main(["export", "gguf", str(model_dir), "--out", str(tmp_path / "export"), "--types", "Q8_0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    warnings = [line for line in (out + err).splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "without TEMPLATE" in warnings[0] and "not one we can translate" in warnings[0]
    text = (tmp_path / "export" / "Modelfile").read_text()
    assert "\nTEMPLATE" not in text and "FROM ./model-Q8_0.gguf" in text
    assert (tmp_path / "export" / "model-Q8_0.gguf").stat().st_size > 0
