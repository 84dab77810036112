"""The `teachers` flow: trains every teacher once per (config, corpus), writes the miniature preset that
the training stages load, records the run and its loss curves in the catalog, and reuses its folder."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from blip2_core.config import load_preset
from blip2_core.vision import VisionEncoder
from data_catalog.layout import Layout
from data_catalog.synth import SynthConfig, synthesize
from flows.common import catalog_session
from flows.teachers import TeachersParams, teachers_flow

STEPS = {"clip_steps": 3, "captioner_steps": 3, "lm_steps": 3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    cfg = SynthConfig(seed=5, n_pretrain=4, n_coco=30, n_vqa_images=10, n_retrieval=2, image_size=64)
    return synthesize(tmp_path_factory.mktemp("corpus") / "corpus", cfg).root


def test_teachers_flow_trains_once_and_writes_the_miniature_preset(prefect_harness, tmp_path, corpus, caplog):
    home = tmp_path / "home"
    params = TeachersParams(corpus=corpus, home=home, threads=1, **STEPS)
    first = teachers_flow(params)

    assert not first.cached and first.folder.parent == home / "teachers"
    for path in (first.clip_weights, first.captioner / "config.json", first.opt / "config.json",
                 first.t5 / "config.json", first.wordpiece / "tokenizer.json"):  # fmt: skip
        assert path.is_file(), path
    cfg = load_preset(first.preset)
    assert cfg.vision.pretrained == str(first.clip_weights)
    assert cfg.llm.name == str(first.opt)
    from transformers import AutoTokenizer

    wordpiece = AutoTokenizer.from_pretrained(first.wordpiece)
    assert cfg.qformer.vocab_size == len(wordpiece)
    assert cfg.qformer.dec_token_id == wordpiece.convert_tokens_to_ids("[DEC]") != wordpiece.unk_token_id
    opt = json.loads((first.opt / "config.json").read_text())
    # Both stages of the from-scratch tiny Q-Former train at lr 1e-3 (1e-4 at the floor).
    assert (cfg.stage1.lr, cfg.stage1.min_lr, cfg.stage2.lr, cfg.stage2.min_lr) == (1e-3, 1e-4, 1e-3, 1e-4)
    assert (cfg.llm.vocab_size, cfg.llm.hidden_size) == (opt["vocab_size"], opt["hidden_size"])
    # The frozen image encoder of the preset is the CLIP teacher's image tower, weight for weight.
    from safetensors.torch import load_file

    clip = load_file(first.clip_weights)
    encoder = VisionEncoder(cfg.vision)
    key = next(k for k in clip if k.startswith("visual.") and k.endswith("conv1.weight"))
    assert torch.equal(encoder.visual.state_dict()[key.removeprefix("visual.")], clip[key])

    with catalog_session(Layout(home), read_only=True) as cat:
        run = cat.run(first.run_id)
        curves = {
            name: cat.metrics(first.run_id, f"{name}/loss") for name in ("clip", "captioner", "opt", "t5")
        }
    assert run.status == "done" and run.stage == "teachers"
    assert all(len(points) >= 1 for points in curves.values()), curves

    again = teachers_flow(params)
    assert again.cached and again.folder == first.folder and again.run_id != first.run_id
    # Another profile is another config: new teachers. The capfilt profile on a corpus without a teacher set
    # (this one) is warned about: its captioner would memorise the COCO train images.
    caplog.set_level(logging.WARNING)
    changed = teachers_flow(params.model_copy(update={"profile": "capfilt"}))
    assert not changed.cached and changed.folder != first.folder
    assert "capfilt profile on a corpus without a teacher set" in caplog.text
    log = json.loads((changed.folder / "captioner" / "teacher.json").read_text())
    assert log["config"]["position_init_std"] == 2.0 and log["config"]["steps"] == STEPS["captioner_steps"]


def test_teachers_flow_names_a_missing_corpus(prefect_harness, tmp_path):
    with pytest.raises(FileNotFoundError, match="no corpus.json"):
        teachers_flow(TeachersParams(corpus=tmp_path / "nothing", home=tmp_path / "home", **STEPS))


def test_profiles_name_the_teacher_configuration(corpus):
    from pydantic import ValidationError

    from blip2_core import teachers as T
    from flows.teachers import config_hash, teacher_config

    demo = teacher_config(TeachersParams(seed=3))
    assert demo == T.TeacherConfig(seed=3, opt=T.STEERABLE_OPT)
    # The demo's OPT: steerable, and never a question-answer text without its caption in front.
    assert (demo.opt.init_std, demo.opt.position_offsets, demo.opt.qa_in_context_only) == (0.1, True, True)
    assert demo.opt.context_qa >= 1 and demo.t5 == T.LMTeacherConfig()
    capfilt = teacher_config(TeachersParams(profile="capfilt", seed=3, captioner_steps=7))
    assert capfilt.seed == 3 and capfilt.captioner.steps == 7  # step overrides apply on top of the profile
    assert capfilt.captioner.position_init_std == capfilt.clip.position_init_std == 2.0
    assert capfilt.clip.steps == T.TEACHER_PROFILES["capfilt"].clip.steps > demo.clip.steps
    with pytest.raises(ValidationError, match="profile"):
        TeachersParams(profile="best")
    with pytest.raises(ValueError, match="unknown teacher profile 'best'"):
        T.teacher_profile("best")
    # Set, the position options change the hash (other teachers). Unset, they leave it as it was before
    # they existed (a config without the fields), so teachers already on disk stay valid.
    assert config_hash(capfilt, corpus) != config_hash(demo, corpus)
    older = dataclasses.asdict(demo)
    for part in ("clip", "captioner"):
        del older[part]["position_init_std"]
    assert config_hash(older, corpus) == config_hash(demo, corpus)
