import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_toy_script import ToyModel

from blip2_core import checkpoints
from blip2_core.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainable_weights,
    save_checkpoint,
)
from blip2_core.optim import WarmupCosineSchedule, adamw, param_groups

torch.set_num_threads(1)


def trained_setup(seed: int = 0):
    """A toy model, optimizer and schedule after two real steps, so that every state is non-trivial."""
    torch.manual_seed(seed)
    model = ToyModel(dropout=0.0)
    opt = adamw(param_groups(model, 0.05), lr=1e-2)
    schedule = WarmupCosineSchedule(opt, 1e-2, 1e-3, 2, 10)
    for _ in range(2):
        model({"x": torch.randn(4, 8), "y": torch.randn(4)}).loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    return model, opt, schedule


def test_saves_only_trainable_params_and_listed_buffers(tmp_path):
    model, opt, schedule = trained_setup()
    path = save_checkpoint(tmp_path, 2, model, optimizer=opt, scheduler=schedule, buffers=("seen",))
    saved = load_file(path / "model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable | {"seen"}
    assert not any(name.startswith("encoder.") for name in saved)  # the frozen part is not copied
    assert torch.equal(saved["fc1.weight"], model.fc1.weight.detach())


def test_unknown_buffer_is_a_clear_error(tmp_path):
    model, _, _ = trained_setup()
    with pytest.raises(KeyError, match="no_such_buffer"):
        save_checkpoint(tmp_path, 1, model, buffers=("no_such_buffer",))


def test_train_state_loads_with_weights_only(tmp_path):
    model, opt, schedule = trained_setup()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    path = save_checkpoint(
        tmp_path,
        2,
        model,
        optimizer=opt,
        scheduler=schedule,
        scaler=scaler,
        data_state={"epoch": 1, "index": 3},
    )
    state = torch.load(path / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    assert state["scheduler"] == {"last_step": 2}
    assert state["scaler"]["scale"] == scaler.get_scale()
    assert state["ranks"][0]["data"] == {"epoch": 1, "index": 3}


def test_round_trip_restores_weights_optimizer_schedule_rng_and_data(tmp_path):
    model, opt, schedule = trained_setup(seed=0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = save_checkpoint(
        tmp_path, 2, model, optimizer=opt, scheduler=schedule, data_state={"epoch": 0, "index": 2}
    )
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    other, other_opt, other_schedule = trained_setup(seed=1)
    frozen_before = other.encoder.weight.clone()
    loaded = load_checkpoint(other, path, other_opt, other_schedule)

    assert (loaded.step, loaded.data_state) == (2, {"epoch": 0, "index": 2})
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q) == p.requires_grad, name  # trainable restored, frozen left alone
    assert torch.equal(other.encoder.weight, frozen_before)
    assert other_schedule.last_step == 2 and other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    exp_avg = opt.state[model.fc1.weight]["exp_avg"]
    assert torch.equal(other_opt.state[other.fc1.weight]["exp_avg"], exp_avg)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])


def test_world_size_mismatch_is_refused(tmp_path):
    model, opt, _ = trained_setup()
    path = save_checkpoint(tmp_path, 2, model, optimizer=opt)
    with pytest.raises(ValueError, match="world_size 2"):
        load_checkpoint(model, path, rank=0, world_size=2)


def test_missing_optimizer_state_is_a_clear_error(tmp_path):
    model, opt, _ = trained_setup()
    path = save_checkpoint(tmp_path, 2, model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(model, path, opt)


def test_load_trainable_weights_is_strict(tmp_path):
    model, _, _ = trained_setup()
    path = save_checkpoint(tmp_path, 1, model)

    wider = ToyModel(dropout=0.0, width=32)
    before = wider.fc2.bias.clone()  # same shape in both models
    with pytest.raises(ValueError, match=r"fc1.weight \(16, 8\) \(model \(32, 8\)\)"):
        load_trainable_weights(wider, path)
    assert torch.equal(wider.fc2.bias, before)  # nothing copied after a mismatch

    extra = ToyModel(dropout=0.0)
    extra.head2 = torch.nn.Linear(2, 2)  # a trainable param the file lacks
    with pytest.raises(KeyError, match="missing head2.bias, head2.weight"):
        load_trainable_weights(extra, path)

    fewer = ToyModel(dropout=0.0)
    fewer.fc2.requires_grad_(False)  # the file holds fc2 but it is not trainable here
    with pytest.raises(KeyError, match="unexpected fc2.bias, fc2.weight"):
        load_trainable_weights(fewer, path)
    report = load_trainable_weights(fewer, path, strict=False)
    assert report.unexpected == ["fc2.bias", "fc2.weight"] and report.missing == []


def test_load_trainable_weights_restores_listed_buffers(tmp_path):
    model, _, _ = trained_setup()
    assert int(model.seen) == 8
    path = save_checkpoint(tmp_path, 1, model, buffers=("seen",))
    fresh = ToyModel(dropout=0.0)
    load_trainable_weights(fresh, path / "model.safetensors")
    assert int(fresh.seen) == 8 and torch.equal(fresh.fc2.weight, model.fc2.weight)


def test_latest_checkpoint_ignores_temp_incomplete_and_foreign_folders(tmp_path):
    model, _, _ = trained_setup()
    save_checkpoint(tmp_path, 3, model)
    save_checkpoint(tmp_path, 10, model)
    (tmp_path / ".tmp-step-000020-999").mkdir()  # a writer killed mid-save
    (tmp_path / "step-000030").mkdir()  # incomplete: no files
    (tmp_path / "step-000040").mkdir()
    (tmp_path / "step-000040" / "model.safetensors").write_bytes(b"")  # no train_state.pt
    (tmp_path / "best").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000010"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_steps_sort_numerically_beyond_six_digits(tmp_path):
    model, _, _ = trained_setup()
    save_checkpoint(tmp_path, 999_999, model)
    save_checkpoint(tmp_path, 1_000_000, model)
    assert latest_checkpoint(tmp_path).name == "step-1000000"


def test_keep_last_prunes_the_oldest(tmp_path):
    model, _, _ = trained_setup()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


def test_a_failed_write_leaves_no_checkpoint_and_no_temp(tmp_path, monkeypatch):
    model, _, _ = trained_setup()
    save_checkpoint(tmp_path, 1, model)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, _, _ = trained_setup()
    save_checkpoint(tmp_path, 5, model)
    with torch.no_grad():
        model.fc2.bias.fill_(3.0)
    path = save_checkpoint(tmp_path, 5, model)
    assert load_file(path / "model.safetensors")["fc2.bias"].item() == 3.0
    assert [p.name for p in tmp_path.iterdir()] == ["step-000005"]
