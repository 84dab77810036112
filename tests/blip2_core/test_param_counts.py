"""Parameter counts of the paper presets, built on the meta device (no memory, no weights)."""

import pytest
import torch

from blip2_core.config import load_preset
from blip2_core.qformer import QFormer, num_parameters
from blip2_core.stage1 import Blip2Stage1
from blip2_core.vision import create_clip

PAPER_QFORMER = 188e6  # paper: "188M parameters", queries included (ViT-g cross-attention width)


def _qformer(name):
    with torch.device("meta"):
        return QFormer(load_preset(name).qformer)


def test_vitg_qformer_is_188m_within_one_percent():
    count = num_parameters(_qformer("paper-vitg-opt2.7b"))
    assert count == pytest.approx(PAPER_QFORMER, rel=0.01)


def test_count_is_the_sum_of_its_bert_parts():
    q = load_preset("paper-vitg-opt2.7b").qformer
    d, ff, v, w = q.hidden_size, q.intermediate_size, q.vocab_size, q.encoder_hidden_size
    linear = lambda i, o: i * o + o  # noqa: E731
    ln = 2 * d
    self_attn = 4 * linear(d, d) + ln
    ffn = linear(d, ff) + linear(ff, d) + ln
    cross = 2 * linear(d, d) + 2 * linear(w, d) + ln
    layers = q.num_hidden_layers * (self_attn + 2 * ffn) + (q.num_hidden_layers // 2) * cross
    embeddings = v * d + q.max_position_embeddings * d + ln
    lm_head = linear(d, d) + ln + v  # decoder weight tied to the word embeddings
    queries = q.num_query_tokens * d
    assert num_parameters(_qformer("paper-vitg-opt2.7b")) == layers + embeddings + lm_head + queries


def test_vitl_cross_attention_is_narrower():
    vit_l, vit_g = (
        num_parameters(_qformer("paper-vitl-opt2.7b")),
        num_parameters(_qformer("paper-vitg-opt2.7b")),
    )
    assert vit_g - vit_l == 6 * 2 * (1408 - 1024) * 768  # six cross-attention layers, key + value


def test_stage1_trains_the_qformer_and_heads_only():
    with torch.device("meta"):
        model = Blip2Stage1(load_preset("paper-vitg-opt2.7b"), device="meta")
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    frozen = num_parameters(model.visual_encoder)
    assert trainable == pytest.approx(PAPER_QFORMER, rel=0.01)
    assert num_parameters(model.visual_encoder, trainable_only=True) == 0
    full = create_clip("EVA01-g-14", device="meta").visual
    cut = [full.trunk.blocks[-1], full.trunk.norm, full.trunk.fc_norm, full.trunk.head, full.head]
    assert frozen == num_parameters(full) - sum(num_parameters(m) for m in cut)  # 39 of 40 blocks, no head
    assert frozen == pytest.approx(1.0e9, rel=0.05)  # the paper's "ViT-g, 1B"
