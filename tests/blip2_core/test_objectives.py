"""ITC, hard-negative sampling, ITM and ITG losses on hand-made tensors."""

import pytest
import torch
import torch.nn.functional as F

from blip2_core.objectives import itc_loss, itg_loss, itm_labels, itm_loss, sample_hard_negatives


def _feats(batch=4, queries=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, queries, dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return image, text


def test_itc_is_smoothed_cross_entropy_over_max_query_similarity():
    image, text = _feats()
    temp = torch.tensor(0.1)
    out = itc_loss(image, text, image, text, temp, label_smoothing=0.1)
    sim = torch.stack([torch.stack([(image[i] @ text[j]).max() for j in range(4)]) for i in range(4)]) / 0.1
    labels = torch.arange(4)
    expected = (
        F.cross_entropy(sim, labels, label_smoothing=0.1)
        + F.cross_entropy(sim.T, labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(out.sim_i2t, sim)
    torch.testing.assert_close(out.sim_t2i, sim.T)
    torch.testing.assert_close(out.loss, expected)


def test_itc_positives_sit_at_this_ranks_offset():
    image, text = _feats(batch=4)
    local = slice(2, 4)  # rank 1 of 2, each holding 2 samples
    out = itc_loss(image[local], text[local], image, text, torch.tensor(0.1), rank=1, label_smoothing=0.0)
    full = itc_loss(image, text, image, text, torch.tensor(0.1), label_smoothing=0.0)
    rows_i2t = F.cross_entropy(full.sim_i2t, torch.arange(4), reduction="none")
    rows_t2i = F.cross_entropy(full.sim_t2i, torch.arange(4), reduction="none")
    torch.testing.assert_close(out.loss, (rows_i2t[local].mean() + rows_t2i[local].mean()) / 2)


def test_same_image_targets_only_when_ids_are_given():
    image, text = _feats(batch=4)
    ids = torch.tensor([0, 0, 1, 2])
    plain = itc_loss(image, text, image, text, torch.tensor(0.1), label_smoothing=0.0)
    soft = itc_loss(image, text, image, text, torch.tensor(0.1), 0, 0.0, ids, ids)
    logp = F.log_softmax(plain.sim_i2t, 1)
    expected_i2t = (
        -(0.5 * (logp[0, 0] + logp[0, 1]) + 0.5 * (logp[1, 0] + logp[1, 1]) + logp[2, 2] + logp[3, 3]) / 4
    )
    logq = F.log_softmax(plain.sim_t2i, 1)
    expected_t2i = (
        -(0.5 * (logq[0, 0] + logq[0, 1]) + 0.5 * (logq[1, 0] + logq[1, 1]) + logq[2, 2] + logq[3, 3]) / 4
    )
    torch.testing.assert_close(soft.loss, (expected_i2t + expected_t2i) / 2)
    assert not torch.allclose(soft.loss, plain.loss)


def test_hard_negatives_never_pick_the_positive_even_when_it_dominates():
    batch, candidates = 4, 8
    sim = torch.randn(batch, candidates)
    for rank in (0, 1):
        positives = rank * batch + torch.arange(batch)
        peaked = sim.clone()
        peaked[torch.arange(batch), positives] = 1e4  # softmax puts all mass on the positive
        for seed in range(50):
            g = torch.Generator().manual_seed(seed)
            neg_text, neg_image = sample_hard_negatives(peaked, peaked, rank, generator=g)
            assert not (neg_text == positives).any() and not (neg_image == positives).any()


def test_hard_negatives_follow_the_softmax_of_similarity():
    sim = torch.tensor([[0.0, 2.0, 0.0, 1.0]])  # candidate 0 is the positive
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, sim, generator=g)[0] for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    expected = torch.tensor([0.0, 2.0, 0.0, 1.0]).exp() * torch.tensor([0, 1, 1, 1])
    expected = expected / expected.sum()
    assert freq[0] == 0
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_same_image_candidates_are_masked_only_with_ids():
    sim = torch.zeros(2, 4)
    sim[:, 1] = 50.0  # candidate 1 shows the same image as sample 0 in the ids below
    ids = torch.tensor([0, 0, 1, 2])
    g = torch.Generator().manual_seed(0)
    picked = [sample_hard_negatives(sim, sim, 0, ids[:2], ids, generator=g)[0][0].item() for _ in range(100)]
    assert 1 not in picked and 0 not in picked
    plain = [sample_hard_negatives(sim, sim, generator=g)[0][0].item() for _ in range(20)]
    assert 1 in plain
    with pytest.raises(ValueError, match="no candidate"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def test_itm_labels_and_loss():
    labels = itm_labels(2)
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]
    logits = torch.randn(6, 2)
    torch.testing.assert_close(itm_loss(logits, labels), F.cross_entropy(logits, labels))


def test_itg_predicts_the_next_real_token_only():
    ids = torch.tensor([[30522, 5, 6, 0], [30522, 7, 0, 0]])
    mask = (ids != 0).long()
    logits = torch.randn(2, 4, 30523)
    loss = itg_loss(logits, ids, mask, label_smoothing=0.1)
    picked = torch.stack([logits[0, 0], logits[0, 1], logits[1, 0]])
    expected = F.cross_entropy(picked, torch.tensor([5, 6, 7]), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    changed = logits.clone()
    changed[0, 2:] += 100.0  # positions predicting padding, and the last position
    torch.testing.assert_close(itg_loss(changed, ids, mask), loss)
