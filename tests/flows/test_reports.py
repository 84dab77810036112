"""HTML reports from synthetic catalog content: loss curves, Figure 5, CapFilt histograms, eval bars."""

from __future__ import annotations

import html
import io
import json
import math
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog import CAPFILT_STAGE, Catalog
from flows.reports import (
    FIGURE5_GAP_METRIC,
    FIGURE5_GAP_SE_METRIC,
    FIGURE5_METRIC,
    ReportParams,
    load_baselines,
    report_flow,
    report_markdown,
    write_report,
)

SVG = "{http://www.w3.org/2000/svg}"
BASELINES = {"BLIP-2 (paper)": {"vqa/synth-vqa/accuracy": 0.62, "caption/synth-coco/CIDEr": 1.1}}


def _write_shard(folder: Path, n: int) -> Path:
    """An img2dataset shard of n successful samples: tar, Parquet and stats, as the catalog checks them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"{i:09d}" for i in range(n)]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key in keys:
            for ext, payload in (("jpg", b"\xff\xd8" + key.encode()), ("txt", b"a cat"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    table = {
        "url": [f"http://example.test/{k}.jpg" for k in keys],
        "caption": ["a cat"] * n,
        "key": keys,
        "status": ["success"] * n,
        "error_message": pa.array([None] * n, pa.string()),
        "width": pa.array([64] * n, pa.int32()),
        "height": pa.array([64] * n, pa.int32()),
    }
    pq.write_table(pa.table(table), folder / "00000.parquet")
    stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0, "duration": 1.0}
    (folder / "00000_stats.json").write_text(json.dumps(stats | {"status_dict": {}}))
    return folder / "00000.tar"


def _capfilt_run(cat: Catalog, config_hash: str, n: int) -> str:
    """A finished CapFilt run over the source's one shard, with a sidecar of n scored samples."""
    run = cat.start_run(CAPFILT_STAGE, config_hash, {})
    sidecar = cat.layout.capfilt_sidecar(config_hash, "synth", "00000")
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    top1 = [0.30 + 0.2 * i / n for i in range(n)]
    web = [0.10 + 0.25 * ((7 * i) % n) / n for i in range(n)]
    table = {
        "key": [f"{i:09d}" for i in range(n)],
        "web_caption": ["a cat"] * n,
        "scores": pa.array([[t, w] for t, w in zip(top1, web, strict=True)], pa.list_(pa.float32())),
        "top1": ["a small cat"] * n,
        "top2": ["a cat"] * n,
        "top1_score": pa.array(top1, pa.float32()),
        "error": pa.array([None] * n, pa.string()),
    }
    pq.write_table(pa.table(table), sidecar)
    cat.set_shard_status(CAPFILT_STAGE, config_hash, "synth", "00000", "done", run)
    cat.finish_run(run, "done", {"samples": n})
    return run


def _train_run(cat: Catalog, stage: str, steps: int, start_loss: float, params: dict | None = None) -> str:
    run = cat.start_run(stage, f"{stage}-hash", params or {})
    for step in range(10, steps + 1, 10):
        loss = start_loss * math.exp(-step / 100)
        values = {"loss": loss, "lr": 1e-4}
        if stage == "stage1":
            values |= {"loss_itc": loss / 2, "loss_itm": loss / 3, "loss_itg": loss / 6}
        cat.log_metrics(run, step, values)
    cat.finish_run(run, "done", {})
    return run


def build_report_home(home: Path) -> dict[str, str]:
    """A catalog with a CapFilt run, a stage-1 run, two stage-2 runs (Figure 5) and evaluation results."""
    with Catalog.open(home / "catalog.duckdb") as cat:
        cat.upsert_source("synth", "parquet", str(home / "manifests" / "synth"), 40, {})
        cat.register_img2dataset_shard("synth", _write_shard(cat.layout.shards("synth"), 40))
        ids = {"capfilt": _capfilt_run(cat, "cf01", 40)}
        ids["stage1"] = _train_run(cat, "stage1", 100, 6.0)
        ids["stage2"] = _train_run(cat, "stage2", 100, 4.0, {"stage1_run": ids["stage1"]})
        ids["stage2_cold"] = _train_run(cat, "stage2", 100, 7.0)
        cat.record_eval(ids["stage2"], "vqa", "synth-vqa", {"accuracy": 0.41}, "ckpt/step-100")
        cat.record_eval(ids["stage2"], "caption", "synth-coco", {"CIDEr": 0.52, "BLEU-4": 0.18})
    return ids


class _Charts:
    """The inline <svg> charts of a page, parsed as XML (each must be well-formed)."""

    def __init__(self, page: str) -> None:
        self.svgs = [ET.fromstring(svg) for svg in re.findall(r"<svg .*?</svg>", page, re.S)]


def titles(page: str) -> list[str]:
    return [svg.get("aria-label") for svg in _Charts(page).svgs]


@pytest.fixture(scope="module")
def report_home(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    home = tmp_path_factory.mktemp("reports") / "var"
    return home, build_report_home(home)


def test_report_has_every_section_with_its_charts(report_home):
    home, ids = report_home
    path = write_report(
        home, title="tiny <replication>", baselines=BASELINES, figure5=(ids["stage2"], ids["stage2_cold"])
    )
    assert path.parent.parent == home / "reports" and path.name == "index.html"
    assert not list(path.parent.glob(".tmp-*"))  # written atomically
    page = path.read_text()
    assert "<h1>tiny &lt;replication&gt;</h1>" in page
    charts = titles(page)
    assert "Stage-2 loss with and without stage-1 representation learning" in charts
    assert f"stage1 {ids['stage1']}" in charts and f"stage2 {ids['stage2_cold']}" in charts
    assert "CapFilt cf01: CLIP scores" in charts
    assert {"vqa on synth-vqa", "caption on synth-coco"} <= set(charts)
    for run_id in ids.values():
        assert run_id in page


def test_loss_curves_hold_every_loss_metric_and_no_learning_rate(report_home):
    home, ids = report_home
    page = write_report(home, run_ids=[ids["stage1"]]).read_text()
    [chart] = _Charts(page).svgs
    series = {p.get("data-series"): p for p in chart.iter(f"{SVG}polyline")}
    assert set(series) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert len(series["loss"].get("points").split()) == 10
    # One run: the report folder is named after it, and shows that run only.
    assert (home / "reports" / ids["stage1"] / "index.html").exists()
    assert ids["stage2"] not in page


def test_figure5_draws_both_stage2_runs_on_one_chart(report_home):
    home, ids = report_home
    page = write_report(
        home, run_ids=[], report_id="fig5", figure5=(ids["stage2"], ids["stage2_cold"])
    ).read_text()
    [chart] = _Charts(page).svgs
    lines = {p.get("data-series"): p for p in chart.iter(f"{SVG}polyline")}
    assert set(lines) == {
        f"with representation learning ({ids['stage2']})",
        f"without ({ids['stage2_cold']})",
    }
    # The run with stage-1 init has the lower loss everywhere: its line lies lower (larger y pixels).
    ys = {k: [float(p.split(",")[1]) for p in v.get("points").split()] for k, v in lines.items()}
    warm, cold = ys[f"with representation learning ({ids['stage2']})"], ys[f"without ({ids['stage2_cold']})"]
    assert all(w > c for w, c in zip(warm, cold, strict=True))


def test_figure5_draws_zero_shot_vqa_of_both_runs_over_training(tmp_path):
    home = tmp_path / "var"
    ids = build_report_home(home)
    accuracy = {
        ids["stage2"]: [(25, 30.0), (50, 38.0), (100, 44.0)],
        ids["stage2_cold"]: [(25, 12.0), (100, 15.0)],
    }
    with Catalog.open(home / "catalog.duckdb") as cat:
        for run_id, points in accuracy.items():
            for step, value in points:
                cat.log_metrics(run_id, step, {FIGURE5_METRIC: value})
    path = write_report(home, run_ids=[], report_id="fig5", figure5=(ids["stage2"], ids["stage2_cold"]))
    page = path.read_text()
    loss, vqa = _Charts(page).svgs
    label = {ids["stage2"]: f"with representation learning ({ids['stage2']})",
             ids["stage2_cold"]: f"without ({ids['stage2_cold']})"}  # fmt: skip
    lines = {p.get("data-series"): p.get("points").split() for p in vqa.iter(f"{SVG}polyline")}
    assert {k: len(v) for k, v in lines.items()} == {label[r]: len(pts) for r, pts in accuracy.items()}
    # Higher accuracy draws higher (smaller y pixels): the warm run's line lies above the cold one's.
    y = {k: [float(p.split(",")[1]) for p in v] for k, v in lines.items()}
    assert max(y[label[ids["stage2"]]]) < min(y[label[ids["stage2_cold"]]])
    assert len(list(vqa.iter(f"{SVG}circle"))) == 5  # a dot per measured checkpoint
    # The accuracy is not a loss: the run's training chart leaves it out; the summary carries the points.
    charts = _Charts(write_report(home, run_ids=[ids["stage2"]]).read_text()).svgs
    [own] = [c for c in charts if c.get("aria-label") == f"stage2 {ids['stage2']}"]
    assert {p.get("data-series") for p in own.iter(f"{SVG}polyline")} == {"loss"}
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["figure5_vqa"] == {label[r]: [list(p) for p in pts] for r, pts in accuracy.items()}


@pytest.mark.parametrize(
    ("last", "reading"),
    [
        ((100, 6.0, 1.5), "Here stage 1 leads, as in the paper"),
        ((100, 2.0, 1.5), "Here the two runs are level: the paper's effect is not reproduced"),
        ((100, -4.0, 1.5), "Here the run without stage 1 leads: the paper's effect is reversed"),
    ],
)
def test_figure5_verdict_reads_the_paired_gap_at_the_last_step(tmp_path, last, reading):
    home = tmp_path / "var"
    ids = build_report_home(home)
    gaps = [(50, 9.0, 1.0), last]  # the earlier step, far ahead, does not decide
    with Catalog.open(home / "catalog.duckdb") as cat:
        for step, gap, se in gaps:
            cat.log_metrics(ids["stage2"], step, {FIGURE5_GAP_METRIC: gap, FIGURE5_GAP_SE_METRIC: se})
    path = write_report(home, run_ids=[], report_id="fig5", figure5=(ids["stage2"], ids["stage2_cold"]))
    page = html.unescape(path.read_text())
    step, gap, se = last
    assert f"{reading} (at step {step}, stage 1's lead is {gap:+.2f} points" in page
    assert f"two standard errors of that paired difference are {2 * se:.2f}" in page
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["figure5_gap"] == [{"step": s, "lead": g, "se": e} for s, g, e in gaps]


def test_figure5_without_a_measured_gap_claims_no_verdict(report_home):
    home, ids = report_home
    page = write_report(
        home, run_ids=[], report_id="fig5", figure5=(ids["stage2"], ids["stage2_cold"])
    ).read_text()
    assert "Figure 5: the effect of representation learning" in page
    assert "Here " not in page and "stage 1's lead" not in html.unescape(page)


def test_capfilt_histogram_counts_every_scored_sample(report_home):
    home, ids = report_home
    page = write_report(home, run_ids=[ids["capfilt"]], bins=10).read_text()
    [chart] = _Charts(page).svgs
    counts = {}
    for bar in chart.iter(f"{SVG}rect"):
        if bar.get("class") == "bar":
            counts[bar.get("data-series")] = counts.get(bar.get("data-series"), 0) + int(
                bar.get("data-count")
            )
    assert counts == {"best caption (top-1)": 40, "web caption": 40}
    assert "web caption kept" in page


def test_evaluation_bars_stand_beside_the_baselines(report_home):
    home, ids = report_home
    page = write_report(home, run_ids=[ids["stage2"]], baselines=BASELINES).read_text()
    vqa = next(s for s in _Charts(page).svgs if s.get("aria-label") == "vqa on synth-vqa")
    bars = {
        b.get("data-series"): float(b.get("data-value"))
        for b in vqa.iter(f"{SVG}rect")
        if b.get("class") == "bar"
    }
    assert bars == {ids["stage2"]: 0.41, "BLIP-2 (paper)": 0.62}


def test_baselines_file_and_bad_inputs_are_checked(report_home, tmp_path):
    home, _ = report_home
    good = tmp_path / "baselines.json"
    good.write_text(json.dumps(BASELINES))
    assert load_baselines(good) == BASELINES
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"paper": {"vqa-accuracy": 1}}))
    with pytest.raises(ValueError, match="task/dataset/metric"):
        load_baselines(bad)
    with pytest.raises(KeyError, match="no run 'nope'"):
        write_report(home, run_ids=["nope"])
    with pytest.raises(ValueError, match="report id"):
        write_report(home, run_ids=[], report_id="../escape")


def test_markdown_links_the_report_and_shows_the_headline_numbers(report_home):
    home, ids = report_home
    path = write_report(home, run_ids=[ids["stage2"]], title="pipeline")
    md = report_markdown(path)
    assert md.startswith("# pipeline\n")
    assert f"({path.resolve().as_uri()})" in md
    assert f"| {ids['stage2']} | stage2 | done | {4.0 * math.exp(-1):.4g} |" in md
    assert "| vqa | synth-vqa | accuracy | 0.41 |" in md


def test_report_flow_writes_the_report_and_a_markdown_artifact(report_home, prefect_harness):
    from prefect.client.orchestration import get_client

    home, ids = report_home
    path = report_flow(ReportParams(run_ids=(ids["stage1"],), report_id="flow-test", home=home))
    assert path == home / "reports" / "flow-test" / "index.html" and path.exists()
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()  # newest per key
    report = [a for a in artifact if a.key == "blip2-report"]
    assert report and path.resolve().as_uri() in report[0].data


def test_evaluate_runs_bring_the_paper_numbers_and_are_not_shown_twice(tmp_path):
    """flows/evaluate.py records results under its own run and the model run; its summary has the paper's."""
    home = tmp_path / "var"
    with Catalog.open(home / "catalog.duckdb") as cat:
        model = _train_run(cat, "stage2", 20, 4.0)
        evaluation = cat.start_run("evaluate", "e1", {})
        for run in (evaluation, model):
            cat.record_eval(run, "vqa", "vqav2-val", {"overall": 31.5}, "ckpt")
        summary = {"task": "vqa", "dataset": "vqav2-val", "model_run": model, "preset": "paper-vitg-flant5xl"}
        cat.finish_run(evaluation, "done", summary | {"paper": {"overall": 63.1}})
    page = write_report(home, report_id="paper").read_text()
    vqa = next(s for s in _Charts(page).svgs if s.get("aria-label") == "vqa on vqav2-val")
    bars = {
        b.get("data-series"): float(b.get("data-value")) for b in vqa.iter(f"{SVG}rect") if b.get("class")
    }
    assert bars == {model: 31.5, "paper (paper-vitg-flant5xl)": 63.1}
    # Reported alone, the evaluate run shows its own results.
    page = write_report(home, run_ids=[evaluation]).read_text()
    assert f"<td>{evaluation}</td>" in page and "31.5" in page
