"""Block quantization with float offsets: the fit, and the ONNX ops that run it against numpy."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.quantize.onnx_offsets import dequantize, fit_blocks, rewrite_embeddings, rewrite_matmuls


def _grid_weights(rng, k: int, n: int, bits: int, block: int = 32) -> np.ndarray:
    """A [K, N] matrix whose blocks are exactly min + d * q (how a Q4_1 GGUF stores them)."""
    nb = k // block
    q = rng.integers(0, 1 << bits, size=(nb, block, n))
    q[:, 0], q[:, 1] = 0, (1 << bits) - 1  # llama.cpp's Q4_1 maps each block's min and max to the end codes
    d = rng.uniform(0.001, 0.02, size=(nb, 1, n))
    m = rng.normal(0, 0.05, size=(nb, 1, n))
    return (m + d * q).reshape(k, n).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_fit_recovers_a_float_offset_grid_exactly(bits):
    w = _grid_weights(np.random.default_rng(0), 96, 40, bits)
    codes, scale, offset = fit_blocks(w, bits, 32)
    assert codes.shape == (40, 3, 32) and codes.max() < (1 << bits)
    back = dequantize(codes, scale, offset, bits, 96)
    assert np.abs(back - w).max() < 1e-6


def test_fit_beats_min_max_rounding_on_continuous_weights_and_pads_partial_blocks():
    rng = np.random.default_rng(1)
    w = rng.standard_t(4, size=(80, 64)).astype(np.float32) * 0.02  # heavy tails, K not a multiple of 32
    codes, scale, offset = fit_blocks(w, 4, 32)
    back = dequantize(codes, scale, offset, 4, 80)
    assert back.shape == w.shape
    # plain asymmetric min/max rounding of the same blocks, the fit's starting point
    pad = np.concatenate([w, np.repeat(w[-1:], 16, axis=0)]).reshape(3, 32, 64)
    lo, hi = pad.min(1, keepdims=True), pad.max(1, keepdims=True)
    s = (hi - lo) / 15
    rtn = (lo + s * np.clip(np.rint((pad - lo) / s), 0, 15)).reshape(96, 64)[:80]
    err_fit, err_rtn = np.linalg.norm(back - w), np.linalg.norm(rtn - w)
    assert err_fit < 0.97 * err_rtn, (err_fit, err_rtn)


def _run(model, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("bits,accuracy_level,tol", [(4, 0, 1e-4), (8, 0, 1e-4), (4, 4, 0.03)])
def test_matmuls_become_matmulnbits_plus_offsets_and_compute_the_fitted_weights(bits, accuracy_level, tol):
    rng = np.random.default_rng(2)
    w1 = _grid_weights(rng, 64, 48, 4)
    w2 = rng.normal(0, 0.05, size=(64, 24)).astype(np.float32)  # reads the same x: one block sum for both
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 64])
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in (1, 2)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
            helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2"),
        ],
        "g",
        [x],
        outs,
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    assert rewrite_matmuls(model, bits, 32, accuracy_level, exclude=set()) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 3  # one shared block sum, two offset products
    assert not {"w1", "w2"} & {i.name for i in model.graph.initializer}  # the fp32 weights are gone
    xv = rng.normal(size=(2, 5, 64)).astype(np.float32)
    y1 = _run(model, {"x": xv})
    ref = xv @ dequantize(*fit_blocks(w1, bits, 32), bits, 64)
    assert np.abs(y1 - ref).max() < tol * np.abs(ref).max()
    if accuracy_level == 0 and bits == 4:
        assert np.abs(y1 - xv @ w1).max() < 1e-4  # on-grid weights: exact


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_gather_becomes_block_quantized_rows_with_offsets(bits):
    rng = np.random.default_rng(3)
    table = _grid_weights(rng, 64, 50, bits).T.copy()  # [vocab 50, hidden 64], grids along hidden
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])
    out = helper.make_tensor_value_info("h", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["h"], name="embed")],
        "g",
        [ids],
        [out],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    assert rewrite_embeddings(model, ["embed"], bits, 32) == 1
    assert "GatherBlockQuantized" in [n.op_type for n in model.graph.node]
    tokens = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    assert np.abs(_run(model, {"input_ids": tokens}) - table[tokens]).max() < 1e-5


def test_tied_embedding_shares_the_output_projections_codes():
    rng = np.random.default_rng(4)
    table = rng.normal(0, 0.05, size=(96, 64)).astype(np.float32)  # [vocab, hidden]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["h"], name="embed"),
            helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head"),
        ],
        "g",
        [ids],
        [out],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "head")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    fitted: dict = {}
    rewrite_matmuls(model, 8, 32, 0, exclude=set(), fitted=fitted)
    assert rewrite_embeddings(model, ["embed"], 8, 32, fitted=fitted) == 1
    big = [i for i in model.graph.initializer if np.prod(i.dims) >= 96 * 64]
    assert len(big) == 1  # one copy of the codes, read by both ops
    tokens = np.array([[1, 95, 40]], dtype=np.int64)
    w = dequantize(*fit_blocks(table.T, 8, 32), 8, 64)  # [hidden, vocab]
    np.testing.assert_allclose(_run(model, {"input_ids": tokens}), w.T[tokens] @ w, rtol=1e-4, atol=1e-5)


def test_symmetric_blocks_are_q4_0s_rounding_with_zero_on_the_grid():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from toolchain.quantize.onnx_offsets import symmetric_blocks

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 24)) * 0.05).astype(np.float32)  # [K, N]
    w[5, :] = 0.0
    codes, scale, offset = symmetric_blocks(w, 4, 32)
    assert not offset.any()
    back = dequantize(codes, scale, offset, 4, 64)
    assert np.array_equal(back[5], np.zeros(24, np.float32))  # a zero weight stays zero
    # llama.cpp's Q4_0 of the same blocks (each GGUF row is one output's K weights): same codes
    q4 = quantize(np.ascontiguousarray(w.T), GGMLQuantizationType.Q4_0).reshape(24, 2, 18)
    ggml_codes = np.concatenate([q4[..., 2:] & 0x0F, q4[..., 2:] >> 4], axis=-1)
    assert np.array_equal(codes, ggml_codes)
    assert np.allclose(scale, q4[..., :2].copy().view(np.float16)[..., 0].astype(np.float32), rtol=1e-3)
