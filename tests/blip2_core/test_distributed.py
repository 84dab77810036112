"""Rank helpers without a process group, and the cross-rank gather in a real 2-process gloo group."""

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip2_core.distributed import all_gather_no_grad, all_gather_with_local_grad, get_rank, get_world_size
from blip2_core.objectives import itc_loss


def test_helpers_work_without_a_process_group():
    assert (get_rank(), get_world_size()) == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_local_grad(x) is x
    assert not all_gather_no_grad(x).requires_grad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        local = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = all_gather_with_local_grad(local)
        (gathered * torch.arange(4.0)[:, None]).sum().backward()  # weights differ per row
        # ITC across ranks: the same features as a single process would see, split in two.
        g = torch.Generator().manual_seed(0)
        image = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
        mine = slice(2 * rank, 2 * rank + 2)
        itc = itc_loss(
            image[mine],
            text[mine],
            all_gather_with_local_grad(image[mine]),
            all_gather_with_local_grad(text[mine]),
            torch.tensor(0.1),
            rank=get_rank(),
        )
        torch.save(
            {
                "gathered": gathered.detach(),
                "grad": local.grad,
                "world": get_world_size(),
                "itc": itc.loss.detach(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_gather_across_two_gloo_ranks_keeps_only_the_local_gradient(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    for rank, res in enumerate(results):
        assert res["world"] == 2
        torch.testing.assert_close(res["gathered"], expected)
        row_weights = torch.arange(4.0)[2 * rank : 2 * rank + 2, None].expand(2, 3)
        torch.testing.assert_close(res["grad"], row_weights)  # only this rank's rows reach its tensor
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    full = itc_loss(image, text, image, text, torch.tensor(0.1))
    torch.testing.assert_close((results[0]["itc"] + results[1]["itc"]) / 2, full.loss)
