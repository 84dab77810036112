"""The synthetic corpus on disk: images, manifests, COCO / Karpathy / VQAv2-format files, corpus.json.

    corpus/
      corpus.json                              seed, config, image sets, files (paths relative)
      images/<set>/<image_id>.jpg              one folder per image set; the sets share no image
      manifests/<set>.parquet                  image_id, path (relative), caption, gt_caption,
                                               web_caption_kind, wrong_attribute
      coco/dataset_coco.json                   Karpathy-style splits of the COCO-like caption set
      coco/annotations/captions_<split>.json   COCO caption annotations per split (5 references)
      vqa/v2_OpenEnded_synth_<split>_questions.json, vqa/v2_synth_<split>_annotations.json
      retrieval/captions_test.json             the retrieval test split (COCO format)
      teacher/captions_train.json              clean captions (COCO format) of the `teacher_train` set:
                                               what the off-the-shelf models of the miniature replication
                                               learn from, as the real ones learned from their own data

Every image is drawn from its own generator, seeded by (seed, set, index), so a corpus is a pure
function of its config. The corpus is built in a staging folder and moved into place whole.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_catalog.synth.captions import (
    WRONG_ATTRIBUTES,
    applicable,
    correct_caption,
    gt_caption,
    reference_captions,
    wrong_caption,
)
from data_catalog.synth.scenes import Scene, render, sample_scene
from data_catalog.synth.vqa import human_answers, majority, questions

CAPTION_KINDS = ("correct", "partly_wrong", "unrelated")
MANIFEST_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("path", pa.string()), ("caption", pa.string()), ("gt_caption", pa.string()),
     ("web_caption_kind", pa.string()), ("wrong_attribute", pa.string())]
)  # fmt: skip


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` makes. Shares are (correct, partly_wrong, unrelated) web captions; they sum to 1."""

    seed: int = 0
    n_pretrain: int = 5_000
    n_coco: int = 1_000
    n_vqa_images: int = 1_000
    n_retrieval: int = 1_000
    # Clean captioned images for the teachers only (the captioner, CLIP and LLMs stand-ins). A captioner
    # trained on a few hundred images memorises them by their colours instead of learning shapes.
    n_teacher: int = 0
    image_size: int = 128
    jpeg_quality: int = 90
    max_shapes: int = 3
    caption_shares: tuple[float, float, float] = (0.6, 0.25, 0.15)
    wrong_attributes: tuple[str, ...] = WRONG_ATTRIBUTES
    coco_splits: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test (Karpathy-style)
    vqa_val_fraction: float = 0.2
    references_per_image: int = 5
    questions_per_image: int = 5
    answer_noise: float = 0.1  # chance that one of the ten annotators answers wrongly

    def __post_init__(self) -> None:
        for name in ("n_pretrain", "n_coco", "n_vqa_images", "n_retrieval", "n_teacher"):
            if getattr(self, name) < 0:
                raise ValueError(f"SynthConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 16 <= self.image_size <= 4096:
            raise ValueError(f"SynthConfig.image_size must be in [16, 4096], got {self.image_size}")
        for name in ("caption_shares", "coco_splits"):
            values = getattr(self, name)
            if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
                raise ValueError(
                    f"SynthConfig.{name} must be three non-negative shares summing to 1, got {values}"
                )
        unknown = set(self.wrong_attributes) - set(WRONG_ATTRIBUTES)
        if unknown or not self.wrong_attributes:
            raise ValueError(f"SynthConfig.wrong_attributes must be a non-empty subset of {WRONG_ATTRIBUTES}")
        if not 0 <= self.answer_noise < 0.5:
            raise ValueError(f"SynthConfig.answer_noise must be in [0, 0.5), got {self.answer_noise}")


@dataclass(frozen=True)
class CorpusInfo:
    """A synthesized corpus: its folder, config, images per set and files (absolute paths)."""

    root: Path
    config: SynthConfig
    image_sets: dict[str, int]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """One image of the corpus and its ground truth."""

    image_id: int
    image_set: str
    scene: Scene
    references: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"images/{self.image_set}/{self.image_id:07d}.jpg"


def split_sizes(n: int, shares: tuple[float, ...]) -> list[int]:
    """`n` divided by `shares` into integers summing to `n` (largest remainders get the rest)."""
    exact = [n * s for s in shares]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def image_sets(cfg: SynthConfig) -> dict[str, int]:
    """Image count per set, in the order image ids are given."""
    coco = split_sizes(cfg.n_coco, cfg.coco_splits)
    vqa_val = round(cfg.n_vqa_images * cfg.vqa_val_fraction)
    return {
        "pretrain": cfg.n_pretrain,
        "coco_train": coco[0],
        "coco_val": coco[1],
        "coco_test": coco[2],
        "vqa_train": cfg.n_vqa_images - vqa_val,
        "vqa_val": vqa_val,
        "retrieval_test": cfg.n_retrieval,
        "teacher_train": cfg.n_teacher,
    }


def _make_items(root: Path, cfg: SynthConfig) -> dict[str, list[Item]]:
    items: dict[str, list[Item]] = {}
    next_id = 1
    for name, n in image_sets(cfg).items():
        (root / "images" / name).mkdir(parents=True)
        items[name] = []
        for i in range(n):
            rng = random.Random(f"{cfg.seed}:{name}:{i}")
            scene = sample_scene(rng, cfg.max_shapes)
            item = Item(next_id, name, scene, tuple(reference_captions(scene, rng, cfg.references_per_image)))
            # Files inside the staging folder need no atomic rename: the folder appears whole.
            (root / item.path).write_bytes(render(scene, cfg.image_size, rng, cfg.jpeg_quality))
            items[name].append(item)
            next_id += 1
    return items


def _web_captions(items: list[Item], cfg: SynthConfig) -> list[tuple[str, str, str | None]]:
    """(caption, kind, wrong attribute) per pretraining image, the kinds in exactly the configured shares."""
    rng = random.Random(f"{cfg.seed}:web-captions")
    kinds = [k for k, n in zip(CAPTION_KINDS, split_sizes(len(items), cfg.caption_shares), strict=True)
             for _ in range(n)]  # fmt: skip
    rng.shuffle(kinds)
    out = []
    for i, (item, kind) in enumerate(zip(items, kinds, strict=True)):
        if kind == "correct":
            out.append((correct_caption(item.scene, rng), kind, None))
        elif kind == "partly_wrong":
            attribute = rng.choice(
                [a for a in cfg.wrong_attributes if applicable(item.scene, a)] or ["colour"]
            )
            out.append((wrong_caption(item.scene, attribute, rng), kind, attribute))
        else:
            out.append((correct_caption(_unrelated_scene(items, i, rng), rng), kind, None))
    return out


def _unrelated_scene(items: list[Item], i: int, rng: random.Random) -> Scene:
    own = gt_caption(items[i].scene)
    others = [j for j in rng.sample(range(len(items)), min(len(items), 20)) if j != i]
    for j in others:
        if gt_caption(items[j].scene) != own:
            return items[j].scene
    raise ValueError(
        "SynthConfig.n_pretrain is too small to find an unrelated caption; use at least 2 images"
    )


def _write_manifest(path: Path, items: list[Item], web: list[tuple[str, str, str | None]] | None) -> None:
    web = web or [(item.references[0], "correct", None) for item in items]
    table = pa.table(
        {
            "image_id": [it.image_id for it in items],
            "path": [it.path for it in items],
            "caption": [w[0] for w in web],
            "gt_caption": [gt_caption(it.scene) for it in items],
            "web_caption_kind": [w[1] for w in web],
            "wrong_attribute": [w[2] for w in web],
        },
        schema=MANIFEST_SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")


def coco_captions(items: list[Item], cfg: SynthConfig, description: str) -> dict:
    """COCO caption annotations; `file_name` is the image path relative to the corpus folder."""
    images = [{"id": it.image_id, "file_name": it.path, "width": cfg.image_size, "height": cfg.image_size}
              for it in items]  # fmt: skip
    annotations = [
        {"id": it.image_id * 100 + k, "image_id": it.image_id, "caption": caption}
        for it in items
        for k, caption in enumerate(it.references)
    ]
    info = {"description": description, "version": "1.0", "seed": cfg.seed}
    return {"info": info, "licenses": [], "type": "captions", "images": images, "annotations": annotations}


def karpathy_split(splits: dict[str, list[Item]]) -> dict:
    """The `dataset_coco.json` layout: images with filepath, filename, split, cocoid, sentences."""
    images = []
    for split, items in splits.items():
        for it in items:
            folder, name = it.path.rsplit("/", 1)
            sentences = [
                {"tokens": c.split(), "raw": c, "imgid": len(images), "sentid": it.image_id * 100 + k}
                for k, c in enumerate(it.references)
            ]
            images.append({"filepath": folder, "filename": name, "imgid": len(images), "split": split,
                           "cocoid": it.image_id, "sentids": [s["sentid"] for s in sentences],
                           "sentences": sentences})  # fmt: skip
    return {"dataset": "coco", "images": images}


def vqa_files(items: list[Item], cfg: SynthConfig, split: str) -> tuple[dict, dict]:
    """(questions file, annotations file) in the VQAv2 layout."""
    qs, anns = [], []
    for it in items:
        rng = random.Random(f"{cfg.seed}:vqa:{it.image_id}")
        for k, q in enumerate(questions(it.scene, rng, cfg.questions_per_image)):
            qid = it.image_id * 100 + k
            answers = human_answers(q, rng, cfg.answer_noise)
            qs.append({"image_id": it.image_id, "question": q.question, "question_id": qid})
            anns.append({
                "question_id": qid, "image_id": it.image_id, "question_type": q.question_type,
                "answer_type": q.answer_type, "multiple_choice_answer": majority(answers, q.answer),
                "answers": [{"answer": a, "answer_confidence": "yes" if a == q.answer else "maybe",
                             "answer_id": n + 1} for n, a in enumerate(answers)],
            })  # fmt: skip
    header = {"info": {"description": "synthetic VQAv2-format set", "seed": cfg.seed}, "license": {},
              "data_type": "synth", "data_subtype": split}  # fmt: skip
    return {**header, "task_type": "Open-Ended", "questions": qs}, {**header, "annotations": anns}


def _write_sets(root: Path, cfg: SynthConfig, items: dict[str, list[Item]]) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, members in items.items():
        files[f"manifest_{name}"] = f"manifests/{name}.parquet"
        web = _web_captions(members, cfg) if name == "pretrain" and members else None
        _write_manifest(root / files[f"manifest_{name}"], members, web)
    coco = {split: items[f"coco_{split}"] for split in ("train", "val", "test")}
    files["coco_karpathy"] = "coco/dataset_coco.json"
    _write_json(root / files["coco_karpathy"], karpathy_split(coco))
    for split, members in coco.items():
        files[f"coco_captions_{split}"] = f"coco/annotations/captions_{split}.json"
        _write_json(
            root / files[f"coco_captions_{split}"], coco_captions(members, cfg, f"synthetic COCO {split}")
        )
    for split in ("train", "val"):
        questions_file, annotations_file = vqa_files(items[f"vqa_{split}"], cfg, split)
        files[f"vqa_questions_{split}"] = f"vqa/v2_OpenEnded_synth_{split}_questions.json"
        files[f"vqa_annotations_{split}"] = f"vqa/v2_synth_{split}_annotations.json"
        _write_json(root / files[f"vqa_questions_{split}"], questions_file)
        _write_json(root / files[f"vqa_annotations_{split}"], annotations_file)
    files["retrieval_test"] = "retrieval/captions_test.json"
    _write_json(
        root / files["retrieval_test"],
        coco_captions(items["retrieval_test"], cfg, "synthetic retrieval test"),
    )
    files["teacher_captions"] = "teacher/captions_train.json"
    _write_json(
        root / files["teacher_captions"], coco_captions(items["teacher_train"], cfg, "synthetic teacher set")
    )
    return files


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / "corpus.json").exists():
            raise FileExistsError(
                f"{out_dir} exists, is not empty and holds no corpus.json: refusing to replace it"
            )
        old = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, out_dir)


def synthesize(out_dir: str | os.PathLike[str], cfg: SynthConfig | None = None) -> CorpusInfo:
    """Write the synthetic corpus described by `cfg` into `out_dir` (replacing an older corpus there)."""
    cfg = cfg or SynthConfig()
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}.", dir=out_dir.parent))
    try:
        items = _make_items(staging, cfg)
        files = _write_sets(staging, cfg, items)
        sets = {name: len(members) for name, members in items.items()}
        _write_json(staging / "corpus.json", {"format_version": 1, "seed": cfg.seed, "config": asdict(cfg),
                                              "image_sets": sets, "files": files})  # fmt: skip
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_corpus(out_dir)


def load_corpus(corpus_dir: str | os.PathLike[str]) -> CorpusInfo:
    """The CorpusInfo of a corpus folder, read from its corpus.json."""
    root = Path(corpus_dir).resolve()
    meta_path = root / "corpus.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not a synthetic corpus (no corpus.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    files = {key: root / rel for key, rel in meta["files"].items()}
    return CorpusInfo(root, SynthConfig(**config), dict(meta["image_sets"]), files)
