"""HF directory -> ONNX decoder with a KV cache, for onnxruntime (see runtime/onnx_decoder.py).

fp32 at the output folder, and optionally fp16/int8/int4 folders beside it
(quantize/onnx_quant.py), each self-contained with the same inputs and outputs. The fp32 graph
gets the offline fusions of export/onnx_optimize.py first, so every precision inherits them.

The graph is exported with `torch.onnx.export(dynamo=True)`. Past keys/values travel as flat
graph inputs (`past_key_values.{i}.key` / `.value`) and come back as `present.{i}.key` /
`.value`, each [batch, kv_heads, seq, head_dim]; a wrapper rebuilds the transformers
`DynamicCache` from them. `attention_mask` covers past + new tokens.

Two facts shape the example inputs:
- the example must have >= 2 new tokens: with 1, SDPA's `is_causal` is specialised away and the
  graph is wrong for prefill;
- the example past must be non-empty: a size-0 (or 1) example dimension is specialised to a
  constant by torch.export. The exported graph still runs with an EMPTY past (length 0) in
  onnxruntime, which the prefill relies on; tests/export/test_onnx_export.py checks both.

The weights always go to an external-data file `model.onnx.data` (one layout for every model
size; protobuf's 2 GB limit never matters, and the small graph file is quick to inspect).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

from toolchain.errors import UserError
from toolchain.fileio import atomic_dir, sha256_file
from toolchain.formats import ONNX_DATA_FILE as DATA_FILE
from toolchain.formats import ONNX_INFO_FILE as INFO_FILE
from toolchain.formats import ONNX_MODEL_FILE as MODEL_FILE
from toolchain.formats import Artifact
from toolchain.models.load import read_meta
from toolchain.models.registry import get_arch

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
OPSET = 18


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported decoder, in graph order."""
    past, present = [], []
    for i in range(num_layers):
        past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present += [f"present.{i}.key", f"present.{i}.value"]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    class DecoderWithCache(torch.nn.Module):
        """Flat tensors in and out, so the exporter never sees a Cache object."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.n_layers = lm.config.num_hidden_layers

        def forward(self, input_ids, attention_mask, position_ids, *flat_past):
            pairs = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(self.n_layers)]
            # no config: every layer a plain full-length DynamicLayer, so all present.N tensors
            # have the same layout; sliding-window layers (Gemma-3) get their window from the
            # attention mask, which transformers builds from config.sliding_window
            cache = DynamicCache(pairs)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return DecoderWithCache(model).eval()


def _eos_ids(model_dir: Path, config) -> list[int]:
    # generation_config.json may list more stop tokens than config.json (chat models)
    ids: list[int] = []
    sources = [getattr(config, "eos_token_id", None)]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def model_info(model_dir: Path, config) -> dict:
    from toolchain.models.llama import head_dim

    n = config.num_hidden_layers
    inputs, outputs = io_names(n)
    template = model_dir / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else None
    if chat_template is None:
        tc = model_dir / "tokenizer_config.json"
        if tc.is_file():
            chat_template = json.loads(tc.read_text()).get("chat_template")
    return {
        "model_type": config.model_type,
        "num_layers": n,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim(config),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": _eos_ids(model_dir, config),
        "chat_template": chat_template,
        "inputs": inputs,
        "outputs": outputs,
        "dtype": "float32",
        "opset": OPSET,
    }


def _example_inputs(config, new: int = 3, past: int = 4):
    """>= 2 new tokens and a non-empty past (see the module docstring)."""
    import torch

    from toolchain.models.llama import head_dim

    gen = torch.Generator().manual_seed(0)  # leave the global RNG alone
    shape = (1, config.num_key_value_heads, past, head_dim(config))
    flat = []
    for _ in range(config.num_hidden_layers):
        flat += [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)]
    ids = torch.randint(0, config.vocab_size, (1, new), generator=gen)
    mask = torch.ones(1, past + new, dtype=torch.int64)
    pos = torch.arange(past, past + new).unsqueeze(0)
    return (ids, mask, pos, *flat)


def _dynamic_shapes(n_layers: int):
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    kv = {0: batch, 2: past}
    # torch.export takes the nested structure of forward's arguments: *flat_past is one tuple
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple(kv for _ in range(2 * n_layers)))


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporter's progress lines and known-harmless warnings; errors still propagate.

    The captured stdout is logged at debug level, so `--debug` runs can still see it.
    """
    buf = io.StringIO()
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            # dynamic axes that share constraints (batch appears in every input) are merged
            warnings.filterwarnings("ignore", message=r"# The axis name")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        reg_log.setLevel(level)
        log.debug("torch.onnx.export output:\n%s", buf.getvalue())


def _export_graph(wrapper, config, path: Path) -> str:
    """Write the graph to `path` (+ external data); returns which exporter succeeded.

    dynamo first (the one torch maintains); the legacy TorchScript exporter as a fallback,
    since some models trace where torch.export cannot. If both fail, a UserError names the
    architecture and both causes (usually an operator neither exporter supports).
    """
    import torch

    n = config.num_hidden_layers
    inputs, outputs = io_names(n)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                wrapper,
                _example_inputs(config),
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=_dynamic_shapes(n),
                opset_version=OPSET,
                optimize=True,
                verify=False,
            )
            assert program is not None  # torch.onnx.export returns an ONNXProgram when dynamo=True
            program.save(str(path), external_data=True)
        return "dynamo"
    except Exception as dynamo_err:
        log.warning("dynamo export failed (%s); trying the legacy exporter", _first_line(dynamo_err))
        first = dynamo_err
    try:
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        }
        for name in inputs[3:]:
            axes[name] = {0: "batch", 2: "past_sequence"}
        for name in outputs[1:]:
            axes[name] = {0: "batch", 2: "total_sequence"}
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(
                wrapper,
                _example_inputs(config),
                str(path),
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
            )
        _to_external_data(path)
        return "legacy"
    except Exception as legacy_err:
        raise UserError(
            f"ONNX export of a '{config.model_type}' model failed with both exporters: dynamo: "
            f"{_first_line(first)}; legacy: {_first_line(legacy_err)} (an operator or model feature the "
            "exporters do not support; --debug shows the full trace)"
        ) from legacy_err


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _to_external_data(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )


def _record(out_dir: Path, precision: str, seconds: float) -> Artifact:
    onnx_path = out_dir / MODEL_FILE
    data_path = out_dir / DATA_FILE
    size = onnx_path.stat().st_size + (data_path.stat().st_size if data_path.is_file() else 0)
    # model.onnx holds only the graph; the weights are in model.onnx.data, so a checksum of
    # model.onnx alone would not change when the model does. Checksum every file, and give one
    # digest over that listing.
    files = {p.name: sha256_file(p) for p in (onnx_path, data_path) if p.is_file()}
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return Artifact(
        format="onnx",
        quant=precision,
        path=str(onnx_path),
        bytes=size,
        sha256=hashlib.sha256(listing.encode()).hexdigest(),
        files_sha256=files,
        seconds=round(seconds, 2),
    )


def precision_dir(out_dir: str | Path, precision: str) -> Path:
    """Folder of one precision: fp32 at `out_dir` itself, the others beside it (`onnx-int4`)."""
    out_dir = Path(out_dir)
    return out_dir if precision == "fp32" else out_dir.with_name(f"{out_dir.name}-{precision}")


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    precisions: list[str] | tuple[str, ...] = ("fp32",),
    optimize: bool = True,
    calib=None,
) -> Artifact:
    """Export an HF causal LM directory to `out_dir/model.onnx` (+ data, tokenizer, model_info.json).

    With int4, the grid of its 4-bit blocks is chosen by measuring both on `calib` (token rows;
    default: the opening blocks of the bundled text) and recorded as `int4_grid` in
    model_info.json.

    fp32 is always written at `out_dir` (the reference the others are made from); each other
    precision in `precisions` (fp16, int8, int4) becomes its own self-contained folder beside
    it (`<out_dir>-int4/`: graph, weights, tokenizer, model_info.json), so an app ships one
    folder. Each folder is written atomically. Returns the fp32 record with the others under
    "variants".
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolchain.quantize.onnx_quant import check_precisions

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    precisions = check_precisions(list(precisions))
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    get_arch(config.model_type)  # refuse unsupported architectures before the slow part

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    wrapper = _wrapper(model)
    with atomic_dir(out_dir) as tmp:
        exporter = _export_graph(wrapper, config, tmp / MODEL_FILE)
        fusions = _optimize_in_place(tmp / MODEL_FILE) if optimize else {}
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        info = model_info(model_dir, config)
        info.update(precision="fp32", exporter=exporter, fusions=fusions)
        qat = read_meta(model_dir).get("qat") or {}
        if qat.get("type"):  # the grid the student was trained through (quantize.qat); its int4 export uses it
            info["qat"] = qat["type"]
            if qat["type"] == "int4":
                info["qat_grid"] = qat.get("grid", "minmax")
        elif "int4" in precisions:
            info["int4_grid"] = _measured_int4_grid(model, model_dir, calib)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    record = _record(out_dir, "fp32", time.perf_counter() - t0)
    record["exporter"], record["fusions"] = exporter, fusions
    record["variants"] = [quantize_export(out_dir, p) for p in precisions if p != "fp32"]
    return record


def _measured_int4_grid(model, model_dir: Path, calib) -> dict:
    """The int4 blocks' grid for this model, measured (quantize/onnx_grid.py) on `calib` rows,
    or on the opening training blocks of the bundled text."""
    from toolchain.quantize.onnx_grid import choose_int4_grid

    if calib is None:
        from transformers import AutoTokenizer

        from toolchain.config import DataConfig
        from toolchain.student import calibration_rows

        calib = calibration_rows(AutoTokenizer.from_pretrained(model_dir), DataConfig(seq_len=128), None, 4)
    choice = choose_int4_grid(model, calib)
    log.info("int4 grid: %s (KL on calibration rows %s)", choice["grid"], choice["kl"])
    return choice


def _optimize_in_place(path: Path) -> dict:
    import onnx

    from toolchain.export.onnx_optimize import optimize_graph

    model = onnx.load(str(path))
    fusions = optimize_graph(model)
    if any(fusions.values()):
        (path.parent / DATA_FILE).unlink(missing_ok=True)
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
    return fusions


def quantize_export(fp32_dir: str | Path, precision: str, keep_lm_head: bool = False) -> Artifact:
    """Write `precision_dir(fp32_dir, precision)` from an fp32 export folder, atomically."""
    from toolchain.quantize.onnx_quant import check_precisions, quantize_file

    fp32_dir = Path(fp32_dir)
    check_precisions([precision])
    if not (fp32_dir / MODEL_FILE).is_file() or not (fp32_dir / INFO_FILE).is_file():
        raise UserError(f"{fp32_dir} is not an fp32 ONNX export (needs {MODEL_FILE} and {INFO_FILE})")
    info = json.loads((fp32_dir / INFO_FILE).read_text())
    if info.get("precision", "fp32") != "fp32":
        raise UserError(f"{fp32_dir} holds a {info['precision']} model; quantize from the fp32 export")
    out = precision_dir(fp32_dir, precision)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        # a student trained through an int4 grid gets exactly those codes; otherwise the grid
        # measured at export (an older export's info has none: the fit)
        if info.get("qat") == "int4":
            grid = info.get("qat_grid", "minmax")
        else:
            grid = (info.get("int4_grid") or {}).get("grid", "fit")
        quantize_file(fp32_dir / MODEL_FILE, tmp / MODEL_FILE, precision, keep_lm_head=keep_lm_head, int4_grid=grid)
        for name in TOKENIZER_FILES:
            if (fp32_dir / name).is_file():
                shutil.copy2(fp32_dir / name, tmp / name)
        info.update(precision=precision)  # inputs/outputs (and the fp32 KV cache) stay as they were
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return _record(out, precision, time.perf_counter() - t0)
