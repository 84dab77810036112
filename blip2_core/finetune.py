"""Fine-tuning BLIP-2 (SPEC.md, "Downstream tasks"): the models, their data and the layer-wise lr decay.

Three tasks, each trained by `train.train` (the one loop) with the image encoder UNFROZEN:
- caption:   Blip2Stage2, LM loss on the caption after the prompt "a photo of "; the LLM stays frozen.
             364 px in the paper.
- vqa:       `Blip2VQA`: the question goes into the Q-Former too (its tokens and the queries see each
             other, the bidirectional mask) and, inside the paper's prompt, to the LLM; the target is the
             answer. The Q-Former keeps its text branch (embeddings, text FFNs), which stage 2 dropped,
             so it starts from the stage-1 checkpoint's text branch. 490 px in the paper.
- retrieval: Blip2Stage1 with `match_same_image=True` (captions of the same image are positives for
             ITC and never hard negatives for ITM), ITC + ITM + ITG. 364 px.

The image size is a parameter: `finetune_config` sets it, and the image tower interpolates its position
embeddings when it is built (vision.py). Layer-wise lr decay (`finetune_param_groups`) gives ViT block i
the lr scale decay ** (blocks - i) (BEiT's rule; the Q-Former and ln_vision get 1), applied by the
schedule at every step (optim.py), not written and ignored as in the reference code.

Data: `Record`s read from the public formats (COCO captions JSON, VQAv2 questions + annotations,
Visual Genome question_answers.json), served by `RecordData`, a resumable `train.DataSource`.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from blip2_core.config import Blip2Config, config_from_dict, config_to_dict
from blip2_core.data import AugmentConfig, ImageTransform
from blip2_core.fileio import path_under
from blip2_core.generate import VQA_GENERATION, GenerationConfig, generate_with_llm, vqa_prompt
from blip2_core.optim import param_groups
from blip2_core.stage1 import Blip2Stage1
from blip2_core.stage2 import Blip2Stage2, Stage2Output

Task = Literal["caption", "vqa", "retrieval"]
TASKS: tuple[str, ...] = ("caption", "vqa", "retrieval")
PAPER_IMAGE_SIZE = {"caption": 364, "vqa": 490, "retrieval": 364}
CAPTION_PROMPT = "a photo of "  # the paper's captioning prompt; the caption follows it directly
Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]  # texts -> {"text_ids", "text_mask"} (B, T)


def finetune_config(cfg: Blip2Config, image_size: int) -> Blip2Config:
    """The run's config: the image tower trains (fp32) at `image_size` px."""
    raw = config_to_dict(cfg)
    raw["vision"] |= {"image_size": image_size, "freeze": False, "precision": "fp32"}
    return config_from_dict(raw, source=f"{cfg.name} fine-tuned at {image_size} px")


# ----------------------------------------------------------------------------------------------- models


def question_query_output(
    model: Blip2Stage2, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
) -> torch.Tensor:
    """(B, 3, H, W) + question (B, T) -> (B, Q, D): queries that attended to the image AND the question."""
    if model.qformer.embeddings is None:
        raise ValueError("this model's Q-Former has no text branch: build it with qformer_text_input=True")
    image_embeds = model.ln_vision(model.visual_encoder(images))  # (B, S, W)
    out = model.qformer(
        input_ids=question_ids,
        query_embeds=model.qformer.expand_queries(images.shape[0]),
        attention_mask=question_mask,
        encoder_hidden_states=image_embeds,
        mask_kind="bidirectional",
    ).last_hidden_state  # (B, Q + T, D)
    return out[:, : model.cfg.qformer.num_query_tokens]


def answer_text(model: Blip2Stage2, answer: str) -> str:
    """A decoder LLM continues "... Answer:" with " red"; an encoder-decoder decodes "red" on its own."""
    return answer if model.bridge.is_encoder_decoder else " " + answer


class Blip2VQA(Blip2Stage2):
    """Stage-2 model whose Q-Former also reads the question (its text branch is kept). Same state-dict
    names as Blip2Stage2, so `hf_interop.load_trained` reloads it (as a Blip2Stage2 with text input)."""

    def __init__(self, cfg: Blip2Config, bridge=None, visual_encoder: nn.Module | None = None):
        super().__init__(cfg, bridge, visual_encoder, qformer_text_input=True)

    def forward(self, batch: dict[str, Any]) -> Stage2Output:
        query_output = question_query_output(
            self, batch["images"], batch["question_ids"], batch["question_mask"]
        )
        prompts = [vqa_prompt(self.cfg.llm.kind, q) for q in batch["questions"]]
        answers = [answer_text(self, a) for a in batch["captions"]]
        out = self.bridge(query_output, answers, prompts)
        return Stage2Output(out.loss, out.logits, out.labels, query_output)


@torch.no_grad()
def answer_questions(
    model: Blip2Stage2,
    images: torch.Tensor,
    questions: list[str],
    tokenize: Tokenize | None,
    cfg: GenerationConfig = VQA_GENERATION,
) -> list[str]:
    """Open-ended answers. With a text-input Q-Former (VQA fine-tuned) and `tokenize`, the question goes
    into the Q-Former as well; otherwise (zero-shot) only into the LLM prompt."""
    if model.qformer.embeddings is not None and tokenize is not None:
        text = tokenize(questions)
        device = images.device
        query_output = question_query_output(
            model, images, text["text_ids"].to(device), text["text_mask"].to(device)
        )
    else:
        query_output = model.query_output(images)
    prompts = [vqa_prompt(model.cfg.llm.kind, q) for q in questions]
    texts, _ = generate_with_llm(model.bridge, query_output, prompts, cfg)
    return texts


def build_finetune_model(task: Task, cfg: Blip2Config, bridge=None) -> nn.Module:
    """The model of a task with its image tower trainable (cfg from `finetune_config`)."""
    if task == "retrieval":
        model = Blip2Stage1(cfg, match_same_image=True)
    elif task == "vqa":
        model = Blip2VQA(cfg, bridge)
    elif task == "caption":
        model = Blip2Stage2(cfg, bridge)
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    model.visual_encoder.unfreeze()
    return model


@torch.no_grad()
def load_start_weights(model: nn.Module, files: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Copy the weights of checkpoint files (later files win) into the model's trainable parameters.

    Every trainable parameter must come from some file, except the image tower's, which keep the
    preset's weights (`vision.pretrained`) unless a file holds `visual_encoder.*` (a fine-tuned start).
    Returns the file keys the model has no use for (e.g. stage-1 heads when fine-tuning captioning).
    """
    state: dict[str, torch.Tensor] = {}
    for file in files:
        path = Path(file)
        state |= load_file(str(path / "model.safetensors" if path.is_dir() else path), device="cpu")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    has_tower = any(k.startswith("visual_encoder.") for k in state)
    missing = [n for n in params if n not in state and (has_tower or not n.startswith("visual_encoder."))]
    if missing:
        raise KeyError(
            f"start checkpoint(s) {[str(f) for f in files]} lack {len(missing)} weights, e.g. {missing[:4]}"
        )
    cfg = getattr(model, "cfg", None)
    if not has_tower and cfg is not None and cfg.vision.pretrained is None:
        raise ValueError(
            "the image tower has no weights: vision.pretrained is unset and the start checkpoint holds no "
            "visual_encoder.* tensors (set vision.pretrained in the preset to the image encoder's weights)"
        )
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(p.shape)}" for n, p in params.items() if n in state
             and state[n].shape != p.shape]  # fmt: skip
    if wrong:
        raise ValueError(f"start checkpoint shapes differ from the model's: {wrong[:4]}")
    for name, param in params.items():
        if name in state:
            param.copy_(state[name])
    return sorted(set(state) - set(params))


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups with the image tower's layer-wise lr decay (None or 1.0: no decay)."""
    if layer_decay is None or layer_decay == 1.0:
        return param_groups(model, weight_decay)
    encoder = model.visual_encoder
    ids = encoder.layer_ids()

    def layer_id(name: str) -> int | None:
        if not name.startswith("visual_encoder."):
            return None  # ln_vision, Q-Former, heads, projection: the full lr
        return ids[name.removeprefix("visual_encoder.")]

    # num_layers = kept blocks: the top block gets decay ** 1, the embeddings decay ** (blocks + 1).
    return param_groups(model, weight_decay, layer_decay, layer_id, num_layers=len(encoder.blocks))


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Record:
    """One training example: an image file and its text (the caption, or the answer for VQA)."""

    image: str
    text: str
    image_id: int  # images are numbered per dataset; same number = same image (retrieval targets)
    question: str = ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def image_file(root: Path, image_id: Any, pattern: str, where: str) -> str:
    """The image of `image_id` under `root` by `pattern` (e.g. "COCO_train2014_{image_id:012d}.jpg")."""
    try:
        name = pattern.format(image_id=image_id)
    except (ValueError, KeyError) as err:
        raise ValueError(f"image_pattern {pattern!r} cannot name image_id {image_id!r}: {err}") from err
    path = path_under(root, name, f"{where}: image_id {image_id!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file {path} does not exist (image_pattern {pattern!r})")
    return str(path)


def coco_caption_records(annotations: str | os.PathLike[str], images: str | os.PathLike[str]) -> list[Record]:
    """COCO captions JSON (`images[].file_name` under the `images` folder, `annotations[].caption`)."""
    path = Path(annotations)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise ValueError(f"{path}: expected a COCO captions object with 'images' and 'annotations' lists")
    files, numbers = {}, {}
    for i, img in enumerate(data["images"]):
        if "id" not in img or "file_name" not in img:
            raise ValueError(f"{path}: image #{i} needs 'id' and 'file_name'")
        files[img["id"]] = path_under(images, img["file_name"], f"{path}: images[{i}] (id {img['id']!r})")
        numbers[img["id"]] = i
    records = []
    for i, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id")
        if image_id not in files:
            raise ValueError(f"{path}: annotation #{i} refers to image_id {image_id!r}, not in 'images'")
        records.append(Record(str(files[image_id]), str(ann["caption"]), numbers[image_id]))
    _check_files(records, path)
    return records


def _check_files(records: list[Record], source: Path) -> None:
    missing = [r.image for r in records if not Path(r.image).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} image file(s) do not exist, e.g. {missing[0]}")


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent human answer (first seen wins a tie), VQAv2's multiple_choice_answer."""
    return Counter(answers).most_common(1)[0][0]


def vqa_records(
    questions: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    image_pattern: str,
) -> list[Record]:
    """VQAv2 questions + annotations files; the target is `multiple_choice_answer` (else the majority)."""
    q_path, a_path = Path(questions), Path(annotations)
    q_data, a_data = _read_json(q_path), _read_json(a_path)
    if not isinstance(q_data, dict) or not isinstance(q_data.get("questions"), list):
        raise ValueError(f"{q_path}: expected a VQAv2 questions object with a 'questions' list")
    if not isinstance(a_data, dict) or not isinstance(a_data.get("annotations"), list):
        raise ValueError(f"{a_path}: expected a VQAv2 annotations object with an 'annotations' list")
    answers = {a["question_id"]: a for a in a_data["annotations"]}
    records, numbers = [], {}
    for q in q_data["questions"]:
        ann = answers.get(q["question_id"])
        if ann is None:
            raise ValueError(f"{a_path}: no annotation for question_id {q['question_id']!r} of {q_path}")
        answer = ann.get("multiple_choice_answer") or majority_answer([x["answer"] for x in ann["answers"]])
        number = numbers.setdefault(q["image_id"], len(numbers))
        image = image_file(Path(images), q["image_id"], image_pattern, str(q_path))
        records.append(Record(image, str(answer), number, str(q["question"])))
    return records


def visual_genome_qa_records(
    path: str | os.PathLike[str], images: str | os.PathLike[str], image_pattern: str = "{image_id}.jpg"
) -> list[Record]:
    """Visual Genome `question_answers.json`: [{"id": image id, "qas": [{"question", "answer"}, ...]}]."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected Visual Genome question_answers.json (a list of images)")
    records = []
    for number, entry in enumerate(data):
        qas = entry.get("qas", [])
        if not qas:
            continue
        image_id = entry.get("id", entry.get("image_id"))
        image = image_file(Path(images), image_id, image_pattern, str(path))
        for qa in qas:
            answer = str(qa["answer"]).strip().rstrip(".").lower()  # VG answers are sentences: "Red."
            records.append(Record(image, answer, number, str(qa["question"])))
    return records


def annotation_records(
    task: Task,
    annotations: Sequence[str | os.PathLike[str]],
    images: Sequence[str | os.PathLike[str]],
    questions: Sequence[str | os.PathLike[str]] = (),
    image_pattern: str = "{image_id}.jpg",
) -> list[Record]:
    """Every training record of a task's annotation files, `images[i]` the image folder of file i.

    caption, retrieval: COCO captions files. vqa: the first len(questions) files are VQAv2 annotations
    (with questions[i]), the rest Visual Genome question_answers.json files.
    """
    records: list[Record] = []
    for i, (ann, folder) in enumerate(zip(annotations, images, strict=True)):
        if task != "vqa":
            records += coco_caption_records(ann, folder)
        elif i < len(questions):
            records += vqa_records(questions[i], ann, folder, image_pattern)
        else:
            records += visual_genome_qa_records(ann, folder, image_pattern)
    return records


@dataclass(frozen=True)
class RecordCollate:
    """(image tensor, Record) pairs -> the batch the task's model reads. Runs in DataLoader workers."""

    task: Task
    prompt: str = CAPTION_PROMPT
    tokenize: Tokenize | None = None  # BERT-style: retrieval texts, VQA questions

    def __call__(self, items: list[tuple[torch.Tensor, Record]]) -> dict[str, Any]:
        images = torch.stack([image for image, _ in items])  # (B, 3, S, S)
        records = [r for _, r in items]
        texts = [r.text for r in records]
        if self.task == "caption":
            return {"images": images, "captions": texts, "prompts": [self.prompt] * len(texts)}
        if self.tokenize is None:
            raise ValueError(f"{self.task} fine-tuning needs a BERT-style tokenizer for the Q-Former")
        if self.task == "vqa":
            questions = [r.question for r in records]
            text = self.tokenize(questions)
            return {"images": images, "captions": texts, "questions": questions,
                    "question_ids": text["text_ids"], "question_mask": text["text_mask"]}  # fmt: skip
        text = self.tokenize(texts)
        image_ids = torch.tensor([r.image_id for r in records])
        return {
            "images": images,
            "text_ids": text["text_ids"],
            "text_mask": text["text_mask"],
            "image_ids": image_ids,
        }


class _RecordImages(Dataset):
    """Index -> (augmented image (3, S, S), record); augmentation drawn from (seed, epoch, index)."""

    def __init__(self, records: Sequence[Record], augment: AugmentConfig, seed: int) -> None:
        self.records, self.transform, self.seed = list(records), ImageTransform(augment), seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Record]:
        record = self.records[index]
        with Image.open(record.image) as image:
            rgb = image.convert("RGB")
        rng = random.Random(f"finetune:{self.seed}:{self.epoch}:{index}")
        tensor, _ = self.transform(rgb, rng)  # captions of fine-tuning sets are not flipped: see hflip
        return tensor, record


class RecordData:
    """A `train.DataSource` over records: each epoch a permutation drawn from (seed, epoch), rank r takes
    every world_size-th batch's share, the tail that fills no batch on every rank is dropped. Position =
    (epoch, batches handed out), so a resumed run continues at the next unseen batch."""

    def __init__(
        self,
        records: Sequence[Record],
        batch_size: int,
        augment: AugmentConfig,
        collate: RecordCollate,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if not records:
            raise ValueError("RecordData: no training records")
        self.dataset = _RecordImages(records, augment, seed)
        self.collate, self.batch_size, self.seed = collate, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.batches_per_epoch = len(records) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"RecordData: {len(records)} records cannot fill one batch of {batch_size} on each of "
                f"{world_size} rank(s)"
            )
        self.epoch, self.index = 0, 0

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        kept = self.batches_per_epoch * self.batch_size * self.world_size
        order = torch.randperm(len(self.dataset), generator=generator)[:kept][self.rank :: self.world_size]
        return [order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
                for i in range(self.index, self.batches_per_epoch)]  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        self.dataset.epoch = self.epoch
        # Starting an iterator draws a base seed; from the global generator it would shift the model's
        # dropout masks after a resume (the global state is restored before the loader starts).
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        loader = DataLoader(
            self.dataset, batch_sampler=self._batches(), collate_fn=self.collate,
            num_workers=self.num_workers, generator=generator,
        )  # fmt: skip
        for batch in loader:
            self.index += 1  # before the yield: the state counts the batch as handed out
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"RecordData.load_state_dict: saved {key}={state[key]}, this one has {getattr(self, key)}"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
