"""Fine-tuning pieces: layer-wise lr decay reaching the optimizer, the task models, records and their data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blip2_core.checkpoints import trainable_state
from blip2_core.data import AugmentConfig
from blip2_core.finetune import (
    Record,
    RecordCollate,
    RecordData,
    build_finetune_model,
    coco_caption_records,
    finetune_config,
    finetune_param_groups,
    load_start_weights,
    majority_answer,
    visual_genome_qa_records,
    vqa_records,
)
from blip2_core.optim import WarmupCosineSchedule, adamw
from blip2_core.stage1 import Blip2Stage1

BLOCK = "visual_encoder.visual.transformer.resblocks.{}.attn.in_proj_weight"


@pytest.fixture(scope="module")
def retrieval_model(tiny_config):
    torch.manual_seed(0)
    return build_finetune_model("retrieval", finetune_config(tiny_config, 72))


def test_finetune_config_unfreezes_the_tower_at_the_new_size(tiny_config, retrieval_model):
    cfg = finetune_config(tiny_config, 72)
    assert (cfg.vision.image_size, cfg.vision.freeze, cfg.vision.precision) == (72, False, "fp32")
    encoder = retrieval_model.visual_encoder
    assert encoder.visual.positional_embedding.shape == (1 + 9 * 9, 64)  # 72 px / patch 8, interpolated
    assert all(p.requires_grad for p in encoder.parameters())
    assert retrieval_model.match_same_image
    out = encoder(torch.randn(2, 3, 72, 72))
    assert out.shape == (2, 82, 64)


def test_layer_decay_lrs_reach_the_optimizer_groups(retrieval_model):
    groups = finetune_param_groups(retrieval_model, 0.05, layer_decay=0.5)
    optimizer = adamw(groups, lr=1e-3, betas=(0.9, 0.999))
    schedule = WarmupCosineSchedule(optimizer, 1e-3, 0.0, 0, 10)

    def lrs() -> dict[str, float]:
        return {name: g["lr"] for g in optimizer.param_groups for name in g["param_names"]}

    blocks = len(retrieval_model.visual_encoder.blocks)  # 3 kept of the tiny tower's 4
    lr = lrs()
    assert lr["qformer.query_tokens"] == pytest.approx(1e-3)  # outside the tower: full lr
    assert lr["ln_vision.weight"] == pytest.approx(1e-3)
    assert lr[BLOCK.format(blocks - 1)] == pytest.approx(1e-3 * 0.5)  # top block: one decay
    assert lr[BLOCK.format(0)] == pytest.approx(1e-3 * 0.5**blocks)
    assert lr["visual_encoder.visual.conv1.weight"] == pytest.approx(1e-3 * 0.5 ** (blocks + 1))
    schedule.step()  # the schedule keeps applying the scales at every step
    after = lrs()
    ratio = after[BLOCK.format(0)] / after["qformer.query_tokens"]
    assert after["qformer.query_tokens"] < 1e-3 and ratio == pytest.approx(0.5**blocks)
    no_decay = finetune_param_groups(retrieval_model, 0.05, layer_decay=None)
    assert {g["lr_scale"] for g in no_decay} == {1.0}


def test_load_start_weights_requires_everything_but_the_tower(tiny_config, tmp_path):
    cfg = finetune_config(tiny_config, 64)
    torch.manual_seed(3)
    source = Blip2Stage1(tiny_config)  # frozen tower: its checkpoint holds no visual_encoder.*
    save_file(trainable_state(source), str(tmp_path / "stage1.safetensors"))
    model = build_finetune_model("retrieval", cfg)
    # vision.pretrained is unset in `tiny`, and the checkpoint has no tower: refused, not random.
    with pytest.raises(ValueError, match="vision.pretrained is unset"):
        load_start_weights(model, [tmp_path / "stage1.safetensors"])
    partial = {k: v for k, v in trainable_state(source).items() if not k.startswith("itm_head")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(KeyError, match="itm_head"):
        load_start_weights(model, [tmp_path / "partial.safetensors"])
    # A fine-tuned start holds the tower: everything loads, exactly.
    save_file(trainable_state(model), str(tmp_path / "full.safetensors"))
    torch.manual_seed(4)
    other = build_finetune_model("retrieval", cfg)
    assert load_start_weights(other, [tmp_path / "full.safetensors"]) == []
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _image(path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), colour).save(path)


def test_readers_by_hand(tmp_path):
    for i, colour in enumerate(["red", "green", "blue"]):
        _image(tmp_path / "img" / f"{i + 1:03d}.png", colour)
    coco = {
        "images": [{"id": 1, "file_name": "img/001.png"}, {"id": 7, "file_name": "img/002.png"}],
        "annotations": [
            {"image_id": 7, "caption": "a green card"},
            {"image_id": 1, "caption": "a red card"},
            {"image_id": 7, "caption": "green"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    records = coco_caption_records(tmp_path / "captions.json", tmp_path)
    assert [(r.text, r.image_id) for r in records] == [("a green card", 1), ("a red card", 0), ("green", 1)]

    questions = {"questions": [{"question_id": 10, "image_id": 3, "question": "what colour?"}]}
    answers = {"annotations": [{"question_id": 10, "answers": [{"answer": a} for a in ["b", "a", "b", "c"]]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    (record,) = vqa_records(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img", "{image_id:03d}.png")
    assert (record.question, record.text, record.image.endswith("003.png")) == ("what colour?", "b", True)
    assert majority_answer(["x", "y", "y", "x"]) == "x"  # a tie goes to the first seen

    vg = [{"id": 2, "qas": [{"question": "What colour?", "answer": "Green."}]}, {"id": 3, "qas": []}]
    (tmp_path / "vg.json").write_text(json.dumps(vg))
    (vg_record,) = visual_genome_qa_records(tmp_path / "vg.json", tmp_path / "img", "{image_id:03d}.png")
    assert (vg_record.question, vg_record.text) == ("What colour?", "green")

    with pytest.raises(FileNotFoundError, match="image file .*009.png does not exist"):
        bad = {"questions": [{"question_id": 10, "image_id": 9, "question": "q"}]}
        (tmp_path / "q.json").write_text(json.dumps(bad))
        vqa_records(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img", "{image_id:03d}.png")
    with pytest.raises(ValueError, match="image_id 5, not in 'images'"):
        coco["annotations"].append({"image_id": 5, "caption": "x"})
        (tmp_path / "captions.json").write_text(json.dumps(coco))
        coco_caption_records(tmp_path / "captions.json", tmp_path)


def test_record_data_batches_and_resumes(tmp_path):
    records = []
    for i in range(10):
        _image(tmp_path / f"{i}.png", (20 * i, 0, 0))
        records.append(Record(str(tmp_path / f"{i}.png"), f"caption {i}", i))
    augment = AugmentConfig(image_size=16, hflip=False)

    def make() -> RecordData:
        return RecordData(records, 3, augment, RecordCollate("caption", prompt="p "), seed=1)

    data = make()
    assert data.batches_per_epoch == 3
    seen = []
    for _ in range(2):  # two epochs: 3 batches each, the tenth record dropped per epoch
        seen += [b["captions"] for b in data]
    assert all(len(c) == 3 for c in seen) and len(seen) == 6
    first = next(iter(make()))
    assert first["images"].shape == (3, 3, 16, 16) and first["prompts"] == ["p "] * 3
    assert seen[0] == first["captions"]

    partial = make()
    it = iter(partial)
    next(it)
    state = partial.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["captions"] for b in resumed]
    assert rest == seen[1:3]  # the batches not yet handed out, in the same order
    with pytest.raises(ValueError, match="cannot fill one batch"):
        RecordData(records[:2], 3, augment, RecordCollate("caption"))
