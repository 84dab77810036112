"""The `capfilt` stage: per shard, caption each web image 10 times, rank with CLIP, keep the top two.

The unit of work is a batch of `shards_per_task` shards, one Prefect task run each, so a 13k-shard run
has low thousands of task runs (never one per image). A task reads tars, writes one sidecar per shard to
var/capfilt/<config-hash>/<source>/<shard>.parquet (atomically, by blip2_core.capfilt) and returns small
dict records; only this flow process writes the catalog, shard statuses under stage "capfilt" and the
config hash, as batch results come back. The models are loaded once per worker process: in the flow
process for engine "local", in one long-lived Ray actor per GPU (or CPU worker) for engine "ray".

Resumable: a re-run picks the shards that are not 'done' under the config hash (a shard left 'running' by
a killed run is not done, and its sidecar, if any, was never half written); 'done' shards are cache hits.
`force` or an explicit shard list recomputes the chosen shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, field_validator

from blip2_core.capfilt import (
    CapFiltConfig,
    CapFiltModels,
    RankerConfig,
    ShardReadError,
    capfilt_shard,
    config_hash,
    load_capfilt_models,
)
from data_catalog import CAPFILT_STAGE, Catalog, CatalogError, PlannedShard, ShardStatusUpdate
from data_catalog.layout import Layout
from data_catalog.url_safety import no_credentials_pattern
from flows.common import (
    artifact_key,
    catalog_session,
    flow_run_id,
    layout_for,
    redact,
    refuse_url_credentials,
    require_paths,
    source_lock,
)

_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(CapFiltConfig) if f.default is not dataclasses.MISSING
}
# Prefect runs the flow's tasks in threads; Ray-backed tasks only wait on an actor, so many may be in flight.
_MAX_TASK_THREADS = 256
_worker_log = logging.getLogger("blip2.capfilt.worker")


# --- parameters and summary ------------------------------------------------------------------------


class RankerParams(BaseModel):
    """The CLIP ranker: an open_clip model name, its local weights, and its config JSON if custom."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("ViT-L-14", description="open_clip model name (the config file's stem if custom)")
    weights: Path = Field(description="local weights file (safetensors or open_clip checkpoint)")
    config: Path | None = Field(None, description="open_clip model-config JSON for a custom model")


class SamplingParams(BaseModel):
    """Nucleus sampling and ranking; the defaults are the paper's (SPEC.md, CapFilt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_captions: int = Field(_DEFAULTS["num_captions"], ge=1)
    top_p: float = Field(_DEFAULTS["top_p"], gt=0.0, le=1.0)
    top_k: int = Field(_DEFAULTS["top_k"], ge=0, description="0: pure nucleus sampling")
    repetition_penalty: float = Field(_DEFAULTS["repetition_penalty"], gt=0.0)
    min_length: int = Field(_DEFAULTS["min_length"], ge=0, description="tokens, prompt included")
    max_length: int = Field(_DEFAULTS["max_length"], ge=1, description="tokens, prompt included")
    prompt: str = _DEFAULTS["prompt"]
    keep_top: int = Field(_DEFAULTS["keep_top"], ge=1)
    seed: int = _DEFAULTS["seed"]


class CapFiltParams(BaseModel):
    """Parameters of one CapFilt run (the flow's and the CLI's)."""

    # Errors never quote a value: ray_address may be a refused URL with credentials.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    sources: tuple[str, ...] = Field(min_length=1, description="catalog source names")
    shards: tuple[str, ...] | None = Field(
        None, description="recompute only these shards: '00003' (in every source) or 'source/00003'"
    )
    captioner: Path = Field(description="BLIP captioner directory in save_pretrained format")
    ranker: RankerParams
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    batch_size: int = Field(_DEFAULTS["batch_size"], ge=1, description="images per model batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when workers have GPUs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    shards_per_task: int = Field(8, ge=1, description="shards per Prefect task run")
    force: bool = Field(False, description="recompute shards that are already done")
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join; default: the connected one, else start a local instance",
        json_schema_extra={"pattern": no_credentials_pattern()},  # the server refuses credentials too
    )
    num_workers: int = Field(1, ge=1, description="ray: model-holding CPU actors when there is no GPU")
    num_gpus: int | None = Field(None, ge=0, description="ray: one actor per GPU; default every GPU")
    home: Path | None = Field(None, description="data root; default $BLIP2_HOME or ./var")

    @field_validator("ray_address")
    @classmethod
    def _ray_address_without_credentials(cls, address: str | None) -> str | None:
        return refuse_url_credentials(address)


class CapFiltSourceRow(BaseModel):
    """One source's line of the final table; sample figures cover the shards this run computed."""

    source: str
    shards: int
    done: int  # computed by this run
    cached: int  # already done under this config: skipped
    failed: int
    samples_ok: int
    samples_failed: int
    web_kept_share: float | None
    top1_score_mean: float | None


class CapFiltSummary(BaseModel):
    run_id: str
    config_hash: str
    engine: str
    task_runs: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    samples_ok: int
    samples_failed: int
    web_kept_share: float | None  # this run's samples whose web caption is in the top keep_top
    failed_shards: dict[str, str]  # "source/shard" -> error
    sources: list[CapFiltSourceRow]
    score_stats: dict[str, Any] | None  # catalog.capfilt_score_stats over every done shard of the config


# --- config ----------------------------------------------------------------------------------------


def capfilt_config(params: CapFiltParams, device: str) -> CapFiltConfig:
    """The blip2_core config the workers run; its hash keys every output of the run."""
    ranker = RankerConfig(
        model=params.ranker.model,
        weights=str(Path(params.ranker.weights).resolve()),
        model_config=str(Path(params.ranker.config).resolve()) if params.ranker.config else None,
    )
    return CapFiltConfig(
        captioner=str(Path(params.captioner).resolve()),
        ranker=ranker,
        batch_size=params.batch_size,
        device=device,
        dtype=params.dtype,
        **params.sampling.model_dump(),
    )


def config_to_dict(cfg: CapFiltConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> CapFiltConfig:
    return CapFiltConfig(**{**d, "ranker": RankerConfig(**d["ranker"])})


# --- the worker side: runs in the flow process (local) or in a Ray actor ----------------------------

_MODELS: dict[str, CapFiltModels] = {}


def cached_models(cfg: CapFiltConfig) -> CapFiltModels:
    """The models of `cfg`, loaded once per process; a new config evicts the old one (memory)."""
    key = config_hash(cfg)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_capfilt_models(cfg)
    return _MODELS[key]


def run_shard_batch(items: list[dict], cfg_dict: dict) -> list[dict]:
    """CapFilt over a batch of shards: one small record per shard, a sidecar per successful shard.

    A shard that fails (unreadable tar, or any error while processing it) gets a 'failed' record and
    no sidecar; the batch goes on. Failing to load the models is not a shard's fault: it raises.
    """
    cfg = config_from_dict(cfg_dict)
    models = cached_models(cfg)
    return [_run_one_shard(item, cfg, models) for item in items]


def _run_one_shard(item: dict, cfg: CapFiltConfig, models: CapFiltModels) -> dict:
    record = {"source": item["source"], "shard": item["shard"], "output_path": item["out"]}
    start = time.monotonic()
    try:
        result = capfilt_shard(item["tar"], item["out"], cfg, models)
    except ShardReadError as err:
        return {**record, "status": "failed", "error": str(err), "seconds": time.monotonic() - start}
    except Exception as err:  # one bad shard must not stop a 13k-shard run; it is recorded and re-runnable
        _worker_log.exception("CapFilt of shard %s/%s failed", item["source"], item["shard"])
        error = f"{type(err).__name__}: {err}"
        return {**record, "status": "failed", "error": error, "seconds": time.monotonic() - start}
    return {
        **record,
        "status": "done",
        "error": None,
        "seconds": time.monotonic() - start,
        **dataclasses.asdict(result),
    }


@task(name="capfilt-shards", cache_policy=NO_CACHE, task_run_name="capfilt-{label}")
def capfilt_shards(items: list[dict], cfg: dict, label: str, pool: str | None = None) -> list[dict]:
    """Run CapFilt on a batch of shards (paths in `items`) in this process, or on a Ray actor of `pool`.

    Returns one record per shard: source, shard, status ('done' or 'failed'), output_path, error, and
    the shard's figures (blip2_core.capfilt.ShardResult) when done.
    """
    if pool is None:
        return run_shard_batch(items, cfg)
    from flows.ray_capfilt import get_pool

    return get_pool(pool).run(items, cfg)


# --- engines ---------------------------------------------------------------------------------------


class Engine(Protocol):
    device: str  # what the workers run on: enters the config hash
    slots: int  # batches in flight at once
    pool: str | None  # Ray pool id handed to the tasks; None: run in this process


@dataclasses.dataclass
class LocalEngine:
    """Batches run one at a time in the flow process, sharing one copy of the models."""

    device: str
    slots: int = 1
    pool: str | None = None


def resolve_local_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def open_engine(params: CapFiltParams) -> Iterator[Engine]:
    if params.engine == "local":
        yield LocalEngine(device=resolve_local_device(params.device))
        return
    from flows.ray_capfilt import ray_actor_pool

    with ray_actor_pool(params.ray_address, params.device, params.num_gpus, params.num_workers) as pool:
        yield pool


# --- planning --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What a run will do: the shards to compute (work items) and, per source, the cache hits."""

    todo: list[dict]
    registered: dict[str, int]
    cached: dict[str, list[str]]


def parse_shard_choice(choice: tuple[str, ...], sources: tuple[str, ...]) -> dict[str, set[str]]:
    """'00003' applies to every source; 'src/00003' to one. Returns source -> chosen shard ids."""
    chosen: dict[str, set[str]] = {s: set() for s in sources}
    for item in choice:
        source, _, shard = item.rpartition("/")
        for s in [source] if source else sources:
            if s not in chosen:
                raise ValueError(f"shard {item!r} names source {s!r}, which is not among {list(sources)}")
            chosen[s].add(shard)
    return chosen


def plan_shards(cat: Catalog, params: CapFiltParams, layout: Layout, chash: str) -> Plan:
    plan = Plan(todo=[], registered={}, cached={})
    choice = parse_shard_choice(params.shards, params.sources) if params.shards else None
    for source in params.sources:
        shards = {s.shard: s for s in cat.shard_plan(source, CAPFILT_STAGE, chash)}
        if not shards:
            raise CatalogError(f"source {source!r} has no registered shards: ingest it first (blip2 ingest)")
        plan.registered[source] = len(shards)
        if choice is not None:
            unknown = sorted(choice[source] - shards.keys())
            if unknown:
                raise CatalogError(f"source {source!r} has no shard(s) {unknown}")
            todo = sorted(choice[source])
        else:
            done = set() if params.force else _done_shards(layout, chash, shards.values())
            todo = sorted(shards.keys() - done)
            plan.cached[source] = sorted(done)
        for shard in todo:
            out = layout.capfilt_sidecar(chash, source, shard)
            plan.todo.append(
                {"source": source, "shard": shard, "tar": shards[shard].tar_path, "out": str(out)}
            )
    return plan


def _done_shards(layout: Layout, chash: str, shards: Iterable[PlannedShard]) -> set[str]:
    """Shards done under `chash` whose sidecar is whole on disk; one that lost or broke it runs again."""
    done = set()
    for s in shards:
        if s.status != "done":
            continue
        problem = sidecar_problem(layout.capfilt_sidecar(chash, s.source, s.shard), s.samples_ok)
        if problem is None:
            done.add(s.shard)
        else:
            get_run_logger().warning("shard %s/%s runs again: %s", s.source, s.shard, problem)
    return done


def sidecar_problem(path: Path, samples: int | None) -> str | None:
    """Why a 'done' sidecar cannot be trusted: missing, cut short (no Parquet footer), or not one row per
    sample of its shard. Reads the footer only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        return f"sidecar {path} is missing"
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        return f"sidecar {path} is unreadable ({err})"
    if samples is not None and rows != samples:
        return f"sidecar {path} has {rows} rows for a shard of {samples} samples"
    return None


def shard_batches(items: list[dict], shards_per_task: int) -> list[list[dict]]:
    return [items[i : i + shards_per_task] for i in range(0, len(items), shards_per_task)]


def batch_label(batch: list[dict]) -> str:
    first, last = batch[0], batch[-1]
    if len(batch) == 1:
        return f"{first['source']}-{first['shard']}"
    if first["source"] == last["source"]:
        return f"{first['source']}-{first['shard']}-to-{last['shard']}"
    return f"{first['source']}-{first['shard']}-to-{last['source']}-{last['shard']}"


def remove_stale_temporaries(folder: Path) -> int:
    """Temporary sidecars of a killed run (the folder is locked, so no live writer owns them)."""
    stale = list(folder.glob(".tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# --- running and registering -----------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """Results of this run, per source."""

    records: list[dict] = dataclasses.field(default_factory=list)

    def add(self, records: list[dict]) -> None:
        self.records.extend(records)

    def of(self, source: str | None = None, status: str | None = None) -> list[dict]:
        return [
            r
            for r in self.records
            if (source is None or r["source"] == source) and (status is None or r["status"] == status)
        ]


def _weighted_mean(records: list[dict], field: str) -> float | None:
    pairs = [(r[field], r["n_ok"]) for r in records if r.get(field) is not None and r["n_ok"]]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def _result_update(r: dict) -> ShardStatusUpdate:
    output = r["output_path"] if r["status"] == "done" else None
    return ShardStatusUpdate(r["source"], r["shard"], r["status"], output, r["error"])


def record_batches(
    layout: Layout, chash: str, run_id: str, records: list[dict], starting: list[list[dict]]
) -> None:
    """One catalog session and one transaction per returned batch: its shards' results (a 'done' shard's
    score summary included, read from its sidecar) and 'running' for the batches about to be submitted."""
    updates = [_result_update(r) for r in records]
    updates += [ShardStatusUpdate(i["source"], i["shard"], "running") for batch in starting for i in batch]
    if not updates:
        return
    with catalog_session(layout) as cat:
        cat.set_shard_statuses(CAPFILT_STAGE, chash, run_id, updates)


def run_batches(
    batches: list[list[dict]], cfg: dict, engine: Engine, layout: Layout, chash: str, run_id: str
) -> Tally:
    """Submit shard batches, at most `engine.slots` in flight; register each batch as it comes back."""
    logger = get_run_logger()
    tally, queue = Tally(), deque(batches)
    total = sum(len(b) for b in batches)
    progress_id = create_progress_artifact(
        progress=0.0 if total else 100.0,
        key=artifact_key("capfilt-progress", chash),
        description=f"CapFilt `{chash}`: shards computed of {total} to do",
    )
    in_flight: dict[PrefectFuture, list[dict]] = {}
    records: list[dict] = []
    while queue or in_flight:
        starting = [queue.popleft() for _ in range(min(len(queue), engine.slots - len(in_flight)))]
        record_batches(layout, chash, run_id, records, starting)  # the last batch's results, the next ones
        for batch in starting:
            future = capfilt_shards.submit(batch, cfg, batch_label(batch), engine.pool)
            in_flight[future] = batch
        future = next(as_completed(list(in_flight)))
        in_flight.pop(future)
        records = future.result()  # a task that raised (models failed to load) stops the run
        tally.add(records)
        for r in records:
            if r["status"] == "failed":
                logger.warning("shard %s/%s failed: %s", r["source"], r["shard"], r["error"])
        logger.info(
            "capfilt %d/%d shards (%d failed)", len(tally.records), total, len(tally.of(status="failed"))
        )
        update_progress_artifact(progress_id, progress=100.0 * len(tally.records) / total)
    record_batches(layout, chash, run_id, records, [])
    return tally


# --- the flow --------------------------------------------------------------------------------------


@flow(name="capfilt", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=_MAX_TASK_THREADS))
def capfilt_flow(params: CapFiltParams) -> CapFiltSummary:
    """Caption, rank and filter the web captions of registered shards; sidecars keyed by config hash."""
    require_paths(
        files={"ranker.weights": params.ranker.weights, "ranker.config": params.ranker.config},
        dirs={"captioner": params.captioner},
    )
    logger = get_run_logger()
    layout = layout_for(params.home)
    with open_engine(params) as engine, contextlib.ExitStack() as locks:
        cfg = capfilt_config(params, engine.device)
        chash = config_hash(cfg)
        for source in params.sources:
            folder = layout.capfilt(chash, source)
            locks.enter_context(source_lock(folder))
            remove_stale_temporaries(folder)
        with catalog_session(layout) as cat:
            plan = plan_shards(cat, params, layout, chash)
            run_id = cat.start_run(CAPFILT_STAGE, chash, _jsonable(params), flow_run_id())
        _log_plan(logger, plan, chash, run_id, params)
        batches = shard_batches(plan.todo, params.shards_per_task)
        try:
            tally = run_batches(batches, config_to_dict(cfg), engine, layout, chash, run_id)
        except BaseException as err:
            with catalog_session(layout) as cat:
                cat.finish_run(run_id, "failed", {"error": redact(str(err))[:2000]})
            raise
        with catalog_session(layout) as cat:
            summary = summarize(cat, params, plan, tally, chash, run_id, len(batches))
            cat.finish_run(run_id, "done", summary.model_dump())
    _publish(summary, cfg.keep_top)
    return summary


def _log_plan(logger: Any, plan: Plan, chash: str, run_id: str, params: CapFiltParams) -> None:
    logger.info("capfilt config %s, run %s, engine %s", chash, run_id, params.engine)
    for source, n in plan.registered.items():
        cached = plan.cached.get(source, [])
        todo = sum(1 for item in plan.todo if item["source"] == source)
        logger.info(
            "capfilt %s: %d shards registered, %d done already (cache hits, skipped), %d to compute",
            source,
            n,
            len(cached),
            todo,
        )
        if cached:
            shown = ", ".join(cached[:10]) + (", ..." if len(cached) > 10 else "")
            logger.info("capfilt %s cache hits: %s", source, shown)


def summarize(
    cat: Catalog, params: CapFiltParams, plan: Plan, tally: Tally, chash: str, run_id: str, task_runs: int
) -> CapFiltSummary:
    rows = []
    for source, n in plan.registered.items():
        done, failed = tally.of(source, "done"), tally.of(source, "failed")
        rows.append(
            CapFiltSourceRow(
                source=source,
                shards=n,
                done=len(done),
                cached=len(plan.cached.get(source, [])),
                failed=len(failed),
                samples_ok=sum(r["n_ok"] for r in done),
                samples_failed=sum(r["n_failed"] for r in done),
                web_kept_share=_weighted_mean(done, "web_kept_share"),
                top1_score_mean=_weighted_mean(done, "top1_score_mean"),
            )
        )
    stats = cat.capfilt_score_stats(chash)
    return CapFiltSummary(
        run_id=run_id,
        config_hash=chash,
        engine=params.engine,
        task_runs=task_runs,
        shards_done=sum(r.done for r in rows),
        shards_skipped=sum(r.cached for r in rows),
        shards_failed=sum(r.failed for r in rows),
        samples_ok=sum(r.samples_ok for r in rows),
        samples_failed=sum(r.samples_failed for r in rows),
        web_kept_share=_weighted_mean(tally.of(status="done"), "web_kept_share"),
        failed_shards={f"{r['source']}/{r['shard']}": r["error"] for r in tally.of(status="failed")},
        sources=rows,
        score_stats=dataclasses.asdict(stats[0]) if stats else None,
    )


def _publish(summary: CapFiltSummary, keep_top: int) -> None:
    """The final table artifact: one row per source (this run), one for every done shard of the config."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    table = [
        {
            "source": r.source,
            "shards": r.shards,
            "done (this run)": r.done,
            "cached": r.cached,
            "failed": r.failed,
            "samples": r.samples_ok,
            "failed samples": r.samples_failed,
            f"web caption in top {keep_top}": pct(r.web_kept_share),
            "top-1 score mean": num(r.top1_score_mean),
            "top-1 p10 / median / p90": "-",
        }
        for r in summary.sources
    ]
    s = summary.score_stats
    if s is not None:
        table.append(
            {
                "source": "all done shards of the config",
                "shards": "-",
                "done (this run)": "-",
                "cached": "-",
                "failed": "-",
                "samples": s["samples"],
                "failed samples": s["errors"],
                f"web caption in top {keep_top}": pct(s["web_caption_kept_share"]),
                "top-1 score mean": num(s["top1_mean"]),
                "top-1 p10 / median / p90": " / ".join(
                    num(s[k]) for k in ("top1_p10", "top1_median", "top1_p90")
                ),
            }
        )
    names = list(summary.failed_shards)
    failed = f", failed: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else ""
    create_table_artifact(
        table=table,
        key=artifact_key("capfilt", summary.config_hash),
        description=f"CapFilt `{summary.config_hash}` run {summary.run_id}: {summary.shards_done} shards "
        f"done, {summary.shards_skipped} cached, {summary.shards_failed} failed{failed}",
    )
    get_run_logger().info(
        "capfilt %s done: %d shards computed, %d cached, %d failed; web caption kept in top %d: %s",
        summary.config_hash,
        summary.shards_done,
        summary.shards_skipped,
        summary.shards_failed,
        keep_top,
        pct(summary.web_kept_share),
    )


def _jsonable(params: BaseModel) -> dict:
    return redact(json.loads(params.model_dump_json()))
