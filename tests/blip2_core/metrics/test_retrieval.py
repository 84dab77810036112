"""Retrieval: recall@K on hand-built similarities, ITM re-ranking of the ITC top-k, rank merge, readers."""

from __future__ import annotations

import json

import pytest
import torch

from blip2_core.metrics.retrieval import (
    load_retrieval_gt,
    merge_rank_scores,
    owned_rows,
    recall_at_k,
    rerank_with_itm,
)

INF = float("inf")

# 3 images x 6 texts, two captions per image.
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]
SIM_3x6 = torch.tensor(
    [
        [0.5, 0.9, 0.1, 0.2, 0.3, 0.0],  # image 0: its text 1 is first                  -> rank 0
        [0.8, 0.1, 0.7, 0.3, 0.2, 0.0],  # image 1: text 0 beats its best, text 2           -> rank 1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # image 2: its texts 4, 5 come 5th and 6th         -> rank 4
    ]
)


def test_recall_at_k_by_hand():
    scores = recall_at_k(SIM_3x6, IMG2TXT, TXT2IMG, ks=(1, 2, 5))
    # i2t ranks [0, 1, 4]: R@1 = 1/3, R@2 = 2/3, R@5 = 3/3.
    assert scores.i2t == pytest.approx({1: 100 / 3, 2: 200 / 3, 5: 100.0})
    # t2i, by column (a text's own image in brackets):
    #   t0 [0.5] 0.8 0.9 -> 2;  t1 [0.9] 0.1 0.8 -> 0;  t2 0.1 [0.7] 0.7 -> 0 (tie: lower index first);
    #   t3 0.2 [0.3] 0.6 -> 1;  t4 0.3 0.2 [0.5] -> 0;  t5 0.0 0.0 [0.4] -> 0.
    assert scores.t2i == pytest.approx({1: 400 / 6, 2: 500 / 6, 5: 100.0})
    assert scores.i2t_mean == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert scores.t2i_mean == pytest.approx((400 / 6 + 500 / 6 + 100) / 3)
    assert scores.mean == pytest.approx((scores.i2t_mean + scores.t2i_mean) / 2)


def test_recall_checks_ground_truth():
    with pytest.raises(ValueError, match="ground truth covers 2 images"):
        recall_at_k(SIM_3x6, IMG2TXT[:2], TXT2IMG)
    with pytest.raises(ValueError, match=r"img2txt\[0\] lists text 2, whose txt2img is not 0"):
        recall_at_k(SIM_3x6, [[0, 2], [1, 3], [4, 5]], TXT2IMG)


# 2 images x 4 texts: ITC puts the wrong image's texts first, ITM knows better.
IMG2TXT_2x4 = [[0, 1], [2, 3]]
TXT2IMG_2x4 = [0, 0, 1, 1]
SIM_2x4 = torch.tensor([[0.1, 0.2, 0.9, 0.8], [0.7, 0.6, 0.3, 0.4]])
ITM_2x4 = torch.tensor([[5.0, 4.0, -3.0, -2.0], [-1.0, -2.0, 6.0, 3.0]])


class TableItm:
    """An ITM head read from a table, recording each batch of (image, text) pairs it was asked about."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.calls: list[list[tuple[int, int]]] = []

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        self.calls.append(list(zip(images.tolist(), texts.tolist(), strict=True)))
        return self.table[images, texts]


def test_rerank_orders_by_itm():
    before = recall_at_k(SIM_2x4, IMG2TXT_2x4, TXT2IMG_2x4, ks=(1,))
    # ITC: image 0's best own text (t1, 0.2) is 3rd; image 1's (t3, 0.4) 3rd -> R@1 = 0.
    assert before.i2t == {1: 0.0}

    i2t, t2i = rerank_with_itm(SIM_2x4, TableItm(ITM_2x4), k=4, mode="itm")
    assert torch.equal(i2t, ITM_2x4)
    assert torch.equal(t2i, ITM_2x4.t())
    after = recall_at_k(i2t, IMG2TXT_2x4, TXT2IMG_2x4, ks=(1,), sim_t2i=t2i)
    # ITM ranks t0 first for image 0 and t2 first for image 1; every text's own image scores highest.
    assert after.i2t == {1: 100.0}
    assert after.t2i == {1: 100.0}


def test_rerank_itm_plus_itc_adds_the_similarity():
    i2t, t2i = rerank_with_itm(SIM_2x4, TableItm(ITM_2x4), k=4)  # default: LAVIS's itm + itc
    assert torch.allclose(i2t, ITM_2x4 + SIM_2x4)
    assert torch.allclose(t2i, (ITM_2x4 + SIM_2x4).t())


def test_candidates_outside_top_k_stay_behind_and_itm_calls_are_batched():
    itm = TableItm(ITM_2x4)
    i2t, t2i = rerank_with_itm(SIM_2x4, itm, k=1, batch_size=3)
    # i2t: top-1 by ITC is t2 for image 0 and t0 for image 1; only those pairs are re-scored.
    expected_i2t = torch.tensor([[-INF, -INF, -3.0 + 0.9, -INF], [-1.0 + 0.7, -INF, -INF, -INF]])
    assert torch.allclose(i2t, expected_i2t)
    # t2i: top-1 image per text by ITC: t0 -> 1, t1 -> 1, t2 -> 0, t3 -> 0.
    expected_t2i = torch.tensor(
        [[-INF, -1.0 + 0.7], [-INF, -2.0 + 0.6], [-3.0 + 0.9, -INF], [-2.0 + 0.8, -INF]]
    )
    assert torch.allclose(t2i, expected_t2i)
    # 2 i2t pairs in one call, then 4 t2i pairs in calls of 3 and 1: never more than batch_size.
    assert itm.calls == [[(0, 2), (1, 0)], [(1, 0), (1, 1), (0, 2)], [(0, 3)]]
    # Left-out candidates (-inf) rank after the re-scored one, in index order among themselves:
    #   image 0: row [-inf, -inf, -2.1, -inf]: t0 has t2 ahead -> rank 1 (t1 rank 2), although ITM
    #            would have put t0 first had it been a candidate;
    #   image 1: row [-0.3, -inf, -inf, -inf]: t2 has t0 ahead and t1 (tie, lower index) -> rank 2.
    #   every text: its one candidate is the wrong image, its own image comes 2nd.
    scores = recall_at_k(i2t, IMG2TXT_2x4, TXT2IMG_2x4, ks=(1, 2), sim_t2i=t2i)
    assert scores.i2t == {1: 0.0, 2: 50.0}
    assert scores.t2i == {1: 0.0, 2: 100.0}


def test_rerank_rejects_a_wrongly_shaped_itm_output():
    with pytest.raises(ValueError, match=r"itm_fn returned shape \(1,\) for 2 pairs"):
        rerank_with_itm(SIM_2x4, lambda img, txt: torch.zeros(1), k=1)


def test_owned_rows_partition_the_queries():
    assert [owned_rows(5, r, 2) for r in range(2)] == [range(0, 2), range(2, 5)]
    assert [len(owned_rows(2, r, 3)) for r in range(3)] == [0, 1, 1]
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        owned_rows(5, 2, 2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_parts_merge_to_the_single_rank_result(world_size):
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(2, 7, generator=g)
    itm = torch.randn(2, 7, generator=g)
    single = rerank_with_itm(sim, TableItm(itm), k=3, batch_size=4)
    parts = [
        rerank_with_itm(sim, TableItm(itm), k=3, batch_size=4, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    # Each part leaves the rows it does not own as NaN.
    assert parts[0][1][owned_rows(7, 1, world_size).start :].isnan().all()
    merged = merge_rank_scores(parts)
    assert torch.equal(merged[0], single[0])
    assert torch.equal(merged[1], single[1])


def test_merge_rejects_missing_and_doubled_rows():
    itm = TableItm(ITM_2x4)
    part0 = rerank_with_itm(SIM_2x4, itm, k=2, rank=0, world_size=2)
    part1 = rerank_with_itm(SIM_2x4, itm, k=2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="scores_i2t: row 1 was computed by 0 rank parts"):
        merge_rank_scores([part0])
    with pytest.raises(ValueError, match="scores_i2t: row 0 was computed by 2 rank parts"):
        merge_rank_scores([part0, part0, part1])
    with pytest.raises(ValueError, match="merge the rank parts first"):
        recall_at_k(part0[0], IMG2TXT_2x4, TXT2IMG_2x4, sim_t2i=part0[1])


# ---------------------------------------------------------------------------------------------------
# Ground truth readers.
# ---------------------------------------------------------------------------------------------------


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_karpathy_reader_with_split(tmp_path):
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "cocoid": 1, "split": "test",
         "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}, {"raw": "A pup."}]},
        {"filepath": "train2014", "filename": "b.jpg", "cocoid": 2, "split": "train",
         "sentences": [{"raw": "A cat."}]},
        {"filename": "c.jpg", "imgid": 3, "split": "test", "sentences": [{"tokens": ["a", "bird"]}]},
    ]  # fmt: skip
    path = _write(tmp_path, "dataset_coco.json", {"images": images, "dataset": "coco"})
    gt = load_retrieval_gt(path, split="test")
    assert gt.image_keys == ("val2014/a.jpg", "c.jpg")
    assert gt.texts == ("A dog.", "A pup.", "a bird")
    assert gt.img2txt == ((0, 1), (2,))
    assert gt.txt2img == (0, 0, 1)
    assert len(load_retrieval_gt(path).texts) == 4  # no split: every image
    with pytest.raises(ValueError, match=r"dataset_coco\.json: no images in split 'val'"):
        load_retrieval_gt(path, split="val")


def test_coco_captions_and_lavis_readers(tmp_path):
    coco = {
        "images": [{"id": 3, "file_name": "3.jpg"}, {"id": 1, "file_name": "1.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "one a"},
            {"id": 11, "image_id": 3, "caption": "three"},
            {"id": 12, "image_id": 1, "caption": "one b"},
        ],
    }
    gt = load_retrieval_gt(_write(tmp_path, "captions_test.json", coco))
    assert gt.image_keys == ("3.jpg", "1.jpg")
    assert gt.texts == ("three", "one a", "one b")
    assert gt.img2txt == ((0,), (1, 2))
    assert gt.txt2img == (0, 1, 1)

    lavis = [{"image": "x.jpg", "caption": ["x one", "x two"]}, {"image": "y.jpg", "caption": "y one"}]
    gt = load_retrieval_gt(_write(tmp_path, "flickr30k_test.json", lavis))
    assert gt.image_keys == ("x.jpg", "y.jpg")
    assert gt.img2txt == ((0, 1), (2,))
    assert gt.txt2img == (0, 0, 1)


def test_retrieval_reader_errors(tmp_path):
    with pytest.raises(ValueError, match=r"odd\.json: not a Karpathy, COCO captions or LAVIS retrieval file"):
        load_retrieval_gt(_write(tmp_path, "odd.json", {"foo": 1}))
    no_sentences = {"images": [{"filename": "a.jpg", "split": "test"}]}
    with pytest.raises(ValueError, match=r"k\.json: missing field 'sentences'"):
        load_retrieval_gt(_write(tmp_path, "k.json", no_sentences))
    empty = {"images": [{"filename": "a.jpg", "sentences": []}]}
    with pytest.raises(ValueError, match=r"e\.json: image 'a\.jpg' has no captions"):
        load_retrieval_gt(_write(tmp_path, "e.json", empty))
    stray = {"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "x"}]}
    with pytest.raises(ValueError, match=r"s\.json: annotation #0 refers to image_id 2"):
        load_retrieval_gt(_write(tmp_path, "s.json", stray))
