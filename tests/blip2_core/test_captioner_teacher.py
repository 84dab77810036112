"""The captioner teacher: a BLIP captioner trained from scratch must start from a usable initialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import BlipForConditionalGeneration

from blip2_core import teachers as T

TEXTS = ["a picture of a red circle on a blue background", "two small green stars at the top"] * 4
HP = T.CaptionerTeacherConfig(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                              text_heads=2)  # fmt: skip


@pytest.fixture(scope="module")
def captioner() -> BlipForConditionalGeneration:
    tokenizer = T.train_wordpiece(TEXTS, 60)
    torch.manual_seed(0)
    return BlipForConditionalGeneration(T.blip_captioner_config(HP, 32, tokenizer))


def test_captioner_vision_tower_starts_from_a_random_init_not_zeros(captioner):
    # transformers' BlipVisionConfig defaults to initializer_range 1e-10 (weights meant to be loaded);
    # trained from there the ViT barely moves and the captioner ignores the image.
    vision = captioner.vision_model
    for weight in (vision.embeddings.patch_embedding.weight, vision.encoder.layers[0].self_attn.qkv.weight):
        assert 0.01 < weight.std().item() < 0.05
    text_weight = captioner.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight
    assert 0.01 < text_weight.std().item() < 0.05


@pytest.mark.parametrize(
    ("caption", "mirrored"),
    [
        (
            "a red circle on the left and a blue star on the right",
            "a red circle on the right and a blue star on the left",
        ),
        (
            "two small stars at the top on a white background",
            "two small stars at the top on a white background",
        ),
        ("a large green square in the center", "a large green square in the center"),
    ],
)
def test_mirror_caption_swaps_left_and_right_only(caption, mirrored):
    assert T.mirror_caption(caption) == mirrored
