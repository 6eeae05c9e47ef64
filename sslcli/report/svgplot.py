"""Small inline-SVG charts for the HTML reports: line charts and a labelled scatter plot.

Written here rather than drawn with matplotlib so that ``ssl report`` needs no plotting
package and its output is text that opens offline in any browser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173",
    "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
)  # fmt: skip


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    dashed: bool = False
    markers: bool | None = None
    """Draw a dot per point (None: when there are few points)."""
    extra: dict[str, str] = field(default_factory=dict)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def fmt_tick(v: float, span: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}"
    if span >= 10 or float(v).is_integer():
        return f"{v:.0f}" if float(v).is_integer() or span >= 100 else f"{v:.1f}"
    digits = max(0, 2 - math.floor(math.log10(max(span, 1e-12))))
    return f"{v:.{min(digits, 6)}f}"


def _range(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    width: int = 460,
    height: int = 270,
    y_percent: bool = False,
) -> str:
    """One SVG line chart; a point-only series (one point) is drawn as a dot."""
    left, right, top, bottom = 68, 12, 28, 44
    live = [s for s in series if s.points]
    legend_rows = math.ceil(len(live) / 2) if len(live) > 1 else 0
    height += 16 * legend_rows
    pw, ph = width - left - right, height - top - bottom - 16 * legend_rows
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{width / 2:.1f}" y="17" text-anchor="middle" class="title">'
        f"{escape(title)}</text>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>',
    ]
    if not live:
        parts.append(
            f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" text-anchor="middle" '
            'class="muted">not recorded</text></svg>'
        )
        return "".join(parts)
    scale = 100.0 if y_percent else 1.0
    xs = [p[0] for s in live for p in s.points]
    ys = [p[1] * scale for s in live for p in s.points]
    x0, x1 = _range(xs, 0.02)
    y0, y1 = _range(ys)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y * scale - y0) / (y1 - y0) * ph

    for t in nice_ticks(y0, y1):
        yy = top + ph - (t - y0) / (y1 - y0) * ph
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     'class="grid"/>')  # fmt: skip
        parts.append(f'<text x="{left - 5}" y="{yy + 4:.1f}" text-anchor="end" class="tick">'
                     f"{fmt_tick(t, y1 - y0)}</text>")  # fmt: skip
    for t in nice_ticks(x0, x1):
        xx = left + (t - x0) / (x1 - x0) * pw
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top + ph}" y2="{top + ph + 4}" '
                     'class="axis"/>')  # fmt: skip
        parts.append(f'<text x="{xx:.1f}" y="{top + ph + 16}" text-anchor="middle" '
                     f'class="tick">{fmt_tick(t, x1 - x0)}</text>')  # fmt: skip
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32}" text-anchor="middle" '
                 f'class="label">{escape(xlabel)}</text>')  # fmt: skip
    if ylabel:
        parts.append(f'<text transform="translate(13 {top + ph / 2:.1f}) rotate(-90)" '
                     f'text-anchor="middle" class="label">{escape(ylabel)}</text>')  # fmt: skip
    for s in live:
        pts = sorted(s.points)
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if len(pts) > 1:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" '
                         f'stroke-width="1.6"{dash}><title>{escape(s.name)}</title>'
                         "</polyline>")  # fmt: skip
        markers = s.markers if s.markers is not None else len(pts) <= 30
        if markers:
            for x, y in pts:
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" '
                             f'fill="{s.color}"><title>{escape(s.name)}: '
                             f"{y * scale:.4g} at {x:g}</title></circle>")  # fmt: skip
    for i, s in enumerate(live if legend_rows else []):
        lx = left + (i % 2) * (pw / 2)
        ly = top + ph + 48 + 16 * (i // 2)
        parts.append(f'<rect x="{lx:.1f}" y="{ly - 8}" width="10" height="10" '
                     f'fill="{s.color}"/>')  # fmt: skip
        parts.append(f'<text x="{lx + 14:.1f}" y="{ly + 1}" class="legend">'
                     f"{escape(_clip(s.name, 38))}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def scatter(
    xy: Sequence[tuple[float, float]],
    groups: Sequence[int],
    names: Sequence[str],
    *,
    title: str,
    width: int = 620,
    height: int = 480,
) -> str:
    """A scatter plot of 2-D points coloured by group, with a legend of group names."""
    left, top, right, bottom = 12, 28, 150, 12
    pw, ph = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{(left + pw) / 2:.1f}" y="17" text-anchor="middle" class="title">'
        f"{escape(title)}</text>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>',
    ]
    if xy:
        x0, x1 = _range([p[0] for p in xy])
        y0, y1 = _range([p[1] for p in xy])
        for (x, y), g in zip(xy, groups, strict=True):
            cx = left + (x - x0) / (x1 - x0) * pw
            cy = top + ph - (y - y0) / (y1 - y0) * ph
            c = "#999999" if g < 0 else color(g)
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.6" fill="{c}" '
                         'fill-opacity="0.75"/>')  # fmt: skip
    shown = sorted(set(groups))
    for i, g in enumerate(shown[:28]):
        ly = top + 10 + 16 * i
        c = "#999999" if g < 0 else color(g)
        name = "unlabelled" if g < 0 else (names[g] if g < len(names) else str(g))
        parts.append(f'<circle cx="{left + pw + 14}" cy="{ly - 4}" r="5" fill="{c}"/>')
        parts.append(f'<text x="{left + pw + 24}" y="{ly}" class="legend">'
                     f"{escape(_clip(name, 18))}</text>")  # fmt: skip
    if len(shown) > 28:
        parts.append(f'<text x="{left + pw + 8}" y="{top + 10 + 16 * 28}" class="legend">'
                     f"+{len(shown) - 28} more</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)
