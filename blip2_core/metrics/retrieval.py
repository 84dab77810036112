"""Image-text retrieval with the BLIP-2 protocol: ITC top-k candidates re-ranked by ITM, recall@K.

Inference (paper, and LAVIS `compute_sim_matrix`): for each query take the k (128) candidates with the
highest ITC similarity, score those pairs with the ITM head, and rank by the new score; candidates
outside the top-k keep -inf and so rank after every re-scored one. LAVIS ranks by `itm_logit + itc_sim`
(the ITC similarity is added back); `rerank="itm"` ranks by the ITM score alone.

Work splits over ranks by query rows: each rank re-scores a contiguous slice of the image queries and
of the text queries and leaves the other rows NaN; `merge_rank_scores` assembles the parts (gathered
by whatever transport the caller uses: files, `all_gather_object`), checking every row came from one
rank. Recall@K is in percent, as BLIP/LAVIS report it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

RerankMode = Literal["itm+itc", "itm"]
# (image indices (B,), text indices (B,)) -> ITM score of each pair (B,); for BLIP-2 the positive-class
# ITM logit averaged over the query tokens, as LAVIS's `compute_itm` returns it.
ItmFn = Callable[[Tensor, Tensor], Tensor]

_RANK_CHUNK_ELEMENTS = 1 << 25  # bound the (queries x ground truths x candidates) comparison in memory


@dataclass(frozen=True)
class RetrievalScores:
    """Recall@K in percent: `i2t` text retrieval (image queries), `t2i` image retrieval (text queries)."""

    i2t: dict[int, float]
    t2i: dict[int, float]
    i2t_mean: float
    t2i_mean: float
    mean: float


@dataclass(frozen=True)
class RetrievalGroundTruth:
    """Images and captions in evaluation order; text j belongs to image `txt2img[j]`.

    `image_keys` holds each image's relative file path where the file gives one, else its id.
    """

    image_keys: tuple[int | str, ...]
    texts: tuple[str, ...]
    img2txt: tuple[tuple[int, ...], ...]
    txt2img: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------
# Re-ranking.
# ---------------------------------------------------------------------------------------------------


def owned_rows(n_queries: int, rank: int, world_size: int) -> range:
    """The contiguous slice of query rows that `rank` re-scores (sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return range(rank * n_queries // world_size, (rank + 1) * n_queries // world_size)


def _batched_scores(pair_score: ItmFn, queries: Tensor, candidates: Tensor, batch_size: int) -> Tensor:
    """Call `pair_score(queries[b], candidates[b])` batch by batch; returns float32 scores (P,)."""
    out = []
    for start in range(0, queries.numel(), batch_size):
        q, c = queries[start : start + batch_size], candidates[start : start + batch_size]
        scores = torch.as_tensor(pair_score(q, c))
        if scores.shape != q.shape:
            raise ValueError(
                f"itm_fn returned shape {tuple(scores.shape)} for {q.numel()} pairs; expected ({q.numel()},)"
            )
        out.append(scores.to(device=queries.device, dtype=torch.float32))
    return torch.cat(out)


def _rerank_rows(
    sim_qc: Tensor, pair_score: ItmFn, k: int, batch_size: int, rows: range, mode: RerankMode
) -> Tensor:
    """Scores (Q, C): owned rows hold re-scored top-k candidates and -inf elsewhere; other rows NaN."""
    n_q, n_c = sim_qc.shape
    out = torch.full((n_q, n_c), float("nan"), dtype=torch.float32, device=sim_qc.device)
    if len(rows) == 0:
        return out
    out[rows.start : rows.stop] = float("-inf")
    top_sim, top_idx = sim_qc[rows.start : rows.stop].topk(min(k, n_c), dim=1)  # (R, k)
    queries = (
        torch.arange(rows.start, rows.stop, device=sim_qc.device)[:, None].expand_as(top_idx).reshape(-1)
    )
    candidates = top_idx.reshape(-1)
    score = _batched_scores(pair_score, queries, candidates, batch_size)
    if mode == "itm+itc":
        score = score + top_sim.reshape(-1)
    out[queries, candidates] = score
    return out


@torch.no_grad()
def rerank_with_itm(
    sim_i2t: Tensor,
    itm_fn: ItmFn,
    k: int = 128,
    batch_size: int = 128,
    rank: int = 0,
    world_size: int = 1,
    mode: RerankMode = "itm+itc",
) -> tuple[Tensor, Tensor]:
    """Re-rank the ITC top-k candidates of every query by ITM: returns (scores_i2t, scores_t2i).

    sim_i2t: ITC similarities (N_img, N_txt). Returns float32 (N_img, N_txt) and (N_txt, N_img); rows
    this rank does not own are NaN (merge the ranks' parts with `merge_rank_scores`).
    `itm_fn` gets at most `batch_size` (image, text) pairs per call.
    """
    if mode not in ("itm+itc", "itm"):
        raise ValueError(f"rerank mode must be 'itm+itc' or 'itm', got {mode!r}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive, got k={k}, batch_size={batch_size}")
    sim = torch.as_tensor(sim_i2t).float()
    if sim.dim() != 2:
        raise ValueError(f"sim_i2t must be (N_img, N_txt), got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    scores_i2t = _rerank_rows(sim, itm_fn, k, batch_size, owned_rows(n_img, rank, world_size), mode)

    def text_queries(txt: Tensor, img: Tensor) -> Tensor:  # t2i rows are texts, candidates images
        return itm_fn(img, txt)

    scores_t2i = _rerank_rows(sim.t(), text_queries, k, batch_size, owned_rows(n_txt, rank, world_size), mode)
    return scores_i2t, scores_t2i


def _merge_one(mats: Sequence[Tensor], name: str) -> Tensor:
    shapes = {tuple(m.shape) for m in mats}
    if len(shapes) != 1:
        raise ValueError(f"{name}: rank parts have different shapes {sorted(shapes)}")
    owned = torch.stack([~m.isnan().all(dim=1) for m in mats])  # (parts, Q)
    count = owned.sum(dim=0)
    bad = (count != 1).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(
            f"{name}: row {row} was computed by {int(count[row])} rank parts, expected exactly 1"
        )
    merged = torch.empty_like(mats[0])
    for m, own in zip(mats, owned, strict=True):
        merged[own] = m[own]
    return merged


def merge_rank_scores(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Assemble per-rank (scores_i2t, scores_t2i) parts, each row taken from the one rank that owns it."""
    if not parts:
        raise ValueError("merge_rank_scores: no parts")
    return _merge_one([p[0] for p in parts], "scores_i2t"), _merge_one([p[1] for p in parts], "scores_t2i")


# ---------------------------------------------------------------------------------------------------
# Recall@K.
# ---------------------------------------------------------------------------------------------------


def query_ranks(scores: Tensor, ground_truth: Sequence[Sequence[int]]) -> Tensor:
    """0-based rank (Q,) of each query's best-ranked ground-truth candidate.

    Ties rank the lower candidate index first (a stable descending sort), so -inf candidates left out of
    the top-k rank after every re-scored one and in index order among themselves.
    """
    if scores.isnan().any():
        raise ValueError("scores contain NaN: rows not computed by any rank (merge the rank parts first)")
    n_q, n_c = scores.shape
    width = max(len(g) for g in ground_truth)
    gt = torch.full((n_q, width), -1, dtype=torch.long)
    for q, cands in enumerate(ground_truth):
        gt[q, : len(cands)] = torch.as_tensor(list(cands), dtype=torch.long)
    gt = gt.to(scores.device)
    cand_index = torch.arange(n_c, device=scores.device)
    chunk = max(1, _RANK_CHUNK_ELEMENTS // (width * n_c))
    ranks = []
    for start in range(0, n_q, chunk):
        rows, g = scores[start : start + chunk], gt[start : start + chunk]  # (C, N), (C, G)
        s_gt = rows.gather(1, g.clamp(min=0))[:, :, None]  # (C, G, 1)
        ahead = (rows[:, None, :] > s_gt) | ((rows[:, None, :] == s_gt) & (cand_index < g[:, :, None]))
        rank = ahead.sum(dim=2).masked_fill(g < 0, n_c)  # padding never wins the min
        ranks.append(rank.min(dim=1).values)
    return torch.cat(ranks)


def _check_ground_truth(
    n_img: int, n_txt: int, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
) -> None:
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(
            f"ground truth covers {len(img2txt)} images / {len(txt2img)} texts; scores are {n_img} x {n_txt}"
        )
    for img, texts in enumerate(img2txt):
        if not texts:
            raise ValueError(f"image {img} has no ground-truth text")
        for txt in texts:
            if not 0 <= txt < n_txt or txt2img[txt] != img:
                raise ValueError(f"img2txt[{img}] lists text {txt}, whose txt2img is not {img}")


def _recalls(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    return {k: 100.0 * int((ranks < k).sum()) / ranks.numel() for k in ks}


def recall_at_k(
    sim_i2t: Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: Tensor | None = None,
) -> RetrievalScores:
    """Recall@K both directions: an image query hits if ANY of its texts ranks within K; a text query
    hits if its one image does. `sim_t2i` (N_txt, N_img) defaults to `sim_i2t.T` (pure ITC ranking);
    pass both outputs of `rerank_with_itm` for the re-ranked protocol.
    """
    sim_i2t = torch.as_tensor(sim_i2t).float()
    sim_t2i = sim_i2t.t() if sim_t2i is None else torch.as_tensor(sim_t2i).float()
    n_img, n_txt = sim_i2t.shape
    if tuple(sim_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"sim_t2i has shape {tuple(sim_t2i.shape)}, expected ({n_txt}, {n_img})")
    _check_ground_truth(n_img, n_txt, img2txt, txt2img)
    i2t = _recalls(query_ranks(sim_i2t, img2txt), ks)
    t2i = _recalls(query_ranks(sim_t2i, [[img] for img in txt2img]), ks)
    i2t_mean, t2i_mean = sum(i2t.values()) / len(ks), sum(t2i.values()) / len(ks)
    return RetrievalScores(
        i2t=i2t, t2i=t2i, i2t_mean=i2t_mean, t2i_mean=t2i_mean, mean=(i2t_mean + t2i_mean) / 2
    )


# ---------------------------------------------------------------------------------------------------
# Ground truth readers.
# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _karpathy_images(images: list, split: str | None) -> list[tuple[int | str, list[str]]]:
    """Karpathy `dataset_{coco,flickr30k}.json`: images[] with filepath/filename, split, sentences[].raw."""
    out = []
    for i, img in enumerate(images):
        if split is not None and img.get("split") != split:
            continue
        name = img.get("filename")
        key = f"{img['filepath']}/{name}" if name and img.get("filepath") else name
        key = key if key is not None else img.get("cocoid", img.get("imgid", i))
        texts = [s["raw"] if "raw" in s else " ".join(s["tokens"]) for s in img["sentences"]]
        out.append((key, texts))
    return out


def _coco_caption_images(data: Mapping, path: Path) -> list[tuple[int | str, list[str]]]:
    """COCO captions JSON: images in `images` order (else first appearance), captions in file order."""
    captions: dict[object, list[str]] = {img["id"]: [] for img in data.get("images", [])}
    keys = {img["id"]: img.get("file_name", img["id"]) for img in data.get("images", [])}
    for i, ann in enumerate(data["annotations"]):
        if keys and ann["image_id"] not in keys:
            raise ValueError(
                f"{path}: annotation #{i} refers to image_id {ann['image_id']!r}, not in 'images'"
            )
        captions.setdefault(ann["image_id"], []).append(str(ann["caption"]))
    return [(keys.get(image_id, image_id), texts) for image_id, texts in captions.items()]


def _lavis_images(records: list) -> list[tuple[int | str, list[str]]]:
    """LAVIS `coco_karpathy_test.json` / `flickr30k_test.json`: [{"image": path, "caption": [str, ...]}]."""
    out = []
    for rec in records:
        captions = rec["caption"]
        out.append((rec["image"], [captions] if isinstance(captions, str) else list(captions)))
    return out


def _parse_images(data: object, path: Path, split: str | None) -> list[tuple[int | str, list[str]]]:
    if isinstance(data, list):
        return _lavis_images(data)
    if isinstance(data, Mapping) and isinstance(data.get("annotations"), list):
        return _coco_caption_images(data, path)
    if isinstance(data, Mapping) and isinstance(data.get("images"), list):
        return _karpathy_images(data["images"], split)
    raise ValueError(f"{path}: not a Karpathy, COCO captions or LAVIS retrieval file")


def load_retrieval_gt(path: str | os.PathLike[str], split: str | None = None) -> RetrievalGroundTruth:
    """Read retrieval ground truth: Karpathy-style JSON (`images[].sentences`; `split` picks e.g. "test"
    for COCO 5K / Flickr30K 1K), COCO captions JSON, or LAVIS's `[{"image", "caption": [...]}]`.

    Texts are numbered image by image in file order.
    """
    path = Path(path)
    try:
        images = _parse_images(_read_json(path), path, split)
    except KeyError as err:
        raise ValueError(f"{path}: missing field {err}") from err
    if not images:
        raise ValueError(f"{path}: no images" + (f" in split {split!r}" if split else ""))
    keys, texts, img2txt, txt2img = [], [], [], []
    for img, (key, captions) in enumerate(images):
        if not captions:
            raise ValueError(f"{path}: image {key!r} has no captions")
        img2txt.append(tuple(range(len(texts), len(texts) + len(captions))))
        keys.append(key)
        texts.extend(captions)
        txt2img.extend([img] * len(captions))
    return RetrievalGroundTruth(tuple(keys), tuple(texts), tuple(img2txt), tuple(txt2img))
