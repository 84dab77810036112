"""CapFilt quality on the synthetic corpus: does CapFilt with the trained teachers raise caption correctness?

Synthesizes a corpus, trains the teachers (`blip2_core.teachers`) on its clean splits, runs
`blip2_core.capfilt.run_capfilt` over the pretraining images with the teacher captioner and CLIP ranker,
and judges every caption against the scene's ground truth with a rule-based judge:

    a caption is correct when everything it states (counts, sizes, colours, shapes, positions, background)
    is true of the scene and it names every shape group, each exactly once.

Prints one JSON line: the share of correct captions among the raw web captions and among the kept top two
(plus diagnostics: top-1, all generated candidates, how often the web caption was kept, what a perfect
ranker would keep from the same candidates, and the ranker's pairwise accuracy: the share of (correct, wrong)
caption pairs of one image that it scores in the right order).

    python benchmarks/capfilt_quality.py                  # 1,000 pretrain images, the "capfilt" teachers
    python benchmarks/capfilt_quality.py --profile demo   # the demo's (few-minute) teachers instead
    python benchmarks/capfilt_quality.py --workdir DIR    # keep (or reuse) the corpus and teachers in DIR

The "capfilt" teachers train for about 20 CPU minutes on the corpus' 4,000-image teacher set.

The judge lives here, not in blip2_core, because it reads the corpus' word lists from data_catalog.synth.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The corpus' own vocabulary: counts ("a"/"two"/...), positions ("on the left"...), templates.
from data_catalog.synth.captions import _COUNT_WORDS, _TEMPLATES, WHERE  # noqa: E402
from data_catalog.synth.scenes import COLOURS, SHAPES, SIZES  # noqa: E402

# ----------------------------------------------------------------------------------------------- judge

COUNT_OF = {"a": 1, "an": 1} | {word: n for n, word in _COUNT_WORDS.items() if n > 1}
POSITION_WORDS = {position: tuple(phrase.split()) for position, phrase in WHERE.items()}


@dataclass(frozen=True)
class StatedGroup:
    """What a caption says about one group of identical shapes; None where it says nothing."""

    count: int
    kind: str
    colour: str
    size: str | None
    position: str | None


@dataclass(frozen=True)
class ParsedCaption:
    groups: tuple[StatedGroup, ...]
    background: str | None


def _template_patterns() -> list[re.Pattern[str]]:
    """Each caption template as an anchored regex; bare objects last (the captioner's prompt is stripped)."""
    colours = "|".join(COLOURS)
    patterns = []
    for template in (*_TEMPLATES, "{objects}"):
        regex = re.escape(template).replace(r"\{objects\}", "(?P<objects>.+)")
        regex = regex.replace(r"\{bg\}", f"(?P<bg>{colours})")
        patterns.append(re.compile(regex))
    return patterns


TEMPLATE_PATTERNS = _template_patterns()


def _parse_group(words: list[str], i: int) -> tuple[StatedGroup, int] | None:
    """The group phrase at words[i]: count [size] colour kind(s) [position]; returns it and its end."""
    count = COUNT_OF.get(words[i]) if i < len(words) else None
    if count is None:
        return None
    i += 1
    size = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i + 1 >= len(words) or words[i] not in COLOURS:
        return None
    colour, noun = words[i], words[i + 1]
    kind = noun if count == 1 else noun.removesuffix("s") if noun.endswith("s") else ""
    if kind not in SHAPES:
        return None
    i += 2
    position = None
    for name, phrase in POSITION_WORDS.items():
        if tuple(words[i : i + len(phrase)]) == phrase:
            position, i = name, i + len(phrase)
            break
    return StatedGroup(count, kind, colour, size, position), i


def _parse_objects(text: str) -> tuple[StatedGroup, ...] | None:
    """Group phrases joined by commas and a final "and"; None unless every word is accounted for."""
    words = text.replace(",", " ").split()
    groups, i = [], 0
    while i < len(words):
        if groups and words[i] == "and":
            i += 1
        parsed = _parse_group(words, i)
        if parsed is None:
            return None
        group, i = parsed
        groups.append(group)
    return tuple(groups) or None


def parse_caption(caption: str) -> ParsedCaption | None:
    """The groups and background a caption states, or None if it is not a caption of the corpus' grammar."""
    text = " ".join(caption.lower().replace(" ,", ",").split()).rstrip(".")
    for pattern in TEMPLATE_PATTERNS:
        match = pattern.fullmatch(text)
        groups = _parse_objects(match["objects"]) if match else None
        if groups is not None:
            return ParsedCaption(groups, match.groupdict().get("bg"))
    return None


def _agrees(stated: StatedGroup, true: StatedGroup) -> bool:
    return (
        (stated.count, stated.kind, stated.colour) == (true.count, true.kind, true.colour)
        and stated.size in (None, true.size)
        and stated.position in (None, true.position)  # a group of several has no single position
    )


def is_correct(caption: str, gt_caption: str) -> bool:
    """Everything `caption` states is true of the scene of `gt_caption` (the corpus' full caption) and it
    names every shape group exactly once."""
    truth = parse_caption(gt_caption)
    if truth is None:
        raise ValueError(f"ground-truth caption does not parse: {gt_caption!r}")
    stated = parse_caption(caption)
    if stated is None or stated.background not in (None, truth.background):
        return False
    if len(stated.groups) != len(truth.groups):
        return False
    return any(
        all(_agrees(s, truth.groups[j]) for s, j in zip(stated.groups, order, strict=True))
        for order in itertools.permutations(range(len(truth.groups)))
    )


def caption_errors(caption: str, gt_caption: str) -> str:
    """What a caption gets wrong, for the error breakdown: "ok", "unparsed", "background", "groups" (it names
    another number of shape groups), or the attributes wrong in the closest reading, joined by "+"."""
    truth, stated = parse_caption(gt_caption), parse_caption(caption)
    if truth is None:
        raise ValueError(f"ground-truth caption does not parse: {gt_caption!r}")
    if stated is None:
        return "unparsed"
    if stated.background not in (None, truth.background):
        return "background"
    if len(stated.groups) != len(truth.groups):
        return "groups"
    readings = []
    for order in itertools.permutations(range(len(truth.groups))):
        wrong = set()
        for s, j in zip(stated.groups, order, strict=True):
            t = truth.groups[j]
            checks = {
                "count": s.count != t.count,
                "shape": s.kind != t.kind,
                "colour": s.colour != t.colour,
                "size": s.size not in (None, t.size),
                "position": s.position not in (None, t.position),
            }
            wrong |= {name for name, bad in checks.items() if bad}
        readings.append(wrong)
    return "+".join(sorted(min(readings, key=len))) or "ok"


# ----------------------------------------------------------------------------------------------- benchmark


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def _scored(rec: object, gt_caption: str) -> list[tuple[float, bool]]:
    """(CLIP score, correct) of each distinct caption the ranker scored (the candidates, then the web one)."""
    texts = [*rec.candidates, rec.web_caption]
    seen, out = set(), []
    for text, score in zip(texts, rec.scores, strict=True):
        if score == score and text not in seen:  # NaN: dropped as degenerate
            seen.add(text)
            out.append((score, is_correct(text, gt_caption)))
    return out


def capfilt_quality(corpus_dir: Path, teachers: object, batch_size: int, seed: int) -> dict:
    """Run CapFilt over the corpus' pretraining images; shares of correct captions before and after."""
    import pyarrow.parquet as pq

    from blip2_core.capfilt import CapFiltConfig, RankerConfig, load_capfilt_models, run_capfilt

    cfg = CapFiltConfig(
        captioner=str(teachers.captioner),
        ranker=RankerConfig(
            model=teachers.clip_model_name,
            weights=str(teachers.clip_weights),
            model_config=str(teachers.clip_config),
        ),
        batch_size=batch_size,
        seed=seed,
    )
    rows = pq.read_table(corpus_dir / "manifests" / "pretrain.parquet").to_pylist()
    samples = [(str(r["image_id"]), (corpus_dir / r["path"]).read_bytes(), r["caption"]) for r in rows]
    start = time.perf_counter()
    records = list(run_capfilt(samples, cfg, load_capfilt_models(cfg)))
    seconds = time.perf_counter() - start
    web, kept, top1, generated, web_kept, oracle, pairs = [], [], [], [], [], [], []
    errors: collections.Counter[str] = collections.Counter()
    for row, rec in zip(rows, records, strict=True):
        gt = row["gt_caption"]
        web.append(is_correct(row["caption"], gt))
        kept += [is_correct(t, gt) for t in rec.top]
        top1.append(bool(rec.top) and is_correct(rec.top[0], gt))
        generated += [is_correct(t, gt) for t in rec.candidates]
        errors.update(caption_errors(t, gt) for t in rec.candidates)
        web_kept.append(rec.web_caption in rec.top)
        scored, k = _scored(rec, gt), len(rec.top)
        right = min(k, sum(ok for _, ok in scored))  # a perfect ranker keeps the correct ones first
        oracle += [True] * right + [False] * (min(k, len(scored)) - right)
        pairs += [a > b for a, ok_a in scored if ok_a for b, ok_b in scored if not ok_b and a != b]
    return {
        "images": len(rows),
        "web_correct_share": _share(web),
        "kept_top2_correct_share": _share(kept),
        "top1_correct_share": _share(top1),
        "generated_correct_share": _share(generated),
        "web_caption_kept_share": _share(web_kept),
        "perfect_ranker_top2_correct_share": _share(oracle),
        "ranker_pairwise_accuracy": _share(pairs),
        # Share of the generated candidates by what they get wrong; the eight most common kinds.
        "generated_errors": {kind: round(n / sum(errors.values()), 4) for kind, n in errors.most_common(8)},
        "capfilt_seconds": round(seconds, 1),
        "example": {"web": rows[0]["caption"], "gt": rows[0]["gt_caption"], "kept": list(records[0].top)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-pretrain", type=int, default=1000)
    parser.add_argument("--n-coco", type=int, default=1000)
    parser.add_argument("--n-vqa", type=int, default=1000)
    parser.add_argument("--n-teacher", type=int, default=4000, help="clean images for the teachers only")
    parser.add_argument("--profile", choices=("capfilt", "demo"), default="capfilt",
                        help="teacher configuration (blip2_core.teachers.TEACHER_PROFILES); the options "
                             "below apply on top of it")  # fmt: skip
    parser.add_argument("--captioner-steps", type=int, default=None, help="default: the profile's")
    parser.add_argument("--captioner-init-std", type=float, default=None, help="ViT and decoder init std")
    parser.add_argument("--captioner-position-init-std", type=float, default=None,
                        help="the captioner ViT's position embedding init std")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads ran 5x slower on a busy 2-core box
    parser.add_argument("--workdir", type=Path, default=None, help="corpus + teachers (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from blip2_core.teachers import CLIP_MODEL_NAME, TeacherPaths, teacher_profile, train_teachers
    from data_catalog.synth import SynthConfig, synthesize

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="capfilt-quality-"))
    corpus = work / "corpus"
    if not (corpus / "corpus.json").is_file():
        synthesize(corpus, SynthConfig(seed=args.seed, n_pretrain=args.n_pretrain, n_coco=args.n_coco,
                                       n_vqa_images=args.n_vqa, n_retrieval=10,
                                       n_teacher=args.n_teacher))  # fmt: skip
    out = work / "teachers"
    start = time.perf_counter()
    if (out / "t5" / "config.json").is_file():
        clip = out / "clip"
        teachers = TeacherPaths(clip / f"{CLIP_MODEL_NAME}.json", clip / f"{CLIP_MODEL_NAME}.safetensors",
                                out / "captioner", out / "opt", out / "t5", out / "tokenizers")  # fmt: skip
    else:
        cfg = teacher_profile(args.profile, args.seed)
        if args.captioner_steps is not None:
            cfg = replace(cfg, captioner=replace(cfg.captioner, steps=args.captioner_steps))
        if args.captioner_init_std is not None:
            std = args.captioner_init_std
            cfg = replace(cfg, captioner=replace(cfg.captioner, vision_init_std=std, text_init_std=std))
        if args.captioner_position_init_std is not None:
            std = args.captioner_position_init_std
            cfg = replace(cfg, captioner=replace(cfg.captioner, position_init_std=std))
        teachers = train_teachers(corpus, out, cfg)
    teacher_seconds = time.perf_counter() - start
    result = capfilt_quality(corpus, teachers, args.batch_size, args.seed)
    result["teacher_seconds"] = {
        name: json.loads((out / name / "teacher.json").read_text())["seconds"]
        for name in ("clip", "captioner", "opt", "t5")
    }
    result["teachers_total_seconds"] = round(teacher_seconds, 1)  # 0 when the workdir's teachers were reused
    logs = {name: json.loads((out / name / "teacher.json").read_text()) for name in ("clip", "captioner")}
    result["teacher_configs"] = {name: log["config"] for name, log in logs.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
