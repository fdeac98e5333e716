import pytest

from toolchain.errors import UserError
from toolchain.export.ollama import detect_format, render_modelfile, write_modelfile


def test_modelfile_for_chatml_model(tiny_dir, tmp_path):
    gguf_path = tmp_path / "model-Q8_0.gguf"
    gguf_path.write_bytes(b"")
    path, warning = write_modelfile(tiny_dir, gguf_path)
    text = path.read_text()
    assert warning is None
    assert "FROM ./model-Q8_0.gguf" in text
    assert "<|im_start|>{{ .Role }}" in text and "{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "LICENSE" in text and "ollama create" in text


def test_known_formats_and_refusal():
    assert detect_format("{{ '<|start_header_id|>' }}").name == "llama3"
    assert detect_format("<start_of_turn>user").name == "gemma"
    with pytest.raises(UserError, match="cannot be derived"):
        detect_format(None)
    with pytest.raises(UserError, match="not one we can translate"):
        detect_format("{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}")


def test_generation_defaults_become_parameters():
    text, _ = render_modelfile("m.gguf", "<|im_start|>", 4096, None, {"temperature": 0.2, "top_p": 0.9})
    assert "PARAMETER temperature 0.2" in text and "PARAMETER top_p 0.9" in text
    assert "PARAMETER num_ctx 4096" in text
