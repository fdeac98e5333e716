"""report.json -> one self-contained report.html (tables + plots inlined as base64 PNG)."""

from __future__ import annotations

import base64
import html
import re

from toolchain.report import plots
from toolchain.report.markdown import render as render_markdown

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
  padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2} tr:nth-child(even) td{background:#fafafa}
code,pre{background:#f5f5f5;padding:1px 4px;border-radius:3px} pre{padding:8px;white-space:pre-wrap}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0 1.5em}
"""


def _md_to_html(md: str) -> str:
    """The small Markdown subset report.md uses: headings, pipe tables, code fences, paragraphs."""
    out, lines, i = [], md.splitlines(), 0
    inline = lambda s: re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre>{html.escape(chr(10).join(block))}</pre>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.match(r"^\|[-|: ]+\|$", lines[i]):
                    rows.append([c.strip() for c in lines[i].strip("|").split(" | ")])
                i += 1
            i -= 1
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(report: dict) -> str:
    figures = [
        _img(plots.size_speed_quality(report), "size vs speed vs quality"),
        _img(plots.per_target(report), "decode speed per target"),
        _img(plots.roofline(report), "efficiency against the roofline"),
        _img(plots.task_buckets(report), "task accuracy per bucket"),
    ]
    figs = "\n".join(f for f in figures if f)
    body = _md_to_html(render_markdown(report))
    title = html.escape(str(report.get("name") or "report"))
    plots_section = f"<h2>Plots</h2>\n{figs}" if figs else ""
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
        f"<body>\n{body}\n{plots_section}\n</body></html>\n"
    )
