"""Frozen image encoder: second-to-last block, position interpolation, freezing, precision, layer ids."""

import dataclasses

import torch
from torch import nn

from blip2_core.config import load_preset
from blip2_core.vision import VisionEncoder, create_clip, interpolate_positions


def _full_tower(cfg, seed):
    torch.manual_seed(seed)
    return create_clip(cfg.model_name, cfg.quick_gelu).visual.eval()


def test_features_are_the_second_to_last_block_output_with_every_token(tiny_config):
    cfg = tiny_config.vision
    torch.manual_seed(3)
    encoder = VisionEncoder(cfg)
    full = _full_tower(cfg, 3)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        x = full.conv1(images).flatten(2).transpose(1, 2)  # (B, g*g, W)
        x = torch.cat([full.class_embedding.expand(2, 1, -1), x], dim=1) + full.positional_embedding
        x = full.ln_pre(x)
        hidden = []
        for block in full.transformer.resblocks:
            x = block(x)
            hidden.append(x)
        got = encoder(images)
    grid = cfg.image_size // 8
    assert got.shape == (2, 1 + grid * grid, cfg.width) and got.dtype == torch.float32
    torch.testing.assert_close(got, hidden[-2])
    assert not torch.allclose(got, hidden[-1])
    assert len(encoder.blocks) == len(full.transformer.resblocks) - 1
    kept = dataclasses.replace(cfg, drop_last_block=False)
    torch.manual_seed(3)
    torch.testing.assert_close(VisionEncoder(kept)(images), hidden[-1])


def test_position_interpolation_shapes_and_identity():
    pos = torch.randn(1 + 8 * 8, 16)
    same = interpolate_positions(pos, 8)
    torch.testing.assert_close(same, pos)
    bigger = interpolate_positions(pos[None], 12)
    assert bigger.shape == (1, 1 + 12 * 12, 16)
    torch.testing.assert_close(bigger[0, 0], pos[0])  # CLS position untouched


def test_larger_images_use_interpolated_positions(tiny_config):
    cfg = dataclasses.replace(tiny_config.vision, image_size=96)
    encoder = VisionEncoder(cfg)
    assert encoder(torch.randn(1, 3, 96, 96)).shape == (1, 1 + 12 * 12, cfg.width)


def test_paper_towers_on_meta_at_fine_tuning_sizes():
    with torch.device("meta"):
        vit_l = VisionEncoder(
            dataclasses.replace(load_preset("paper-vitl-opt2.7b").vision, image_size=364), "meta"
        )
        vit_g = VisionEncoder(
            dataclasses.replace(load_preset("paper-vitg-opt2.7b").vision, image_size=490), "meta"
        )
    assert vit_l.visual.positional_embedding.shape == (1 + 26 * 26, 1024) and len(vit_l.blocks) == 23
    assert vit_g.visual.trunk.pos_embed.shape == (1, 1 + 35 * 35, 1408) and len(vit_g.blocks) == 39
    assert max(vit_g.layer_ids().values()) == 39


class Parent(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder


def test_freezing_is_explicit_and_survives_parent_train(tiny_config):
    parent = Parent(VisionEncoder(tiny_config.vision))
    parent.train()
    assert not parent.encoder.training
    assert not any(p.requires_grad for p in parent.encoder.parameters())
    parent.encoder.unfreeze()
    parent.train()
    assert parent.encoder.training and all(p.requires_grad for p in parent.encoder.parameters())


def test_half_precision_cast_keeps_fp32_features(tiny_config):
    encoder = VisionEncoder(dataclasses.replace(tiny_config.vision, precision="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert encoder(torch.randn(1, 3, 64, 64)).dtype == torch.float32
    encoder.unfreeze()
    assert all(p.dtype == torch.float32 for p in encoder.parameters())


def test_layer_ids_for_layer_wise_decay(tiny_config):
    encoder = VisionEncoder(tiny_config.vision)
    ids = encoder.layer_ids()
    assert set(ids) == {n for n, _ in encoder.named_parameters()}
    assert ids["visual.conv1.weight"] == 0 and ids["visual.positional_embedding"] == 0
    assert ids["visual.transformer.resblocks.0.attn.in_proj_weight"] == 1
    assert max(ids.values()) == len(encoder.blocks) == encoder.num_layers - 1


def test_local_weights_load_in_one_place(tiny_config, tmp_path):
    torch.manual_seed(7)
    clip = create_clip(tiny_config.vision.model_name)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    cfg = dataclasses.replace(tiny_config.vision, pretrained=str(tmp_path / "clip.pt"))
    torch.manual_seed(8)
    encoder = VisionEncoder(cfg)
    torch.testing.assert_close(encoder.visual.conv1.weight, clip.visual.conv1.weight)
    torch.testing.assert_close(
        encoder.blocks[0].mlp.c_fc.weight, clip.visual.transformer.resblocks[0].mlp.c_fc.weight
    )
