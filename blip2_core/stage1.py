"""Stage 1 of BLIP-2: representation learning with a frozen image encoder (ITC + ITM + ITG).

`Blip2Stage1(cfg)(batch)` returns a `Stage1Output` whose `.loss` is the equal-weight sum of the three
objectives. The feature helpers (`image_features`, `text_features`, `itm_scores`) are what retrieval
fine-tuning and evaluation reuse.

One forward, per rank (B samples, N = world * B candidates):
  1. image tokens: frozen ViT -> ln_vision                                    (B, S, W)
  2. ITC: queries-only pass (cross-attending to the image) and text-only pass; together these are the
     unimodal mask, run as two cheaper passes. The queries' keys/values are cached for step 4.
  3. ITM: hard negatives sampled from the ITC similarities over all ranks, one bidirectional pass
     over [positives ; image + negative text ; negative image + text]              (3B, Q + T, D)
  4. ITG: [DEC] replaces [CLS]; text attends to the cached queries under the causal mask (queries in
     the causal mask see only queries, exactly what the queries-only pass computed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip2_core import objectives
from blip2_core.config import Blip2Config
from blip2_core.distributed import all_gather_no_grad, all_gather_with_local_grad, get_rank
from blip2_core.qformer import KVCache, QFormer
from blip2_core.vision import VisionEncoder


@dataclass
class Stage1Batch:
    images: torch.Tensor  # (B, 3, H, W), normalised pixels
    text_ids: torch.Tensor  # (B, T) BERT ids starting with [CLS], padded to the same T on every rank
    text_mask: torch.Tensor  # (B, T) 1 = real token
    image_ids: torch.Tensor | None = None  # (B,) read only by a model built with match_same_image=True

    @classmethod
    def from_any(cls, batch: Any) -> Stage1Batch:
        """Accept a Stage1Batch, another dataclass or a dict with the same field names."""
        if isinstance(batch, cls):
            return batch
        if is_dataclass(batch):
            batch = {f.name: getattr(batch, f.name) for f in fields(batch)}
        if not isinstance(batch, dict):
            raise TypeError(f"batch must be a dict or dataclass, got {type(batch).__name__}")
        missing = [name for name in ("images", "text_ids", "text_mask") if name not in batch]
        if missing:
            raise KeyError(f"stage-1 batch lacks {', '.join(missing)} (has {', '.join(batch)})")
        return cls(batch["images"], batch["text_ids"], batch["text_mask"], batch.get("image_ids"))


@dataclass
class ImageFeatures:
    image_embeds: torch.Tensor  # (B, S, W) ln_vision(frozen ViT tokens)
    query_output: torch.Tensor  # (B, Q, D)
    image_feats: torch.Tensor  # (B, Q, E) L2-normalised ITC features
    query_cache: KVCache | None = None  # the queries' keys/values, reused by ITG


@dataclass
class TextFeatures:
    text_output: torch.Tensor  # (B, T, D)
    text_feat: torch.Tensor  # (B, E) L2-normalised [CLS] feature


@dataclass
class Stage1Output:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    sim_i2t: torch.Tensor  # (B, N), temperature-scaled
    sim_t2i: torch.Tensor  # (B, N)
    temp: torch.Tensor  # the clamped temperature used


class Blip2Stage1(nn.Module):
    def __init__(self, cfg: Blip2Config, match_same_image: bool = False, device: str | torch.device = "cpu"):
        """match_same_image: use batch.image_ids for same-image ITC targets and hard-negative masking
        (COCO retrieval fine-tuning). Off by default, so pretraining never switches to it silently."""
        super().__init__()
        self.cfg = cfg
        self.match_same_image = match_same_image
        self.label_smoothing = cfg.stage1.label_smoothing
        self.visual_encoder = VisionEncoder(cfg.vision, device=device)
        with torch.device(device):
            self.ln_vision = nn.LayerNorm(cfg.vision.width)
            self.qformer = QFormer(cfg.qformer)
            hidden, embed = cfg.qformer.hidden_size, cfg.qformer.embed_dim
            self.vision_projection = nn.Linear(hidden, embed)
            self.text_projection = nn.Linear(hidden, embed)
            self.itm_head = nn.Linear(hidden, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))

    # ----- features (reused by retrieval fine-tuning and evaluation) -----

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.ln_vision(self.visual_encoder(images))  # (B, S, W)

    def image_features(self, images: torch.Tensor, use_cache: bool = False) -> ImageFeatures:
        image_embeds = self.encode_image(images)
        out = self.qformer(
            query_embeds=self.qformer.expand_queries(images.shape[0]),
            encoder_hidden_states=image_embeds,
            use_cache=use_cache,
        )
        feats = F.normalize(self.vision_projection(out.last_hidden_state), dim=-1)
        return ImageFeatures(image_embeds, out.last_hidden_state, feats, out.past_key_values)

    def text_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        out = self.qformer(input_ids=text_ids, attention_mask=text_mask).last_hidden_state  # (B, T, D)
        return TextFeatures(out, F.normalize(self.text_projection(out[:, 0]), dim=-1))

    def itm_logits(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor):
        """(B, S, W) image tokens + (B, T) text -> (B, 2) match logits averaged over the query outputs."""
        num_queries = self.cfg.qformer.num_query_tokens
        out = self.qformer(
            input_ids=text_ids,
            query_embeds=self.qformer.expand_queries(text_ids.shape[0]),
            attention_mask=text_mask,
            encoder_hidden_states=image_embeds,
            mask_kind="bidirectional",
        ).last_hidden_state
        return self.itm_head(out[:, :num_queries]).mean(dim=1)  # (B, Q, 2) -> (B, 2)

    def itm_scores(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor):
        """(B,) probability that each image-text pair matches (retrieval re-ranking)."""
        return self.itm_logits(image_embeds, text_ids, text_mask).softmax(dim=-1)[:, 1]

    # ----- training forward -----

    def clamped_temp(self) -> torch.Tensor:
        # Clamp the parameter itself (as BLIP does), so it cannot drift outside where its gradient dies.
        with torch.no_grad():
            self.temp.clamp_(objectives.TEMP_MIN, objectives.TEMP_MAX)
        return self.temp

    def forward(self, batch: Any) -> Stage1Output:
        batch = Stage1Batch.from_any(batch)
        rank = get_rank()
        image_ids = batch.image_ids if self.match_same_image else None
        all_image_ids = all_gather_no_grad(image_ids) if image_ids is not None else None
        image = self.image_features(batch.images, use_cache=True)
        text = self.text_features(batch.text_ids, batch.text_mask)

        itc = objectives.itc_loss(
            image.image_feats,
            text.text_feat,
            all_gather_with_local_grad(image.image_feats),
            all_gather_with_local_grad(text.text_feat),
            self.clamped_temp(),
            rank=rank,
            label_smoothing=self.label_smoothing,
            image_ids=image_ids,
            all_image_ids=all_image_ids,
        )
        loss_itm = self._itm_loss(batch, image.image_embeds, itc, rank, image_ids, all_image_ids)
        loss_itg = self._itg_loss(batch, image.query_cache)
        return Stage1Output(
            loss=itc.loss + loss_itm + loss_itg,
            loss_itc=itc.loss,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            sim_i2t=itc.sim_i2t.detach(),
            sim_t2i=itc.sim_t2i.detach(),
            temp=self.temp.detach().clone(),
        )

    def _itm_loss(self, batch, image_embeds, itc, rank, image_ids, all_image_ids) -> torch.Tensor:
        neg_text, neg_image = objectives.sample_hard_negatives(
            itc.sim_i2t, itc.sim_t2i, rank, image_ids, all_image_ids
        )
        all_ids, all_mask = all_gather_no_grad(batch.text_ids), all_gather_no_grad(batch.text_mask)
        all_embeds = all_gather_with_local_grad(image_embeds)  # (N, S, W)
        text_ids = torch.cat([batch.text_ids, all_ids[neg_text], batch.text_ids])  # (3B, T)
        text_mask = torch.cat([batch.text_mask, all_mask[neg_text], batch.text_mask])
        embeds = torch.cat([image_embeds, image_embeds, all_embeds[neg_image]])  # (3B, S, W)
        logits = self.itm_logits(embeds, text_ids, text_mask)  # (3B, 2)
        return objectives.itm_loss(logits, objectives.itm_labels(batch.text_ids.shape[0], logits.device))

    def _itg_loss(self, batch, query_cache: KVCache) -> torch.Tensor:
        dec_ids = batch.text_ids.clone()
        dec_ids[:, 0] = self.cfg.qformer.dec_token_id
        text_out = self.qformer(
            input_ids=dec_ids,
            attention_mask=batch.text_mask,
            mask_kind="causal",
            past_key_values=query_cache,
        ).last_hidden_state  # (B, T, D): the cache holds the queries, so only text comes back
        logits = self.qformer.lm_logits(text_out)  # (B, T, V)
        return objectives.itg_loss(logits, dec_ids, batch.text_mask, self.label_smoothing)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]
