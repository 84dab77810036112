"""`blip2 catalog status|runs|metrics`: the catalog as readable tables on the terminal."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flows.common import catalog_session, layout_for


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) and rows for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        )

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(s.rstrip() for s in out)


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def status_text(args: argparse.Namespace) -> str:
    with catalog_session(layout_for(args.home), read_only=True) as cat:
        summary = cat.status_summary()
        sources = {s.name: s for s in cat.sources()}
    parts = [f"catalog: {layout_for(args.home).catalog}", "", "sources"]
    rows = []
    for s in summary.sources:
        src = sources.get(s.name)
        dropped = sum(src.dropped.values()) if src else None
        rows.append([s.name, src.n_urls if src else None, dropped, s.shards, s.samples_ok, s.samples_failed])
    parts.append(format_table(["source", "urls", "dropped", "shards", "ok", "failed"], rows))
    reasons = [(s.name, reason, n) for s in summary.sources for reason, n in sorted(s.failures.items())]
    if reasons:
        parts += ["", "failures by reason", format_table(["source", "reason", "samples"], reasons)]
    if summary.stages:
        rows = [[s.stage, s.config_hash, s.done, s.running, s.failed, s.pending] for s in summary.stages]
        parts += [
            "",
            "stages (shards)",
            format_table(["stage", "config", "done", "running", "failed", "pending"], rows),
        ]
    return "\n".join(parts)


def runs_text(args: argparse.Namespace) -> str:
    with catalog_session(layout_for(args.home), read_only=True) as cat:
        runs = cat.runs(args.stage)
    rows = [
        [
            r.run_id,
            r.stage,
            r.config_hash,
            r.status,
            r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            None if r.duration_s is None else round(r.duration_s, 1),
        ]
        for r in runs
    ]
    return format_table(["run", "stage", "config", "status", "started (UTC)", "seconds"], rows)


def metrics_text(args: argparse.Namespace) -> str:
    with catalog_session(layout_for(args.home), read_only=True) as cat:
        run = cat.run(args.run_id)
        if run is None:
            raise KeyError(f"no run {args.run_id!r} in the catalog; `blip2 catalog runs` lists them")
        metrics = cat.metrics(args.run_id)
        evals = cat.eval_results(args.run_id)
    parts = [f"run {run.run_id}: {run.stage} ({run.status})"]
    last: dict[str, tuple[int, float]] = {}
    for m in metrics:
        last[m.name] = (m.step, m.value)
    if last:
        parts += [
            "",
            "training metrics (last value)",
            format_table(["metric", "step", "value"], [[k, s, v] for k, (s, v) in sorted(last.items())]),
        ]
    if evals:
        parts += [
            "",
            "evaluation",
            format_table(
                ["task", "dataset", "metric", "value", "checkpoint"],
                [[e.task, e.dataset, e.metric, e.value, e.checkpoint] for e in evals],
            ),
        ]
    if run.summary:
        parts += [
            "",
            "summary",
            format_table(["key", "value"], sorted((k, _short(v)) for k, v in run.summary.items())),
        ]
    return "\n".join(parts)


def _short(v: object) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def run(args: argparse.Namespace) -> int:
    text = {"status": status_text, "runs": runs_text, "metrics": metrics_text}[args.catalog_command](args)
    print(text)
    return 0
