"""The `pipeline` flow end to end on a tiny synthetic corpus (the miniature replication's regression test),
and re-running chosen stages with the others resolved from the catalog."""

from __future__ import annotations

import html
import math
from pathlib import Path

import pytest

from data_catalog.layout import Layout
from flows.common import catalog_session
from flows.pipeline import STAGES, PipelineParams, pipeline_flow
from flows.reports import FIGURE5_GAP_METRIC, FIGURE5_GAP_SE_METRIC, FIGURE5_METRIC

TINY = {
    "n_pretrain": 40,
    "n_coco": 30,
    "n_vqa_images": 20,
    "n_retrieval": 20,
    "n_teacher": 20,
    "stage1_steps": 3,
    "stage2_steps": 3,
    "finetune_steps": 2,
    "batch_size": 8,
    "retrieval_k": 4,
    "threads": 1,
    "overrides": {
        "ingest": {"image_sets": ["pretrain"], "samples_per_shard": 20, "image_size": 64},
        "teachers": {"clip_steps": 3, "captioner_steps": 3, "lm_steps": 3},
        "capfilt": {"batch_size": 20, "sampling": {"num_captions": 3}},
    },
}


@pytest.fixture(scope="module")
def first_run(prefect_harness, tmp_path_factory, monkeypatch_module):
    home = tmp_path_factory.mktemp("pipeline") / "home"
    monkeypatch_module.setenv("BLIP2_DEMO_PORT", "0")  # any free port
    return home, pipeline_flow(PipelineParams(home=home, **TINY))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_stage_runs_and_is_recorded(first_run):
    home, summary = first_run
    assert summary.ran[0] == "ingest" and summary.ran[-1] == "report"
    for stage in ("teachers", "capfilt", "stage1", "stage2", "figure5", "finetune-caption", "evaluate"):
        assert stage in summary.ran, stage
    with catalog_session(Layout(home), read_only=True) as cat:
        runs = {r.run_id: r for r in cat.runs()}
    for name, run_id in summary.runs.items():
        assert runs[run_id].status == "done", (name, run_id)
    # Stage 2 and its Figure 5 ablation: one starts from the stage-1 run, the other from nothing.
    assert runs[summary.runs["stage2"]].params["stage1_run"] == summary.runs["stage1"]
    assert runs[summary.runs["stage2 without stage1"]].params["stage1_run"] is None
    report = summary.report.read_text()
    assert "Figure 5" in report and summary.runs["stage2"] in report


def test_metrics_come_with_their_baselines(first_run):
    home, summary = first_run
    rows = {m.what: m for m in summary.metrics}
    assert len(rows) == 12  # 11 results and Figure 5's gap
    for m in rows.values():
        assert math.isfinite(m.value) and m.baseline_value is not None and math.isfinite(m.baseline_value)
    assert rows["retrieval text->image R@1, zero-shot"].baseline_value == pytest.approx(100 / 20)  # chance
    assert 0 <= rows["VQA accuracy, zero-shot"].baseline_value <= 100  # the majority answer's accuracy
    assert rows["captioning CIDEr, zero-shot"].baseline == "untrained bridge"
    # The LLM alone: zero-shot VQA through the untrained bridge's checkpoint, as its evaluate run recorded it.
    prior = rows["VQA accuracy, untrained bridge (the LLM alone)"]
    assert prior.baseline == "majority answer"
    with catalog_session(Layout(home), read_only=True) as cat:
        (checkpoint,) = cat.checkpoints(summary.runs["stage2 untrained bridge"])
        recorded = [
            e.value
            for e in cat.eval_results()
            if e.task == "vqa" and e.metric == "overall" and e.checkpoint
            if Path(e.checkpoint).resolve() == Path(checkpoint.path).resolve()
        ]
    # once by the evaluate run, once on the evaluated stage-2 run's own record
    assert len(recorded) == 2 and all(v == pytest.approx(prior.value) for v in recorded)


def test_figure5_measures_zero_shot_vqa_of_both_stage2_runs_at_every_checkpoint(first_run):
    home, summary = first_run
    rows = {m.what: m for m in summary.metrics}
    runs = {
        "zero-shot": summary.runs["stage2"],
        "zero-shot, stage 2 without stage 1": summary.runs["stage2 without stage1"],
    }
    with catalog_session(Layout(home), read_only=True) as cat:
        accuracy = {  # evaluated checkpoint -> VQA accuracy, as each evaluate run recorded it
            str(Path(e.checkpoint).resolve()): e.value
            for e in cat.eval_results()
            if e.task == "vqa" and e.metric == "overall" and e.checkpoint
        }
        for what, run_id in runs.items():
            checkpoints = cat.checkpoints(run_id)
            curve = [(m.step, m.value) for m in cat.metrics(run_id, FIGURE5_METRIC)]
            # 3 steps at a checkpoint every ceil(3 / 4) = 1 step: one point per step, each the accuracy of
            # that step's checkpoint, the last one the table's row.
            assert [step for step, _ in curve] == [c.step for c in checkpoints] == [1, 2, 3]
            for c, (_, value) in zip(checkpoints, curve, strict=True):
                assert accuracy[str(Path(c.path).resolve())] == pytest.approx(value)
            assert rows[f"VQA accuracy, {what}"].value == pytest.approx(curve[-1][1])
            assert rows[f"VQA accuracy, {what}"].baseline == "majority answer"
    assert "Zero-shot VQA accuracy over stage-2 training" in summary.report.read_text()


def test_figure5_gap_is_the_paired_difference_of_the_two_curves_with_its_noise(first_run):
    home, summary = first_run
    with_stage1, without = summary.runs["stage2"], summary.runs["stage2 without stage1"]
    with catalog_session(Layout(home), read_only=True) as cat:
        curve = {
            run: dict((m.step, m.value) for m in cat.metrics(run, FIGURE5_METRIC))
            for run in (with_stage1, without)
        }
        gap = [(m.step, m.value) for m in cat.metrics(with_stage1, FIGURE5_GAP_METRIC)]
        se = [(m.step, m.value) for m in cat.metrics(with_stage1, FIGURE5_GAP_SE_METRIC)]
        assert not cat.metrics(without, FIGURE5_GAP_METRIC)  # the lead belongs to the run from stage 1
    # At every step: the per-question mean difference is the difference of the two accuracies.
    assert [step for step, _ in gap] == [step for step, _ in se] == [1, 2, 3]
    for step, value in gap:
        assert value == pytest.approx(curve[with_stage1][step] - curve[without][step], abs=1e-6)
    assert all(v >= 0 for _, v in se)
    [row] = [m for m in summary.metrics if m.metric == FIGURE5_GAP_METRIC]
    assert row.value == pytest.approx(gap[-1][1]) and row.baseline_value == pytest.approx(2 * se[-1][1])
    page = html.unescape(summary.report.read_text())
    assert "stage 1's lead (points)" in page
    assert f"at step 3, stage 1's lead is {gap[-1][1]:+.2f} points" in page


def test_rerunning_one_stage_takes_the_others_from_the_catalog(first_run):
    home, first = first_run
    again = pipeline_flow(PipelineParams(home=home, stages=("stage2",), **TINY))
    assert again.ran == ["stage2"]
    for stage in ("teachers", "capfilt", "stage1"):
        assert again.runs[stage] == first.runs[stage]  # resolved, not re-run
    assert again.runs["stage2"] == first.runs["stage2"]  # finished with these parameters: the result
    # The untrained bridge evaluate made after it is a newer stage-2 run from the same stage-1 run: never
    # the stage 2 a later stage is given. Evaluate alone also finds the run without stage 1 (Figure 5).
    evaluated = pipeline_flow(PipelineParams(home=home, stages=("evaluate",), **TINY))
    assert first.runs["stage2 untrained bridge"] not in (evaluated.runs["stage2"], again.runs["stage2"])
    assert evaluated.runs["stage2"] == first.runs["stage2"]
    assert evaluated.runs["stage2 without stage1"] == first.runs["stage2 without stage1"]
    rows = {m.what: m.value for m in evaluated.metrics}
    assert rows == pytest.approx({m.what: m.value for m in first.metrics})  # the same runs, the same results
    overrides = {**TINY["overrides"], "stage2": {"resume": False}}
    fresh = pipeline_flow(PipelineParams(home=home, stages=("stage2",), **{**TINY, "overrides": overrides}))
    assert fresh.ran == ["stage2"] and fresh.runs["stage2"] != first.runs["stage2"]
    with pytest.raises(LookupError, match="'nope' is not a finished stage1 run"):
        pipeline_flow(PipelineParams(home=home, stages=("stage2",), use={"stage1": "nope"}, **TINY))


def test_a_stage_without_its_inputs_says_which_stage_to_run(prefect_harness, tmp_path):
    with pytest.raises(LookupError, match="no finished teachers run"):
        pipeline_flow(PipelineParams(home=tmp_path / "empty", stages=("stage1",), **TINY))
    with pytest.raises(ValueError, match="unknown stage"):
        PipelineParams(stages=("stage3",))
    assert STAGES[0] == "ingest" and STAGES[-1] == "report"


def test_the_first_stages_alone_need_nothing_from_later_ones(prefect_harness, tmp_path):
    summary = pipeline_flow(PipelineParams(home=tmp_path / "home", stages=("ingest",), **TINY))
    assert summary.ran == ["ingest"]  # teachers onwards neither run nor looked up in the empty catalog
    assert summary.metrics == [] and summary.report is None
    assert [k for k in summary.runs if k.startswith("ingest/")] and "teachers" not in summary.runs
