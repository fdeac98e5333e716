"""App bundles: built from a run of real exports (each verified), loaded by the runtimes apps
embed in interpreters that hold nothing else, and refused when any byte changed."""

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from toolchain.cli import main
from toolchain.errors import UserError
from toolchain.pack.build import pack_run
from toolchain.runtime.bundle import Bundle


@pytest.fixture(scope="module")
def prompt_ids(tiny_dir) -> list[int]:
    """A chat prompt as an app sends it: the template's turns (end-of-turn tokens inside), ready for the answer."""
    from transformers import AutoTokenizer

    from toolchain.data.chat_encoding import prompt_token_ids

    return prompt_token_ids(AutoTokenizer.from_pretrained(tiny_dir), [{"role": "user", "content": "Is this spam?"}])


def _closure(name: str, seen: dict) -> None:
    """The installed distribution `name` and everything it requires (markers evaluated)."""
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    dist = md.distribution(name)
    seen[key] = dist
    for req in dist.requires or []:
        r = Requirement(req)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            _closure(r.name, seen)


def isolated_python(root: Path, dists: list[str]) -> Path:
    """A fresh venv that sees only `dists` and their dependencies (linked from this interpreter's
    site-packages, nothing downloaded): no torch, no transformers, not this package."""
    seen: dict = {}
    for d in dists:
        _closure(d, seen)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    py = root / "venv" / "bin" / "python"
    site = root / "only"
    site.mkdir()
    for dist in seen.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (site / top).exists() and top != "bin":
                (site / top).symlink_to(src)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([py, "-c", where], check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "only.pth").write_text(f"{site}\n")
    return py


def run_isolated(py: Path, code: str, absent=("torch", "transformers", "toolchain")) -> dict:
    guard = f"import importlib.util as u\nassert all(u.find_spec(m) is None for m in {absent!r}), 'not isolated'\n"
    # run outside the checkout, whose toolchain/ the working directory would put on the path
    out = subprocess.run([py, "-c", guard + code], check=True, capture_output=True, text=True, cwd=py.parents[2]).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory) -> Path:
    """A run directory as the pipeline leaves it (student, exports, verify record), made of real
    exports of the tiny model, verified for real."""
    import shutil

    import yaml

    from toolchain.config import VerifyConfig
    from toolchain.export.gguf import export_gguf
    from toolchain.export.onnx import export_onnx
    from toolchain.fileio import write_json
    from toolchain.verify.exports import verify_exports

    run = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_dir, run / "student")
    ggufs = export_gguf(run / "student", run / "export", ["Q8_0"])
    onnx = export_onnx(run / "student", run / "export" / "onnx", [])
    write_json(run / "stages" / "export_gguf.json", {"files": ggufs})
    write_json(run / "stages" / "export_onnx.json", onnx)
    quick = VerifyConfig(prompts=["The capital of France is"], greedy_tokens=8, min_prompts=2, quality_tokens=0)
    results = verify_exports(run / "student", [*ggufs, onnx], quick)
    write_json(run / "stages" / "verify.json", {"results": results})
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "tiny-student", "task": {"path": None}}))
    return run


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    pack_run(run_dir, out, make_zip=True)
    return out


def test_bundle_lists_every_file_and_inspect_checks_them(bundle, capsys):
    m = Bundle.open(bundle).manifest
    files = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - files == {"manifest.json", "manifest.sha256"}
    assert {"gguf/model-Q8_0.gguf", "gguf/Modelfile", "onnx/fp32/genai_config.json", "README.md"} <= files
    assert {"tokenizer/tokenizer.json", "onnx/fp32/model.onnx.data", "onnx/fp32/tokenizer.json"} <= files
    assert [(x["format"], x["quant"]) for x in m["models"]] == [("gguf", "Q8_0"), ("onnx", "fp32")]
    assert all(x["verify"]["passed"] for x in m["models"])
    assert m["provenance"]["toolchain_version"] and m["license"] == "apache-2.0"
    assert m["generation"]["stop_token_ids"] and m["generation"]["temperature"] == 0.0
    assert "FROM ./model-Q8_0.gguf" in (bundle / "gguf" / "Modelfile").read_text()
    assert "tiny-student" in (bundle / "README.md").read_text()
    assert bundle.with_suffix(".zip").is_file()
    assert main(["inspect", str(bundle)]) == 0
    assert f"all {len(m['files'])} files match" in capsys.readouterr().out


@pytest.mark.parametrize(
    "target", ["gguf/model-Q8_0.gguf", "onnx/fp32/model.onnx.data", "tokenizer/tokenizer.json", "manifest.json"]
)
def test_a_changed_byte_anywhere_is_refused(bundle, tmp_path, capsys, target):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    f = copy / target
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="changed"):
        Bundle.open(copy)
    assert main(["inspect", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "changed" in err


def test_pack_refuses_what_was_not_exported_or_verified(run_dir, tmp_path):
    with pytest.raises(UserError, match="no gguf export Q4_0"):
        pack_run(run_dir, tmp_path / "a", gguf=["Q4_0"])
    bare = tmp_path / "bare"
    (bare / "student").mkdir(parents=True)
    with pytest.raises(UserError, match="not a finished run directory"):
        pack_run(bare, tmp_path / "b")


@pytest.mark.slow
def test_onnxruntime_genai_alone_generates_what_our_decoder_does(bundle, prompt_ids, tmp_path):
    from toolchain.runtime.onnx_decoder import OnnxDecoder

    folder = bundle / "onnx" / "fp32"
    ours = OnnxDecoder(folder).generate(prompt_ids, 12, greedy=True, stop_ids=[])
    py = isolated_python(tmp_path, ["onnxruntime-genai"])
    theirs = run_isolated(
        py,
        f"""
import json, onnxruntime_genai as og
model = og.Model({str(folder)!r})
params = og.GeneratorParams(model)
params.set_search_options(max_length={len(prompt_ids) + 12}, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens({prompt_ids!r})
while not gen.is_done():
    gen.generate_next_token()
print(json.dumps(list(map(int, gen.get_sequence(0)))[{len(prompt_ids)}:]))
""",
    )
    assert len(ours) == 12 and theirs == ours


@pytest.mark.slow
def test_llama_cpp_alone_generates_what_our_runtime_does(bundle, prompt_ids, tmp_path):
    from toolchain.eval.generate import llama_generate

    gguf = bundle / "gguf" / "model-Q8_0.gguf"
    (ours,) = llama_generate(gguf, [prompt_ids], 12, stops=[])
    py = isolated_python(tmp_path, ["llama-cpp-python"])
    theirs = run_isolated(
        py,
        f"""
import json
from llama_cpp import Llama
llm = Llama(model_path={str(gguf)!r}, n_ctx=128, verbose=False)
out = []
for tok in llm.generate({prompt_ids!r}, top_k=1, temp=0.0, reset=True):
    out.append(int(tok))
    if len(out) == 12:
        break
print(json.dumps(out))
""",
    )
    assert len(ours) == 12 and theirs == ours


MESSAGES = [{"role": "user", "content": "Is this spam? Win money now!"}]


def test_router_answers_with_the_student_or_hands_over(bundle, tiny_dir):
    from transformers import AutoTokenizer

    from toolchain.data.chat_encoding import prompt_token_ids, stop_token_ids
    from toolchain.eval.generate import decode_answer, llama_generate
    from toolchain.runtime.confidence import NEVER, answer_confidence
    from toolchain.runtime.router import Router

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    asked = []
    fallback = lambda m: asked.append(m) or "from the teacher"
    r = Router(bundle, fallback=fallback, threshold=0.0)
    r.max_new_tokens = 16  # a random model never stops by itself
    assert r.student.prompt_ids(MESSAGES) == prompt_token_ids(tok, MESSAGES)  # jinja2 renders as HF does
    stats: list = []
    stops = stop_token_ids(tok, tiny_dir)
    (ids,) = llama_generate(bundle / "gguf" / "model-Q8_0.gguf", [prompt_token_ids(tok, MESSAGES)], 16, stops,
                            stats=stats)  # fmt: skip
    reply = r.answer(MESSAGES)
    assert reply.source == "student" and reply.text == decode_answer(tok, ids, stops) and not asked
    assert reply.confidence == pytest.approx(answer_confidence(stats[0], stops, ids, 1.0))
    r.threshold = NEVER
    handed = r.answer(MESSAGES)
    assert handed.source == "fallback" and handed.text == "from the teacher" and asked == [MESSAGES]
    assert handed.confidence == pytest.approx(reply.confidence)
    with pytest.raises(UserError, match="no calibrated threshold"):
        Router(bundle, fallback=fallback)  # this bundle's run had no task


@pytest.mark.slow
def test_router_runs_without_torch(bundle, tmp_path):
    """The router in an interpreter with llama-cpp-python and this package's source, no torch."""
    from toolchain.runtime.router import Router

    router = Router(bundle, threshold=0.0)
    router.max_new_tokens = 16
    ours = router.answer(MESSAGES)
    py = isolated_python(tmp_path, ["llama-cpp-python"])
    pkg = Path(__file__).resolve().parents[2] / "toolchain"
    (tmp_path / "only" / "toolchain").symlink_to(pkg)
    theirs = run_isolated(
        py,
        f"""
import json
from toolchain.runtime.router import Router
r = Router({str(bundle)!r}, fallback=lambda m: "teacher", threshold=0.0)
r.max_new_tokens = 16
a = r.answer({MESSAGES!r})
print(json.dumps([a.text, a.source, a.confidence]))
""",
        absent=("torch", "transformers"),
    )
    assert theirs[:2] == [ours.text, "student"] and theirs[2] == pytest.approx(ours.confidence)
