"""Frozen image encoders built with open_clip, cut before their last transformer block.

BLIP-2 reads the output of the SECOND-TO-LAST block of the image tower, every token (CLS + patches,
257 for ViT-L/14 at 224 px), with no final norm. `VisionEncoder` builds the open_clip tower offline
(`pretrained=None`), loads local weights in one place (`load_open_clip_weights`), then:
  1. interpolates the position embeddings when `image_size` differs from the tower's (364/490 px),
  2. removes the last block and everything after the blocks (final norm, pooling, projection), so
     no unused parameter is left for DDP to complain about when the encoder is fine-tuned,
  3. freezes it (requires_grad_(False) + eval(), kept across the parent's .train()) and casts it to
     fp16/bf16 if asked. Features always leave as fp32 (B, N, W); the trainable `ln_vision` that
     follows belongs to the BLIP-2 model, not to this frozen module.
Two tower families are supported: open_clip's own VisionTransformer (ViT-L-14, the tiny tower) and
timm towers wrapped by open_clip (EVA01-g-14).
"""

from __future__ import annotations

import re
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from blip2_core.config import OPEN_CLIP_CONFIG_NAMES, PRESET_DIR, VisionConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_open_clip_configs() -> None:
    """Make the open_clip architectures shipped in `presets/` (e.g. `blip2-tiny-clip`) known to open_clip."""
    known = set(open_clip.list_models())
    for name in OPEN_CLIP_CONFIG_NAMES:
        if name not in known:
            open_clip.add_model_config(PRESET_DIR / f"{name}.json")


def create_clip(model_name: str, quick_gelu: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised open_clip CLIP model (both towers); never touches the network."""
    register_open_clip_configs()
    with torch.device(device):  # on "meta", allocate nothing (building on CPU first takes ~45 s for ViT-g)
        return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu, device=device)


def load_open_clip_weights(visual: nn.Module, path: str | Path) -> None:
    """The one place where image-tower weights are read: an open_clip checkpoint (full CLIP or tower only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    visual.load_state_dict(state, strict=True)


def interpolate_positions(pos: torch.Tensor, new_grid: int, num_prefix: int = 1) -> torch.Tensor:
    """(P + g*g, W) or (1, P + g*g, W) learned positions -> the same for a new_grid x new_grid patch grid."""
    batched = pos.dim() == 3
    pos = pos[0] if batched else pos
    prefix, grid_pos = pos[:num_prefix], pos[num_prefix:]
    old_grid = int(round(grid_pos.shape[0] ** 0.5))
    if old_grid * old_grid != grid_pos.shape[0]:
        raise ValueError(f"position embeddings of {grid_pos.shape[0]} patches are not a square grid")
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
    grid_pos = F.interpolate(grid_pos.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    out = torch.cat([prefix, grid_pos], dim=0)
    return out[None] if batched else out


class VisionEncoder(nn.Module):
    """The image tower minus its last block; forward(images (B, 3, H, W)) -> (B, N, W) fp32."""

    def __init__(self, cfg: VisionConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.visual = create_clip(cfg.model_name, cfg.quick_gelu, device=device).visual
        if cfg.pretrained:
            load_open_clip_weights(self.visual, cfg.pretrained)
        self.is_timm = hasattr(self.visual, "trunk")
        self._set_image_size(cfg.image_size)
        self._cut_after_blocks(drop_last=cfg.drop_last_block)
        width = self.blocks[0].ln_1.normalized_shape[0] if not self.is_timm else self.visual.trunk.embed_dim
        if width != cfg.width:
            raise ValueError(f"vision.width is {cfg.width} but {cfg.model_name} produces {width}-wide tokens")
        self.frozen = False
        if cfg.freeze:
            self.freeze()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.trunk.blocks if self.is_timm else self.visual.transformer.resblocks

    @property
    def num_layers(self) -> int:
        """Layer ids run 0 (patch/position embeddings) .. num_blocks (last kept block)."""
        return len(self.blocks) + 1

    def _set_image_size(self, size: int) -> None:
        if self.is_timm:
            if tuple(self.visual.trunk.patch_embed.img_size) != (size, size):
                self.visual.trunk.set_input_size(img_size=(size, size))
            return
        visual = self.visual
        grid = size // visual.patch_size[0]
        if visual.grid_size != (grid, grid):
            visual.positional_embedding = nn.Parameter(
                interpolate_positions(visual.positional_embedding, grid)
            )
            visual.grid_size, visual.image_size = (grid, grid), (size, size)

    def _cut_after_blocks(self, drop_last: bool) -> None:
        if drop_last:
            kept = nn.ModuleList(list(self.blocks)[:-1])
            if self.is_timm:
                self.visual.trunk.blocks = nn.Sequential(*kept)
            else:
                self.visual.transformer.resblocks = kept
        if self.is_timm:
            trunk = self.visual.trunk
            trunk.norm, trunk.fc_norm, trunk.head = nn.Identity(), nn.Identity(), nn.Identity()
            self.visual.head = nn.Identity()
        else:
            self.visual.ln_post, self.visual.proj, self.visual.attn_pool = nn.Identity(), None, None

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.frozen = True
        self.to(DTYPES[self.cfg.precision])
        self.eval()

    def unfreeze(self) -> None:
        """Fine-tuning trains the encoder: fp32 weights, gradients on, train mode follows the parent."""
        self.frozen = False
        self.to(torch.float32)
        self.requires_grad_(True)

    def train(self, mode: bool = True) -> VisionEncoder:
        # A frozen encoder stays in eval mode (no dropout, fixed norms) whatever its parent does.
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        images = images.to(dtype)
        if self.is_timm:
            tokens = self.visual.trunk.forward_features(images)  # norm removed: last kept block's output
        else:
            tokens = self.visual.transformer(self.visual._embeds(images))  # (B, 1 + g*g, W)
        return tokens.float()

    def layer_ids(self) -> dict[str, int]:
        """Parameter name -> layer id for layer-wise lr decay (0 = embeddings, i + 1 = block i)."""
        block_prefix = "visual.trunk.blocks." if self.is_timm else "visual.transformer.resblocks."
        ids = {}
        for name, _ in self.named_parameters():
            match = re.match(re.escape(block_prefix) + r"(\d+)\.", name)
            ids[name] = int(match.group(1)) + 1 if match else 0
        return ids
