"""Q4_0/Q4_1/Q5_0/Q5_1 rounding weighted by an importance matrix in our writer: the search llama.cpp's
quantizer runs, the layout gguf reads, a lower weighted error than the reference rounding."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from toolchain.export.gguf import export_gguf, write_gguf
from toolchain.models.file_checks import open_gguf
from toolchain.quantize import imatrix as I
from toolchain.quantize.gguf_types import llama_cpp_quantize
from toolchain.quantize.weighted import quantize_weighted


def _weighted_error(x, q, importance):
    sigma2 = (x.astype(np.float64) ** 2).mean(axis=1, keepdims=True)
    w = importance[None, :] * np.sqrt(sigma2 + x.astype(np.float64) ** 2)
    return float((w * (x - q) ** 2).sum())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_weighted_rounding_lowers_the_weighted_error(type_name):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    x[0, :32] = 0  # an all-zero block stays zero
    importance = rng.gamma(0.5, 1.0, 256).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    ours = quantize_weighted(x, importance, type_name)
    assert ours.shape == quantize(x, qtype).shape and ours.dtype == np.uint8
    back = dequantize(ours, qtype)
    assert np.array_equal(back[0, :32], np.zeros(32, np.float32))
    plain = dequantize(quantize(x, qtype), qtype)
    assert _weighted_error(x, back, importance) < 0.95 * _weighted_error(x, plain, importance)
    # equal importance: still a least-squares scale, never worse than the reference rounding
    flat = np.ones(256, np.float32)
    assert _weighted_error(x, dequantize(quantize_weighted(x, flat, type_name), qtype), flat) <= _weighted_error(
        x, plain, flat
    )


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_the_writer_rounds_as_llama_cpp_does(tiny_dir, tmp_path, type_name):
    rows = torch.randint(10, 2000, (4, 24), generator=torch.Generator().manual_seed(0))
    imatrix = I.read(I.write(tmp_path / "im.gguf", I.collect(tiny_dir, rows), 4, 24, "test rows"))
    (ours,) = export_gguf(tiny_dir, tmp_path / "ours", [type_name], imatrix=imatrix)
    f32 = write_gguf(tiny_dir, tmp_path / "f32.gguf", "F32")
    theirs = llama_cpp_quantize(
        f32, tmp_path / "llama.gguf", type_name, overrides={"token_embd": type_name}, imatrix=imatrix
    )
    (plain,) = export_gguf(tiny_dir, tmp_path / "plain", [type_name])
    qtype = gguf.GGMLQuantizationType[type_name]
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    a = {t.name: t for t in open_gguf(ours["path"]).tensors}
    b = {t.name: t for t in open_gguf(theirs).tensors}
    c = {t.name: t for t in open_gguf(plain["path"]).tensors}
    same, total, changed = 0, 0, 0
    for name, t in a.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2:
            assert b[name].tensor_type == t.tensor_type == qtype
            blocks_a, blocks_b = np.asarray(t.data).reshape(-1, nbytes), np.asarray(b[name].data).reshape(-1, nbytes)
            same += int((blocks_a == blocks_b).all(-1).sum())
            total += len(blocks_a)
            changed += int((blocks_a != np.asarray(c[name].data).reshape(-1, nbytes)).any(-1).sum())
    # the same search in the same float32 arithmetic: the same bytes
    assert same == total
    assert changed > 0.3 * total  # and it is not the reference rounding
    assert int(open_gguf(ours["path"]).fields["quantize.imatrix.entries_count"].contents()) == len(imatrix[0])
