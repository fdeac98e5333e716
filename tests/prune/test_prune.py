"""Width and depth pruning on tiny random models of every supported family: the result loads
as a standard config, computes exactly what the kept structures computed, and exports."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_tiny_causal_lm
from toolchain.config import from_dict
from toolchain.config.prune import PruneAgain, PruneConfig
from toolchain.errors import UserError
from toolchain.models.load import load_model
from toolchain.prune import Shape, prune_model, prune_student
from toolchain.prune.axes import head_dim

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3_text"]


def _calib(n: int = 4, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(100, 5000, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, teacher_dir):
    root = tmp_path_factory.mktemp("prune-tiny")
    return {mt: make_tiny_causal_lm(root / mt, teacher_dir, mt, layers=3) for mt in FAMILIES}


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])  # qwen2: heads set its width
def test_pruned_heads_and_neurons_compute_what_they_computed(tiny_models, model_type):
    """Cutting query heads (inside their KV groups) and MLP neurons equals zeroing what they
    write in the unpruned model: so no head was moved to another KV group's keys."""
    model = load_model(str(tiny_models[model_type])).model
    shape = Shape(3, 64, 80, 2, 1)  # 4 heads / 2 KV -> 2 heads in 1 KV group
    pruned, record = prune_model(model, _calib(), shape, "activation")

    masked = load_model(str(tiny_models[model_type])).model
    hd = head_dim(masked.config)
    with torch.no_grad():
        for i, (layer, p_layer) in enumerate(zip(masked.model.layers, pruned.model.layers)):
            o = layer.self_attn.o_proj.weight
            p_o = p_layer.self_attn.o_proj.weight
            kept_cols = [c for c in range(o.shape[1]) if any(torch.equal(o[:, c], col) for col in p_o.T)]
            assert len(kept_cols) == 2 * hd  # two whole heads
            heads = sorted({c // hd for c in kept_cols})
            assert {h // 2 for h in heads} == set(record["kept_kv_heads"][i])  # both in the one kept KV group
            drop = torch.ones(o.shape[1], dtype=torch.bool)
            drop[kept_cols] = False
            o[:, drop] = 0
            d = layer.mlp.down_proj.weight
            p_d = p_layer.mlp.down_proj.weight
            keep_n = [c for c in range(d.shape[1]) if any(torch.equal(d[:, c], col) for col in p_d.T)]
            assert len(keep_n) == 80
            dropn = torch.ones(d.shape[1], dtype=torch.bool)
            dropn[keep_n] = False
            d[:, dropn] = 0
    x = _calib(2, 16, seed=1)
    torch.testing.assert_close(pruned(x).logits, masked(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruned_model_loads_and_exports_to_gguf_and_onnx(tiny_models, model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    from toolchain.config import VerifyConfig
    from toolchain.export.gguf import write_gguf
    from toolchain.export.onnx import export_onnx
    from toolchain.verify.gguf import verify_gguf
    from toolchain.verify.onnx import verify_onnx

    width = 32 if model_type == "qwen2" else 48  # llama.cpp's qwen2 graph: width = heads * head_dim
    cfg = PruneConfig(enabled=True, layers=2, hidden_size=width, intermediate_size=96, num_attention_heads=2,
                      num_key_value_heads=1)  # fmt: skip
    out = tmp_path / "pruned"
    rec = prune_student(tiny_models[model_type], out, cfg, _calib(), tmp_path / "work")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    c = loaded.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (2, width, 96)
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    meta = json.loads((out / "toolchain.json").read_text())
    assert rec["params"] < rec["params_before"] and len(meta["kept_layers"]) == 2

    v = VerifyConfig()
    gguf_path = write_gguf(out, tmp_path / "model-F16.gguf", "F16")
    g = verify_gguf(out, gguf_path, "F16", v.prompts, 8, v.max_nmse, v.min_greedy_agreement)
    assert g["nmse_max"] <= 1e-4 and g["greedy_agreement"] == 1.0
    export_onnx(out, tmp_path / "onnx", ["fp32"])
    o = verify_onnx(out, tmp_path / "onnx", v.prompts[:2], greedy_tokens=8, threads=1)
    assert o["passed"] and o["max_abs_diff"] < 1e-3


def test_importance_rules_and_budget_search(tiny_models, tmp_path):
    src = tiny_models["llama"]
    full = load_model(str(src)).model
    total = sum(p.numel() for p in full.parameters())
    for rule in ("taylor", "random"):
        cfg = PruneConfig(enabled=True, hidden_size=32, importance=rule)
        rec = prune_student(src, tmp_path / rule, cfg, _calib(), tmp_path / f"work-{rule}")
        assert rec["shape"]["hidden_size"] == 32 and rec["heldout_kl"] > 0
    cfg = PruneConfig(enabled=True, params=0.8, align=8)
    rec = prune_student(src, tmp_path / "budget", cfg, _calib(8), tmp_path / "work-b")
    assert rec["params"] <= 0.8 * total and len(rec["candidates"]) >= 2
    assert rec["heldout_kl"] == min(c["kl"] for c in rec["candidates"])


def test_rounds_heal_in_between(tiny_models, tmp_path):
    healed = []

    def heal(src, out, steps):  # a real copy, standing in for distillation's output directory
        import shutil

        healed.append((src.name, steps))
        shutil.copytree(src, out)

    cfg = PruneConfig(enabled=True, hidden_size=32, intermediate_size=64, rounds=2, heal_steps=3)
    rec = prune_student(tiny_models["llama"], tmp_path / "out", cfg, _calib(), tmp_path / "work", heal=heal)
    assert healed == [("round-1", 3)]
    assert [r["shape"]["hidden_size"] for r in rec["rounds"]] == [40, 32]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (Shape(3, 64, 128, 3, 2), "not a multiple"),
        (Shape(3, 64, 128, 4, 1), "cannot move to another KV group"),
        (Shape(3, 80, 128, 4, 2), "between 1 and the model's 64"),
    ],
)
def test_shapes_that_cannot_be_cut_are_refused(tiny_models, shape, message):
    model = load_model(str(tiny_models["llama"])).model
    with pytest.raises(UserError, match=message):
        prune_model(model, _calib(), shape)


def test_qwen2_width_follows_its_heads(tiny_models):
    model = load_model(str(tiny_models["qwen2"])).model
    with pytest.raises(UserError, match="hidden_size == num_attention_heads"):
        prune_model(model, _calib(), Shape(3, 48, 128, 4, 2))


def test_budget_below_every_candidate_and_unknown_arch(tiny_models, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no candidate shape fits"):
        prune_student(tiny_models["llama"], tmp_path / "o", PruneConfig(enabled=True, params="1K"), _calib(), tmp_path)
    import dataclasses

    from toolchain.models import llama
    from toolchain.prune import cut

    monkeypatch.setattr(cut, "get_arch", lambda _t: dataclasses.replace(llama.ARCH, block_norms=()))
    model = load_model(str(tiny_models["llama"])).model
    with pytest.raises(UserError, match="no pruning rule"):
        prune_model(model, _calib(), Shape(3, 32, 128, 4, 2))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"params": "40M", "hidden_size": 32}, "a budget"),
        ({"params": "lots"}, "count like 40M"),
        ({"importance": "magnitude"}, "importance"),
        ({}, "needs a goal"),
        ({"target": "no-such-target"}, "no-such-target"),
        ({"target": "phone-low", "quant": "Q3"}, "quant"),
        ({"num_attention_heads": 3, "num_key_value_heads": 2}, "not a multiple"),
        ({"layers": 3, "again": PruneAgain()}, "prune.again needs a goal"),
        ({"layers": 3, "again": PruneAgain(params="40M", hidden_size=32)}, "prune.again: a budget"),
        ({"layers": 3, "again": PruneAgain(hidden_size=32, steps=0)}, "prune.again.steps"),
        ({"layers": 3, "again": PruneAgain(num_attention_heads=3, num_key_value_heads=2)}, "not a multiple"),
    ],
)
def test_prune_config_errors(fields, message):
    with pytest.raises(UserError, match=message):
        PruneConfig(enabled=True, **fields).validate("prune")


def test_prune_again_is_a_typed_section_of_its_own():
    cfg = from_dict({"prune": {"enabled": True, "layers": 3}}, ["prune.again.params=0.7", "prune.again.steps=50"])
    second = cfg.prune.second_cut()
    assert cfg.prune.again == PruneAgain(params=0.7, steps=50)
    assert second is not None and second.params == 0.7 and second.layers is None and second.again is None
    with pytest.raises(UserError, match="prune.again.hiden_size"):
        from_dict({}, ["prune.again.hiden_size=32"])


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_norm_rescale_makes_dropping_silent_channels_exact(tiny_models, model_type):
    """Channels the residual stream never uses (zero in the embeddings and in every write to the
    stream) change nothing when dropped, once the norms are rescaled to the fewer channels they
    average over (and Gemma's sqrt(width) embedding scale is restored); without it they do."""
    from toolchain.models.registry import get_arch

    model = load_model(str(tiny_models[model_type])).model
    arch = get_arch(model.config.model_type)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 48:] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[48:] = 0
            layer.mlp.down_proj.weight[48:] = 0
    shape = Shape(3, 48, 128, 4, 2)
    x = _calib(2, 16, seed=1)
    with torch.no_grad():
        want = model(x).logits
        exact, rec = prune_model(model, _calib(), shape, "activation")
        plain, _ = prune_model(model, _calib(), shape, "activation", rescale_norms=False)
        assert rec["rescale"]["embed_factor"] == (
            pytest.approx((64 / 48) ** 0.5) if arch.embed_scale_follows_width else 1.0
        )
        torch.testing.assert_close(exact(x).logits, want, atol=2e-3, rtol=1e-3)
        assert (plain(x).logits - want).abs().max() > 1e-2


def test_budget_candidates_also_keep_width_and_pay_with_the_mlp():
    from transformers import LlamaConfig

    from toolchain.prune.axes import params_of
    from toolchain.prune.budget import candidate_shapes

    # SmolLM2-135M's shape: 9 heads over 3 KV heads make most narrower widths drop heads
    config = LlamaConfig(
        vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    limit = 0.5 * params_of(config, Shape.of(config))
    shapes = candidate_shapes(config, lambda s: params_of(config, s) <= limit, True, 32)
    assert all(params_of(config, s) <= limit for s in shapes) and len(set(shapes)) == len(shapes)
    # every head and the whole width kept at some depth, the MLP narrowed to fit
    full_width = [s for s in shapes if s.hidden_size == 576 and s.num_attention_heads == 9]
    assert full_width and all(s.intermediate_size < 1536 for s in full_width)
    # a width between, at the most heads it accepts (6 of 9: 480 is no multiple of 9)
    assert any(s.hidden_size == 480 and s.num_attention_heads == 6 for s in shapes)
    for s in full_width:  # the widest MLP: one more step of 32 would not fit
        assert params_of(config, Shape(**{**vars(s), "intermediate_size": s.intermediate_size + 32})) > limit
