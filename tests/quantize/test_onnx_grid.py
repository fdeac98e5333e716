"""The int4 export's grid is measured on the model: fitted offsets where the weights sit on an
offset grid, symmetric where a fitted grid would move small weights that large inputs multiply."""

import numpy as np
import torch

from toolchain.quantize.onnx_grid import choose_int4_grid, grid_errors


def _blocks_on_an_offset_grid(model) -> None:
    """Every block matrix as a Q4_1 file stores it: min + d * q, codes 0..15."""
    g = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."):
            out, k = m.weight.shape
            q = torch.randint(0, 16, (out, k // 32, 32), generator=g).float()
            q[..., 0], q[..., 1] = 0, 15
            d = torch.rand(out, k // 32, 1, generator=g) * 0.01 + 0.002
            lo = torch.randn(out, k // 32, 1, generator=g) * 0.02
            m.weight.data = (lo + d * q).reshape(out, k)


def _large_input_channel(model) -> None:
    """One hidden channel 100x larger at every block's inputs, its weights small, as distilled
    students have them."""
    for name, m in model.named_modules():
        if name.endswith("input_layernorm") or name.endswith("post_attention_layernorm"):
            m.weight.data[3] = 100.0
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.") and m.weight.shape[1] == 64:
            m.weight.data[:, 3] *= 0.01


def test_weights_on_an_offset_grid_keep_the_fit(tiny_dir):
    from toolchain.models.load import load_model

    model = load_model(str(tiny_dir)).model
    _blocks_on_an_offset_grid(model)
    rows = torch.randint(10, 2000, (2, 32), generator=torch.Generator().manual_seed(1))
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    choice = choose_int4_grid(model, rows)
    assert choice["grid"] == "fit" and choice["kl"]["fit"] < 1e-6 < choice["kl"]["symmetric"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # the model is given back as it was


def test_a_large_input_channel_picks_the_symmetric_grid(tiny_dir):
    from toolchain.models.load import load_model

    model = load_model(str(tiny_dir)).model
    _large_input_channel(model)
    rows = torch.randint(10, 2000, (2, 32), generator=torch.Generator().manual_seed(1))
    kl = grid_errors(model, rows)
    assert kl["symmetric"] < kl["fit"] and np.isfinite(list(kl.values())).all()
    assert choose_int4_grid(model, rows)["grid"] == "symmetric"


def test_the_int4_export_records_and_uses_the_measured_grid(tiny_dir, tmp_path):
    import json

    import onnx
    from onnx import numpy_helper

    from toolchain.export.onnx import export_onnx, precision_dir
    from toolchain.models.load import load_model, save_model

    student = load_model(str(tiny_dir))
    _large_input_channel(student.model)
    save_model(student.model, student.tokenizer, tmp_path / "student", dict(student.meta))
    rows = torch.randint(10, 2000, (2, 32), generator=torch.Generator().manual_seed(1))
    export_onnx(tmp_path / "student", tmp_path / "onnx", ["fp32", "int4"], calib=rows)
    int4 = precision_dir(tmp_path / "onnx", "int4")
    info = json.loads((int4 / "model_info.json").read_text())
    assert info["int4_grid"]["grid"] == "symmetric" and info["int4_grid"]["tokens"] == 64
    graph = onnx.load(str(int4 / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # zero on the grid: every block's offset is 0 (the offsets' product, stored in 8 bits, scales by 0)
    offset_scales = [v for k, v in inits.items() if k.endswith("_Q4o_offsets_scales")]
    assert len(offset_scales) == 4 * 7 and not any(s.any() for s in offset_scales)
