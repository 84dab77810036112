"""No loader of ours runs code from a pickle: a malicious `.pt` / `.bin` is refused, not executed.

The payload is real: unpickling it with plain `pickle` writes a marker file (checked first, so this test
fails if the payload ever stops working). Every loader that reads a pickle-based file is then given it.
"""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from blip2_core import checkpoints
from blip2_core.capfilt import CapFiltConfig, RankerConfig, load_capfilt_models
from blip2_core.qformer import read_bert_state_dict
from blip2_core.vision import load_open_clip_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capfilt_fixtures as fx  # noqa: E402


class _Payload:
    """Unpickling this calls exec(), which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def write_malicious(path: Path, marker: Path) -> Path:
    """A torch.save file (zip + pickle) whose state dict holds the payload beside a real tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(marker)}, path)
    return path


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


def test_the_payload_runs_under_plain_unpickling(tmp_path, marker):
    write_malicious(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what an unsafe loader would do
    assert marker.read_text() == "pwned"


def test_training_state_is_loaded_without_running_code(tmp_path, marker):
    model = torch.nn.Linear(2, 2)
    ckpt = checkpoints.save_checkpoint(tmp_path / "run", 1, model)
    write_malicious(ckpt / checkpoints.STATE_FILE, marker)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load_checkpoint(model, ckpt)
    assert not marker.exists()


def test_image_tower_and_bert_weights_are_loaded_without_running_code(tmp_path, marker):
    with pytest.raises(pickle.UnpicklingError):
        load_open_clip_weights(torch.nn.Linear(1, 1), write_malicious(tmp_path / "clip.pt", marker))
    bert = tmp_path / "bert"
    write_malicious(bert / "pytorch_model.bin", marker)
    with pytest.raises(pickle.UnpicklingError):
        read_bert_state_dict(bert)
    assert not marker.exists()


def test_capfilt_models_are_loaded_without_running_code(tmp_path, marker):
    config, _ = fx.save_ranker(tmp_path / "ranker")
    evil_ranker = write_malicious(tmp_path / "ranker" / "evil.pt", marker)
    captioner = fx.save_captioner(tmp_path / "captioner")
    ranker = RankerConfig(model=config.stem, weights=str(evil_ranker), model_config=str(config))
    with pytest.raises(Exception, match="(?i)weights only load failed|unpickl|unsupported global"):
        load_capfilt_models(CapFiltConfig(captioner=str(captioner), ranker=ranker))
    assert not marker.exists()

    # A captioner folder with a pickled pytorch_model.bin instead of safetensors.
    evil_captioner = tmp_path / "captioner-bin"
    shutil.copytree(captioner, evil_captioner)
    (evil_captioner / "model.safetensors").unlink()
    write_malicious(evil_captioner / "pytorch_model.bin", marker)
    good = RankerConfig(model=config.stem, weights=str(tmp_path / "ranker" / f"{config.stem}.safetensors"))
    good = RankerConfig(model=good.model, weights=good.weights, model_config=str(config))
    with pytest.raises(Exception, match="(?i)weights only load failed|unpickl|unsupported global"):
        load_capfilt_models(CapFiltConfig(captioner=str(evil_captioner), ranker=good))
    assert not marker.exists()
