"""The inline SVG charts of the reports: well-formed, round ticks, data mapped to the right pixels."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from flows.plots import Frame, bar_chart, format_tick, histogram, line_chart, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on anything that is not well-formed XML


def texts(root: ET.Element, cls: str | None = None) -> list[str]:
    return [t.text for t in root.iter(f"{SVG}text") if cls is None or t.get("class") == cls]


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 10, [0, 2, 4, 6, 8, 10]),
        (0.13, 0.91, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (-3.2, 4.1, [-4, -2, 0, 2, 4, 6]),
        (1, 1, [0.9, 0.95, 1.0, 1.05, 1.1]),
        (0, 1000, [0, 200, 400, 600, 800, 1000]),
        (2.0, 12.3, [0, 2.5, 5, 7.5, 10, 12.5]),
    ],
)
def test_nice_ticks_are_round_and_cover_the_range(lo, hi, expected):
    ticks = nice_ticks(lo, hi, 5)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= min(lo, hi) and ticks[-1] >= max(lo, hi)


def test_nice_ticks_refuse_non_finite_ranges():
    with pytest.raises(ValueError, match="finite"):
        nice_ticks(0, math.nan)


def test_tick_labels_have_the_decimals_of_the_step():
    assert format_tick(0.5, 0.25) == "0.50"
    assert format_tick(1000, 200) == "1000"
    assert format_tick(0.3, 0.1) == "0.3"
    assert format_tick(2e7, 5e6) == "2e+07"


def test_line_chart_draws_one_polyline_per_series_in_data_coordinates():
    frame = Frame(width=400, height=300, left=50, right=10, top=30, bottom=40)
    svg = line_chart(
        {"loss": [(0, 4.0), (10, 2.0), (20, 1.0)], "loss_itc": [(0, 3.0), (20, math.nan), (10, 2.5)]},
        title="stage 1 <run a&b>",
        x_label="step",
        y_label="loss",
        frame=frame,
    )
    root = parse(svg)
    lines = {p.get("data-series"): p.get("points").split() for p in root.iter(f"{SVG}polyline")}
    assert set(lines) == {"loss", "loss_itc"}
    assert len(lines["loss_itc"]) == 2  # the NaN point is left out
    # x ticks 0..20, y ticks 1..4: step 0 -> left edge, loss 4.0 -> top, 2.0 -> 2/3 down, 1.0 -> bottom.
    # The legend's row under the title moves the plot area down 16 px; the canvas grows by as much.
    pts = [tuple(map(float, p.split(","))) for p in lines["loss"]]
    assert pts == [(50.0, 46.0), (220.0, pytest.approx(46 + 230 * 2 / 3, abs=0.1)), (390.0, 276.0)]
    assert root.get("height") == "316"
    assert "stage 1 <run a&b>" in texts(root)  # escaped in the file, plain once parsed
    assert {"step", "loss"} <= set(texts(root, "axis-label"))
    assert set(texts(root, "legend")) == {"loss", "loss_itc"}
    assert "0" in texts(root, "tick") and "20" in texts(root, "tick")


def test_markers_put_a_dot_on_every_point_of_their_own_line():
    series = {"with": [(100, 20.0), (200, 30.0), (300, 35.0)], "without": [(100, 10.0), (300, 12.0)]}
    for markers in (False, True):
        root = parse(line_chart(series, title="t", x_label="x", y_label="y", markers=markers))
        lines = {p.get("data-series"): p.get("points").split() for p in root.iter(f"{SVG}polyline")}
        dots: dict[str, list[str]] = {}
        for c in root.iter(f"{SVG}circle"):
            dots.setdefault(c.get("data-series"), []).append(f"{c.get('cx')},{c.get('cy')}")
        assert dots == (lines if markers else {})  # each dot sits on a vertex of its series' line


def test_empty_or_non_finite_series_say_no_data():
    for svg in (
        line_chart({}, title="t", x_label="x", y_label="y"),
        line_chart({"a": [(1, math.inf)]}, title="t", x_label="x", y_label="y"),
        histogram([0, 1], {"a": [0]}, title="t", x_label="x"),
        bar_chart(["g"], {"a": [None]}, title="t", y_label="y"),
    ):
        assert "no data" in texts(parse(svg))


def test_histogram_bar_heights_are_proportional_to_counts():
    svg = histogram(
        [0.0, 0.1, 0.2, 0.3], {"top-1": [2, 8, 4], "web caption": [6, 0, 1]}, title="h", x_label="score"
    )
    bars = list(parse(svg).iter(f"{SVG}rect"))
    bars = [b for b in bars if b.get("class") == "bar"]
    assert len(bars) == 5  # the empty bin draws nothing
    height = {(b.get("data-series"), int(b.get("data-count"))): float(b.get("height")) for b in bars}
    assert height[("top-1", 8)] == pytest.approx(4 * height[("top-1", 2)], rel=1e-3)
    assert height[("web caption", 6)] == pytest.approx(3 * height[("top-1", 2)], rel=1e-3)
    with pytest.raises(ValueError, match="3 bins"):
        histogram([0, 1, 2, 3], {"a": [1, 2]}, title="h", x_label="x")


def test_bar_chart_groups_bars_and_puts_negative_values_below_zero():
    svg = bar_chart(
        ["accuracy", "CIDEr"], {"run": [0.5, -0.2], "baseline": [0.25, None]}, title="vqa", y_label="value"
    )
    root = parse(svg)
    bars = {(b.get("data-series"), b.get("data-value")): b for b in root.iter(f"{SVG}rect") if b.get("class")}
    assert set(bars) == {("run", "0.5"), ("run", "-0.2"), ("baseline", "0.25")}
    h = {k: float(b.get("height")) for k, b in bars.items()}
    assert h[("run", "0.5")] == pytest.approx(2 * h[("baseline", "0.25")], rel=1e-3)
    zero_line = [ln for ln in root.iter(f"{SVG}line") if ln.get("y1") == ln.get("y2")]
    neg = bars[("run", "-0.2")]
    assert any(abs(float(ln.get("y1")) - float(neg.get("y"))) < 0.1 for ln in zero_line)  # hangs from 0
    assert {"accuracy", "CIDEr"} <= set(texts(root, "tick"))
    assert set(texts(root, "legend")) == {"run", "baseline"}
