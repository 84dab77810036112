"""Charts as inline SVG for the HTML reports: line charts, histograms and grouped bar charts.

No plotting library: a report is one self-contained HTML file that a browser opens from disk, and the
charts it needs are simple. Each function returns an `<svg>` string with a title, axis labels, round
ticks, light grid lines and a legend. Non-finite values (NaN, inf) are left out; a chart with nothing to
draw says "no data". Every text is escaped, so run ids and metric names can be anything.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

# Colour-blind-safe (Okabe-Ito), in the order series are given.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_FONT = 'font-family="sans-serif"'


@dataclass(frozen=True)
class Frame:
    """The SVG canvas and the margins around the plot area (pixels)."""

    width: int = 640
    height: int = 360
    left: int = 70
    right: int = 20
    top: int = 40
    bottom: int = 56

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) from below `lo` to above `hi`."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # one value: a unit-wide (or 10%-wide) range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    n = round((stop - start) / step)
    return [_clean(start + i * step) for i in range(n + 1)]


def _clean(v: float) -> float:
    """Drop floating-point noise (0.30000000000000004 -> 0.3) and negative zero."""
    return round(v, 12) + 0.0


def format_tick(value: float, step: float) -> str:
    """A tick label with as many decimals as the step needs (0.25 steps: two; 1000 steps: none)."""
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    if abs(value) >= 1e6 or (value != 0 and abs(value) < 1e-4):
        return f"{value:.3g}"
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class _Axes:
    """Maps data coordinates to pixels inside a frame's plot area."""

    frame: Frame
    x_ticks: Sequence[float]
    y_ticks: Sequence[float]

    def x(self, v: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.frame.left + (v - lo) / (hi - lo) * self.frame.plot_width

    def y(self, v: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.frame.top + (hi - v) / (hi - lo) * self.frame.plot_height


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _svg(frame: Frame, title: str, body: list[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{frame.width}" '
        f'height="{frame.height}" viewBox="0 0 {frame.width} {frame.height}" role="img" '
        f'aria-label="{_esc(title)}">'
    )
    heading = (
        f'<text x="{frame.width / 2:.1f}" y="22" text-anchor="middle" font-size="15" '
        f'font-weight="bold" {_FONT}>{_esc(title)}</text>'
    )
    return "\n".join([head, f"<title>{_esc(title)}</title>", heading, *body, "</svg>"])


def _no_data(frame: Frame, title: str) -> str:
    note = (
        f'<text x="{frame.width / 2:.1f}" y="{frame.height / 2:.1f}" text-anchor="middle" '
        f'font-size="14" fill="#666" {_FONT}>no data</text>'
    )
    return _svg(frame, title, [note])


def _y_axis(axes: _Axes, label: str) -> list[str]:
    f, out = axes.frame, []
    step = axes.y_ticks[1] - axes.y_ticks[0] if len(axes.y_ticks) > 1 else 1.0
    for t in axes.y_ticks:
        y = axes.y(t)
        out.append(
            f'<line x1="{f.left}" x2="{f.left + f.plot_width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
        )
        out.append(
            f'<text class="tick" x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f"{_FONT}>{_esc(format_tick(t, step))}</text>"
        )
    cy = f.top + f.plot_height / 2
    out.append(
        f'<text class="axis-label" x="16" y="{cy:.1f}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 16 {cy:.1f})" {_FONT}>{_esc(label)}</text>'
    )
    return out


def _x_label(frame: Frame, label: str) -> str:
    return (
        f'<text class="axis-label" x="{frame.left + frame.plot_width / 2:.1f}" y="{frame.height - 10}" '
        f'text-anchor="middle" font-size="12" {_FONT}>{_esc(label)}</text>'
    )


def _x_tick(frame: Frame, x: float, text: str) -> str:
    y = frame.top + frame.plot_height
    return (
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 4}" stroke="#444"/>'
        f'<text class="tick" x="{x:.1f}" y="{y + 17}" text-anchor="middle" font-size="11" '
        f"{_FONT}>{_esc(text)}</text>"
    )


def _x_axis(axes: _Axes, label: str) -> list[str]:
    step = axes.x_ticks[1] - axes.x_ticks[0] if len(axes.x_ticks) > 1 else 1.0
    out = [_x_tick(axes.frame, axes.x(t), format_tick(t, step)) for t in axes.x_ticks]
    return [*out, _x_label(axes.frame, label)]


def _plot_box(frame: Frame) -> str:
    return (
        f'<rect x="{frame.left}" y="{frame.top}" width="{frame.plot_width}" height="{frame.plot_height}" '
        'fill="none" stroke="#444"/>'
    )


def _with_legend(frame: Frame, names: Sequence[str]) -> tuple[Frame, list[str]]:
    """Colour keys in rows under the title, wrapped to the frame's width; the canvas grows by the rows
    it takes, so the plot area keeps its size and no key hides data. One series needs no legend."""
    if len(names) < 2:
        return frame, []
    out, x, row = [], frame.left, 0
    for i, name in enumerate(names):
        width = 22 + 6.5 * len(name)
        if x > frame.left and x + width > frame.width - frame.right:
            x, row = frame.left, row + 1
        y = frame.top + 16 * row
        out.append(
            f'<rect x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
        )
        out.append(
            f'<text class="legend" x="{x + 14:.1f}" y="{y}" font-size="11" {_FONT}>{_esc(name)}</text>'
        )
        x += width
    grow = 16 * (row + 1)
    return replace(frame, top=frame.top + grow, height=frame.height + grow), out


def _finite_points(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    frame: Frame = Frame(),
    markers: bool = False,
) -> str:
    """One polyline per series of (x, y) points, drawn in x order, on shared axes; `markers`: a dot at
    every point too (a few measured points rather than a dense curve)."""
    lines = {name: sorted(_finite_points(pts)) for name, pts in series.items()}
    lines = {name: pts for name, pts in lines.items() if pts}
    if not lines:
        return _no_data(frame, title)
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    frame, legend = _with_legend(frame, list(lines))
    axes = _Axes(frame, nice_ticks(min(xs), max(xs), 6), nice_ticks(min(ys), max(ys), 5))
    body = [*_y_axis(axes, y_label), *_x_axis(axes, x_label), _plot_box(frame)]
    for i, (name, pts) in enumerate(lines.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{axes.x(x):.1f},{axes.y(y):.1f}" for x, y in pts)
        body.append(
            f'<polyline class="series" data-series="{_esc(name)}" points="{coords}" fill="none" '
            f'stroke="{colour}" stroke-width="1.8" stroke-linejoin="round"/>'
        )
        for x, y in pts if markers or len(pts) == 1 else ():  # a single point is invisible as a line
            body.append(
                f'<circle class="marker" data-series="{_esc(name)}" cx="{axes.x(x):.1f}" '
                f'cy="{axes.y(y):.1f}" r="3" fill="{colour}"/>'
            )
    return _svg(frame, title, [*legend, *body])


def histogram(
    edges: Sequence[float],
    series: Mapping[str, Sequence[int]],
    *,
    title: str,
    x_label: str,
    y_label: str = "samples",
    frame: Frame = Frame(),
) -> str:
    """Counts per bin (bin i spans edges[i]..edges[i+1]); several series stand side by side in a bin."""
    counts = {name: list(c) for name, c in series.items()}
    for name, c in counts.items():
        if len(c) != len(edges) - 1:
            raise ValueError(f"series {name!r} has {len(c)} counts for {len(edges) - 1} bins")
    if len(edges) < 2 or not any(any(c) for c in counts.values()):
        return _no_data(frame, title)
    top = max(max(c) for c in counts.values())
    frame, legend = _with_legend(frame, list(counts))
    axes = _Axes(frame, nice_ticks(edges[0], edges[-1], 6), nice_ticks(0, top, 5))
    body = [*_y_axis(axes, y_label), *_x_axis(axes, x_label)]
    for i, (name, c) in enumerate(counts.items()):
        colour = PALETTE[i % len(PALETTE)]
        for b, n in enumerate(c):
            if n <= 0:
                continue
            x0, x1 = axes.x(edges[b]), axes.x(edges[b + 1])
            width = (x1 - x0) / len(counts)
            y = axes.y(n)
            body.append(
                f'<rect class="bar" data-series="{_esc(name)}" data-count="{n}" x="{x0 + i * width:.2f}" '
                f'y="{y:.2f}" width="{max(width - 0.5, 0.5):.2f}" height="{axes.y(0) - y:.2f}" '
                f'fill="{colour}"><title>{_esc(name)}: {n} in [{edges[b]:.4g}, {edges[b + 1]:.4g})</title>'
                "</rect>"
            )
    body.append(_plot_box(frame))
    return _svg(frame, title, [*legend, *body])


def bar_chart(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    y_label: str,
    frame: Frame = Frame(),
) -> str:
    """Grouped bars: one group per label in `groups`, one bar per series (None: no bar), values on top."""
    values = {name: list(v) for name, v in series.items()}
    for name, v in values.items():
        if len(v) != len(groups):
            raise ValueError(f"series {name!r} has {len(v)} values for {len(groups)} groups")
    finite = [x for v in values.values() for x in v if x is not None and math.isfinite(x)]
    if not finite:
        return _no_data(frame, title)
    frame, legend = _with_legend(frame, list(values))
    # 8% headroom above the tallest bar for its value label.
    y_ticks = nice_ticks(min(0.0, *finite) * 1.08, max(0.0, *finite) * 1.08, 5)
    axes = _Axes(frame, [0.0, float(len(groups))], y_ticks)
    body = _y_axis(axes, y_label)
    slot = frame.plot_width / len(groups)
    width = slot * 0.8 / len(values)
    for g, label in enumerate(groups):
        body.append(_x_tick(frame, axes.x(g + 0.5), label))
        for i, (name, v) in enumerate(values.items()):
            value = v[g]
            if value is None or not math.isfinite(value):
                continue
            x = axes.x(g) + slot * 0.1 + i * width
            y_top, y_bottom = sorted((axes.y(value), axes.y(0.0)))
            body.append(
                f'<rect class="bar" data-series="{_esc(name)}" data-value="{value:.6g}" x="{x:.2f}" '
                f'y="{y_top:.2f}" width="{width - 1:.2f}" height="{y_bottom - y_top:.2f}" '
                f'fill="{PALETTE[i % len(PALETTE)]}"><title>{_esc(name)}: {value:.4g}</title></rect>'
            )
            body.append(
                f'<text class="value" x="{x + width / 2:.2f}" y="{y_top - 3:.2f}" text-anchor="middle" '
                f'font-size="10" {_FONT}>{value:.3g}</text>'
            )
    zero = axes.y(0.0)
    body.append(
        f'<line x1="{frame.left}" x2="{frame.left + frame.plot_width}" y1="{zero:.1f}" y2="{zero:.1f}" '
        'stroke="#444"/>'
    )
    body.append(_plot_box(frame))
    return _svg(frame, title, [*legend, *body])
