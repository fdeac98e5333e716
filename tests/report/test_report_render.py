import base64
import re

from toolchain.report.html import render as render_html
from toolchain.report.markdown import render as render_md
from toolchain.report.plots import pareto_front


def _report():
    def summ(x):
        return {"median": x, "p95": x * 1.1, "stddev": 1.0, "n": 5}

    exports = [
        {
            "format": "gguf",
            "quant": q,
            "path": f"m-{q}.gguf",
            "bytes": b,
            "sha256": "ab" * 32,
            "parity": {"nmse_max": n, "greedy_agreement": g, "tokenizer_parity": 1.0, "passed": True},
        }
        for q, b, n, g in [("F16", 129e6, 4e-7, 1.0), ("Q8_0", 69e6, 5e-4, 0.9), ("Q4_K_M", 56e6, 7e-3, 0.8)]
    ]
    bench = [
        {
            "runtime": "llama_cpp",
            "format": "gguf",
            "quant": q,
            "target": t,
            "threads": 2,
            "n_prompt": 512,
            "n_gen": 128,
            "prefill_tps": summ(1000),
            "prefill_short_tps": summ(500),
            "decode_tps": summ(v),
            "ttft_ms": summ(100),
            "peak_rss_mb": 150,
            "bytes": b,
            "roofline": {"ceiling_tps": v * 1.6, "efficiency": 1 / 1.6, "bytes_per_token": b, "bandwidth_gbps": 35},
            **(
                {"projection": {"decode_tps": v / 3, "formula": "bw_target / bytes_per_token * efficiency"}}
                if t == "phone"
                else {}
            ),
        }
        for q, b, v in [("F16", 129e6, 145), ("Q8_0", 69e6, 200), ("Q4_K_M", 56e6, 215)]
        for t in ("cpu", "phone")
    ]
    bench.append({"runtime": "torch", "format": "hf", "quant": "fp32", "target": "cuda", "skipped": "no CUDA device"})
    bench.append(
        {
            "runtime": "llama_cpp",
            "format": "gguf",
            "quant": "F16",
            "target": "tiny-phone",
            "fits": False,
            "memory_needed_mb": 900,
        }
    )
    return {"name": "t", "exports": exports, "bench": bench, "stage_seconds": {"distill": 10.0}}


def test_pareto_front():
    pts = [(129, 145, 1.0), (69, 200, 0.9), (56, 215, 0.8), (100, 100, 0.5)]
    assert pareto_front(pts) == [0, 1, 2]  # the last is slower, bigger and worse than Q8_0


def test_markdown_bench_table_shows_projection_skips_and_misfits():
    md = render_md(_report())
    assert "skipped: no CUDA device" in md and "does not fit: needs 900 MB" in md
    assert "Projection (not a measurement)" in md and "bw_target / bytes_per_token * efficiency" in md
    assert "(62%)" in md  # efficiency against the ceiling


def test_html_is_self_contained_with_plots():
    page = render_html(_report())
    assert page.startswith("<!doctype html>") and "<table>" in page
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 3
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened offline
