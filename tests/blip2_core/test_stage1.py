"""Stage-1 model: typed output, frozen encoder never moves, gradients only where trainable, losses fall."""

import dataclasses

import pytest
import torch

from blip2_core.stage1 import Blip2Stage1, Stage1Batch, Stage1Output


@pytest.fixture()
def model(tiny_config):
    torch.manual_seed(0)
    return Blip2Stage1(tiny_config)


def test_forward_returns_the_sum_of_three_losses(model, tiny_config, make_batch):
    out = model(make_batch(tiny_config))
    assert isinstance(out, Stage1Output)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    assert out.sim_i2t.shape == out.sim_t2i.shape == (4, 4)
    assert all(torch.isfinite(x) for x in (out.loss_itc, out.loss_itm, out.loss_itg))


def test_batches_as_dict_or_dataclass_and_missing_fields_named(model, tiny_config, make_batch):
    batch = make_batch(tiny_config)
    model.eval()
    torch.manual_seed(1)
    from_dict = model(batch).loss_itc
    torch.manual_seed(1)
    from_dataclass = model(Stage1Batch(**batch)).loss_itc
    torch.testing.assert_close(from_dict, from_dataclass)
    with pytest.raises(KeyError, match="text_mask"):
        model({"images": batch["images"], "text_ids": batch["text_ids"]})


def test_frozen_encoder_never_moves_and_gradients_reach_only_trainable(model, tiny_config, make_batch):
    frozen = {n: p.clone() for n, p in model.visual_encoder.named_parameters()}
    ln_before = model.ln_vision.weight.clone()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3, weight_decay=0.05)
    model.train()
    assert not model.visual_encoder.training
    for step in range(3):
        optimizer.zero_grad()
        model(make_batch(tiny_config, seed=step)).loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            else:
                assert p.grad is None, name
        optimizer.step()
    for name, p in model.visual_encoder.named_parameters():
        assert torch.equal(p, frozen[name]), name
    assert not torch.equal(model.ln_vision.weight, ln_before)
    trainable = {n for n, _ in model.trainable_parameters()}
    assert "temp" in trainable and "qformer.query_tokens" in trainable and "ln_vision.weight" in trainable
    assert not any(n.startswith("visual_encoder.") for n in trainable)


def test_temperature_is_clamped(model, tiny_config, make_batch):
    with torch.no_grad():
        model.temp.fill_(2.0)
    out = model(make_batch(tiny_config))
    assert out.temp.item() == pytest.approx(0.5)
    assert model.temp.item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "loss_name, lr, steps", [("loss_itc", 1e-3, 20), ("loss_itg", 3e-3, 20), ("loss_itm", 3e-3, 40)]
)
def test_each_loss_falls_when_overfitting_a_tiny_batch(model, tiny_config, make_batch, loss_name, lr, steps):
    batch = make_batch(tiny_config)
    model.eval()  # no dropout: over-fitting one batch should be a smooth descent
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=lr)
    history = []
    for _ in range(steps):
        loss = getattr(model(batch), loss_name)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.8 * history[0], history


def test_image_ids_are_used_only_when_asked(tiny_config, make_batch):
    batch = make_batch(tiny_config)
    batch["image_ids"] = torch.tensor([0, 0, 0, 1])  # three captions of one image
    torch.manual_seed(0)
    plain = Blip2Stage1(tiny_config).eval()
    torch.manual_seed(0)
    matching = Blip2Stage1(tiny_config, match_same_image=True).eval()
    torch.manual_seed(5)
    with_ids = plain(batch).loss_itc
    torch.manual_seed(5)
    without = plain({k: v for k, v in batch.items() if k != "image_ids"}).loss_itc
    torch.testing.assert_close(with_ids, without)  # pretraining ignores ids silently passed along
    torch.manual_seed(5)
    assert not torch.allclose(matching(batch).loss_itc, with_ids)


def test_feature_helpers_for_retrieval(model, tiny_config, make_batch):
    batch = make_batch(tiny_config)
    model.eval()
    q = tiny_config.qformer
    with torch.no_grad():
        image = model.image_features(batch["images"])
        text = model.text_features(batch["text_ids"], batch["text_mask"])
        scores = model.itm_scores(image.image_embeds, batch["text_ids"], batch["text_mask"])
    assert image.image_feats.shape == (4, q.num_query_tokens, q.embed_dim)
    torch.testing.assert_close(image.image_feats.norm(dim=-1), torch.ones(4, q.num_query_tokens))
    assert text.text_feat.shape == (4, q.embed_dim)
    assert scores.shape == (4,) and ((scores > 0) & (scores < 1)).all()


def test_unfrozen_encoder_trains_for_fine_tuning(tiny_config, make_batch):
    cfg = dataclasses.replace(tiny_config, vision=dataclasses.replace(tiny_config.vision, freeze=False))
    model = Blip2Stage1(cfg).train()
    assert model.visual_encoder.training
    model(make_batch(cfg)).loss.backward()
    assert all(p.grad is not None for p in model.visual_encoder.parameters())
