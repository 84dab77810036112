"""The captioner teacher: a BLIP captioner trained from scratch must start from a usable initialisation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import BlipForConditionalGeneration

from blip2_core import teachers as T

TEXTS = ["a picture of a red circle on a blue background", "two small green stars at the top"] * 4
HP = T.CaptionerTeacherConfig(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                              text_heads=2, vision_init_std=0.1, text_init_std=0.1)  # fmt: skip


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
        assert 0.05 < weight.std().item() < 0.15
    text_weight = captioner.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight
    assert 0.05 < text_weight.std().item() < 0.15


def _vision_at_init(std: float) -> tuple[float, float, float]:
    """(how much the blocks change the residual stream, last layer's attention entropy, uniform entropy)
    of the default-width captioner ViT initialised at `std`."""
    hp = dataclasses.replace(T.CaptionerTeacherConfig(), vision_init_std=std, text_init_std=std)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(T.blip_captioner_config(hp, 64, T.train_wordpiece(TEXTS, 60)))
    out = model.vision_model(pixel_values=torch.randn(4, 3, 64, 64), output_hidden_states=True,
                             output_attentions=True)  # fmt: skip
    first, last = out.hidden_states[0], out.hidden_states[-1]
    attention = out.attentions[-1]  # (B, heads, T, T)
    entropy = -(attention * attention.clamp_min(1e-12).log()).sum(-1).mean().item()
    return ((last - first).norm() / first.norm()).item(), entropy, math.log(attention.shape[-1])


def test_init_std_0_1_lets_the_width_64_vit_attend():
    # BERT's 0.02 is sized for width 768: at width 64 every attention map is uniform (a mean over patches:
    # colours, no shapes) and the blocks hardly change the residual stream. At 0.1 (the option) it is not.
    change, entropy, uniform = _vision_at_init(0.1)
    assert change > 0.3 and entropy < uniform - 0.05
    change, entropy, uniform = _vision_at_init(0.02)
    assert change < 0.2 and entropy > uniform - 0.01


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


def test_position_init_std_redraws_only_the_vit_position_embedding(captioner):
    model = BlipForConditionalGeneration(captioner.config)
    model.load_state_dict(captioner.state_dict())
    T.init_position_embedding(model, 2.0)
    position = model.vision_model.embeddings.position_embedding
    assert 1.7 < position.std().item() < 2.3
    before = captioner.state_dict()
    changed = {name for name, p in model.state_dict().items() if not torch.equal(p, before[name])}
    assert changed == {"vision_model.embeddings.position_embedding"}
    with pytest.raises(ValueError, match="position_init_std"):
        T.init_position_embedding(model, 0.0)


def test_train_captioner_starts_from_the_position_init_std(tmp_path):
    from PIL import Image

    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green", "white")]
    data = T.TeacherData(images, [[text] for text in TEXTS[:4]], [])
    for std, low, high in ((None, 0.05, 0.15), (2.0, 1.7, 2.3)):
        hp = dataclasses.replace(HP, steps=1, batch_size=2, warmup_steps=1, position_init_std=std)
        cfg = T.TeacherConfig(image_size=32, wordpiece_vocab_size=60, log_every=1, captioner=hp)
        run = T.train_captioner(data, tmp_path / str(std), cfg)
        trained = BlipForConditionalGeneration.from_pretrained(run.path)
        assert low < trained.vision_model.embeddings.position_embedding.std().item() < high
