"""Fine-tuning and retrieval evaluation on several processes, and fine-tuning resumed after a failure.

- 2 torchrun ranks (gloo, CPU) fine-tune VQA as one process does with the doubled batch;
- a fine-tuning run that fails after a checkpoint, started again, ends where an uninterrupted run ends;
- `blip2 evaluate retrieval --nproc 2` gives the recalls of one process.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from finetune_fixtures import open_catalog

import flows.downstream_entry as downstream_entry
from data_catalog.layout import Layout
from flows.cli import main
from flows.common import catalog_session
from flows.finetune import finetune_flow, finetune_stage

torch.set_num_threads(1)

# The parameters of the in-process fine-tuning tests, loaded by path so that any pytest import mode works.
_spec = importlib.util.spec_from_file_location(
    "finetune_flow_tests", Path(__file__).with_name("test_finetune_flows.py")
)
finetune_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune_tests)


def caption_params(built, home: Path, **kw):
    return finetune_tests.params(built, home, "caption", image_size=64, **kw)


def test_two_process_finetune_matches_one_process_with_the_doubled_batch(built, home):
    # VQA: the Q-Former's LM head gets no gradient, which DDP must be told about.
    kw = {"batch_size": 8, "steps": 2, "ckpt_every": 2, "image_size": 64}
    ddp = finetune_flow(finetune_tests.params(built, home, "vqa", nproc=2, **kw))
    single = finetune_flow(finetune_tests.params(built, home, "vqa", nproc=1, **kw))

    assert ddp.step == 2 and ddp.config_hash != single.config_hash
    with open_catalog(home) as cat:
        run = cat.run(ddp.run_id)
        losses = {m.step: m.value for m in cat.metrics(ddp.run_id, "loss")}
        single_losses = {m.step: m.value for m in cat.metrics(single.run_id, "loss")}
        checkpoints = cat.checkpoints(ddp.run_id)
    assert run.status == "done" and run.stage == "finetune-vqa"
    assert [c.step for c in checkpoints] == [2] and Path(checkpoints[0].path).is_dir()
    job = json.loads((ddp.run_dir / "job.json").read_text())
    assert (job["world_size"], job["batch_size"]) == (2, 4)  # 8 samples per step over 2 ranks
    log = (ddp.run_dir / "log").read_text()
    assert "rank0" in log and "rank1" in log  # both ranks ran, their output in the run's log
    # The ranks average their own per-token mean losses (and gradients), one process takes the mean over
    # all tokens of the 8 answers: they differ only through the answers' lengths (a few 1e-4 at most).
    assert sorted(losses) == sorted(single_losses) == [1, 2]
    for step in (1, 2):
        assert losses[step] == pytest.approx(single_losses[step], rel=1e-3), f"step {step}"


class FailAfterCheckpoint(downstream_entry.JsonlEvents):
    """Reports as usual, then fails the run right after its first checkpoint (a crash mid-run)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        super().on_checkpoint(step, path)
        raise RuntimeError(f"simulated crash after the checkpoint of step {step}")


def test_failed_or_killed_finetune_resumes_to_the_uninterrupted_result(built, home, monkeypatch):
    kw = {"steps": 4, "ckpt_every": 2, "batch_size": 4}
    with monkeypatch.context() as patch:
        patch.setattr(downstream_entry, "JsonlEvents", FailAfterCheckpoint)
        with pytest.raises(RuntimeError, match="simulated crash after the checkpoint of step 2"):
            finetune_flow(caption_params(built, home, **kw))
    stage = finetune_stage("caption")
    with open_catalog(home) as cat:
        (failed,) = cat.runs(stage)
        assert failed.status == "failed" and [c.step for c in cat.checkpoints(failed.run_id)] == [2]

    resumed = finetune_flow(caption_params(built, home, **kw))
    assert (resumed.resumed_from_run, resumed.start_step, resumed.step) == (failed.run_id, 2, 4)
    assert Path(resumed.resumed_from) == resumed.run_dir / "checkpoints" / "step-000002"

    # A run whose process was killed stays 'running'; continuing it closes it as failed.
    with catalog_session(Layout(home)) as cat:
        killed = cat.start_run(stage, resumed.config_hash, {})
    failed_ckpt = Layout(home).run_dir(stage, failed.run_id) / "checkpoints" / "step-000002"
    shutil.copytree(failed_ckpt, Layout(home).run_dir(stage, killed) / "checkpoints" / "step-000002")
    continued = finetune_flow(caption_params(built, home, run_id=killed, **kw))
    assert (continued.resumed_from_run, continued.start_step, continued.step) == (killed, 2, 4)

    reference = finetune_flow(caption_params(built, home, resume=False, **kw))
    assert (reference.start_step, reference.resumed_from_run) == (0, None)
    with open_catalog(home) as cat:
        closed = cat.run(killed)
        losses = {r: {m.step: m.value for m in cat.metrics(r, "loss")} for r in (resumed.run_id,
                  continued.run_id, reference.run_id)}  # fmt: skip
        assert [c.step for c in cat.checkpoints(resumed.run_id)] == [2, 4]  # the seeded one, then its own
    assert closed.status == "failed" and "interrupted" in closed.summary["error"]
    assert sorted(losses[resumed.run_id]) == [3, 4] and sorted(losses[reference.run_id]) == [1, 2, 3, 4]
    for run in (resumed, continued):  # fixed seeds: weights, optimizer, data position and RNG restored
        assert run.loss == pytest.approx(reference.loss, abs=1e-6)
        for step in (3, 4):
            assert losses[run.run_id][step] == pytest.approx(losses[reference.run_id][step], abs=1e-6)


def test_retrieval_evaluation_on_two_ranks_gives_the_one_process_recalls(built, home, capsys):
    args = ["evaluate", "retrieval", "--annotations", str(built.files["retrieval_test"]),
            "--checkpoint", built.stage1_run, "--images", str(built.corpus), "--k", "4",
            "--batch-size", "8", "--home", str(home)]  # fmt: skip
    assert main([*args, "--nproc", "2"]) == 0  # 8 images in one batch: rank 1 embeds no image
    assert "txt_r1" in capsys.readouterr().out
    assert main(args) == 0
    with open_catalog(home) as cat:
        two, one = cat.runs("evaluate")
    assert (two.params["nproc"], one.params["nproc"]) == (2, 1)
    assert two.summary["metrics"] == one.summary["metrics"]
    assert {"txt_r1", "img_r10", "itc_txt_r5"} <= set(two.summary["metrics"])
    run_dir = Path(two.summary["run_dir"])
    log = (run_dir / "log").read_text()
    assert "rank0" in log and "rank1" in log
    job = json.loads((run_dir / "retrieval_job.json").read_text())
    assert (len(job["images"]), len(job["texts"]), job["k"]) == (8, 40, 4)
    recalls = json.loads((run_dir / "retrieval_recalls.json").read_text())  # rank 0's, read by the flow
    assert recalls["reranked"]["i2t"]["1"] == two.summary["metrics"]["txt_r1"]
