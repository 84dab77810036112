"""ITM wiring in stage 1: what the pass sees, what the head reads, how pairs and labels line up."""

import dataclasses

import pytest
import torch

from blip2_core import objectives
from blip2_core.stage1 import Blip2Stage1


@pytest.fixture()
def model(tiny_config):
    torch.manual_seed(0)
    return Blip2Stage1(tiny_config).eval()


def _qformer_pass(model, images, ids, mask, kind):
    q = model.qformer
    embeds = model.encode_image(images)
    return q(ids, q.expand_queries(ids.shape[0]), mask, embeds, mask_kind=kind).last_hidden_state


def test_text_reads_the_queries_and_the_image_in_itm_mode_but_not_in_itc_mode(model, tiny_config, make_batch):
    batch = make_batch(tiny_config)
    nq = tiny_config.qformer.num_query_tokens
    other = make_batch(tiny_config, seed=1)["images"]
    ids, mask = batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        itm = [_qformer_pass(model, im, ids, mask, "bidirectional") for im in (batch["images"], other)]
        itc = [_qformer_pass(model, im, ids, mask, "unimodal") for im in (batch["images"], other)]
    # ITM: text tokens read the queries, which read the image; ITC: text never does.
    assert (itm[0][:, nq:] - itm[1][:, nq:]).abs().amax() > 1e-3
    torch.testing.assert_close(itc[0][:, nq:], itc[1][:, nq:])


def test_itm_logits_average_the_head_over_the_query_outputs(model, tiny_config, make_batch):
    batch = make_batch(tiny_config)
    nq = tiny_config.qformer.num_query_tokens
    with torch.no_grad():
        embeds = model.encode_image(batch["images"])
        logits = model.itm_logits(embeds, batch["text_ids"], batch["text_mask"])
        out = _qformer_pass(model, batch["images"], batch["text_ids"], batch["text_mask"], "bidirectional")
    torch.testing.assert_close(logits, model.itm_head(out[:, :nq]).mean(dim=1))
    assert not torch.allclose(logits, model.itm_head(out[:, nq])), "the text [CLS] is not what ITM reads"


def test_itm_batch_is_positives_then_negative_texts_then_negative_images(
    model, tiny_config, make_batch, monkeypatch
):
    """Row i of each block pairs: (image i, text i) -> 1, (image i, text neg_text[i]) -> 0,
    (image neg_image[i], text i) -> 0, with the negatives the sampler returned."""
    batch = make_batch(tiny_config)
    neg_text, neg_image = torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])
    monkeypatch.setattr(objectives, "sample_hard_negatives", lambda *args, **kw: (neg_text, neg_image))
    seen = {}

    def spy(embeds, text_ids, text_mask):
        seen.update(embeds=embeds, text_ids=text_ids)
        return torch.tensor([[0.0, 9.0]] * 4 + [[9.0, 0.0]] * 8)  # confident and right for [1]*4 + [0]*8

    monkeypatch.setattr(model, "itm_logits", spy)
    out = model(batch)
    embeds = model.encode_image(batch["images"])
    ids = batch["text_ids"]
    torch.testing.assert_close(seen["text_ids"], torch.cat([ids, ids[neg_text], ids]))
    torch.testing.assert_close(seen["embeds"], torch.cat([embeds, embeds, embeds[neg_image]]))
    assert out.loss_itm.item() < 1e-3  # so the labels are [1] * B + [0] * 2B in this order


def test_itm_gradient_never_reaches_the_itc_heads_through_the_sampling(model, tiny_config, make_batch):
    model.train()
    model(make_batch(tiny_config)).loss_itm.backward()
    for head in (model.vision_projection, model.text_projection):
        assert head.weight.grad is None or not head.weight.grad.any()
    assert model.temp.grad is None or model.temp.grad == 0
    assert model.itm_head.weight.grad.abs().sum() > 0


def test_a_batch_of_identical_images_samples_finite_uniform_negatives(model, tiny_config, make_batch):
    batch = make_batch(tiny_config, batch=6)
    batch["images"] = batch["images"][:1].expand_as(batch["images"]).clone()
    batch["text_ids"] = batch["text_ids"][:1].expand_as(batch["text_ids"]).clone()
    batch["text_mask"] = batch["text_mask"][:1].expand_as(batch["text_mask"]).clone()
    out = model(batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.loss_itm)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [objectives.sample_hard_negatives(out.sim_i2t, out.sim_t2i, generator=g)[0] for _ in range(600)]
    )
    assert not (draws == torch.arange(6)).any()
    freq = torch.stack([(draws[:, i] == j).float().mean() for i in range(6) for j in range(6) if i != j])
    torch.testing.assert_close(freq, torch.full_like(freq, 0.2), atol=0.08, rtol=0)


def test_itm_learns_a_separable_toy_within_a_few_dozen_steps(tiny_config):
    """Four flat-colour images, texts "[CLS] word_k": a pair matches when the colour and the word share k.

    Every batch holds all four classes in a fresh order, so only a real image-text interaction helps.
    The Q-Former is initialised at the miniature's width-scaled range: at BERT's 0.02 a 64-wide
    Q-Former trained from scratch is nearly input-independent and ITM sat exactly at chance here.
    """
    qformer = dataclasses.replace(
        tiny_config.qformer, initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    cfg = dataclasses.replace(tiny_config, qformer=qformer)
    torch.manual_seed(0)
    model = Blip2Stage1(cfg).train()
    g = torch.Generator().manual_seed(0)
    palette = 2.0 * torch.randn(4, 3, 1, 1, generator=g)

    def pairs(image_class, text_class):
        images = palette[image_class] + 0.1 * torch.randn(len(image_class), 3, 64, 64, generator=g)
        ids = torch.stack([torch.full_like(text_class, qformer.cls_token_id), 2000 + text_class], dim=1)
        return images, ids, torch.ones_like(ids)

    def ranking_accuracy():  # how often an image scores its own word above each other word; chance 0.5
        model.eval()
        with torch.no_grad():
            images, ids, mask = pairs(torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4))
            scores = model.itm_scores(model.encode_image(images), ids, mask).view(4, 4)
        model.train()
        return (scores.diagonal()[:, None] > scores).float().sum().item() / 12

    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3)
    for _ in range(30):
        order = torch.randperm(4, generator=g)
        images, ids, mask = pairs(order, order)
        loss = model({"images": images, "text_ids": ids, "text_mask": mask}).loss_itm
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ranking_accuracy() >= 0.9
