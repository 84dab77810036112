import logging
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from train_toy_script import toy_columns, toy_model, trainable_params

from blip2_core.checkpoints import latest_checkpoint, list_checkpoints
from blip2_core.optim import cosine_lr
from blip2_core.train import InMemoryData, TrainConfig, output_losses, train

torch.set_num_threads(1)


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path), steps=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, log_every=1,
        ckpt_every=4, keep_last=None, seed=0, device="cpu",
    )  # fmt: skip
    return TrainConfig(**(base | overrides))


class Recorder:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[int, object]] = []

    def on_metrics(self, step, metrics):
        self.metrics.append((step, metrics))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, path))


def mean_loss(model: nn.Module, columns) -> float:
    model.eval()
    with torch.no_grad():
        return model(columns).loss.item()


def test_loss_goes_down_and_frozen_weights_never_move(tmp_path):
    model, columns = toy_model(dropout=0.0), toy_columns(64)
    frozen = model.encoder.weight.clone()
    before = mean_loss(model, columns)
    model.train()
    train(model, InMemoryData(columns, 16), config(tmp_path, steps=40, lr=3e-2, ckpt_every=40))
    assert mean_loss(model, columns) < 0.7 * before
    assert torch.equal(model.encoder.weight, frozen)


def test_grad_accumulation_equals_the_bigger_batch(tmp_path):
    big = toy_model(dropout=0.0)
    train(big, InMemoryData(toy_columns(), 8), config(tmp_path / "big"))
    accumulated = toy_model(dropout=0.0)
    train(accumulated, InMemoryData(toy_columns(), 4), config(tmp_path / "acc", grad_accum=2))
    for name, value in trainable_params(big).items():
        assert torch.allclose(value, trainable_params(accumulated)[name], atol=1e-6), name


def test_metrics_callbacks_and_per_iteration_lr(tmp_path):
    recorder = Recorder()
    result = train(toy_model(), InMemoryData(toy_columns(), 4), config(tmp_path), callbacks=[recorder])
    assert [step for step, _ in recorder.metrics] == list(range(1, 9))
    for step, metrics in recorder.metrics:
        assert {"loss", "loss_l1", "lr", "samples_per_s"} <= set(metrics)
        assert "prediction" not in metrics
        assert metrics["lr"] == pytest.approx(cosine_lr(step - 1, 1e-2, 1e-3, 2, 8))
    assert [(s, p.name) for s, p in recorder.checkpoints] == [(4, "step-000004"), (8, "step-000008")]
    assert all(p.is_dir() for _, p in recorder.checkpoints)
    assert result.step == 8 and result.loss == recorder.metrics[-1][1]["loss"]
    assert result.last_checkpoint == recorder.checkpoints[-1][1]


def test_log_window_averages_the_losses(tmp_path):
    every = Recorder()
    train(toy_model(0.0), InMemoryData(toy_columns(), 4), config(tmp_path / "a"), callbacks=[every])
    windowed = Recorder()
    train(toy_model(0.0), InMemoryData(toy_columns(), 4), config(tmp_path / "b", log_every=4), [windowed])
    assert [s for s, _ in windowed.metrics] == [4, 8]
    first_four = sum(m["loss"] for _, m in every.metrics[:4]) / 4
    assert windowed.metrics[0][1]["loss"] == pytest.approx(first_four, rel=1e-6)


def test_progress_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="blip2_core.train"):
        train(toy_model(), InMemoryData(toy_columns(), 4), config(tmp_path, steps=2, log_every=2))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert "step 2/2 | loss" in line and "| lr " in line and "samples/s" in line


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(toy_model(), InMemoryData(toy_columns(), 4), config(tmp_path, steps=3))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/loss_l1", "train/lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_keep_last_and_final_checkpoint(tmp_path):
    train(toy_model(), InMemoryData(toy_columns(), 4), config(tmp_path, steps=10, ckpt_every=3, keep_last=2))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000009", "step-000010"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    model, columns = toy_model(dropout=0.0), toy_columns(64)
    before = mean_loss(model, columns)
    model.train()
    cfg = config(tmp_path, steps=30, lr=3e-2, precision=precision, clip_grad_norm=1.0, ckpt_every=30)
    result = train(model, InMemoryData(columns, 16), cfg)
    assert mean_loss(model, columns) < 0.7 * before
    # The scaler's gradients are unscaled before clipping: the reported norm is the true one.
    assert result.history[0][1]["grad_norm"] == pytest.approx(first_step_grad_norm(columns, 16), rel=0.05)
    state = torch.load(latest_checkpoint(tmp_path / "checkpoints") / "train_state.pt", weights_only=True)
    assert ("scale" in state["scaler"]) == (precision == "fp16")  # only fp16 runs a GradScaler


def first_step_grad_norm(columns, batch_size: int) -> float:
    model = toy_model(dropout=0.0)
    model(next(iter(InMemoryData(columns, batch_size)))).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).norm().item()


def test_reported_grad_norm_is_the_unclipped_norm(tmp_path):
    cfg = config(tmp_path, steps=2, clip_grad_norm=1e-3)
    result = train(toy_model(dropout=0.0), InMemoryData(toy_columns(), 4), cfg)
    assert result.history[0][1]["grad_norm"] == pytest.approx(
        first_step_grad_norm(toy_columns(), 4), rel=1e-5
    )


def test_activation_checkpointing_reaches_the_model(tmp_path):
    model = toy_model()
    train(model, InMemoryData(toy_columns(), 4), config(tmp_path, steps=1, activation_checkpointing=True))
    assert model.grad_checkpointing is True

    class Plain(nn.Module):  # no set_grad_checkpointing
        def __init__(self):
            super().__init__()
            self.inner = toy_model()

        def forward(self, batch):
            return self.inner(batch)

    with pytest.raises(ValueError, match="Plain has no set_grad_checkpointing"):
        train(
            Plain(),
            InMemoryData(toy_columns(), 4),
            config(tmp_path / "b", steps=1, activation_checkpointing=True),
        )


def test_output_without_loss_is_a_clear_error(tmp_path):
    @dataclass
    class NoLoss:
        logits: torch.Tensor

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return NoLoss(batch["x"] * self.w)

    with pytest.raises(TypeError, match="NoLoss needs a scalar tensor `loss`"):
        train(Bad(), InMemoryData(toy_columns(), 4), config(tmp_path, steps=1))


def test_output_losses_reads_plain_objects():
    class Out:
        def __init__(self):
            self.loss = torch.tensor(1.0)
            self.loss_itc = torch.tensor(0.5)
            self.logits = torch.zeros(3)
            self.loss_per_sample = torch.zeros(3)  # not a scalar: not logged

    assert set(output_losses(Out())) == {"loss", "loss_itc"}


def test_diverging_loss_stops_the_run(tmp_path):
    columns = toy_columns()
    columns["y"] = columns["y"].clone()
    columns["y"][:] = float("nan")
    with pytest.raises(FloatingPointError, match="step 1"):
        train(toy_model(), InMemoryData(columns, 4), config(tmp_path, steps=3))


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        config(tmp_path, precision="fp8")
    with pytest.raises(ValueError, match="grad_accum"):
        config(tmp_path, grad_accum=0)
    with pytest.raises(ValueError, match="min_lr"):
        config(tmp_path, min_lr=1.0)


def test_data_split_for_another_world_size_is_refused(tmp_path):
    data = InMemoryData(toy_columns(), 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size=2 but WORLD_SIZE=1"):
        train(toy_model(), data, config(tmp_path, steps=1))


# ----------------------------------------------------------------------------- the reference data source


def epoch_indices(data: InMemoryData, columns) -> list[int]:
    index_of = {round(v, 6): i for i, v in enumerate(columns["y"].tolist())}
    return [index_of[round(v, 6)] for batch in data for v in batch["y"].tolist()]


def test_in_memory_data_shuffles_per_epoch_deterministically():
    columns = toy_columns(20)
    data = InMemoryData(columns, 3, seed=1)
    first, second = epoch_indices(data, columns), epoch_indices(data, columns)
    assert len(first) == 18 and len(set(first)) == 18  # 6 full batches, the 2-sample tail dropped
    assert first != second
    again = InMemoryData(columns, 3, seed=1)
    assert epoch_indices(again, columns) == first and epoch_indices(again, columns) == second
    assert epoch_indices(InMemoryData(columns, 3, seed=2), columns) != first


def test_in_memory_data_resumes_at_the_next_unseen_batch():
    columns = toy_columns(20)
    data = InMemoryData(columns, 3, seed=1)
    it = iter(data)
    for _ in range(4):
        next(it)
    state = data.state_dict()
    rest_of_epoch = [b["y"] for b in it] + [b["y"] for b in data]
    restored = InMemoryData(columns, 3, seed=1)
    restored.load_state_dict(state)
    replay = [b["y"] for b in restored] + [b["y"] for b in restored]
    assert len(replay) == len(rest_of_epoch) == 2 + 6
    assert all(torch.equal(a, b) for a, b in zip(replay, rest_of_epoch, strict=True))


def test_in_memory_data_ranks_split_the_same_permutation():
    columns = toy_columns(20)
    whole = epoch_indices(InMemoryData(columns, 4, seed=1), columns)
    ranks = [epoch_indices(InMemoryData(columns, 2, seed=1, rank=r, world_size=2), columns) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    for k in range(len(whole) // 4):  # global batch k of the single process = rank batches k together
        assert sorted(ranks[0][2 * k : 2 * k + 2] + ranks[1][2 * k : 2 * k + 2]) == sorted(
            whole[4 * k : 4 * k + 4]
        )


def test_in_memory_data_refuses_another_ranks_state():
    data = InMemoryData(toy_columns(20), 2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        data.load_state_dict(InMemoryData(toy_columns(20), 2, rank=0, world_size=2).state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path, precision):
    model, columns = toy_model(dropout=0.1), toy_columns(64)
    cfg = config(tmp_path, steps=12, lr=3e-2, precision=precision, device="cuda", ckpt_every=6)
    result = train(model, InMemoryData(columns, 16), cfg)
    assert next(model.parameters()).is_cuda and result.step == 12
    state = torch.load(tmp_path / "checkpoints" / "step-000006" / "train_state.pt", weights_only=True)
    assert "cuda" in state["ranks"][0]["rng"]
    resumed_model = toy_model(dropout=0.1)
    checkpoints_dir = tmp_path / "checkpoints"
    (checkpoints_dir / "step-000012").rename(checkpoints_dir / ".tmp-step-000012-gone")
    resumed = train(resumed_model, InMemoryData(columns, 16), cfg)
    assert [s for s, _ in resumed.history] == list(range(7, 13))
    for (step, metrics), (_, expected) in zip(resumed.history, result.history[6:], strict=True):
        assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-5), step
