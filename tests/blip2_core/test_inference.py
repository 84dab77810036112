"""Batched inference: retrieval scores (ITC max over queries, top-k re-scored by ITM) vs direct forwards."""

from __future__ import annotations

import torch
from PIL import Image

from blip2_core.inference import Stage1ItmScorer, load_images, retrieval_scores
from blip2_core.stage1 import Blip2Stage1


def _fake_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """Distinct ids per text ([CLS] first), padded to 6 with a mask: what BertTokenize returns."""
    ids = torch.zeros(len(texts), 6, dtype=torch.long)
    mask = torch.zeros(len(texts), 6, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [101] + [1000 + sum(map(ord, word)) % 500 for word in text.split()][:5]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"text_ids": ids, "text_mask": mask}


def test_retrieval_scores_match_direct_itc_and_itm(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = Blip2Stage1(tiny_config).eval()
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (80, 64), colour).save(paths[-1])
    texts = ["a red card", "a green card", "blue", "a blue card on a table"]

    out = retrieval_scores(model, paths, texts, _fake_tokenize, k=len(texts), batch_size=2)

    with torch.no_grad():
        image = model.image_features(load_images(paths, 64))
        tok = _fake_tokenize(texts)
        text = model.text_features(tok["text_ids"], tok["text_mask"])
        sim = torch.stack([(image.image_feats @ t).amax(dim=1) for t in text.text_feat], dim=1)  # (3, 4)
        itm = torch.zeros(3, 4)
        for i in range(3):
            for t in range(4):
                logits = model.itm_logits(image.image_embeds[i : i + 1], tok["text_ids"][t : t + 1],
                                          tok["text_mask"][t : t + 1])  # fmt: skip
                itm[i, t] = logits[0, 1]
    torch.testing.assert_close(out.sim_i2t, sim, rtol=1e-4, atol=1e-5)
    # every candidate is in the top k here: the score is ITM logit + ITC similarity (LAVIS)
    torch.testing.assert_close(out.scores_i2t, itm + sim, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.scores_t2i, (itm + sim).t(), rtol=1e-4, atol=1e-4)

    top1 = retrieval_scores(model, paths, texts, _fake_tokenize, k=1, batch_size=3, mode="itm")
    assert (top1.scores_i2t.isfinite().sum(dim=1) == 1).all()  # the rest stays -inf, behind
    best = sim.argmax(dim=1)
    torch.testing.assert_close(
        top1.scores_i2t[torch.arange(3), best], itm[torch.arange(3), best], rtol=1e-4, atol=1e-4
    )

    scorer = Stage1ItmScorer(model, image.image_embeds, tok["text_ids"], tok["text_mask"])
    pairs = scorer(torch.tensor([0, 2, 1]), torch.tensor([3, 3, 0]))
    torch.testing.assert_close(pairs, torch.stack([itm[0, 3], itm[2, 3], itm[1, 0]]), rtol=1e-4, atol=1e-4)
