"""Two DDP ranks on CPU (gloo) train the same model as one process with the doubled batch.

The ranks are started the way torchrun starts them: one process each with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, so `train` goes through its real distributed path.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from train_toy_script import parse_args, result_record, run_toy, toy_model, trainable_params

torch.set_num_threads(1)

SCRIPT = Path(__file__).with_name("train_toy_script.py")
# Per-rank batch 4 on 2 ranks vs batch 8 on one process. No dropout: ranks draw different masks.
COMMON = ["--steps", "6", "--ckpt-every", "3", "--dropout", "0.0", "--warmup", "1", "--samples", "48"]
# float32 all-reduce sums in another order than one big batch; 6 Adam steps keep the gap near 1e-7.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(out: Path, world_size: int) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--batch-size", "4", *COMMON]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def test_two_ranks_match_one_process_with_the_doubled_batch(tmp_path):
    procs = launch_ranks(tmp_path / "ddp", world_size=2)
    model, result = run_toy(parse_args(["--out", str(tmp_path / "single"), "--batch-size", "8", *COMMON]))
    single = result_record(model, result)
    for rank, proc in enumerate(procs):
        log, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"rank {rank} failed:\n{log.decode()}"
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())

    assert ddp["step"] == single["step"] == 6
    for name, value in single["params"].items():
        diff = (torch.tensor(ddp["params"][name]) - torch.tensor(value)).abs().max().item()
        assert diff < TOLERANCE, f"{name}: max |ddp - single| = {diff}"
    for step, loss in single["losses"].items():  # logged losses are averaged over ranks
        assert abs(ddp["losses"][step] - loss) < TOLERANCE, f"step {step}"
    initial = trainable_params(toy_model(dropout=0.0))
    moved = max((torch.tensor(v) - initial[n]).abs().max().item() for n, v in single["params"].items())
    assert moved > 100 * TOLERANCE  # the runs trained for real, so the tolerance is meaningful

    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-000006" / "train_state.pt", weights_only=True)
    assert [r["data"]["rank"] for r in state["ranks"]] == [0, 1]  # each rank's position is kept
