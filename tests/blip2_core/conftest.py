"""Shared fixtures for the blip2_core tests: one CPU thread, offline, tiny configs and checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

from blip2_core.config import Blip2Config, load_preset
from blip2_core.qformer import QFormer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config() -> Blip2Config:
    """The `tiny` preset: 64 px images, 64-wide tower and Q-Former, 8 queries."""
    return load_preset("tiny")


@pytest.fixture()
def tiny_qformer(tiny_config) -> QFormer:
    torch.manual_seed(0)
    return QFormer(tiny_config.qformer).eval()


def make_stage1_batch(cfg: Blip2Config, batch: int = 4, text_len: int = 8, seed: int = 0) -> dict:
    """Images and BERT-like ids ([CLS] first, padded tails) in the stage-1 batch layout.

    Each image is a flat random colour plus a little noise: random-noise images all look alike to a
    random tower once averaged by attention, while distinct colours give the queries something to match.
    """
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    ids = torch.randint(1000, 1100, (batch, text_len), generator=g)
    ids[:, 0] = cfg.qformer.cls_token_id
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=g)
    mask = (torch.arange(text_len)[None, :] < lengths[:, None]).long()
    colours = 2.0 * torch.randn(batch, 3, 1, 1, generator=g)
    images = colours + 0.1 * torch.randn(batch, 3, size, size, generator=g)
    return {"images": images, "text_ids": ids * mask, "text_mask": mask}


@pytest.fixture(scope="session")
def make_batch():
    """The stage-1 batch factory: make_batch(cfg, batch=4, text_len=8, seed=0) -> dict."""
    return make_stage1_batch


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_config):
    """A random BertForMaskedLM with the tiny Q-Former's dims, saved in the HF layout (safetensors)."""
    from transformers import BertConfig, BertForMaskedLM

    q = tiny_config.qformer
    bert_cfg = BertConfig(
        vocab_size=q.vocab_size - 1,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        max_position_embeddings=q.max_position_embeddings,
    )
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertForMaskedLM(bert_cfg).save_pretrained(path)
    return path
