"""Teachers for the miniature replication: the models the paper takes off the shelf, trained on the corpus.

With the `tiny` preset nothing can be downloaded, so this step trains, on the synthetic corpus' CLEAN splits
only (the COCO-format train split's five reference captions per image and the VQA train questions with
their majority answers; never the noisy pretraining web captions), every pretrained model BLIP-2 uses:

  tokenizers/   WordPiece (BERT/BLIP layout, with [DEC]) and byte-level BPE in OPT's and T5's layouts,
                trained with `tokenizers` and saved with save_pretrained
  clip/         an open_clip CLIP of the tiny preset's architecture (`blip2-tiny-clip`: its image tower
                is the tiny preset's frozen image encoder), contrastive loss on (image, reference) pairs;
                `blip2-tiny-clip.json` + `blip2-tiny-clip.safetensors`, the form `RankerConfig` and
                `VisionConfig.pretrained` read. Its text side uses open_clip's own tokenizer for the config.
  captioner/    a small BlipForConditionalGeneration, LM loss on "a picture of " + reference; model and
                BlipProcessor saved with save_pretrained (what `capfilt.load_capfilt_models` reads)
  opt/, t5/     small OPTForCausalLM / T5ForConditionalGeneration language models with their tokenizers
                (what `llm_bridge.load_llm` reads): OPT as a causal LM on "text\\n" (the bridge's EOS),
                T5 as a prefix LM (split at a uniform point, or at the answer of a question)

Every folder appears atomically (built in a `.tmp-` folder beside it, then renamed) and holds a
`teacher.json` with the loss curve and the seconds it took. Training is deterministic under `seed`.
This module reads the corpus through its public file formats (corpus.json, COCO and VQAv2 JSON), not
through `data_catalog`, so that `blip2_core` stays free of DuckDB.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from blip2_core.fileio import path_under

log = logging.getLogger(__name__)

# progress(teacher, step, loss): called at every logged step
Progress = Callable[[str, int, float], None]

CAPTION_PROMPT = "a picture of "  # the BLIP captioner's prompt, as CapFilt decodes with it
OPT_EOS_TEXT = "\n"  # the stage-2 bridge ends OPT targets with "\n"
BLIP_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0-3; "</s>" is also its BOS
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0-2; "<pad>" is also the decoder start
CLIP_MODEL_NAME = "blip2-tiny-clip"  # the tiny preset's open_clip architecture


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ClipTeacherConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    # Std of the image tower's position embedding at init (None: open_clip's width ** -0.5, 0.125 here,
    # against patch embeddings of std about 0.58). As for the captioner below, 2.0 lets it learn where
    # things are: trained 1,500 steps, it orders a correct and a wrong caption of one image right 0.57 of
    # the time, against 0.51 at 300 steps with open_clip's init (BENCHMARKS.md, session 6).
    position_init_std: float | None = None
    # NegCLIP's hard negatives (Yuksekgonul et al., 2023): per image, this many copies of its caption with
    # one attribute word swapped for another of its kind (`hard_negative`) join the texts each image is
    # contrasted with. A batch's images differ most by colour, so plain CLIP learns colours and little
    # else; a negative that differs from the truth only in a shape or a position is told apart only by an
    # image tower that sees shapes and positions. None: plain CLIP.
    hard_negatives: int | None = None


@dataclass(frozen=True)
class CaptionerTeacherConfig:
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 40  # tokens of "[DEC] a picture of <caption> [SEP]"
    # Naming the shape takes steps and images: with init 0.1, the right shape word (teacher-forced, 300
    # held-out one-shape scenes, chance 0.2) 0.26 after 400 steps, 0.43 after 800, 0.85 after 1,600 on
    # 4,000 clean images (the corpus' teacher set); 0.51 after 1,600 on 480 images, which it memorises.
    # The demo keeps 400 steps at init 0.02 and no teacher set: with the better captioner (and the teacher
    # set) its CapFilt kept fewer web captions, and the whole demo lost retrieval R@1 (7.5 / 23.3 against
    # 17.3 / 32.0) and fine-tuned captioning (CIDEr 0.06, repetition) (BENCHMARKS.md, session 4).
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    # Half the examples mirrored left-right, their captions with "left" and "right" swapped: twice the
    # scenes from the few hundred clean training images.
    mirror: bool = False
    # Weight init std of the ViT and of the text decoder. BERT's 0.02 is sized for width 768; at width 64
    # it leaves each block's output far below the residual stream, attention nearly uniform, and the ViT
    # learns colours (a mean over patches) but not shapes.
    vision_init_std: float = 0.02
    text_init_std: float = 0.02
    # Std of the ViT's position embedding at init (None: vision_init_std). At 0.1 a patch's position is a
    # small part of its embedding (the patch projection's output has std about 1.4): after 1,600 steps the
    # captioner names a lone shape's position no better than chance (0.18; 0.22 trained on 1,540 one-shape
    # images alone), though it knows its colour. At 2.0 it names it right 0.65 of the time, and 1.00 after
    # 3,200 steps (BENCHMARKS.md, session 6).
    position_init_std: float | None = None


@dataclass(frozen=True)
class LMTeacherConfig:
    """OPT / T5 dims; the defaults are the tiny preset's `llm` section (hidden 64, 2 layers, 4 heads)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 128
    d_kv: int = 16  # T5 only
    max_position_embeddings: int = 64  # OPT only
    max_text_len: int = 40
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    # OPT only: what makes the frozen LLM conditionable by stage 2's query slots. Each sequence starts at a
    # random position in [0, max_position_embeddings - length], so 8 slots in front do not shift it into
    # positions it never saw; and per image `reference_pairs` sequences "refA\nrefB\n" of two of its
    # references (at most `max_pair_len` tokens), so that a prefix about the scene predicts the caption.
    # Off by default: the whole demo with both on (and 600 steps) scored captioning CIDEr 0.34 zero-shot,
    # 0.21 fine-tuned, 0.15 untrained bridge (their captions drift into question-answer text), against
    # 0.58 / 0.57 / 0.05 with this single-caption teacher (BENCHMARKS.md, Figure 5 subsection).
    position_offsets: bool = False
    reference_pairs: int = 0
    max_pair_len: int = 56
    # OPT only: per QA pair whose image has a caption, `context_qa` copies of "caption\nQuestion: q Answer:
    # a\n" (at most `max_pair_len` tokens): the answer is read from the context, as stage 2's visual prompt
    # stands in for it at zero-shot VQA; without them every answer is a prior over the question alone.
    context_qa: int = 0
    # OPT only: True leaves out the bare "Question: q Answer: a" sequences, so a question-answer text only
    # ever follows its image's caption (the `context_qa` copies). No sequence then starts with "Question",
    # and a steerable teacher has no question-answer text to drift into when a visual prompt, standing
    # where a caption would, asks it for a caption. None: the bare sequences are in (as before).
    qa_in_context_only: bool | None = None
    # OPT only: weight init std (OPTConfig.init_std). OPT's 0.02 is sized for width 768; at width 64 every
    # attention map starts uniform (entropy log T to 4 decimals) and the trained teacher barely answers to a
    # soft prompt: 8 free prompt vectors per caption, optimised, take its caption loss from 1.22 (one prompt
    # for all) to 0.91 only, against 1.09 to 0.29 at 0.1, whose own loss is lower too (0.85 vs 0.92).
    # Default 0.02 all the same: with 0.1 the teacher follows stage 2's caption-trained prompt at zero-shot
    # VQA and answers with caption fragments ("white background"): the fresh-clone demo scored zero-shot
    # VQA 0.00 with stage 1 and 1.05 without (BENCHMARKS.md, session 4).
    init_std: float = 0.02


@dataclass(frozen=True)
class TeacherConfig:
    seed: int = 0
    image_size: int = 64  # the tiny preset's vision.image_size
    wordpiece_vocab_size: int = 300  # the corpus has a few dozen words; the rest is WordPiece's alphabet
    bpe_vocab_size: int = 640  # 256 byte symbols + merges
    log_every: int = 25
    clip: ClipTeacherConfig = field(default_factory=ClipTeacherConfig)
    captioner: CaptionerTeacherConfig = field(default_factory=CaptionerTeacherConfig)
    opt: LMTeacherConfig = field(default_factory=LMTeacherConfig)  # with reference_pairs: 600 steps
    t5: LMTeacherConfig = field(default_factory=LMTeacherConfig)


# The demo's OPT teacher: one a visual prompt can steer (init 0.1, position offsets), that reads answers
# from a caption in front of the question (context_qa) and never starts a text with "Question", so stage
# 2's prompt, standing where the caption would, neither drifts into question-answer text (as with init 0.1
# and offsets alone, session 7) nor is ignored (as with init 0.02). A fresh demo with it: zero-shot VQA
# 43.0 against 22.9 (the LLM alone 24.1 against 18.8), zero-shot captioning CIDEr 0.55 against 0.44, but
# fine-tuned captioning 0.29 against 0.44 (BENCHMARKS.md, session 8).
STEERABLE_OPT = LMTeacherConfig(
    init_std=0.1, position_offsets=True, steps=600, context_qa=1, qa_in_context_only=True
)

# Named teacher configurations. "demo": the defaults with the steerable OPT above, a few CPU minutes; the
# demo's downstream stages were measured with them. "capfilt": a captioner and a ranker that learn where
# things are (position embeddings drawn at std 2.0) and train long enough to name shapes and counts: the
# CapFilt-quality benchmark's teachers, with which CapFilt raises the share of correct captions
# (BENCHMARKS.md, session 6). It wants the corpus' teacher set (SynthConfig.n_teacher, 4,000 images there)
# and about 20 CPU minutes.
TEACHER_PROFILES: dict[str, TeacherConfig] = {
    "demo": TeacherConfig(opt=STEERABLE_OPT),
    "capfilt": TeacherConfig(
        clip=ClipTeacherConfig(steps=1500, position_init_std=2.0),
        captioner=CaptionerTeacherConfig(
            steps=4800, vision_init_std=0.1, text_init_std=0.1, position_init_std=2.0
        ),
        opt=STEERABLE_OPT,
    ),
}


def teacher_profile(name: str, seed: int = 0) -> TeacherConfig:
    """The named teacher configuration (TEACHER_PROFILES) with `seed`."""
    if name not in TEACHER_PROFILES:
        raise ValueError(f"unknown teacher profile {name!r}; expected one of {sorted(TEACHER_PROFILES)}")
    return replace(TEACHER_PROFILES[name], seed=seed)


@dataclass(frozen=True)
class TeacherRun:
    """One trained teacher: its folder, the logged losses (mean over each logging window), seconds."""

    path: Path
    losses: list[float]
    seconds: float


@dataclass(frozen=True)
class TeacherPaths:
    clip_config: Path  # open_clip model config; its stem is the model name
    clip_weights: Path  # safetensors state dict of the whole CLIP (vision.py takes its `visual.` part)
    captioner: Path  # save_pretrained folder: BlipForConditionalGeneration + BlipProcessor
    opt: Path  # save_pretrained folder: OPTForCausalLM + tokenizer
    t5: Path  # save_pretrained folder: T5ForConditionalGeneration + tokenizer
    tokenizers: Path  # wordpiece/, opt/, t5/

    @property
    def clip_model_name(self) -> str:
        return self.clip_config.stem


# ----------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class TeacherData:
    """The clean text and images of a corpus: COCO train images with their references, VQA train QA."""

    images: list[Image.Image]  # RGB, decoded
    references: list[list[str]]  # per image, its reference captions
    qa: list[tuple[str, str]]  # (question, majority answer)
    qa_captions: list[str] = field(default_factory=list)  # per QA pair, its image's caption ("" if none)

    @property
    def captions(self) -> list[str]:
        return [c for refs in self.references for c in refs]

    @property
    def qa_texts(self) -> list[str]:
        return [qa_text(q, a) for q, a in self.qa]

    @property
    def texts(self) -> list[str]:
        """Everything a tokenizer or language model learns from."""
        return self.captions + self.qa_texts


def qa_text(question: str, answer: str) -> str:
    return f"Question: {question} Answer: {answer}"


def load_teacher_data(corpus_dir: str | os.PathLike[str]) -> TeacherData:
    """Read the COCO train split and the teacher set (images + references), and the VQA train split."""
    root = Path(corpus_dir)
    files = json.loads((root / "corpus.json").read_text(encoding="utf-8"))["files"]
    images, references = [], []
    for key in ("coco_captions_train", "teacher_captions"):  # corpora made before the teacher set lack it
        if key not in files:
            continue
        coco = json.loads((root / files[key]).read_text(encoding="utf-8"))
        refs: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
        for ann in coco["annotations"]:
            refs[ann["image_id"]].append(ann["caption"])
        for img in coco["images"]:
            with Image.open(path_under(root, img["file_name"], f"{files[key]}: image {img['id']}")) as im:
                images.append(im.convert("RGB"))
            references.append(refs[img["id"]])
    questions = json.loads((root / files["vqa_questions_train"]).read_text(encoding="utf-8"))["questions"]
    annotations = json.loads((root / files["vqa_annotations_train"]).read_text(encoding="utf-8"))
    answers = {a["question_id"]: a["multiple_choice_answer"] for a in annotations["annotations"]}
    qa = [(q["question"], answers[q["question_id"]]) for q in questions]
    captions = _vqa_captions(root, files.get("manifest_vqa_train"))
    return TeacherData(images, references, qa, [captions.get(q["image_id"], "") for q in questions])


def _vqa_captions(root: Path, manifest: str | None) -> dict[int, str]:
    """image_id -> ground-truth caption of the VQA train images, from the corpus manifest (if it has one)."""
    if manifest is None or not (root / manifest).is_file():
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(root / manifest)
    if "gt_caption" not in table.column_names:
        return {}
    rows = table.select(["image_id", "gt_caption"]).to_pylist()
    return {r["image_id"]: r["gt_caption"] for r in rows if r["gt_caption"]}


# ----------------------------------------------------------------------------------------------- saving


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it replaces `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}.", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_log(folder: Path, name: str, cfg: object, losses: list[float], seconds: float) -> None:
    info = {"teacher": name, "config": asdict(cfg), "losses": losses, "seconds": round(seconds, 2)}
    (folder / "teacher.json").write_text(json.dumps(info, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------- tokenizers


def wordpiece_vocab(words: Counter[str], vocab_size: int, specials: tuple[str, ...]) -> dict[str, int]:
    """WordPiece vocabulary from word counts, the same in every process.

    Starts from the characters ("c" first in a word, "##c" after), then adds the most frequent adjacent
    pair until `vocab_size` (or no pair is left), breaking ties by the pair's text. The `tokenizers`
    trainer breaks ties in hash order, which Rust seeds per process: two fresh homes trained from the same
    captions got different pieces and ids, so their CapFilt and stage runs differed.
    """
    pieces = {word: [word[0]] + ["##" + c for c in word[1:]] for word in sorted(words) if word}
    vocab = list(specials) + sorted({p for split in pieces.values() for p in split} - set(specials))
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, split in pieces.items():
            for pair in zip(split, split[1:], strict=False):
                pairs[pair] += words[word]
        if not pairs:
            break
        (left, right), _ = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        merged = left + right.removeprefix("##")
        for word, split in pieces.items():
            out, i = [], 0
            while i < len(split):
                if i + 1 < len(split) and split[i] == left and split[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(split[i])
                    i += 1
            pieces[word] = out
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
    return {token: i for i, token in enumerate(vocab)}


def train_wordpiece(texts: list[str], vocab_size: int) -> BertTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer with BLIP's [DEC] (its BOS), as BertTokenizerFast.

    Deterministic: the same texts give the same pieces and ids in every process (`wordpiece_vocab`).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = wordpiece_vocab(words, vocab_size, BLIP_SPECIALS)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )


def train_bpe(texts: list[str], vocab_size: int, kind: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer in OPT's layout (BOS "</s>" prepended) or T5's ("</s>" appended).

    Byte-level so that the bridge's OPT EOS "\\n" is one token, as in OPT's own vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = {"opt": OPT_SPECIALS, "t5": T5_SPECIALS}[kind]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    if kind == "opt":
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def train_tokenizers(data: TeacherData, out_dir: Path, cfg: TeacherConfig) -> Path:
    """wordpiece/, opt/, t5/ under out_dir/tokenizers, each a save_pretrained tokenizer folder."""
    final = Path(out_dir) / "tokenizers"
    texts = data.texts
    with atomic_dir(final) as tmp:
        train_wordpiece(texts, cfg.wordpiece_vocab_size).save_pretrained(tmp / "wordpiece")
        train_bpe(texts, cfg.bpe_vocab_size, "opt").save_pretrained(tmp / "opt")
        train_bpe(texts, cfg.bpe_vocab_size, "t5").save_pretrained(tmp / "t5")
    return final


# ----------------------------------------------------------------------------------------------- training


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(
    name: str,
    model: nn.Module,
    step_loss: Callable[[int], torch.Tensor],
    hp: ClipTeacherConfig | CaptionerTeacherConfig | LMTeacherConfig,
    log_every: int,
    progress: Progress | None,
) -> list[float]:
    """AdamW + warmup/cosine for hp.steps steps of `step_loss(step)`; returns the mean loss of each window."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norms, biases, logit scale
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, hp.steps, hp.warmup_steps))
    model.train()
    losses, window = [], []
    for step in range(hp.steps):
        loss = step_loss(step)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        window.append(loss.item())
        if len(window) == log_every or step == hp.steps - 1:
            losses.append(sum(window) / len(window))
            window = []
            log.info("teacher %s: step %d/%d loss %.4f", name, step + 1, hp.steps, losses[-1])
            if progress is not None:
                progress(name, step + 1, losses[-1])
    return losses


def _batch_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (min(batch_size, n),), generator=generator)


def _pick_references(data: TeacherData, idx: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One reference caption per image of the batch, drawn at random among its references."""
    picks = torch.randint(0, 1 << 30, (len(idx),), generator=generator).tolist()
    return [data.references[i][p % len(data.references[i])] for i, p in zip(idx.tolist(), picks, strict=True)]


# ----------------------------------------------------------------------------------------------- CLIP


# The attribute words of the corpus' captions, by kind; a hard negative swaps one for another of its kind.
ATTRIBUTE_WORDS = (
    ("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
    ("circle", "square", "triangle", "rectangle", "star"),
    ("small", "large"),
    ("left", "right", "top", "bottom", "center"),
    ("two", "three", "four"),  # counts of two or more; "a"/"an" would need the noun's number changed too
)
_ATTRIBUTE_KIND = {word: kind for kind in ATTRIBUTE_WORDS for word in kind}


def hard_negative(caption: str, rng: random.Random) -> str | None:
    """`caption` with one attribute word (a plural noun counts as its singular) replaced by another word of
    its kind, chosen with `rng`; None when the caption has no attribute word. The result is a caption of
    another scene: wrong about exactly one thing."""
    words = caption.split(" ")
    slots = []
    for i, word in enumerate(words):
        stem = word[:-1] if word.endswith("s") and word[:-1] in _ATTRIBUTE_KIND else word
        if stem in _ATTRIBUTE_KIND:
            slots.append((i, stem, word[len(stem) :]))
    if not slots:
        return None
    i, stem, suffix = rng.choice(slots)
    words[i] = rng.choice([w for w in _ATTRIBUTE_KIND[stem] if w != stem]) + suffix
    return " ".join(words)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, negatives: torch.Tensor | None = None
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over B matched (image, text) feature pairs, L2-normalised here. `negatives`
    (M, D): extra texts every image is also contrasted with (hard negatives); they are no image's match."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    candidates = text if negatives is None else torch.cat([text, F.normalize(negatives, dim=-1)])
    labels = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (
        F.cross_entropy(scale * image @ candidates.T, labels)
        + F.cross_entropy(scale * text @ image.T, labels)
    )


def clip_model_config() -> dict:
    """The tiny preset's open_clip config, whose image tower is the tiny preset's image encoder."""
    from blip2_core.config import PRESET_DIR

    return json.loads((PRESET_DIR / f"{CLIP_MODEL_NAME}.json").read_text())


def train_clip(
    data: TeacherData, out_dir: Path, cfg: TeacherConfig, progress: Progress | None = None
) -> TeacherRun:
    """CLIP of the tiny preset's architecture, contrastive loss on (image, random reference) pairs.

    Writes out_dir/clip/{blip2-tiny-clip.json, blip2-tiny-clip.safetensors, teacher.json}.
    """
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from blip2_core.vision import create_clip

    if cfg.clip.hard_negatives is not None and cfg.clip.hard_negatives < 1:
        raise ValueError(
            f"ClipTeacherConfig.hard_negatives must be >= 1 or None, got {cfg.clip.hard_negatives}"
        )
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = create_clip(CLIP_MODEL_NAME)
    if cfg.clip.position_init_std is not None:
        _redraw(model.visual.positional_embedding, cfg.clip.position_init_std, "ClipTeacherConfig")
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    pixels = torch.stack([preprocess(im) for im in data.images])  # (N, 3, S, S)
    loss_fn = ClipLoss()
    generator = torch.Generator().manual_seed(cfg.seed)

    rng = random.Random(f"{cfg.seed}:clip-hard-negatives")

    def step_loss(step: int) -> torch.Tensor:
        idx = _batch_indices(len(data.images), cfg.clip.batch_size, generator)
        captions = _pick_references(data, idx, generator)
        out = model(pixels[idx], tokenizer(captions))  # text: (B, context_length)
        if not cfg.clip.hard_negatives:
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        negatives = [hard_negative(c, rng) for c in captions for _ in range(cfg.clip.hard_negatives)]
        negatives = [n for n in negatives if n is not None]
        features = model.encode_text(tokenizer(negatives)) if negatives else None
        return contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"], features)

    model.output_dict = True
    losses = train_loop("clip", model, step_loss, cfg.clip, cfg.log_every, progress)
    model.output_dict = False
    seconds = time.perf_counter() - start
    final = Path(out_dir) / "clip"
    with atomic_dir(final) as tmp:
        (tmp / f"{CLIP_MODEL_NAME}.json").write_text(json.dumps(clip_model_config(), indent=4) + "\n")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / f"{CLIP_MODEL_NAME}.safetensors"))
        _write_log(tmp, "clip", cfg.clip, losses, seconds)
    return TeacherRun(final, losses, seconds)


# ----------------------------------------------------------------------------------------------- captioner


def blip_captioner_config(
    hp: CaptionerTeacherConfig, image_size: int, tokenizer: PreTrainedTokenizerBase
) -> object:
    from transformers import BlipConfig

    vision = {
        "hidden_size": hp.vision_width,
        "intermediate_size": 4 * hp.vision_width,
        "num_hidden_layers": hp.vision_layers,
        "num_attention_heads": hp.vision_heads,
        "image_size": image_size,
        "patch_size": hp.patch_size,
        # BlipVisionConfig's default initializer_range is 1e-10 (meant for loading pretrained weights):
        # a ViT trained from it starts with every weight ~0 and hardly leaves that point in 400 steps.
        "initializer_range": hp.vision_init_std,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hp.text_width,
        "encoder_hidden_size": hp.vision_width,
        "intermediate_size": 4 * hp.text_width,
        "num_hidden_layers": hp.text_layers,
        "num_attention_heads": hp.text_heads,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "initializer_range": hp.text_init_std,
    }
    return BlipConfig(text_config=text, vision_config=vision)


def init_position_embedding(model: object, std: float) -> None:
    """Redraw the BLIP ViT's position embedding (class token's included) from N(0, std^2)."""
    _redraw(model.vision_model.embeddings.position_embedding, std, "CaptionerTeacherConfig")


def _redraw(position_embedding: torch.Tensor, std: float, owner: str) -> None:
    if not std > 0:
        raise ValueError(f"{owner}.position_init_std must be > 0, got {std}")
    with torch.no_grad():
        position_embedding.normal_(0.0, std)


def captioning_inputs(
    tokenizer: PreTrainedTokenizerBase, captions: list[str], max_len: int
) -> tuple[torch.Tensor, ...]:
    """[DEC] a picture of <caption> [SEP] ids and mask (B, T); labels on the caption and [SEP] only.

    As BLIP's captioner trains: [CLS] becomes the decoder BOS [DEC] and the prompt is not a target.
    """
    enc = tokenizer(
        [CAPTION_PROMPT + c for c in captions],
        padding="longest",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
    )
    ids, mask = enc.input_ids, enc.attention_mask
    ids[:, 0] = tokenizer.bos_token_id
    labels = ids.masked_fill(mask == 0, -100)
    prompt_len = len(tokenizer(CAPTION_PROMPT).input_ids) - 1  # [CLS] + prompt words, without [SEP]
    labels[:, :prompt_len] = -100
    return ids, mask, labels


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored image: "left" and "right" swap, nothing else changes."""
    swap = {"left": "right", "right": "left"}
    return re.sub(r"\b(left|right)\b", lambda m: swap[m.group(1)], caption)


def train_captioner(
    data: TeacherData, out_dir: Path, cfg: TeacherConfig, progress: Progress | None = None
) -> TeacherRun:
    """A small BLIP captioner, next-token loss on "a picture of " + reference given the image.

    Writes out_dir/captioner: save_pretrained model + BlipProcessor (image processor + WordPiece).
    """
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    start = time.perf_counter()
    hp = cfg.captioner
    tokenizer = train_wordpiece(data.texts, cfg.wordpiece_vocab_size)
    size = {"height": cfg.image_size, "width": cfg.image_size}
    processor = BlipProcessor(image_processor=BlipImageProcessor(size=size), tokenizer=tokenizer)
    torch.manual_seed(cfg.seed)
    model = BlipForConditionalGeneration(blip_captioner_config(hp, cfg.image_size, tokenizer))
    if hp.position_init_std is not None:
        init_position_embedding(model, hp.position_init_std)
    pixels = processor.image_processor(data.images, return_tensors="pt").pixel_values  # (N, 3, S, S)
    generator = torch.Generator().manual_seed(cfg.seed + 1)

    def step_loss(step: int) -> torch.Tensor:
        idx = _batch_indices(len(data.images), hp.batch_size, generator)
        captions, batch_pixels = _pick_references(data, idx, generator), pixels[idx]
        if hp.mirror:
            flip = torch.rand(len(idx), generator=generator) < 0.5  # (B,)
            batch_pixels = torch.where(flip[:, None, None, None], batch_pixels.flip(-1), batch_pixels)
            captions = [mirror_caption(c) if f else c for c, f in zip(captions, flip.tolist(), strict=True)]
        ids, mask, labels = captioning_inputs(tokenizer, captions, hp.max_text_len)
        image_embeds = model.vision_model(pixel_values=batch_pixels)[0]  # (B, 1 + patches, W)
        logits = model.text_decoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds, return_dict=True
        ).logits  # (B, T, V)
        # Our own loss: transformers' BLIP decoder loss adds label smoothing 0.1, which flattens the
        # distribution that CapFilt later samples from.
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    losses = train_loop("captioner", model, step_loss, hp, cfg.log_every, progress)
    model.eval()
    seconds = time.perf_counter() - start
    final = Path(out_dir) / "captioner"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _write_log(tmp, "captioner", hp, losses, seconds)
    return TeacherRun(final, losses, seconds)


# ----------------------------------------------------------------------------------------------- LLMs


def _llm_config(kind: str, hp: LMTeacherConfig, vocab_size: int):
    """The same transformers config the stage-2 bridge builds for a preset (`llm_bridge.hf_llm_config`:
    one place for OPT's and FlanT5's layouts and token ids), with dropout off for the tiny corpus."""
    from blip2_core.config import LLMConfig
    from blip2_core.llm_bridge import hf_llm_config

    return hf_llm_config(
        LLMConfig(
            kind=kind,
            hidden_size=hp.hidden_size,
            num_layers=hp.num_layers,
            num_decoder_layers=hp.num_layers,
            num_heads=hp.num_heads,
            ffn_dim=hp.ffn_dim,
            d_kv=hp.d_kv,
            vocab_size=vocab_size,
            max_position_embeddings=hp.max_position_embeddings,
        )
    )


def opt_config(hp: LMTeacherConfig, vocab_size: int):
    config = _llm_config("opt", hp, vocab_size)
    config.dropout = config.attention_dropout = 0.0
    config.init_std = hp.init_std
    return config


def t5_config(hp: LMTeacherConfig, vocab_size: int):
    config = _llm_config("t5", hp, vocab_size)
    config.dropout_rate = 0.0
    return config


def _save_llm(name: str, model, tokenizer, hp: LMTeacherConfig, losses, seconds, out_dir: Path) -> Path:
    model.eval()
    final = Path(out_dir) / name
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_log(tmp, name, hp, losses, seconds)
    return final


def opt_rows(data: TeacherData, tokenizer, hp: LMTeacherConfig, seed: int) -> list[list[int]]:
    """Token ids of every OPT training sequence: "</s>text\\n" for every caption and (unless
    `hp.qa_in_context_only`) question-answer text,
    then `hp.reference_pairs` per image of "</s>refA\\nrefB\\n", two of its references (one if it has one),
    and `hp.context_qa` per question of "</s>caption\\nQuestion: q Answer: a\\n" with its image's caption."""
    texts = data.captions if hp.qa_in_context_only else data.texts
    rows = [tokenizer(t + OPT_EOS_TEXT).input_ids[: hp.max_text_len] for t in texts]
    rng = random.Random(seed)
    for refs in data.references:
        for _ in range(hp.reference_pairs):
            a, b = rng.sample(refs, 2) if len(refs) > 1 else (refs[0], refs[0])
            rows.append(tokenizer(a + OPT_EOS_TEXT + b + OPT_EOS_TEXT).input_ids[: hp.max_pair_len])
    for (question, answer), caption in zip(data.qa, data.qa_captions or [""] * len(data.qa), strict=True):
        if caption:
            text = caption + OPT_EOS_TEXT + qa_text(question, answer) + OPT_EOS_TEXT
            rows += [tokenizer(text).input_ids[: hp.max_pair_len]] * hp.context_qa
    return rows


def opt_position_ids(batch: int, length: int, max_positions: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T) position ids, each row counting up from its own offset, uniform in [0, max_positions - T]:
    the teacher then reads a caption the same wherever stage 2's query slots put it."""
    offsets = torch.randint(0, max(0, max_positions - length) + 1, (batch, 1), generator=generator)  # (B, 1)
    return torch.arange(length)[None, :] + offsets


def train_opt(
    data: TeacherData, out_dir: Path, cfg: TeacherConfig, progress: Progress | None = None
) -> TeacherRun:
    """A small OPT trained as a causal LM on `opt_rows`, at random position offsets (`opt_position_ids`)."""
    from transformers import OPTForCausalLM

    from blip2_core.llm_bridge import lm_loss, pad_right

    start = time.perf_counter()
    hp = cfg.opt
    tokenizer = train_bpe(data.texts, cfg.bpe_vocab_size, "opt")
    rows = opt_rows(data, tokenizer, hp, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = OPTForCausalLM(opt_config(hp, len(tokenizer)))
    generator = torch.Generator().manual_seed(cfg.seed + 2)

    def step_loss(step: int) -> torch.Tensor:
        idx = _batch_indices(len(rows), hp.batch_size, generator).tolist()
        ids, mask = pad_right([rows[i] for i in idx], tokenizer.pad_token_id)  # (B, T)
        labels = ids.masked_fill(mask == 0, -100)
        positions = None
        if hp.position_offsets:
            positions = opt_position_ids(*ids.shape, hp.max_position_embeddings, generator)  # (B, T)
        return lm_loss(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, labels)

    losses = train_loop("opt", model, step_loss, hp, cfg.log_every, progress)
    seconds = time.perf_counter() - start
    return TeacherRun(_save_llm("opt", model, tokenizer, hp, losses, seconds, out_dir), losses, seconds)


def t5_example(tokenizer, text: str, answer_at: int | None, rng: random.Random, max_len: int):
    """(encoder ids, target ids) of one prefix-LM example, both ending in </s>.

    A question-answer text is split at its answer half of the time (the zero-shot VQA prompt form), else
    at a uniform point, as the stage-2 bridge splits captions.
    """
    eos = [tokenizer.eos_token_id]
    if answer_at is not None and rng.random() < 0.5:
        prompt = tokenizer(text[:answer_at].rstrip(), add_special_tokens=False).input_ids
        answer = tokenizer(text[answer_at:].strip(), add_special_tokens=False).input_ids
        return prompt[:max_len] + eos, answer[:max_len] + eos
    tokens = tokenizer(text, add_special_tokens=False).input_ids[:max_len]
    k = rng.randint(1, len(tokens) - 1) if len(tokens) >= 2 else 0
    return tokens[:k] + eos, tokens[k:] + eos


def train_t5(
    data: TeacherData, out_dir: Path, cfg: TeacherConfig, progress: Progress | None = None
) -> TeacherRun:
    """A small T5 trained as a prefix LM on the captions and question-answer texts."""
    from transformers import T5ForConditionalGeneration

    from blip2_core.llm_bridge import pad_right, prefix_lm_loss

    start = time.perf_counter()
    hp = cfg.t5
    tokenizer = train_bpe(data.texts, cfg.bpe_vocab_size, "t5")
    examples = [(c, None) for c in data.captions]
    examples += [(t, t.index(" Answer: ") + len(" Answer:")) for t in data.qa_texts]
    torch.manual_seed(cfg.seed)
    model = T5ForConditionalGeneration(t5_config(hp, len(tokenizer)))
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    rng = random.Random(cfg.seed + 3)

    def step_loss(step: int) -> torch.Tensor:
        idx = _batch_indices(len(examples), hp.batch_size, generator).tolist()
        pairs = [t5_example(tokenizer, *examples[i], rng, hp.max_text_len) for i in idx]
        ids, mask = pad_right([p[0] for p in pairs], tokenizer.pad_token_id)  # (B, S_enc)
        targets, target_mask = pad_right([p[1] for p in pairs], tokenizer.pad_token_id)  # (B, S_dec)
        labels = targets.masked_fill(target_mask == 0, -100)
        logits = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=model._shift_right(labels)
        ).logits
        return prefix_lm_loss(logits, labels)

    losses = train_loop("t5", model, step_loss, hp, cfg.log_every, progress)
    seconds = time.perf_counter() - start
    return TeacherRun(_save_llm("t5", model, tokenizer, hp, losses, seconds, out_dir), losses, seconds)


# ----------------------------------------------------------------------------------------------- all


def train_teachers(
    corpus_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: TeacherConfig | None = None,
    progress: Progress | None = None,
) -> TeacherPaths:
    """Train every teacher on the corpus' clean splits into out_dir; each folder appears atomically."""
    cfg = cfg or TeacherConfig()
    out = Path(out_dir)
    data = load_teacher_data(corpus_dir)
    tokenizers = train_tokenizers(data, out, cfg)
    clip = train_clip(data, out, cfg, progress)
    captioner = train_captioner(data, out, cfg, progress)
    opt = train_opt(data, out, cfg, progress)
    t5 = train_t5(data, out, cfg, progress)
    return TeacherPaths(
        clip_config=clip.path / f"{CLIP_MODEL_NAME}.json",
        clip_weights=clip.path / f"{CLIP_MODEL_NAME}.safetensors",
        captioner=captioner.path,
        opt=opt.path,
        t5=t5.path,
        tokenizers=tokenizers,
    )


# ----------------------------------------------------------------------------------------------- preset


def miniature_preset(teachers: TeacherPaths, out_file: str | os.PathLike[str], base: str = "tiny") -> Path:
    """Write the preset of the miniature replication: `base` with the teachers as its pretrained parts.

    The CLIP teacher's image tower becomes the frozen image encoder (`vision.pretrained`), as CLIP ViT-L/14
    is the paper's, and the OPT teacher the frozen LLM (`llm.name`, with its real dimensions and vocabulary).
    The Q-Former keeps the base's dimensions; stage 1 reads the teachers' WordPiece tokenizer.
    """
    from blip2_core.config import config_from_dict, config_to_dict, load_preset

    raw = config_to_dict(load_preset(base))
    raw["name"] = f"{base}-teachers"
    raw["vision"]["pretrained"] = str(Path(teachers.clip_weights).resolve())
    llm = json.loads((Path(teachers.opt) / "config.json").read_text(encoding="utf-8"))
    if llm.get("model_type") != raw["llm"]["kind"]:
        raise ValueError(
            f"preset {base!r} wants a {raw['llm']['kind']} LLM; {teachers.opt} is {llm.get('model_type')}"
        )
    raw["llm"] |= {
        "name": str(Path(teachers.opt).resolve()),
        "hidden_size": llm["hidden_size"],
        "num_layers": llm["num_hidden_layers"],
        "num_heads": llm["num_attention_heads"],
        "ffn_dim": llm["ffn_dim"],
        "vocab_size": llm["vocab_size"],
        "max_position_embeddings": llm["max_position_embeddings"],
    }
    # The Q-Former's text side speaks the teachers' WordPiece vocabulary: a few hundred ids, not BERT's
    # 30,523 (whose unused rows would cost most of the ITG head's compute at this size).
    from transformers import AutoTokenizer

    wordpiece = AutoTokenizer.from_pretrained(Path(teachers.tokenizers) / "wordpiece", local_files_only=True)
    raw["qformer"] |= {
        "vocab_size": len(wordpiece),
        "pad_token_id": wordpiece.pad_token_id,
        "cls_token_id": wordpiece.cls_token_id,
        "sep_token_id": wordpiece.sep_token_id,
        "dec_token_id": wordpiece.convert_tokens_to_ids("[DEC]"),
    }
    # A Q-Former trained from scratch (no BERT of its width exists) starts with nearly equal features for
    # every image and every text, so ITC and ITM begin exactly at chance. With dropout the noise drowned
    # the small signal that breaks the tie: 400 steps at lr 1e-4 left ITC at ln(batch). Without dropout
    # and at lr 1e-3 it leaves chance within 100 steps (measured on the demo's corpus).
    raw["qformer"] |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    raw["stage1"] |= {"lr": 1e-3, "min_lr": 1e-4}
    # Stage 2 too: at lr 1e-4 the Q-Former of stage 2 alone read almost nothing from the image in 400 steps
    # (0.003 nats per token, session 7); at 1e-3 both stage-2 runs read 0.02 to 0.04 (session 8).
    raw["stage2"] |= {"lr": 1e-3, "min_lr": 1e-4}
    # BERT's init std 0.02 is for width 768 (a projection's output is 0.02 * sqrt(768) = 0.55 times its
    # input); at width 64 it is 0.16 times, so the from-scratch Q-Former is nearly input-independent and
    # ITM (an image x text interaction) cannot leave the saddle: on a separable toy it sat exactly at
    # chance (tests/blip2_core/test_itm.py); on the demo's corpus ITC was 2.15 after 400 steps. At 0.1
    # the toy is solved within 20 steps and ITC reaches 1.60 (ln 32 = 3.47 is chance).
    raw["qformer"]["initializer_range"] = 0.1
    # Every caption of the corpus names every shape and where it is: crops keep nearly the whole image.
    for stage in ("stage1", "stage2"):
        raw[stage]["crop_scale_min"] = max(raw[stage]["crop_scale_min"], 0.9)
    config_from_dict(raw, source=f"miniature preset from {teachers.opt}")  # validate before writing
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    from blip2_core.fileio import atomic_write_text

    atomic_write_text(out, json.dumps(raw, indent=4) + "\n")
    return out
