"""Retrieval split over 2 gloo ranks on CPU gives the same scores, rankings and recalls as 1 process.

The ranks are forked from the test process (no second import of torch and open_clip) and join the
group as torchrun's ranks do: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import torch
from PIL import Image

from blip2_core.config import load_preset
from blip2_core.distributed import get_rank, torchrun_process_group
from blip2_core.inference import rank_batches, retrieval_scores
from blip2_core.metrics.retrieval import query_ranks
from blip2_core.stage1 import Blip2Stage1

N_IMAGES, N_TEXTS = 7, 11  # odd counts: the ranks' shares differ in size
WORDS = ["red", "green", "blue", "card", "ball", "on", "a", "table", "small", "big", "dark"]
TEXTS = [" ".join(WORDS[(j * 3 + i) % len(WORDS)] for i in range(1 + j % 4)) for j in range(N_TEXTS)]
TXT2IMG = [j % N_IMAGES for j in range(N_TEXTS)]
IMG2TXT = [[j for j in range(N_TEXTS) if TXT2IMG[j] == i] for i in range(N_IMAGES)]


def fake_tokenize(batch: list[str]) -> dict[str, torch.Tensor]:
    """Distinct ids per word ([CLS] first), padded to 6 with a mask: what BertTokenize returns."""
    ids = torch.zeros(len(batch), 6, dtype=torch.long)
    mask = torch.zeros(len(batch), 6, dtype=torch.long)
    for row, text in enumerate(batch):
        tokens = [101] + [1000 + sum(map(ord, word)) % 500 for word in text.split()][:5]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"text_ids": ids, "text_mask": mask}


def retrieve(model: Blip2Stage1, image_dir: Path) -> dict:
    """Scores, rankings and recalls of the model on the folder's images; k=3, batches of 2."""
    images = [str(image_dir / f"{i}.png") for i in range(N_IMAGES)]
    out = retrieval_scores(model, images, TEXTS, fake_tokenize, k=3, batch_size=2)
    reranked, itc_only = out.recalls(IMG2TXT, TXT2IMG)
    return {
        "sim_i2t": out.sim_i2t, "scores_i2t": out.scores_i2t, "scores_t2i": out.scores_t2i,
        "order_i2t": out.scores_i2t.argsort(dim=1, descending=True, stable=True),
        "order_t2i": out.scores_t2i.argsort(dim=1, descending=True, stable=True),
        "ranks_i2t": query_ranks(out.scores_i2t, IMG2TXT), "recalls": (reranked, itc_only),
    }  # fmt: skip


def rank_main(rank: int, world_size: int, port: int, model: Blip2Stage1, image_dir: Path, out: Path) -> None:
    """A forked rank: join the gloo group from torchrun's variables, retrieve, rank 0 saves the result."""
    code = 0
    try:
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world_size, "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}  # fmt: skip
        os.environ.update({k: str(v) for k, v in env.items()})
        with torchrun_process_group(torch.device("cpu")):
            result = retrieve(model, image_dir)
            if get_rank() == 0:
                torch.save(result, out)
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # a forked copy of pytest: no exit handlers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_images(folder: Path) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    for i in range(N_IMAGES):
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        Image.new("RGB", (80, 64), colour).save(folder / f"{i}.png")
    return folder


def test_rank_batches_split_whole_batches_in_order():
    assert [rank_batches(7, 2, r, 2) for r in range(2)] == [
        [range(0, 2), range(2, 4)],
        [range(4, 6), range(6, 7)],
    ]
    assert rank_batches(3, 4, 0, 2) == [] and rank_batches(3, 4, 1, 2) == [range(0, 3)]


def test_two_ranks_give_the_one_process_result(tmp_path):
    images = save_images(tmp_path / "images")
    torch.manual_seed(0)
    model = Blip2Stage1(load_preset("tiny")).eval()  # built before the fork: every rank has these weights
    single = retrieve(model, images)
    fork, port = multiprocessing.get_context("fork"), free_port()
    args = [(r, 2, port, model, images, tmp_path / "ddp.pt") for r in range(2)]
    ranks = [fork.Process(target=rank_main, args=a) for a in args]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(timeout=240)
        if proc.exitcode is None:
            proc.kill()
    assert [proc.exitcode for proc in ranks] == [0, 0]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)

    # The same batches give the same features, so the ITC similarities agree bit for bit; each rank
    # re-scores other batches of pairs by ITM (float sums may differ in the last bit): every ranking agrees.
    assert torch.equal(ddp["sim_i2t"], single["sim_i2t"])
    for name in ("scores_i2t", "scores_t2i"):
        assert ddp[name].isfinite().sum(dim=1).eq(3).all()  # the top 3 re-scored, the rest -inf
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=1e-5)
    for name in ("order_i2t", "order_t2i", "ranks_i2t"):
        assert torch.equal(ddp[name], single[name]), name
    assert ddp["recalls"] == single["recalls"]  # R@1/5/10 both directions, re-ranked and ITC alone
    assert set(single["recalls"][0].i2t) == {1, 5, 10}
