"""ONNX fp16/int8/int4 exports: layout, app-facing I/O kept, quantized MatMuls, verification.

Uses the session's tiny export in every precision (conftest `tiny_onnx`).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from toolchain.errors import VerificationError

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    return tiny_onnx


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def test_variants_are_self_contained_folders_with_the_same_io(exported):
    record, out = exported
    assert record["quant"] == "fp32" and record["fusions"]["rms_norm"] == 2 * 4 + 1  # 2 per block + final
    variants = {v["quant"]: v for v in record["variants"]}
    assert list(variants) == ["int4", "int8", "fp16"]  # order of the request, fp32 not repeated
    fp32 = _graph(out)
    names = ([i.name for i in fp32.input], [o.name for o in fp32.output])
    for precision, v in variants.items():
        folder = out.with_name(f"onnx-{precision}")
        assert v["path"] == str(folder / "model.onnx") and len(v["sha256"]) == 64
        for f in ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "model_info.json"):
            assert (folder / f).is_file(), (precision, f)
        info = json.loads((folder / "model_info.json").read_text())
        assert info["precision"] == precision and info["inputs"] == names[0] and info["outputs"] == names[1]
        g = _graph(folder)
        # the app sees the same names and fp32 tensors (elem_type 1) whatever the precision
        assert ([i.name for i in g.input], [o.name for o in g.output]) == names
        assert {i.type.tensor_type.elem_type for i in g.input if i.name.startswith("past")} == {1}
        assert g.output[0].type.tensor_type.elem_type == 1
        ops = Counter(n.op_type for n in g.node)
        if precision in ("int8", "int4"):
            # every linear layer and the (tied) output projection: 7 per block + lm_head; int4 also
            # runs its offset terms' small products (7 per block) and block sums (4 per block) in 8 bits
            assert ops["MatMulNBits"] == 7 * 4 + 1 + (11 * 4 if precision == "int4" else 0), ops
            inits = {i.name for i in g.initializer}
            assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]  # none left in fp32
        # int8/int4 look tokens up in the (tied) output projection's 8-bit codes: no fp32 table left
        assert ops["GatherBlockQuantized"] == (1 if precision in ("int8", "int4") else 0), (precision, ops)
        if precision in ("int8", "int4"):
            vocab_x_hidden = [
                i.name for i in g.initializer if i.data_type == 1 and len(i.dims) == 2 and min(i.dims) == 64
            ]
            assert not vocab_x_hidden, vocab_x_hidden
    # tied head and table stored once, in 8 bits (on this tiny model the vocabulary is most of
    # the weights, so int4 is hardly smaller than int8 here)
    assert variants["int4"]["bytes"] < record["bytes"] / 2.5 and variants["int8"]["bytes"] < record["bytes"] / 2.5
    assert variants["fp16"]["bytes"] < record["bytes"] / 1.9


def test_verify_each_precision(exported, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.verify.onnx import verify_onnx

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    out = exported[1]
    results = {}
    for precision in ("fp32", "fp16", "int8", "int4"):
        folder = out if precision == "fp32" else out.with_name(f"onnx-{precision}")
        # a random 64-wide model has many near-ties among its top logits, so 4-bit flips its
        # top-1 far more often than a trained one (SmolLM2 int4: see README); the default 90%
        # is checked on the real model, here only that int4 stays well above chance
        r = verify_onnx(
            tiny_dir, folder, PROMPTS, greedy_tokens=8, threads=1, model=model, tokenizer=tok, min_top1={"int4": 0.4}
        )
        assert r["passed"] and r["quant"] == precision
        results[precision] = r
    assert results["fp32"]["max_abs_diff"] < 1e-3 and results["fp16"]["max_abs_diff"] < 2e-2
    assert results["fp32"]["mean_kl"] < results["int8"]["mean_kl"] < results["int4"]["mean_kl"]
    assert results["int8"]["top1_agreement"] >= 0.95 and results["int4"]["top1_agreement"] >= 0.4
    assert (
        results["int4"]["thresholds"]["top-1 agreement"] == 0.4
        and results["int8"]["thresholds"]["top-1 agreement"] == 0.95
    )
    assert "mean KL" in results["int4"]["thresholds"]
    # fp16 is judged against torch with the same fp16-rounded weights (the export's error only)
    assert results["fp16"]["reference"] == "torch fp32, fp16-rounded weights"
    assert results["int8"]["reference"] == "torch fp32"

    # an impossible threshold fails with the figures in the message and on the error
    with pytest.raises(
        VerificationError, match=r"ONNX int4 export FAILED: top-1 agreement .*Figures: max \|logit diff\|"
    ) as err:
        verify_onnx(
            tiny_dir,
            out.with_name("onnx-int4"),
            PROMPTS[:1],
            greedy_tokens=4,
            threads=1,
            model=model,
            tokenizer=tok,
            min_top1={"int4": 1.01},
        )
    assert err.value.figures["passed"] is False and err.value.figures["top1_agreement"] <= 1.0


def test_cli_verify_failure_exits_nonzero_with_figures(exported, tiny_dir, capsys):
    from toolchain.cli import main

    rc = main(
        [
            "verify",
            str(tiny_dir),
            str(exported[1].with_name("onnx-int8")),
            "--set",
            "verify.greedy_tokens=4",
            "--set",
            'verify.prompts=["Hello there"]',
            "--set",
            'verify.onnx_max_kl={"int8": 0.0}',
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "mean KL" in err and "top-1" in err
