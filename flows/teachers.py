"""The `teachers` stage of the miniature replication: train the models the paper takes off the shelf.

With the `tiny` preset nothing can be downloaded, so this flow trains them on the synthetic corpus' clean
splits (`blip2_core.teachers`): the CLIP ranker (whose image tower is also the frozen image encoder), the
BLIP captioner of CapFilt, the frozen OPT and T5 language models and their tokenizers. It then writes the
miniature preset (`tiny` with the teachers as its pretrained parts) that the training stages read.

Output: var/teachers/<config-hash>/ with clip/, captioner/, opt/, t5/, tokenizers/, preset.json and
teachers.json (what the later stages read: every path, the losses, the seconds). The hash covers the
teacher config and the corpus' config, so a re-run with the same inputs is a cache hit (the catalog records
the run as done with `cached: true`) and a changed one trains into a new folder beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from pydantic import BaseModel, ConfigDict, Field

from blip2_core.fileio import atomic_write_text
from flows.common import artifact_key, catalog_session, flow_run_id, layout_for

STAGE = "teachers"
MANIFEST = "teachers.json"
_TEACHERS = ("clip", "captioner", "opt", "t5")


class TeachersParams(BaseModel):
    """What the teachers are trained on and for how long; unset step counts keep the library defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: Path | None = Field(None, description="synthetic corpus folder; default <home>/corpus")
    seed: int = 0
    profile: Literal["demo", "capfilt"] = Field(
        "demo",
        description="named teacher configuration (blip2_core.teachers.TEACHER_PROFILES): 'demo', a few CPU "
        "minutes; 'capfilt', a captioner and ranker with which CapFilt raises the share of correct captions "
        "(about 20 CPU minutes; wants the corpus' teacher set)",
    )
    clip_steps: int | None = Field(None, ge=1)
    captioner_steps: int | None = Field(None, ge=1)
    lm_steps: int | None = Field(None, ge=1, description="OPT and T5 steps each")
    threads: int | None = Field(None, ge=1, description="torch CPU threads while training (default: torch's)")
    force: bool = Field(False, description="train again even when the folder for this config exists")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")


class TeachersSummary(BaseModel):
    run_id: str
    folder: Path
    cached: bool
    preset: Path  # the miniature preset: tiny with the teachers as vision.pretrained and llm.name
    clip_config: Path
    clip_weights: Path
    clip_model: str
    captioner: Path
    opt: Path
    t5: Path
    wordpiece: Path  # the BERT-layout tokenizer stage 1 reads
    seconds: dict[str, float]
    final_loss: dict[str, float]


def teacher_config(params: TeachersParams):
    """The named TeacherConfig (`params.profile`) with the step overrides of `params`."""
    from blip2_core.teachers import teacher_profile

    cfg = teacher_profile(params.profile, params.seed)
    steps = {"clip": params.clip_steps, "captioner": params.captioner_steps}
    steps |= {"opt": params.lm_steps, "t5": params.lm_steps}
    changes = {
        name: dataclasses.replace(getattr(cfg, name), steps=n) for name, n in steps.items() if n is not None
    }
    return dataclasses.replace(cfg, **changes)


def config_hash(cfg, corpus_dir: Path) -> str:
    """What determines the teachers: their config (a TeacherConfig or its asdict) and the corpus' config (a
    pure function of the corpus)."""
    corpus = json.loads((corpus_dir / "corpus.json").read_text(encoding="utf-8"))
    teachers = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    key = {"teachers": _set_options(teachers), "corpus": corpus["config"], "format": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _set_options(value: object) -> object:
    """`value` without its unset (None) options: an option added later, left unset, keeps the hash of the
    teachers trained before it existed (no config had a None field until then)."""
    if isinstance(value, dict):
        return {k: _set_options(v) for k, v in value.items() if v is not None}
    return value


def _summary(run_id: str, folder: Path, cached: bool) -> TeachersSummary:
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    return TeachersSummary(run_id=run_id, folder=folder, cached=cached, **manifest)


def _check_corpus(corpus_dir: Path) -> None:
    if not (corpus_dir / "corpus.json").is_file():
        raise FileNotFoundError(
            f"corpus: {corpus_dir} holds no corpus.json; "
            f"render one with `blip2 corpus synth --out {corpus_dir}`"
        )


@flow(name="teachers", log_prints=True)
def teachers_flow(params: TeachersParams) -> TeachersSummary:
    """Train the miniature replication's teachers (or reuse them) and write the miniature preset."""
    import torch

    from blip2_core import teachers as T

    logger = get_run_logger()
    layout = layout_for(params.home)
    corpus_dir = Path(params.corpus or layout.home / "corpus").resolve()
    _check_corpus(corpus_dir)
    cfg = teacher_config(params)
    n_teacher = json.loads((corpus_dir / "corpus.json").read_text(encoding="utf-8"))["config"].get(
        "n_teacher", 0
    )
    if params.profile == "capfilt" and not n_teacher:
        logger.warning(
            "teachers: the capfilt profile on a corpus without a teacher set trains on the COCO train images "
            "alone, which its captioner memorises; synthesize the corpus with a teacher set (n_teacher 4000)"
        )
    chash = config_hash(cfg, corpus_dir)
    folder = layout.home / "teachers" / chash
    with catalog_session(layout) as cat:
        run_id = cat.start_run(STAGE, chash, params.model_dump(mode="json"), flow_run_id())
    try:
        cached = (folder / MANIFEST).is_file() and not params.force
        if cached:
            logger.info("teachers for config %s are on disk (%s): reused", chash, folder)
            _refresh_preset(T, folder)
        else:
            _train(T, cfg, corpus_dir, folder, run_id, layout, params.threads, torch)
        summary = _summary(run_id, folder, cached)
    except BaseException as err:
        with catalog_session(layout) as cat:
            status = "cancelled" if isinstance(err, KeyboardInterrupt) else "failed"
            cat.finish_run(run_id, status, {"error": f"{type(err).__name__}: {err}"})
        raise
    with catalog_session(layout) as cat:
        cat.finish_run(run_id, "done", summary.model_dump(mode="json"))
    rows = [
        {"teacher": name, "final loss": round(summary.final_loss[name], 4), "seconds": summary.seconds[name]}
        for name in _TEACHERS
    ]
    create_table_artifact(
        rows,
        key=artifact_key(STAGE, "summary"),
        description=f"teachers {chash} ({'reused' if cached else 'trained'}); preset {summary.preset}",
    )
    return summary


def _refresh_preset(T, folder: Path) -> None:
    """Write the miniature preset again from reused teachers: it is derived from them, not trained, so
    a newer version of this code applies its own preset rules to teachers trained by an older one."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    paths = T.TeacherPaths(
        clip_config=Path(manifest["clip_config"]),
        clip_weights=Path(manifest["clip_weights"]),
        captioner=Path(manifest["captioner"]),
        opt=Path(manifest["opt"]),
        t5=Path(manifest["t5"]),
        tokenizers=Path(manifest["wordpiece"]).parent,
    )
    T.miniature_preset(paths, Path(manifest["preset"]))


def _train(T, cfg, corpus_dir: Path, folder: Path, run_id: str, layout, threads: int | None, torch) -> None:
    """Train every teacher into `folder`, logging each loss curve to the catalog under `<teacher>/loss`."""
    logger = get_run_logger()
    total = {name: getattr(cfg, name).steps for name in _TEACHERS}
    done = {name: 0 for name in _TEACHERS}
    progress_id = create_progress_artifact(0.0, key=artifact_key(STAGE, "progress"), description="teachers")
    offset = {name: sum(total[n] for n in _TEACHERS[:i]) for i, name in enumerate(_TEACHERS)}
    pending: list[tuple[int, dict[str, float]]] = []

    def progress(name: str, step: int, loss: float) -> None:
        done[name] = step
        # One metric per teacher; its step on a shared axis so that the curves follow each other.
        pending.append((offset[name] + step, {f"{name}/loss": loss}))
        update_progress_artifact(progress_id, progress=100.0 * sum(done.values()) / sum(total.values()))
        if step == total[name]:
            logger.info("teacher %s: %d steps, loss %.4f", name, step, loss)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        paths = T.train_teachers(corpus_dir, folder, cfg, progress)
    finally:
        torch.set_num_threads(previous_threads)
    with catalog_session(layout) as cat:
        for step, values in pending:
            cat.log_metrics(run_id, step, values)
    preset = T.miniature_preset(paths, folder / "preset.json")
    logs = {name: json.loads((folder / name / "teacher.json").read_text()) for name in _TEACHERS}
    manifest = {
        "preset": str(preset),
        "clip_config": str(paths.clip_config),
        "clip_weights": str(paths.clip_weights),
        "clip_model": paths.clip_model_name,
        "captioner": str(paths.captioner),
        "opt": str(paths.opt),
        "t5": str(paths.t5),
        "wordpiece": str(paths.tokenizers / "wordpiece"),
        "seconds": {name: round(logs[name]["seconds"], 1) for name in _TEACHERS},
        "final_loss": {name: logs[name]["losses"][-1] for name in _TEACHERS},
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    logger.info("teachers trained in %.0f s into %s", time.perf_counter() - start, folder)
