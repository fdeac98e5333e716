"""Importance matrix: measured in torch, written in llama.cpp's format, read back, used by
llama.cpp's quantizer (the file changes and records it), required where llama.cpp requires it."""

import numpy as np
import pytest
import torch

from toolchain.cli import main
from toolchain.errors import UserError
from toolchain.export.gguf import export_gguf
from toolchain.quantize import imatrix as I


@pytest.fixture(scope="module")
def measured(tiny_dir, tmp_path_factory):
    rows = torch.randint(10, 2000, (4, 24), generator=torch.Generator().manual_seed(0))
    values = I.collect(tiny_dir, rows)
    path = I.write(tmp_path_factory.mktemp("im") / "imatrix.gguf", values, 4, 24, "test rows")
    return values, path, rows


def test_collect_matches_the_activations_by_hand(tiny_dir, measured):
    from transformers import AutoModelForCausalLM

    values, _, rows = measured
    # every matmul of every block, and the tied head under llama.cpp's name for it
    assert {"blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"} <= set(values)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for i in range(len(rows)):
            model(input_ids=rows[i : i + 1])
    h.remove()
    x = torch.cat(seen)
    np.testing.assert_allclose(values["blk.1.ffn_down.weight"], (x * x).mean(0).numpy(), rtol=1e-5)
    assert values["blk.1.ffn_down.weight"].shape == (model.config.intermediate_size,)


def test_file_reads_back_and_llama_cpp_uses_it(tiny_dir, measured, tmp_path):
    from toolchain.models.file_checks import open_gguf

    values, path, _ = measured
    back, facts = I.read(path)
    assert set(back) == set(values) and facts["entries"] == len(values) and facts["chunks"] == 4
    for k in values:
        np.testing.assert_allclose(back[k], values[k], rtol=1e-6)
    (plain,) = export_gguf(tiny_dir, tmp_path / "plain", ["Q4_K_M"])
    (weighted,) = export_gguf(tiny_dir, tmp_path / "weighted", ["Q4_K_M"], imatrix=(back, facts))
    assert plain["sha256"] != weighted["sha256"]  # the rounding followed the importance
    meta = open_gguf(weighted["path"]).fields
    assert int(meta["quantize.imatrix.entries_count"].contents()) == len(values)
    assert meta["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert "quantize.imatrix.file" not in open_gguf(plain["path"]).fields


def test_types_that_need_an_imatrix_say_so(tiny_dir, measured, tmp_path, capsys):
    _, path, _ = measured
    with pytest.raises(UserError, match="IQ2_XXS needs an importance matrix"):
        export_gguf(tiny_dir, tmp_path / "a", ["IQ2_XXS"])
    assert main(["export", "gguf", str(tiny_dir), "--out", str(tmp_path / "b"), "--types", "IQ2_XXS",
                 "--no-modelfile", "--set", "export.imatrix=false"]) == 2  # fmt: skip
    assert "needs an importance matrix" in capsys.readouterr().err
    # by default the CLI measures one on the calibration text and keeps it beside the files
    assert main(["export", "gguf", str(tiny_dir), "--out", str(tmp_path / "d"), "--types", "IQ2_XXS",
                 "--no-modelfile", "--set", "export.imatrix_rows=2", "--set", "data.seq_len=16"]) == 0  # fmt: skip
    assert (tmp_path / "d" / "imatrix.gguf").is_file() and (tmp_path / "d" / "model-IQ2_XXS.gguf").is_file()
    assert main(["export", "gguf", str(tiny_dir), "--out", str(tmp_path / "c"), "--types", "IQ2_XXS",
                 "--no-modelfile", "--imatrix", str(path)]) == 0  # fmt: skip
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="not a GGUF imatrix file"):
        I.read(bad)


def test_cli_measures_an_imatrix(tiny_dir, tmp_path, capsys):
    out = tmp_path / "im.gguf"
    assert main(["imatrix", str(tiny_dir), "--out", str(out), "--rows", "2", "--set", "data.seq_len=16"]) == 0
    values, facts = I.read(out)
    assert facts["chunks"] == 2 and "blk.0.ffn_up.weight" in values


def test_the_file_closer_to_f16_is_kept_with_its_figures(tiny_dir, measured, tmp_path):
    """With a judge, each type the matrix weighs is written both ways and scored by llama.cpp
    against the F16; the kept file is the lower-KLD one and says so."""
    from toolchain.models.file_checks import open_gguf
    from toolchain.verify.quality import compare, kld_judge, llama_scored

    _, path, _ = measured
    chunks = [[int(t) for t in r] for r in torch.randint(10, 2000, (2, 48), generator=torch.Generator().manual_seed(1))]
    files = export_gguf(tiny_dir, tmp_path / "x", ["F16", "Q4_0", "Q4_K_M", "Q8_0"], imatrix=I.read(path),
                        judge=kld_judge(chunks))  # fmt: skip
    by_type = {f["quant"]: f for f in files}
    assert "imatrix" not in by_type["F16"] and "imatrix" not in by_type["Q8_0"]  # nothing to weigh
    ref = llama_scored(by_type["F16"]["path"], chunks)
    for t in ("Q4_0", "Q4_K_M"):
        c = by_type[t]["imatrix"]
        assert c["used"] == (c["imatrix_kld"] <= c["plain_kld"]) and c["tokens"] == 2 * 23
        kept = compare(ref, llama_scored(by_type[t]["path"], chunks))["mean_kld"]
        assert kept == pytest.approx(min(c["imatrix_kld"], c["plain_kld"]), abs=1e-5)
        assert ("quantize.imatrix.file" in open_gguf(by_type[t]["path"]).fields) == c["used"]
    assert not list((tmp_path / "x").glob(".*"))  # no plain copies or temporary F16 left


def test_a_worse_weighted_file_is_replaced_by_the_plain_one(tiny_dir, measured, tmp_path):
    from toolchain.models.file_checks import open_gguf

    _, path, _ = measured
    (plain,) = export_gguf(tiny_dir, tmp_path / "plain", ["Q4_0"])

    def prefers_plain(reference, weighted, plain_file):  # the decision, given figures that favour plain
        assert reference.is_file() and weighted.is_file() and plain_file.is_file()
        return {"imatrix_kld": 0.2, "plain_kld": 0.1, "tokens": 1}

    (rec,) = export_gguf(tiny_dir, tmp_path / "x", ["Q4_0"], imatrix=I.read(path), judge=prefers_plain)
    assert rec["imatrix"] == {"used": False, "imatrix_kld": 0.2, "plain_kld": 0.1, "tokens": 1}
    assert rec["sha256"] == plain["sha256"]  # the file written without the matrix, byte for byte
    assert "quantize.imatrix.file" not in open_gguf(rec["path"]).fields
    assert not list((tmp_path / "x").glob(".*"))
