"""HTML reports: loss curves, CapFilt score histograms, evaluation metrics beside baselines, Figure 5.

`write_report` reads the catalog through its query API, draws the charts as inline SVG (flows/plots.py)
and writes one self-contained `<BLIP2_HOME>/reports/<report-id>/index.html`, with the headline numbers in
`summary.json` beside it, both atomically. `publish_report_artifact` links the report from a Prefect
markdown artifact; `report_flow` does both, and `blip2 report` runs that flow.

Baselines are numbers to compare with, keyed "task/dataset/metric", per baseline name:
    {"BLIP-2 ViT-g FlanT5-XL (paper)": {"vqa/vqav2/accuracy": 65.0}, "web captions only": {...}}
Evaluate runs add the paper's numbers they carry as a baseline "paper (<preset>)"; their results, also
recorded under the model run they evaluated, are shown once, under that run when it is reported.
Figure 5 of the paper: two stage-2 runs, one started from a stage-1 run (with representation learning) and
one without it: their loss curves on one chart, and their zero-shot VQA accuracy over training (the metric
FIGURE5_METRIC each run carries at its checkpoints' steps, which the pipeline records) on another.
"""

from __future__ import annotations

import html
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from blip2_core.fileio import atomic_write_text
from data_catalog import (
    CAPFILT_STAGE,
    CapfiltScoreHistogram,
    CapfiltScoreStats,
    Catalog,
    EvalRecord,
    StageRunRecord,
)
from flows import plots
from flows.common import artifact_key, catalog_session, layout_for

REPORT_FILE = "index.html"
SUMMARY_FILE = "summary.json"
EVALUATE_STAGE = "evaluate"  # flows/evaluate.py's catalog stage: its summary names model_run and paper
FIGURE5_METRIC = "zero_shot_vqa_accuracy"  # a stage-2 run's zero-shot VQA accuracy at a checkpoint's step
# On the stage-2 run from stage 1: its zero-shot VQA accuracy minus that of the run without stage 1, at each
# step both were evaluated at (points, question by question), and the standard error of that difference.
FIGURE5_GAP_METRIC = "figure5_vqa_gap"
FIGURE5_GAP_SE_METRIC = "figure5_vqa_gap_se"
_REPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
Baselines = Mapping[str, Mapping[str, float]]


# --- what the report shows, read from the catalog --------------------------------------------------


@dataclass(frozen=True)
class CapfiltSection:
    config_hash: str
    stats: CapfiltScoreStats | None
    histogram: CapfiltScoreHistogram


@dataclass(frozen=True)
class ReportData:
    """Everything a report draws: plain records, no catalog handle."""

    home: Path
    runs: list[StageRunRecord]
    curves: dict[str, dict[str, list[tuple[int, float]]]]  # run id -> loss metric -> (step, value)
    capfilt: list[CapfiltSection]
    evals: list[EvalRecord]
    figure5: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # label -> stage-2 loss
    figure5_vqa: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # label -> VQA accuracy
    paper: dict[str, dict[str, float]] = field(default_factory=dict)  # baselines from evaluate runs
    # (step, zero-shot VQA of the run from stage 1 minus the run without, its standard error), in points
    figure5_gap: list[tuple[int, float, float]] = field(default_factory=list)


def is_loss(name: str) -> bool:
    return name == "loss" or name.startswith("loss_")


def loss_curves(cat: Catalog, run: StageRunRecord) -> dict[str, list[tuple[int, float]]]:
    """The run's loss metrics by name; the steps before it come from the runs it continued (`resumes`)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    first, seen = math.inf, set()
    current: StageRunRecord | None = run
    while current is not None and current.run_id not in seen:
        seen.add(current.run_id)
        points = [m for m in cat.metrics(current.run_id) if is_loss(m.name) and m.step < first]
        for m in points:
            curves.setdefault(m.name, []).append((m.step, m.value))
        first = min([first, *(m.step for m in points)])
        previous = (current.params or {}).get("resumes")
        current = cat.run(previous) if previous else None
    return {name: sorted(points) for name, points in sorted(curves.items())}


def _capfilt_configs(cat: Catalog, runs: list[StageRunRecord], chosen: Sequence[str] | None) -> list[str]:
    if chosen is not None:
        return list(chosen)
    hashes = [r.config_hash for r in runs if r.stage == CAPFILT_STAGE]
    return list(dict.fromkeys(hashes))


def gather(
    cat: Catalog,
    run_ids: Sequence[str] | None = None,
    capfilt: Sequence[str] | None = None,
    figure5: tuple[str, str] | None = None,
    bins: int = 30,
) -> ReportData:
    """Read what the report shows: the runs (all when `run_ids` is None), their loss curves and
    evaluation results, the CapFilt configs among them (or those named), and the Figure 5 pair."""
    runs = cat.runs() if run_ids is None else [_require(cat, r) for r in run_ids]
    curves = {r.run_id: c for r in runs if (c := loss_curves(cat, r))}
    sections = []
    for h in _capfilt_configs(cat, runs, capfilt):
        stats = cat.capfilt_score_stats(h)
        sections.append(CapfiltSection(h, stats[0] if stats else None, cat.capfilt_score_histogram(h, bins)))
    evals = [e for r in runs if r.run_id not in _eval_copies(runs) for e in cat.eval_results(r.run_id)]
    fig5, fig5_vqa, gap = {}, {}, []
    if figure5 is not None:
        for label, run_id in zip(("with representation learning", "without"), figure5, strict=True):
            loss = loss_curves(cat, _require(cat, run_id)).get("loss", [])
            fig5[f"{label} ({run_id})"] = loss
            vqa = [(m.step, m.value) for m in cat.metrics(run_id, FIGURE5_METRIC)]
            if vqa:
                fig5_vqa[f"{label} ({run_id})"] = vqa
        se = {m.step: m.value for m in cat.metrics(figure5[0], FIGURE5_GAP_SE_METRIC)}
        gap = [
            (m.step, m.value, se[m.step]) for m in cat.metrics(figure5[0], FIGURE5_GAP_METRIC) if m.step in se
        ]
    return ReportData(
        cat.home, runs, curves, sections, evals, fig5, fig5_vqa, paper_baselines(runs), figure5_gap=gap
    )


def _eval_copies(runs: list[StageRunRecord]) -> set[str]:
    """Evaluate runs whose results are also recorded under a reported model run: shown once, there."""
    reported = {r.run_id for r in runs}
    return {
        r.run_id for r in runs if r.stage == EVALUATE_STAGE and (r.summary or {}).get("model_run") in reported
    }


def paper_baselines(runs: Sequence[StageRunRecord]) -> dict[str, dict[str, float]]:
    """The paper's numbers that evaluate runs carry in their summary, as baselines "paper (<preset>)"."""
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        s = r.summary or {}
        if r.stage != EVALUATE_STAGE or not s.get("paper") or not s.get("task") or not s.get("dataset"):
            continue
        name = f"paper ({s.get('preset') or 'BLIP-2'})"
        for metric, value in s["paper"].items():
            out.setdefault(name, {})[f"{s['task']}/{s['dataset']}/{metric}"] = float(value)
    return out


def _require(cat: Catalog, run_id: str) -> StageRunRecord:
    run = cat.run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in catalog {cat.path}; `blip2 catalog runs` lists them")
    return run


# --- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1340px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.meta, .note { color: #666; font-size: 13px; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def html_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table; numbers right-aligned, None shown as '-'."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, int | float) and not isinstance(v, bool):
                cells.append(f'<td class="num">{_esc(v if isinstance(v, int) else _num(v))}</td>')
            else:
                cells.append(f"<td>{'-' if v is None else _esc(v)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _runs_section(data: ReportData) -> str:
    rows = [
        [
            r.run_id,
            r.stage,
            r.status,
            r.config_hash,
            r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            None if r.duration_s is None else round(r.duration_s, 1),
            r.flow_run_id,
        ]
        for r in data.runs
    ]
    headers = ["run", "stage", "status", "config", "started (UTC)", "seconds", "Prefect flow run"]
    return "<h2>Runs</h2>" + (html_table(headers, rows) if rows else '<p class="note">no runs</p>')


def _training_section(data: ReportData) -> str:
    if not data.curves:
        return ""
    charts, rows = [], []
    stage = {r.run_id: r.stage for r in data.runs}
    for run_id, curves in data.curves.items():
        title = f"{stage.get(run_id, '')} {run_id}".strip()
        charts.append(plots.line_chart(curves, title=title, x_label="optimizer step", y_label="loss"))
        rows += [
            [run_id, name, pts[-1][0], pts[-1][1], min(v for _, v in pts)] for name, pts in curves.items()
        ]
    table = html_table(["run", "metric", "last step", "last value", "lowest"], rows)
    return f'<h2>Training loss</h2><div class="charts">{"".join(charts)}</div>{table}'


def _figure5_section(data: ReportData) -> str:
    if not data.figure5:
        return ""
    chart = plots.line_chart(
        data.figure5,
        title="Stage-2 loss with and without stage-1 representation learning",
        x_label="optimizer step",
        y_label="generative loss",
        frame=plots.Frame(width=820, height=400),
    )
    charts = [chart]
    if data.figure5_vqa:
        charts.append(
            plots.line_chart(
                data.figure5_vqa,
                title="Zero-shot VQA accuracy over stage-2 training, with and without stage 1",
                x_label="stage-2 optimizer step",
                y_label="VQA accuracy (%)",
                frame=plots.Frame(width=820, height=400),
                markers=True,
            )
        )
        rows = [[label, step, value] for label, pts in data.figure5_vqa.items() for step, value in pts]
        charts.append(html_table(["stage-2 run", "step", "zero-shot VQA accuracy"], rows))
    if data.figure5_gap:
        rows = [
            [step, f"{gap:+.2f}", f"{2 * se:.2f}", _gap_word(gap, se)] for step, gap, se in data.figure5_gap
        ]
        charts.append(html_table(["step", "stage 1's lead (points)", "noise: 2 SE, paired", "reading"], rows))
    note = (
        '<p class="note">Figure 5 of the BLIP-2 paper: without representation learning (stage 1) the '
        "Q-Former bridges the modality gap poorly: the frozen LLM's loss stays higher and its zero-shot "
        f"VQA accuracy far lower, all through stage 2.{figure5_verdict(data.figure5_gap)}</p>"
    )
    return f"<h2>Figure 5: the effect of representation learning</h2>{''.join(charts)}{note}"


def _gap_word(gap: float, se: float) -> str:
    from blip2_core.metrics import PairedDifference

    verdict = PairedDifference(gap, se, n=0).verdict()
    return {
        "level": "level (within the noise)",
        "a ahead": "stage 1 ahead",
        "b ahead": "stage 2 alone ahead",
    }[verdict]


def figure5_verdict(gap: Sequence[tuple[int, float, float]]) -> str:
    """One sentence on whether these runs reproduce Figure 5, from the paired gap at the last step."""
    if not gap:
        return ""
    step, lead, se = gap[-1]
    reading = {
        "stage 1 ahead": "Here stage 1 leads, as in the paper",
        "stage 2 alone ahead": "Here the run without stage 1 leads: the paper's effect is reversed",
        "level (within the noise)": "Here the two runs are level: the paper's effect is not reproduced",
    }[_gap_word(lead, se)]
    return (
        f" {reading} (at step {step}, stage 1's lead is {lead:+.2f} points of zero-shot VQA; two standard"
        f" errors of that paired difference are {2 * se:.2f})."
    )


def _capfilt_section(data: ReportData) -> str:
    if not data.capfilt:
        return ""
    charts, rows = [], []
    for s in data.capfilt:
        h = s.histogram
        series = {"best caption (top-1)": h.top1, "web caption": h.web}
        charts.append(
            plots.histogram(h.edges, series, title=f"CapFilt {s.config_hash}: CLIP scores", x_label="score")
        )
        st = s.stats
        rows.append(
            [s.config_hash, *(None,) * 6]
            if st is None
            else [
                st.config_hash,
                st.samples,
                st.errors,
                st.top1_mean,
                st.top1_median,
                st.top1_p90,
                st.web_caption_kept_share,
            ]  # fmt: skip
        )
    headers = ["config", "samples", "errors", "top-1 mean", "top-1 median", "top-1 p90", "web caption kept"]
    return f'<h2>CapFilt</h2><div class="charts">{"".join(charts)}</div>{html_table(headers, rows)}'


def _eval_section(data: ReportData, baselines: Baselines) -> str:
    if not data.evals and not baselines:
        return ""
    groups: dict[tuple[str, str], dict[str, dict[str, float]]] = {}  # (task, dataset) -> metric -> who -> v
    for e in data.evals:
        groups.setdefault((e.task, e.dataset), {}).setdefault(e.metric, {})[e.run_id] = e.value
    for name, values in baselines.items():
        for key, value in values.items():
            task, dataset, metric = _baseline_key(key)
            if (task, dataset) in groups:  # a baseline is drawn beside a result of the same task and data
                groups[(task, dataset)].setdefault(metric, {})[name] = float(value)
    charts = []
    for (task, dataset), metrics in groups.items():
        names = sorted(metrics)
        who = list(dict.fromkeys(w for m in names for w in metrics[m]))
        series = {w: [metrics[m].get(w) for m in names] for w in who}
        charts.append(plots.bar_chart(names, series, title=f"{task} on {dataset}", y_label="value"))
    rows = [[e.task, e.dataset, e.metric, e.value, e.run_id, e.checkpoint] for e in data.evals]
    table = html_table(["task", "dataset", "metric", "value", "run", "checkpoint"], rows)
    base_rows = [[n, k, float(v)] for n, vals in baselines.items() for k, v in vals.items()]
    base = html_table(["baseline", "task/dataset/metric", "value"], base_rows) if base_rows else ""
    return f'<h2>Evaluation</h2><div class="charts">{"".join(charts)}</div>{table}{base}'


def _baseline_key(key: str) -> tuple[str, str, str]:
    parts = key.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"baseline key {key!r}: expected 'task/dataset/metric'")
    return parts[0], parts[1], parts[2]


def render_html(data: ReportData, title: str, baselines: Baselines | None = None) -> str:
    """The whole report as one HTML page with inline SVG charts (no script, no external file)."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [
        _runs_section(data),
        _figure5_section(data),
        _training_section(data),
        _capfilt_section(data),
        _eval_section(data, {**data.paper, **(baselines or {})}),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            f'<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>',
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_esc(title)}</h1>",
            f'<p class="meta">generated {generated} from the catalog in {_esc(data.home)}</p>',
            *(s for s in sections if s),
            "</body></html>",
        ]
    )


def summary_of(data: ReportData, title: str) -> dict:
    """The headline numbers (last losses, evaluation results) that the markdown artifact shows."""
    runs = {r.run_id: r for r in data.runs}
    return {
        "title": title,
        "runs": [
            {
                "run_id": r.run_id,
                "stage": r.stage,
                "status": r.status,
                "loss": _last(data.curves.get(r.run_id)),
            }
            for r in runs.values()
        ],
        "evals": [
            {"run_id": e.run_id, "task": e.task, "dataset": e.dataset, "metric": e.metric, "value": e.value}
            for e in data.evals
        ],
        "capfilt": [s.config_hash for s in data.capfilt],
        "figure5": list(data.figure5),
        "figure5_vqa": {label: [list(p) for p in pts] for label, pts in data.figure5_vqa.items()},
        "figure5_gap": [{"step": step, "lead": lead, "se": se} for step, lead, se in data.figure5_gap],
    }


def _last(curves: dict[str, list[tuple[int, float]]] | None) -> float | None:
    points = (curves or {}).get("loss")
    return points[-1][1] if points else None


# --- public API ------------------------------------------------------------------------------------


def load_baselines(path: Path) -> dict[str, dict[str, float]]:
    """A baselines JSON file: {"name": {"task/dataset/metric": value, ...}, ...}, checked."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ValueError(f"{path}: expected {{baseline name: {{'task/dataset/metric': value}}}}")
    for values in raw.values():
        for key in values:
            _baseline_key(key)
    return {name: {k: float(v) for k, v in values.items()} for name, values in raw.items()}


def new_report_id() -> str:
    return f"report-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def write_report(
    home: Path | None = None,
    *,
    run_ids: Sequence[str] | None = None,
    report_id: str | None = None,
    title: str = "BLIP-2 pipeline report",
    baselines: Baselines | None = None,
    figure5: tuple[str, str] | None = None,
    capfilt: Sequence[str] | None = None,
    bins: int = 30,
) -> Path:
    """Write <home>/reports/<report_id>/index.html (and summary.json) and return the HTML file's path.

    run_ids: the runs to report (default: every run in the catalog). report_id: the folder name (default:
    the run id when there is exactly one, else a new timestamped id). figure5: (stage-2 run started from
    stage 1, stage-2 run without it). capfilt: CapFilt config hashes to plot (default: those of the
    capfilt runs reported).
    """
    layout = layout_for(home)
    if report_id is None:
        report_id = run_ids[0] if run_ids is not None and len(run_ids) == 1 else new_report_id()
    if not _REPORT_ID.match(report_id):
        raise ValueError(f"report id {report_id!r} must be letters, digits, '_', '.' or '-'")
    if baselines:
        for values in baselines.values():
            for key in values:
                _baseline_key(key)
    with catalog_session(layout, read_only=True) as cat:
        data = gather(cat, run_ids, capfilt, figure5, bins)
    folder = layout.report_dir(report_id)
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary_of(data, title), indent=1))
    atomic_write_text(folder / REPORT_FILE, render_html(data, title, baselines))
    return folder / REPORT_FILE


def report_markdown(report: Path) -> str:
    """Markdown linking the report (file:// URL and plain path) with the headline numbers of its summary."""
    report = Path(report).resolve()
    summary_path = report.parent / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    lines = [
        f"# {summary.get('title', 'BLIP-2 report')}",
        "",
        f"[Open the HTML report]({report.as_uri()}) (on the machine that wrote it: `{report}`)",
    ]
    if summary.get("runs"):
        lines += ["", "| run | stage | status | last loss |", "|---|---|---|---|"]
        lines += [
            f"| {r['run_id']} | {r['stage']} | {r['status']} | {_num(r['loss'])} |" for r in summary["runs"]
        ]
    if summary.get("evals"):
        lines += ["", "| task | dataset | metric | value | run |", "|---|---|---|---|---|"]
        lines += [
            f"| {e['task']} | {e['dataset']} | {e['metric']} | {_num(e['value'])} | {e['run_id']} |"
            for e in summary["evals"]
        ]
    return "\n".join(lines) + "\n"


def publish_report_artifact(report: Path, key: str = "blip2-report") -> uuid.UUID:
    """A Prefect markdown artifact that links the report file; call it from inside a flow run."""
    report = Path(report).resolve()
    return create_markdown_artifact(
        markdown=report_markdown(report),
        key=artifact_key(key),
        description=f"HTML report {report.parent.name}",
    )


class ReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_ids: tuple[str, ...] | None = Field(None, description="runs to report; default: every run")
    report_id: str | None = Field(None, description="folder under reports/; default from the runs")
    title: str = "BLIP-2 pipeline report"
    baselines: dict[str, dict[str, float]] | None = Field(
        None, description="{name: {'task/dataset/metric': value}} drawn beside the evaluation results"
    )
    baselines_file: Path | None = Field(None, description="the same as a JSON file")
    figure5: tuple[str, str] | None = Field(
        None, description="(stage-2 run from a stage-1 run, stage-2 run without stage 1)"
    )
    capfilt: tuple[str, ...] | None = Field(None, description="CapFilt config hashes to plot")
    bins: int = Field(30, ge=1, description="CapFilt histogram bins")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")


@flow(name="report", log_prints=True)
def report_flow(params: ReportParams) -> Path:
    """Write the HTML report of the chosen runs and publish a markdown artifact that links it."""
    baselines = dict(params.baselines or {})
    if params.baselines_file is not None:
        baselines |= load_baselines(params.baselines_file)
    path = write_report(
        params.home,
        run_ids=params.run_ids,
        report_id=params.report_id,
        title=params.title,
        baselines=baselines,
        figure5=params.figure5,
        capfilt=params.capfilt,
        bins=params.bins,
    )
    publish_report_artifact(path)
    get_run_logger().info("report written to %s", path)
    return path


__all__ = [
    "ReportParams",
    "load_baselines",
    "publish_report_artifact",
    "render_html",
    "report_flow",
    "report_markdown",
    "write_report",
]
