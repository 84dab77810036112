"""Batched inference for evaluation and instructed generation: captions, VQA answers, retrieval scores.

Images are read from files and prepared as at evaluation time (resize the shorter side, center crop,
CLIP normalisation) at the model's own `vision.image_size`. Every function works batch by batch under
`torch.no_grad()` and returns plain Python values or CPU tensors.

Retrieval follows the paper: ITC similarity = max over the queries of the query-text cosine, the top k
candidates of each query re-scored by the ITM head (`metrics.retrieval.rerank_with_itm`) through
`Stage1ItmScorer`, the adapter that turns (image indices, text indices) into ITM logits.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from blip2_core.data import AugmentConfig, ImageTransform
from blip2_core.finetune import Tokenize, answer_questions
from blip2_core.generate import CAPTION_GENERATION, VQA_GENERATION, GenerationConfig
from blip2_core.metrics.retrieval import RerankMode, rerank_with_itm
from blip2_core.stage1 import Blip2Stage1
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
    cfg: GenerationConfig = CAPTION_GENERATION,
    batch_size: int = 16,
) -> list[str]:
    """Instructed generation: one text per (image file, prompt)."""
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
    cfg: GenerationConfig = VQA_GENERATION,
    batch_size: int = 16,
) -> list[str]:
    """Open-ended answers, one per (image file, question); see `finetune.answer_questions`."""
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
    """ITC features of every image and text (batched), then ITM re-ranking of each query's top k."""
    device, size = model_device(model), model.cfg.vision.image_size
    embeds, feats = [], []
    for rows in _chunks(len(images), batch_size):
        out = model.image_features(load_images([images[i] for i in rows], size).to(device))
        embeds.append(out.image_embeds)  # (B, S, W), kept for ITM
        feats.append(out.image_feats)  # (B, Q, E)
    ids, masks, text_feats = [], [], []
    for rows in _chunks(len(texts), batch_size):
        tok = tokenize([texts[i] for i in rows])
        text_ids, text_mask = tok["text_ids"].to(device), tok["text_mask"].to(device)
        text_feats.append(model.text_features(text_ids, text_mask).text_feat)  # (B, E)
        ids.append(text_ids)
        masks.append(text_mask)
    image_feats, text_feat = torch.cat(feats), torch.cat(text_feats)
    sim_i2t = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(dim=-1)  # (N_img, N_txt)
    scorer = Stage1ItmScorer(model, torch.cat(embeds), torch.cat(ids), torch.cat(masks))
    scores_i2t, scores_t2i = rerank_with_itm(sim_i2t, scorer, k=k, batch_size=batch_size, mode=mode)
    return RetrievalOutput(sim_i2t.cpu(), scores_i2t.cpu(), scores_t2i.cpu())
