"""The page of ``ssl report`` and ``ssl compare --report``: one self-contained HTML file.

Everything is inline — charts are SVG (:mod:`sslcli.report.svgplot`), images are PNG data
URIs, the style sheet is in the page and there is no script — so the file opens offline,
can be mailed, and cannot fetch anything. These are the page's building blocks; the
sections' content is written by :mod:`sslcli.report.sections`.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c9cfdb}nav{padding:8px 28px;background:#e9ecf1}
nav a{margin-right:16px;color:#24559e;text-decoration:none}
section{background:#fff;margin:16px 28px;padding:14px 20px;border-radius:8px;
box-shadow:0 1px 3px rgba(0,0,0,.08)}section h2{margin:0 0 10px;font-size:18px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{padding:3px 10px;
border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}th{background:#f0f2f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#6b7280;fill:#6b7280}
.note{color:#6b7280;font-style:italic}.charts{display:flex;flex-wrap:wrap;gap:10px}
.kv{display:flex;flex-wrap:wrap;gap:24px}
svg.chart{background:#fff}svg .title{font-size:13px;font-weight:600;fill:#1d2330}
svg .tick{font-size:10px;fill:#4b5563}svg .label,svg .legend{font-size:11px;fill:#1d2330}
svg .plot{fill:#fbfbfc;stroke:#c8ccd3}svg .grid{stroke:#e5e7eb}svg .axis{stroke:#9ca3af}
.nn{border-collapse:separate;border-spacing:4px}.nn td{border:0;padding:2px;text-align:center;
font-size:11px}.nn img{width:72px;height:72px;display:block;margin:auto;
border:3px solid #d1d5db;border-radius:3px}.nn img.pix{image-rendering:pixelated}
.nn img.same{border-color:#16a34a}.nn img.other{border-color:#dc2626}
.nn img.query{border-color:#1d2330}.nn td.q{padding-right:14px}
.views img{max-width:100%;image-rendering:pixelated}
"""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{escape(head)}</a>' for sid, head, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{escape(head)}</h2>{html}</section>'
        for sid, head, html in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] = ()
) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = ' class="num"' if i < len(numeric) and numeric[i] else ""
            cells.append(f"<td{cls}>{escape(_text(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def pct(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{100 * v:.2f}%"


def png_data_uri(image: Any) -> str:
    """A uint8 [3, H, W] (or [1, H, W]) tensor/array as a ``data:image/png`` URI."""
    from PIL import Image

    a = np.asarray(image.cpu() if hasattr(image, "cpu") else image, dtype=np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_page(
    path: Path,
    title: str,
    subtitle: str,
    sections: Sequence[tuple[str, str]],
    bodies: dict[str, str],
) -> Path:
    """Write the page of ``sections`` ((id, heading), in order) with their ``bodies`` to
    ``path``, atomically; the subtitle ends with when it was written."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    html = page(
        title, f"{subtitle} — written {stamp}", [(sid, head, bodies[sid]) for sid, head in sections]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
