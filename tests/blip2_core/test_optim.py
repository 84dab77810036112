import math

import pytest
import torch
from torch import nn

from blip2_core.optim import WarmupCosineSchedule, adamw, cosine_lr, param_groups

torch.set_num_threads(1)


class Tower(nn.Module):
    """A ViT-shaped toy: embeddings, `num_layers` blocks, a final norm, plus a frozen part and a scalar."""

    def __init__(self, num_layers: int = 3, width: int = 4) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(width, width).requires_grad_(False)


def tower_layer_id(name: str) -> int:
    if name.startswith("pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 4  # after the last of the 3 blocks


def group_of(groups: list[dict], name: str) -> dict:
    (group,) = [g for g in groups if name in g["param_names"]]
    return group


def test_weight_decay_only_on_matrices_not_biases_norms_or_scalars():
    model = Tower()
    groups = param_groups(model, weight_decay=0.05)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert all(name not in g["param_names"] for g in groups)
            continue
        expected = 0.05 if param.ndim >= 2 else 0.0
        assert group_of(groups, name)["weight_decay"] == expected, name
    assert group_of(groups, "blocks.0.0.bias")["weight_decay"] == 0.0
    assert group_of(groups, "blocks.0.1.weight")["weight_decay"] == 0.0  # LayerNorm weight
    assert group_of(groups, "temp")["weight_decay"] == 0.0
    assert group_of(groups, "blocks.0.0.weight")["weight_decay"] == 0.05


def test_groups_cover_each_trainable_param_once():
    model = Tower()
    groups = param_groups(model, 0.05, layer_decay=0.9, layer_id_fn=tower_layer_id, num_layers=3)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)


def test_no_trainable_params_is_an_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), 0.05)


def reference_lr(step, peak, floor, warmup, total):
    # The paper's schedule written out independently: linear ramp, then half a cosine period to the floor.
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("step", [0, 1, 9, 10, 11, 37, 55, 99, 100, 150])
def test_cosine_lr_matches_the_formula(step):
    assert cosine_lr(step, 1e-4, 5e-5, 10, 100) == pytest.approx(reference_lr(step, 1e-4, 5e-5, 10, 100))


def test_schedule_warms_up_then_decays_to_the_floor_per_iteration():
    param = nn.Parameter(torch.zeros(2, 2))
    opt = adamw([{"params": [param], "lr_scale": 1.0}], lr=1e-4)
    schedule = WarmupCosineSchedule(opt, peak_lr=1e-4, min_lr=5e-5, warmup_steps=20, total_steps=200)
    lrs = []
    for _ in range(220):
        lrs.append(opt.param_groups[0]["lr"])
        schedule.step()
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:20], strict=False))  # ramps up every iteration
    assert lrs[19] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[20:200], lrs[21:200], strict=False))
    assert len(set(lrs[20:200])) == 180  # changes every iteration, not once per epoch
    assert lrs[199] > 5e-5 and lrs[200:] == [pytest.approx(5e-5)] * 20


def test_schedule_state_dict_restores_the_step():
    param = nn.Parameter(torch.zeros(2))
    opt = adamw([{"params": [param]}], lr=1.0)
    schedule = WarmupCosineSchedule(opt, 1.0, 0.0, 5, 50)
    for _ in range(17):
        schedule.step()
    fresh = WarmupCosineSchedule(adamw([{"params": [param]}], lr=1.0), 1.0, 0.0, 5, 50)
    fresh.load_state_dict(schedule.state_dict())
    assert (
        fresh.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == cosine_lr(17, 1.0, 0.0, 5, 50)
    )


def test_layer_decay_scales_follow_depth():
    model = Tower(num_layers=3)
    groups = param_groups(model, 0.05, layer_decay=0.5, layer_id_fn=tower_layer_id, num_layers=3)
    assert group_of(groups, "norm.weight")["lr_scale"] == 1.0
    assert group_of(groups, "blocks.2.0.weight")["lr_scale"] == 0.5
    assert group_of(groups, "blocks.0.0.weight")["lr_scale"] == 0.5**3
    assert group_of(groups, "pos_embed")["lr_scale"] == 0.5**4


def test_layer_decay_really_changes_the_update_size():
    # Adam's first update moves each weight by about lr (the normalised gradient is +-1), so the
    # movement of each layer must shrink by exactly its lr_scale: the decay is not a no-op.
    model = Tower(num_layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = param_groups(model, 0.0, layer_decay=0.5, layer_id_fn=tower_layer_id, num_layers=3)
    opt = adamw(groups, lr=1e-3)
    WarmupCosineSchedule(opt, peak_lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=10)
    x = torch.randn(8, 5, 4)
    h = x + model.pos_embed
    for block in model.blocks:
        h = block(h)
    (model.norm(h) * torch.randn(8, 5, 4)).sum().mul(model.temp).backward()
    opt.step()
    for name, expected_scale in [
        ("blocks.2.0.weight", 0.5),
        ("blocks.0.0.weight", 0.125),
        ("pos_embed", 0.0625),
    ]:
        moved = (dict(model.named_parameters())[name] - before[name]).abs()
        moved = moved[moved > 0]
        assert moved.numel() > 0
        assert torch.allclose(moved, torch.full_like(moved, 1e-3 * expected_scale), rtol=1e-2), name


def test_layer_decay_needs_the_layer_map():
    with pytest.raises(ValueError, match="layer_id_fn"):
        param_groups(Tower(), 0.05, layer_decay=0.9)


def test_layer_id_out_of_range_names_the_param():
    with pytest.raises(ValueError, match="pos_embed"):
        param_groups(Tower(), 0.05, layer_decay=0.9, layer_id_fn=lambda n: 99, num_layers=3)


def test_adamw_betas_are_configurable():
    param = nn.Parameter(torch.zeros(2))
    assert adamw([{"params": [param]}], lr=1.0).defaults["betas"] == (0.9, 0.98)
    assert adamw([{"params": [param]}], lr=1.0, betas=(0.9, 0.999)).param_groups[0]["betas"] == (0.9, 0.999)
