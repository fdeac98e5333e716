import pytest
import torch

from toolchain.config import from_dict
from toolchain.errors import UserError
from toolchain.models.load import load_model, load_teacher, teacher_from_config

X = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(X).logits.float()


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return _logits(load_model(str(tiny_dir)))


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    # init_lora_weights=False: B is random too, so the adapter visibly changes the logits
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft.save_pretrained(out)
    return out


@pytest.mark.parametrize("quantize, min_cos", [("8bit", 0.995), ("4bit", 0.9)])
def test_quantized_teacher_gives_finite_logits_close_to_fp32(tiny_dir, ref, quantize, min_cos):
    import bitsandbytes as bnb

    t = load_teacher(str(tiny_dir), quantize=quantize)
    kind = bnb.nn.Linear8bitLt if quantize == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, kind) for m in t.model.modules())  # really quantized, not silently fp32
    y = _logits(t)
    assert torch.isfinite(y).all()
    cos = _cos(y, ref)
    assert min_cos < cos < 1.0 - 1e-7, cos  # close, and not identical (the weights were rounded)
    assert t.meta["variant"]["quantize"] == quantize


def test_adapter_attached_equals_merged(tiny_dir, ref, adapter):
    from peft import PeftModel

    merged = load_teacher(str(tiny_dir), adapter=str(adapter), adapter_mode="merge")
    attached = load_teacher(str(tiny_dir), adapter=str(adapter), adapter_mode="attach")
    assert isinstance(attached.model, PeftModel) and not isinstance(merged.model, PeftModel)
    a, m = _logits(attached), _logits(merged)
    assert (a - ref).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(a, m, atol=1e-4, rtol=1e-4)


def test_4bit_teacher_with_attached_adapter(tiny_dir, ref, adapter):
    t = load_teacher(str(tiny_dir), adapter=str(adapter), quantize="4bit", adapter_mode="attach")
    y = _logits(t)
    assert torch.isfinite(y).all() and t.meta["adapter"] == adapter.name and len(t.meta["adapter_sha256"]) == 64
    with pytest.raises(UserError, match="cannot be merged into a 4bit teacher"):
        load_teacher(str(tiny_dir), adapter=str(adapter), quantize="4bit", adapter_mode="merge")


def test_teacher_config_fields(tiny_dir):
    cfg = from_dict({"teacher": {"model": str(tiny_dir), "quantize": "8bit"}})
    assert teacher_from_config(cfg.teacher).meta["variant"] == {
        "dtype": "float32",
        "quantize": "8bit",
        "adapter_mode": None,
    }
    with pytest.raises(UserError, match="teacher.quantize: '3bit' is not one of none, 8bit, 4bit"):
        from_dict({"teacher": {"quantize": "3bit"}})
    with pytest.raises(UserError, match="teacher.adapter_mode: merge would round"):
        from_dict({"teacher": {"adapter": "x", "quantize": "4bit"}})
    with pytest.raises(UserError, match="adapter_mode must be one of"):
        load_teacher(str(tiny_dir), adapter_mode="fuse")
