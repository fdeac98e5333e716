"""Quantization-aware distillation: the torch rounding is gguf's to the bit, the trained student
exports to exactly the weights it trained with, and what cannot be matched is refused."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from toolchain.config import DataConfig, DistillConfig
from toolchain.errors import UserError
from toolchain.export.gguf import export_gguf
from toolchain.models.load import load_model
from toolchain.quantize.fake_quant import fake_quantize, quantize_values
from toolchain.quantize.qat import check_qat, qat_distill, tensor_types


def _awkward_rows(rng) -> np.ndarray:
    w = (rng.standard_normal((64, 96)) * 0.05).astype(np.float32)
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = w[1, 0]  # every value tied for the largest magnitude
    w[2, :32] = np.linspace(-1, 1, 32)
    w[3, :32] = 0
    w[3, :3] = [127.0, 62.5, -62.5]  # Q8_0 scale 1: exact halves, rounded away from zero
    w[4, :32] = 1e-9  # a scale that underflows fp16
    return w


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("spread", [1e-3, 0.05, 4.0])
def test_fake_quant_is_gguf_rounding_to_the_bit(type_name, spread):
    rng = np.random.default_rng(0)
    w = _awkward_rows(rng) * np.float32(spread / 0.05)
    qtype = gguf.GGMLQuantizationType[type_name]
    stored = dequantize(quantize(w, qtype), qtype)
    ours = quantize_values(torch.from_numpy(w), type_name).numpy()
    assert np.array_equal(ours, stored)
    # on the grid: quantizing the values again stores the same codes
    assert np.array_equal(quantize(ours, qtype), quantize(stored, qtype))
    assert np.array_equal(dequantize(quantize(ours, qtype), qtype), ours)


def test_gradient_passes_straight_through():
    w = torch.randn(8, 64, requires_grad=True)
    g = torch.randn(8, 64)
    (fake_quantize(w, "Q4_0") * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
def test_learned_scales_store_exactly_what_trains(type_name):
    from toolchain.quantize.fake_quant import learned_scale_values, reference_scales
    from toolchain.quantize.gguf_types import quantize_tensor

    rng = np.random.default_rng(1)
    w = torch.from_numpy(_awkward_rows(rng))
    start = reference_scales(w, type_name)
    if type_name == "Q4_0":  # training starts from the reference rounding: the same values but
        # for near-ties (codes are rounded against the fp16 scale the file holds, not the fp32 one)
        plain = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
        ref_scales = reference_scales(plain, "Q4_0")
        diff = (learned_scale_values(plain, ref_scales, "Q4_0") - quantize_values(plain, "Q4_0")).abs()
        step = ref_scales.abs().repeat_interleave(32, dim=-1)
        assert (diff > 0).float().mean() < 1e-3 and bool((diff <= step * 1.001).all())
    scales = start * torch.from_numpy(rng.uniform(0.6, 1.2, start.shape).astype(np.float32))
    values = learned_scale_values(w, scales, type_name).numpy()
    packed, qtype = quantize_tensor(w.numpy(), type_name, scales=scales.numpy())
    assert qtype.name == type_name and np.array_equal(dequantize(packed, qtype), values)


def test_learned_scales_lower_the_rounding_error():
    # only the scales train (Adam on LSQ's gradient), towards the weights they round
    from toolchain.quantize.fake_quant import learned_scale_values, reference_scales

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    reach = torch.nn.Parameter(reference_scales(w, "Q4_0") * 8)
    opt = torch.optim.Adam([reach], lr=2e-4)
    errors = []
    for _ in range(60):
        err = (learned_scale_values(w, reach / 8, "Q4_0") - w).pow(2).mean()
        errors.append(err.item())
        opt.zero_grad()
        err.backward()
        opt.step()
    # Gaussian blocks: a range below the largest weight rounds better (LSQ gets 4% of the 12% a
    # per-block grid search finds: its gradient is an estimate; in QAD the loss is the KL anyway)
    assert errors[-1] < 0.97 * errors[0]


def test_tensor_types_follow_the_gguf_writer(tiny_dir):
    model = load_model(str(tiny_dir)).model
    types = tensor_types(model, "Q4_0", {"token_embd": "Q8_0", "ffn_down": "F16"})
    assert types["model.embed_tokens"] == "Q8_0" and types["lm_head"] == "Q8_0"  # tied: stored once
    assert types["model.layers.0.self_attn.q_proj"] == "Q4_0"
    assert types["model.layers.2.mlp.down_proj"] == "F16"


def test_unmatched_roundings_are_refused(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="'Q5_K_M' has no exact fake-quant"):
        check_qat("Q5_K_M", None)
    with pytest.raises(UserError, match="Q4_1 has no exact fake-quant"):
        check_qat("Q4_0", {"token_embd": "Q4_1"})
    cfg = DistillConfig(steps=1)
    cfg.lora.r = 4
    with pytest.raises(UserError, match="set distill.lora.r to 0"):
        qat_distill(None, tiny_dir, tmp_path / "o", DataConfig(seq_len=32), cfg, tmp_path / "w", "Q4_0")


def _gguf_weights(path) -> dict[str, np.ndarray]:
    from toolchain.models.file_checks import open_gguf

    return {t.name: dequantize(t.data, t.tensor_type).reshape(t.shape[::-1]) for t in open_gguf(path).tensors}


def _torch_weights_as_gguf(model_dir) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from toolchain.models.registry import get_arch

    config = AutoConfig.from_pretrained(model_dir)
    arch = get_arch(config.model_type)
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    return {tmap.get_name(n, try_suffixes=(".weight", ".bias")): d for n, d in arch.gguf_tensors(state, config)}


def _trained_as_gguf(model_dir) -> dict[str, np.ndarray]:
    """A learned-scale student's weights as it trained with them (its rounding, its scales)."""
    from transformers import AutoConfig

    from toolchain.models.registry import get_arch
    from toolchain.quantize.qat import bake, load_scales, trained_rounding

    loaded = load_model(str(model_dir))
    qat = loaded.meta["qat"]
    trained_rounding(qat, load_scales(model_dir, qat)).apply(loaded.model)
    bake(loaded.model)
    config = AutoConfig.from_pretrained(model_dir)
    arch = get_arch(config.model_type)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    state = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    return {tmap.get_name(n, try_suffixes=(".weight", ".bias")): d for n, d in arch.gguf_tensors(state, config)}


@pytest.mark.parametrize(
    ("model", "type_name", "overrides", "learn_scales"),
    [
        ("tiny_dir", "Q4_0", {"token_embd": "Q8_0"}, False),
        ("tiny_dir", "Q8_0", {}, False),
        ("qwen2", "Q4_0", {"^output": "Q8_0"}, False),  # an untied head
        ("gemma3_text", "Q4_0", {}, False),
        # learned scales: llama's rotary rows are permuted for GGUF (the scales' with them), a
        # tied Q8_0 embedding shares one scale tensor with the head, an untied Q8_0 head
        ("tiny_dir", "Q4_0", {"token_embd": "Q8_0"}, True),
        ("qwen2", "Q4_0", {"^output": "Q8_0"}, True),
    ],
)
def test_trained_student_exports_to_exactly_its_weights(
    model, type_name, overrides, learn_scales, request, tmp_path, teacher_dir
):
    from conftest import make_tiny_causal_lm

    if model == "tiny_dir":
        src = request.getfixturevalue("tiny_dir")
    else:
        src = make_tiny_causal_lm(tmp_path / model, teacher_dir, model, layers=2)
    teacher = load_model(str(src))
    cfg = DistillConfig(
        steps=8, batch_size=2, lr=2e-4, warmup_steps=1, alpha=0.0, temperature=1.0, eval_every=0, divergence_ratio=0
    )
    out = tmp_path / "qat"
    data = DataConfig(seq_len=32, eval_sequences=4)
    res = qat_distill(
        teacher, src, out, data, cfg, tmp_path / "w", type_name, overrides, progress=False, learn_scales=learn_scales
    )
    if type_name == "Q4_0":  # (Q8_0's rounding costs too little KL on a tiny model to win back)
        # held-out KL to the unrounded teacher: rounding costs some, training through it wins part back
        assert res["after"]["kl"] < res["before"]["kl"]
    expected = {"type": type_name, "overrides": overrides, "steps": 8, "activations": True}
    if learn_scales:
        expected["scales"] = "qat/scales.safetensors"
    assert {k: v for k, v in load_model(str(out)).meta["qat"].items() if k != "scale_start"} == expected

    (rec,) = export_gguf(out, tmp_path / "export", [type_name], overrides=overrides)
    stored = _gguf_weights(rec["path"])
    trained = _trained_as_gguf(out) if learn_scales else _torch_weights_as_gguf(out)
    assert set(stored) == set(trained)
    quantized = [n for n in stored if n.endswith(".weight") and trained[n].ndim == 2]
    assert quantized
    for name in quantized:
        assert np.array_equal(stored[name], trained[name].astype(np.float32)), name
    if learn_scales:
        _check_learned_scales(out, rec["path"], stored, quantized, tied=model == "tiny_dir")
        # verify's reference is torch running the trained rounding with the learned scales
        from toolchain.config import VerifyConfig
        from toolchain.verify.exports import verify_exports

        (checked,) = verify_exports(out, [rec], VerifyConfig(max_nmse={"default": 2e-3}))
        assert checked["passed"] and checked["nmse_max"] < 2e-3 and "rounded as trained" in checked["reference"]
        with pytest.raises(UserError, match="same overrides"):
            export_gguf(out, tmp_path / "other", [type_name], overrides={})


def _check_learned_scales(out, path, stored, quantized, tied: bool) -> None:
    """The scales trained (no matrix is the reference rounding of its latent weights) and a tied
    head's are its embedding's, saved once."""
    from toolchain.models.file_checks import open_gguf
    from toolchain.quantize.qat import load_scales

    qat = load_model(str(out)).meta["qat"]
    # the scales started from the rounding the student measured closer to itself
    kl = qat["scale_start"]["kl"]
    assert set(kl) == {"reference", "imatrix"} and qat["scale_start"]["chosen"] == min(kl, key=kl.get)
    scales = load_scales(out, qat)
    assert "model.embed_tokens.weight" in scales and ("lm_head.weight" in scales) is not tied
    latent = _torch_weights_as_gguf(out)
    for t in open_gguf(path).tensors:
        if t.name in quantized:
            reference = quantize_values(torch.from_numpy(latent[t.name].astype(np.float32)), t.tensor_type.name)
            assert not np.array_equal(stored[t.name], reference.numpy()), t.name


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K_M"])
def test_cli_quantize_then_export_records_it(type_name, tiny_dir, tmp_path, capsys):
    from toolchain.cli import main
    from toolchain.models.file_checks import open_gguf

    out = tmp_path / "qat"
    args = ["--teacher", str(tiny_dir), "--student", str(tiny_dir), "--out", str(out), "--no-progress"]
    sets = ["data.seq_len=32", "data.eval_sequences=4", "distill.batch_size=2", "distill.eval_every=0"]
    if type_name == "Q8_0":  # weight rounding only, for a backend that multiplies in float
        sets.append("quantize.round_activations=false")
    code = main(["quantize", *args, "--type", type_name, "--steps", "2", *(x for s in sets for x in ("--set", s))])
    assert code == 0 and "then: toolchain export gguf" in capsys.readouterr().out
    assert load_model(str(out)).meta["qat"]["activations"] is (type_name != "Q8_0")
    export = ["export", "gguf", str(out), "--out", str(tmp_path / "g"), "--types", type_name, "--no-modelfile"]
    assert main(export) == 0
    written = open_gguf(tmp_path / "g" / f"model-{type_name}.gguf")
    assert written.fields["toolchain.qat.type"].contents() == type_name
    if type_name == "Q4_K_M":  # 64-wide rows: llama.cpp's fallbacks for Q4_K and Q6_K, as trained
        trained = load_model(str(out)).meta["qat"]["tensors"]
        assert {t.name: t.tensor_type.name for t in written.tensors if len(t.shape) >= 2} == trained
        assert set(trained.values()) == {"Q5_0", "Q8_0"}


def test_cli_refuses_an_override_it_cannot_round(tiny_dir, tmp_path, capsys):
    from toolchain.cli import main

    args = ["--teacher", str(tiny_dir), "--student", str(tiny_dir), "--out", str(tmp_path / "q"), "--type", "Q4_0"]
    assert main(["quantize", *args, "--override", "token_embd=Q4_1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Q4_1, which has no exact training rounding" in err


def test_pipeline_config_names_the_file_it_trains_for():
    from toolchain.config import load_config

    with pytest.raises(UserError, match="quantize.qat: Q4_0 is not among export.gguf"):
        load_config(None, ["quantize.qat=Q4_0", "export.gguf=[F16,Q8_0]"])
    cfg = load_config(None, ["quantize.qat=Q4_0", "export.gguf=[F16,Q4_0]"])
    assert cfg.quantize.qat == "Q4_0"
    with pytest.raises(UserError, match="include int4"):
        load_config(None, ["quantize.qat=int4", "export.onnx_precisions=[fp32,int8]"])
    assert load_config(None, ["quantize.qat=int4", "export.onnx_precisions=[fp32,int4]"]).quantize.qat == "int4"
    assert load_config(None, ["quantize.qat=Q4_K_M", "export.gguf=[F16,Q4_K_M]"]).quantize.qat == "Q4_K_M"


def test_int4_grid_in_torch_is_the_exports_to_the_bit():
    from toolchain.quantize.fake_quant import int4_grid
    from toolchain.quantize.onnx_offsets import minmax_blocks

    rng = np.random.default_rng(1)
    w = _awkward_rows(rng)  # [64, 96]: torch rows of 3 blocks; ONNX holds it as [K, N] = w.T
    codes, scale, offset = (t.numpy() for t in int4_grid(torch.from_numpy(w).reshape(-1, 32)))
    c2, s2, o2 = minmax_blocks(np.ascontiguousarray(w.T), 4, 32)  # [N, blocks, 32], [N, blocks]
    assert np.array_equal(codes.reshape(64, 3, 32).astype(np.uint8), c2)
    assert np.array_equal(scale.reshape(64, 3), s2) and np.array_equal(offset.reshape(64, 3), o2)


def test_int4_student_exports_the_codes_it_trained_with(tiny_dir, tmp_path):
    import onnx
    from onnx import numpy_helper

    from toolchain.export.onnx import export_onnx, precision_dir
    from toolchain.quantize.fake_quant import int4_grid

    teacher = load_model(str(tiny_dir))
    cfg = DistillConfig(
        steps=8, batch_size=2, lr=1e-4, warmup_steps=1, alpha=0.0, temperature=1.0, eval_every=0, divergence_ratio=0
    )
    data = DataConfig(seq_len=32, eval_sequences=4)
    res = qat_distill(teacher, tiny_dir, tmp_path / "s", data, cfg, tmp_path / "w", "int4", progress=False)
    assert res["after"]["kl"] < res["before"]["kl"]
    student = load_model(str(tmp_path / "s")).model
    trained = {}  # scale bytes -> (codes, scale, offset) of each matrix the student trained through
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            c, s, o = (t.numpy() for t in int4_grid(module.weight.detach().reshape(-1, 32)))
            rows = module.weight.shape[0]
            trained[s.tobytes()] = (c.reshape(rows, -1, 32), s.reshape(rows, -1), o.reshape(rows, -1))
    export_onnx(tmp_path / "s", tmp_path / "onnx", ["fp32", "int4"])
    graph = onnx.load(str(precision_dir(tmp_path / "onnx", "int4") / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    four_bit = [n for n in graph.node if n.op_type == "MatMulNBits" and {a.name: a.i for a in n.attribute}["bits"] == 4]
    assert len(four_bit) == len(trained) == 7 * 4
    for node in four_bit:
        packed, scale = inits[node.input[1]], inits[node.input[2]]
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
        c, s, _ = trained[scale.astype(np.float32).tobytes()]  # KeyError: a scale the student never had
        # the MatMulNBits block is the trained one; the offsets' small product then runs in 8 bits
        assert np.array_equal(codes.reshape(c.shape), c) and np.array_equal(scale.reshape(s.shape), s)


def test_symmetric_int4_in_torch_is_the_exports_to_the_bit():
    from toolchain.quantize.fake_quant import quantize_values
    from toolchain.quantize.onnx_offsets import dequantize, symmetric_blocks

    w = _awkward_rows(np.random.default_rng(2))  # [64, 96]
    ours = quantize_values(torch.from_numpy(w), "int4_sym").numpy()
    codes, scale, offset = symmetric_blocks(np.ascontiguousarray(w.T), 4, 32)
    assert np.array_equal(ours, dequantize(codes, scale, offset, 4, 96).T)


def test_int4_student_with_large_inputs_trains_and_exports_the_symmetric_grid(tiny_dir, tmp_path):
    import json

    import onnx
    from onnx import numpy_helper

    from tests.quantize.test_onnx_grid import _large_input_channel
    from toolchain.export.onnx import export_onnx, precision_dir
    from toolchain.models.load import save_model
    from toolchain.quantize.fake_quant import quantize_values
    from toolchain.quantize.onnx_offsets import symmetric_blocks

    src = load_model(str(tiny_dir))
    _large_input_channel(src.model)
    save_model(src.model, src.tokenizer, tmp_path / "src", dict(src.meta))
    cfg = DistillConfig(
        steps=4, batch_size=2, lr=1e-4, warmup_steps=1, alpha=0.0, temperature=1.0, eval_every=0, divergence_ratio=0
    )
    data = DataConfig(seq_len=32, eval_sequences=4)
    teacher = load_model(str(tmp_path / "src"))
    res = qat_distill(teacher, tmp_path / "src", tmp_path / "s", data, cfg, tmp_path / "w", "int4", progress=False)
    student = load_model(str(tmp_path / "s"))
    assert student.meta["qat"]["grid"] == "symmetric"
    assert res["before"]["kl"] < 0.1  # (the fitted grid costs this model 0.35: test_onnx_grid)
    export_onnx(tmp_path / "s", tmp_path / "onnx", ["fp32", "int4"])
    int4 = precision_dir(tmp_path / "onnx", "int4")
    assert json.loads((int4 / "model_info.json").read_text())["qat_grid"] == "symmetric"
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int4 / "model.onnx")).graph.initializer}
    scales = {inits[k].astype(np.float32).tobytes(): k for k in inits if k.endswith("_Q4o_scales")}
    for name, module in student.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            w = module.weight.detach().numpy()
            codes, scale, _ = symmetric_blocks(np.ascontiguousarray(w.T), 4, 32)
            packed = inits[scales[scale.tobytes()].removesuffix("_scales")]  # KeyError: a scale never trained
            stored = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(codes.shape)
            assert np.array_equal(stored, codes)
            # and those codes are the values the student trained through
            trained = quantize_values(module.weight.detach(), "int4_sym").numpy()
            assert np.array_equal(trained, ((codes.astype(np.float32) - 8) * scale[..., None]).reshape(w.shape[0], -1))


def test_k_quant_student_trains_through_llamacpps_mix_and_exports_its_codes(teacher_dir, tmp_path):
    """Q4_K_M: llama.cpp's per-tensor mix for the model, our K-quant rounding in torch, and a
    file whose every matrix is that rounding of the student's weights, which llama.cpp runs."""
    from conftest import make_tiny_llama

    from toolchain.config import VerifyConfig
    from toolchain.export.gguf import qat_tensor_types
    from toolchain.models.file_checks import open_gguf
    from toolchain.verify.exports import verify_exports

    src = make_tiny_llama(tmp_path / "wide", teacher_dir, layers=2, hidden=256)  # rows split into 256
    mix = qat_tensor_types(src, "Q4_K_M", None)
    assert {"Q4_K", "Q6_K"} <= set(mix.values())  # attn_v / ffn_down / the tied embedding at Q6_K
    teacher = load_model(str(src))
    cfg = DistillConfig(
        steps=8, batch_size=2, lr=2e-4, warmup_steps=1, alpha=0.0, temperature=1.0, eval_every=0, divergence_ratio=0
    )
    out = tmp_path / "qat"
    data = DataConfig(seq_len=32, eval_sequences=4)
    res = qat_distill(teacher, src, out, data, cfg, tmp_path / "w", "Q4_K_M", progress=False, gguf_types=mix)
    assert res["after"]["kl"] < res["before"]["kl"]
    assert load_model(str(out)).meta["qat"]["tensors"] == mix

    (rec,) = export_gguf(out, tmp_path / "export", ["Q4_K_M"])
    reader = open_gguf(rec["path"])
    assert {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2} == mix
    assert reader.fields["toolchain.qat.type"].contents() == "Q4_K_M"
    stored, latent = _gguf_weights(rec["path"]), _torch_weights_as_gguf(out)
    for name, t in mix.items():
        trained = quantize_values(torch.from_numpy(latent[name].astype(np.float32)), t).numpy()
        assert np.array_equal(stored[name], trained), name
    # verify compares the file with torch running the trained rounding: llama.cpp runs exactly
    # those weights, so only its activation rounding differs (vs the latent weights: NMSE ~0.1)
    (checked,) = verify_exports(out, [rec], VerifyConfig(max_nmse={"default": 2e-3}))
    assert checked["passed"] and checked["tokenizer_parity"] == 1.0
    assert checked["nmse_max"] < 2e-3 and "rounded as trained" in checked["reference"]


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_k_quant_rounding_is_the_files_to_the_bit(type_name):
    from toolchain.quantize.gguf_types import quantize_tensor

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 512)) * rng.uniform(1e-3, 2.0, (16, 1))).astype(np.float32)
    w[0, :256] = 0  # an all-zero super-block
    w[1, :256] = np.abs(w[1, :256])  # no negative value: Q4_K's min offset is 0
    w[2, :256] = -np.abs(w[2, :256])
    w[3, 5] = 40.0  # one outlier
    data, qtype = quantize_tensor(w, "F16", type_name)
    assert qtype.name == type_name
    assert np.array_equal(dequantize(data, qtype), quantize_values(torch.from_numpy(w), type_name).numpy())
    rel = np.mean((dequantize(data, qtype) - w) ** 2) / np.mean(w**2)
    assert rel < (0.01 if type_name == "Q4_K" else 0.001)


def test_activation_rounding_is_llamacpps_8bit_blocks_with_a_straight_gradient():
    from toolchain.quantize.fake_quant import activation_values, round_activations

    x = torch.randn(3, 5, 256) * 2
    x[0, 0, :32] *= 40  # an outlier block: its step is coarser than its neighbours'
    # Q8_0 blocks of 32 (the partner of Q4_0/Q5_0/Q8_0 weights), as gguf's reference rounds them
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    flat = x.reshape(-1, 256).numpy()
    assert np.array_equal(activation_values(x, 32).reshape(-1, 256).numpy(), dequantize(quantize(flat, q8_0), q8_0))
    # Q8_K super-blocks of 256 (the K-quants' partner): 8-bit codes under one fp32 scale
    k = activation_values(x, 256)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(k / step, torch.round(k / step), atol=1e-4) and (k - x).abs().max() <= step.max() / 2 + 1e-6
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)
    (round_activations(xg, 32) * g).sum().backward()
    assert torch.equal(xg.grad, g)


def test_qad_rounds_matmul_inputs_while_training_and_not_after(tiny_dir):
    from toolchain.quantize.qat import QuantAware

    model = load_model(str(tiny_dir)).model
    ids = torch.randint(100, 2000, (1, 12))
    transform = QuantAware("Q8_0")
    transform.apply(model)
    with torch.no_grad():
        during = model(ids).logits
    assert transform.meta["qat"]["activations"] is True and transform._hooks
    transform.finish(model)
    with torch.no_grad():
        after = model(ids).logits  # baked Q8_0 weights, inputs as they come
    plain = QuantAware("Q8_0", activations=False)
    plain.apply(model)
    with torch.no_grad():
        weights_only = model(ids).logits
    plain.finish(model)
    assert torch.equal(after, weights_only) and not torch.equal(during, after)


def test_learned_scales_can_start_from_the_importance_weighted_search(tiny_dir):
    from toolchain.quantize.imatrix import collect
    from toolchain.quantize.qat import QuantAware, bake, learned_scales

    rows = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    importance = collect(tiny_dir, rows)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4)
    errors = {}
    for start, imp in (("reference", {}), ("searched", importance)):
        model = load_model(str(tiny_dir)).model
        latent = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("proj")}
        rounding = QuantAware("Q4_0", learn_scales=True, importance=imp)
        rounding.apply(model)
        assert set(latent) <= {n.removesuffix(".weight") for n in learned_scales(model)}
        bake(model)
        modules = dict(model.named_modules())
        errors[start] = sum(
            float(
                (
                    (modules[n].weight - w).pow(2)
                    * torch.from_numpy(importance[tmap.get_name(f"{n}.weight", try_suffixes=(".weight",))])
                ).sum()
            )
            for n, w in latent.items()
        )
    # the search minimises the importance-weighted rounding error: it starts lower
    assert errors["searched"] < 0.95 * errors["reference"]
