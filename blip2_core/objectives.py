"""The stage-1 objectives of BLIP-2: ITC, hard-negative sampling for ITM, ITM and ITG.

Each function works on tensors only; `stage1.py` computes the logits and calls these where they are.
Notation: B = this rank's batch, N = world * B (candidates from all ranks), Q = queries, E = ITC
width, T = text length, V = vocabulary. Local sample i is global candidate `rank * B + i`
(every rank holds the same B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEMP_MIN, TEMP_MAX = 0.001, 0.5


@dataclass
class ItcOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B, N) local images against all texts, divided by the temperature
    sim_t2i: torch.Tensor  # (B, N) local texts against all images, divided by the temperature


def positive_targets(
    batch: int,
    rank: int,
    num_candidates: int,
    image_ids: torch.Tensor | None,
    all_image_ids: torch.Tensor | None,
) -> torch.Tensor:
    """(B, N) target distribution: one-hot on the paired candidate, or spread over same-image candidates.

    The same-image form is used only when image ids are given on purpose (COCO retrieval fine-tuning,
    where five captions share an image); pretraining pairs are one-to-one.
    """
    if image_ids is None:
        targets = torch.zeros(batch, num_candidates)
        targets[torch.arange(batch), rank * batch + torch.arange(batch)] = 1.0
        return targets
    same = (image_ids[:, None] == all_image_ids[None, :]).float()  # (B, N)
    return same / same.sum(dim=1, keepdim=True)


def smoothed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Cross-entropy of (B, N) logits against (B, N) target distributions, with label smoothing."""
    targets = (1.0 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    all_image_feats: torch.Tensor,
    all_text_feat: torch.Tensor,
    temp: torch.Tensor,
    rank: int = 0,
    label_smoothing: float = 0.1,
    image_ids: torch.Tensor | None = None,
    all_image_ids: torch.Tensor | None = None,
) -> ItcOutput:
    """Image-text contrastive loss with max-over-queries similarity.

    image_feats (B, Q, E), text_feat (B, E): this rank's L2-normalised features (with gradient).
    all_image_feats (N, Q, E), all_text_feat (N, E): the same gathered from every rank.
    temp: scalar temperature, already clamped to [TEMP_MIN, TEMP_MAX] by the model.
    image_ids / all_image_ids (B,) / (N,): only for same-image soft targets (see positive_targets).
    """
    # Image-to-text: best-matching query per pair. (B, 1, Q, E) x (N, E) -> (B, N, Q) -> (B, N)
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, all_text_feat).amax(dim=-1) / temp
    # Text-to-image: (B, E) x (N, Q, E) -> (B, N, Q) -> (B, N)
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, all_image_feats).amax(dim=-1) / temp
    batch, num_candidates = sim_i2t.shape
    targets = positive_targets(batch, rank, num_candidates, image_ids, all_image_ids).to(sim_i2t.device)
    loss = (
        smoothed_cross_entropy(sim_i2t, targets, label_smoothing)
        + smoothed_cross_entropy(sim_t2i, targets, label_smoothing)
    ) / 2
    return ItcOutput(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    rank: int = 0,
    image_ids: torch.Tensor | None = None,
    all_image_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local image one negative text, for each local text one negative image.

    sim_i2t, sim_t2i: (B, N) temperature-scaled ITC similarities against all ranks' candidates.
    Candidates are drawn with probability softmax(similarity) after removing the positive (and, only
    when image ids are passed, every candidate showing the same image). Returns global indices
    (neg_text_for_image (B,), neg_image_for_text (B,)) into the gathered candidates.
    """
    batch, num_candidates = sim_i2t.shape
    forbidden = positive_targets(batch, rank, num_candidates, image_ids, all_image_ids).to(sim_i2t.device) > 0
    if forbidden.all(dim=1).any():
        raise ValueError("hard-negative sampling: a sample has no candidate that is not a positive")
    picks = []
    for sim in (sim_i2t, sim_t2i):
        weights = F.softmax(sim.float(), dim=1).masked_fill(forbidden, 0.0)
        # Underflow can zero every allowed weight for a very peaked row; fall back to uniform there.
        empty = weights.sum(dim=1, keepdim=True) == 0
        weights = torch.where(empty, (~forbidden).float(), weights)
        picks.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return picks[0], picks[1]


def itm_labels(batch: int, device: torch.device | None = None) -> torch.Tensor:
    """(3B,) labels for [B positives ; B images with negative texts ; B texts with negative images]."""
    return torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(device)


def itm_loss(itm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """itm_logits (3B, 2): the 2-way head averaged over the Q query outputs; labels (3B,) 1 = match."""
    return F.cross_entropy(itm_logits, labels)


def itg_loss(
    lm_logits: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Image-grounded generation: next-token loss over the text.

    lm_logits (B, T, V) from the text positions of a multimodal-causal pass whose input_ids (B, T)
    start with [DEC]; position t predicts token t + 1. text_mask (B, T): 1 = real token; padding is
    not predicted.
    """
    labels = input_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)  # (B, T - 1)
    logits = lm_logits[:, :-1]  # (B, T - 1, V)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
