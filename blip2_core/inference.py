"""Batched inference for evaluation and instructed generation: captions, VQA answers, retrieval scores.

Images are read from files and prepared as at evaluation time (resize the shorter side, center crop,
CLIP normalisation) at the model's own `vision.image_size`. Every function works batch by batch under
`torch.no_grad()` and returns plain Python values or CPU tensors.

Retrieval follows the paper: ITC similarity = max over the queries of the query-text cosine, the top k
candidates of each query re-scored by the ITM head (`metrics.retrieval.rerank_with_itm`) through
`Stage1ItmScorer`, the adapter that turns (image indices, text indices) into ITM logits. Under
torch.distributed (torchrun) retrieval splits across the ranks: each embeds its share of the image and
text batches, the features are gathered, each re-ranks its share of the queries, and the score rows are
gathered again, so every rank returns the whole result, the same as one process computes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from blip2_core.data import AugmentConfig, ImageTransform
from blip2_core.distributed import all_gather_rows, get_rank, get_world_size
from blip2_core.metrics.retrieval import (
    RerankMode,
    RetrievalScores,
    owned_rows,
    recall_at_k,
    rerank_with_itm,
)
from blip2_core.stage1 import Blip2Stage1

if TYPE_CHECKING:  # the LLM side (transformers' language models) loads only when generating
    from blip2_core.finetune import Tokenize
    from blip2_core.generate import GenerationConfig
    from blip2_core.stage2 import Blip2Stage2


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_images(paths: Sequence[str], image_size: int) -> torch.Tensor:
    """Image files -> (B, 3, S, S) evaluation tensors."""
    transform = ImageTransform(AugmentConfig(image_size=image_size, train=False))
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(transform(image.convert("RGB"), random.Random(0))[0])
    return torch.stack(tensors)


def _chunks(n: int, size: int) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


@torch.no_grad()
def generate_texts(
    model: Blip2Stage2,
    images: Sequence[str],
    prompts: Sequence[str],
    cfg: GenerationConfig | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Instructed generation: one text per (image file, prompt); cfg None: CAPTION_GENERATION."""
    from blip2_core.generate import CAPTION_GENERATION

    cfg = CAPTION_GENERATION if cfg is None else cfg
    if len(images) != len(prompts):
        raise ValueError(f"generate_texts: {len(images)} images but {len(prompts)} prompts")
    device, size = model_device(model), model.cfg.vision.image_size
    out: list[str] = []
    for rows in _chunks(len(images), batch_size):
        pixels = load_images([images[i] for i in rows], size).to(device)
        out += model.generate(pixels, [prompts[i] for i in rows], cfg)
    return out


@torch.no_grad()
def answer_vqa(
    model: Blip2Stage2,
    images: Sequence[str],
    questions: Sequence[str],
    tokenize: Tokenize | None = None,
    cfg: GenerationConfig | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Open-ended answers, one per (image file, question); see `finetune.answer_questions`.
    cfg None: VQA_GENERATION."""
    from blip2_core.finetune import answer_questions
    from blip2_core.generate import VQA_GENERATION

    cfg = VQA_GENERATION if cfg is None else cfg
    device, size = model_device(model), model.cfg.vision.image_size
    out: list[str] = []
    for rows in _chunks(len(images), batch_size):
        pixels = load_images([images[i] for i in rows], size).to(device)
        out += answer_questions(model, pixels, [questions[i] for i in rows], tokenize, cfg)
    return out


@dataclass
class Stage1ItmScorer:
    """`ItmFn` over a Blip2Stage1: ITM positive-class logits (averaged over the queries) of pairs given by
    index into the cached image tokens (N_img, S, W) and tokenised texts (N_txt, T)."""

    model: Blip2Stage1
    image_embeds: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor

    @torch.no_grad()
    def __call__(self, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        device = self.image_embeds.device
        image_index, text_index = image_index.to(device), text_index.to(device)
        logits = self.model.itm_logits(
            self.image_embeds[image_index], self.text_ids[text_index], self.text_mask[text_index]
        )  # (P, 2)
        return logits[:, 1].float()


@dataclass
class RetrievalOutput:
    sim_i2t: torch.Tensor  # (N_img, N_txt) ITC similarity: max over the queries of the cosine
    scores_i2t: torch.Tensor  # (N_img, N_txt) re-ranked (top-k by ITC re-scored by ITM, -inf elsewhere)
    scores_t2i: torch.Tensor  # (N_txt, N_img)

    def recalls(
        self, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
    ) -> tuple[RetrievalScores, RetrievalScores]:
        """Recall@1/5/10 both directions: (re-ranked by ITM, ITC similarity alone)."""
        reranked = recall_at_k(self.scores_i2t, img2txt, txt2img, sim_t2i=self.scores_t2i)
        return reranked, recall_at_k(self.sim_i2t, img2txt, txt2img)


def rank_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The batches of `_chunks(n, batch_size)` that `rank` computes: a contiguous run of whole batches,
    so that every batch holds the same rows as in one process (and gives the same features)."""
    batches = _chunks(n, batch_size)
    return [batches[i] for i in owned_rows(len(batches), rank, world_size)]


def _rows_per_rank(n: int, batch_size: int, world_size: int) -> list[int]:
    return [sum(map(len, rank_batches(n, batch_size, r, world_size))) for r in range(world_size)]


def _embed_images(model: Blip2Stage1, images: Sequence[str], batch_size: int):
    """This rank's image batches -> (image_embeds (N_img, S, W), image_feats (N_img, Q, E)), all ranks'."""
    device, size = model_device(model), model.cfg.vision.image_size
    rank, world = get_rank(), get_world_size()
    embeds, feats = [], []
    # A rank with no batch (fewer batches than ranks) still needs its (0, ...) part of the right shape.
    for rows in rank_batches(len(images), batch_size, rank, world) or [range(0)]:
        out = model.image_features(load_images([images[i] for i in rows or [0]], size).to(device))
        embeds.append(out.image_embeds[: len(rows)])  # (B, S, W), kept for ITM
        feats.append(out.image_feats[: len(rows)])  # (B, Q, E)
    sizes = _rows_per_rank(len(images), batch_size, world)
    return all_gather_rows(torch.cat(embeds), sizes), all_gather_rows(torch.cat(feats), sizes)


def _embed_texts(model: Blip2Stage1, texts: Sequence[str], tokenize: Tokenize, batch_size: int):
    """This rank's text batches -> (text_ids, text_mask (N_txt, T), text_feat (N_txt, E)), all ranks'."""
    device, rank, world = model_device(model), get_rank(), get_world_size()
    ids, masks, feats = [], [], []
    for rows in rank_batches(len(texts), batch_size, rank, world) or [range(0)]:
        tok = tokenize([texts[i] for i in rows or [0]])
        text_ids, text_mask = tok["text_ids"].to(device), tok["text_mask"].to(device)
        feats.append(model.text_features(text_ids, text_mask).text_feat[: len(rows)])  # (B, E)
        ids.append(text_ids[: len(rows)])
        masks.append(text_mask[: len(rows)])
    sizes = _rows_per_rank(len(texts), batch_size, world)
    return tuple(all_gather_rows(torch.cat(part), sizes) for part in (ids, masks, feats))


@torch.no_grad()
def retrieval_scores(
    model: Blip2Stage1,
    images: Sequence[str],
    texts: Sequence[str],
    tokenize: Tokenize,
    k: int = 128,
    batch_size: int = 32,
    mode: RerankMode = "itm+itc",
) -> RetrievalOutput:
    """ITC features of every image and text (batched), then ITM re-ranking of each query's top k.

    Under torch.distributed every rank must call it with the same arguments; each computes its share
    (module docstring) and all return the whole output.
    """
    image_embeds, image_feats = _embed_images(model, images, batch_size)
    text_ids, text_mask, text_feat = _embed_texts(model, texts, tokenize, batch_size)
    sim_i2t = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(dim=-1)  # (N_img, N_txt)
    scorer = Stage1ItmScorer(model, image_embeds, text_ids, text_mask)
    rank, world = get_rank(), get_world_size()
    parts = rerank_with_itm(
        sim_i2t, scorer, k=k, batch_size=batch_size, rank=rank, world_size=world, mode=mode
    )
    scores = []
    for part in parts:  # each rank re-ranked a contiguous slice of the query rows; the rest is NaN
        mine = owned_rows(part.shape[0], rank, world)
        sizes = [len(owned_rows(part.shape[0], r, world)) for r in range(world)]
        scores.append(all_gather_rows(part[mine.start : mine.stop].contiguous(), sizes))
    return RetrievalOutput(sim_i2t.cpu(), scores[0].cpu(), scores[1].cpu())
