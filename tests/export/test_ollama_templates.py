"""Ollama TEMPLATEs render the very prompt the model's Jinja chat template renders."""

import jinja2
import pytest
from conftest import GEMMA_CHAT_TEMPLATE
from jinja2.sandbox import ImmutableSandboxedEnvironment

from toolchain.export import go_template
from toolchain.export.chat_formats import CHATML, GEMMA, LLAMA3, default_system, detect_format
from toolchain.export.ollama import (
    CHECK_CONVERSATIONS,
    check_translation,
    ollama_messages,
    render_modelfile,
    write_modelfile,
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def jinja(template: str, bos: str):
    """Render as transformers' apply_chat_template does (sandboxed jinja2, trim/lstrip blocks)."""

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    t = env.from_string(template)
    return lambda messages, gen, tools=None: t.render(
        messages=messages, add_generation_prompt=gen, bos_token=bos, eos_token="", tools=tools
    )


CASES = [
    (CHATML, SMOLLM2_TEMPLATE, None),
    (LLAMA3, LLAMA3_TEMPLATE, "<|begin_of_text|>"),
    (GEMMA, GEMMA_CHAT_TEMPLATE, "<bos>"),
]


@pytest.mark.parametrize("fmt,template,bos", CASES, ids=[c[0].name for c in CASES])
@pytest.mark.parametrize("conv", range(len(CHECK_CONVERSATIONS)))
def test_go_template_renders_the_jinja_prompt(fmt, template, bos, conv):
    assert detect_format(template) is fmt
    messages = CHECK_CONVERSATIONS[conv]
    system = default_system(fmt, template)
    render = jinja(template, bos or "")
    want = render(messages, True)
    want = want[len(bos) :] if bos else want  # llama.cpp adds BOS itself (add_bos in the GGUF)
    got = go_template.render(fmt.go_template, {"Messages": ollama_messages(messages, system)})
    assert got == want
    # without the generation prompt, Jinja's text is the start of what Ollama sends
    closed = render(messages + [{"role": "assistant", "content": "Ok."}], False)
    closed = closed[len(bos) :] if bos else closed
    assert closed.startswith(got[: got.rfind("\n", 0, len(got) - 1) + 1][:20])
    assert ("You are a helpful AI assistant named SmolLM" in got) == (fmt is CHATML and conv in (0, 2))


def test_lookalike_template_is_refused():
    # ChatML markers, but every turn carries a name line: our translation would drop it
    odd = SMOLLM2_TEMPLATE.replace("+ message['role'] + '\n'", "+ message['role'] + '\nname: x\n'")
    reason = check_translation(CHATML, jinja(odd, ""), default_system(CHATML, odd), None)
    assert reason and "renders a conversation differently" in reason and "name: x" in reason
    dated = LLAMA3_TEMPLATE.replace(
        "{% for message", "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday' }}{% for message"
    )
    text, warning = render_modelfile(
        "m.gguf", dated, 4096, render_jinja=jinja(dated, "<|begin_of_text|>"), bos_text="<|begin_of_text|>"
    )
    assert "\nTEMPLATE" not in text and "FROM ./m.gguf" in text and "renders a conversation differently" in warning


def test_modelfile_for_gemma_and_for_a_base_model(tiny_gemma_dir, tmp_path):
    gguf_path = tmp_path / "model-Q8_0.gguf"
    gguf_path.write_bytes(b"")
    path, warning = write_modelfile(tiny_gemma_dir, gguf_path)
    text = path.read_text()
    assert warning is None
    assert "<start_of_turn>" in text and "<bos>" not in text.split("TEMPLATE")[1].split('"""')[1]
    assert 'PARAMETER stop "<end_of_turn>"' in text and 'PARAMETER stop "<eos>"' in text
    assert 'LICENSE """gemma"""' in text and "ollama create NAME -f Modelfile" in text
    base, _ = render_modelfile("m.gguf", None, 32768)
    assert 'TEMPLATE """{{ .Prompt }}"""' in base and "SYSTEM" not in base


def test_go_subset_refuses_what_it_cannot_render():
    with pytest.raises(ValueError):
        go_template.render("{{ range .Messages }}{{ .Content | upper }}{{ end }}", {"Messages": [{"Content": "x"}]})
    with pytest.raises(ValueError, match="missing"):
        go_template.render("{{ if .X }}open", {"X": 1})
    assert (
        go_template.render(
            '{{- $a := "" }}{{ range $i, $m := .L }}{{ if eq $i 0 }}{{ $a = $m }}{{ end }}{{ end }}[{{ $a }}]',
            {"L": ["p", "q"]},
        )
        == "[p]"
    )
