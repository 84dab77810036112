"""Stage 2 end to end on CPU: tiny open_clip tower, tiny Q-Former, tiny OPT / T5 saved locally."""

import dataclasses

import pytest
import torch
from tiny_models import save_tiny_llm

from blip2_core.config import load_preset
from blip2_core.generate import GenerationConfig
from blip2_core.llm_bridge import IGNORE_INDEX
from blip2_core.stage2 import Blip2Stage2, load_stage1_weights

torch.set_num_threads(1)
CAPTIONS = ["a red square on a blue background", "two green circles"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {kind: save_tiny_llm(kind, root / kind) for kind in ("opt", "t5")}


def tiny_cfg(llm_dir, kind, prompt=""):
    cfg = load_preset("tiny")
    llm = dataclasses.replace(cfg.llm, kind=kind, name=str(llm_dir), hidden_size=32, prompt=prompt)
    qformer = dataclasses.replace(cfg.qformer, num_hidden_layers=2, num_query_tokens=4)
    return dataclasses.replace(cfg, llm=llm, qformer=qformer)


def make_model(llm_dirs, kind, **kwargs):
    torch.manual_seed(0)
    return Blip2Stage2(tiny_cfg(llm_dirs[kind], kind, **kwargs.pop("prompt_kw", {})), **kwargs)


def batch(n=2):
    return {"images": torch.randn(n, 3, 64, 64), "captions": CAPTIONS[:n]}


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_forward_returns_a_typed_loss_and_training_moves_only_trainables(llm_dirs, kind):
    model = make_model(llm_dirs, kind)
    model.train()
    assert not model.visual_encoder.training and not model.bridge.llm.training
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.clone() for n, p in model.trainable_parameters()}
    assert frozen and all(n.startswith(("visual_encoder.", "bridge.llm.")) for n in frozen)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3)
    data = batch()
    losses = []
    for _ in range(8):
        out = model(data)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.query_output.shape == (2, 4, 64) and out.loss.dim() == 0
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    changed = {n for n, p in model.trainable_parameters() if not torch.equal(p, trainable_before[n])}
    assert "bridge.llm_projection.weight" in changed and "qformer.query_tokens" in changed
    assert any(n.startswith("ln_vision.") for n in changed)


def test_text_branch_dropped_in_pretraining_and_kept_for_vqa(llm_dirs):
    plain = make_model(llm_dirs, "opt")
    names = {n for n, _ in plain.named_parameters()}
    assert not any(".intermediate." in n or "qformer.embeddings" in n or "qformer.cls" in n for n in names)
    assert any("intermediate_query" in n for n in names)
    vqa = make_model(llm_dirs, "opt", qformer_text_input=True)
    assert any("qformer.embeddings.word_embeddings" in n for n, _ in vqa.named_parameters())


def test_preset_prompt_is_context_not_target(llm_dirs):
    model = make_model(llm_dirs, "opt", prompt_kw={"prompt": "a photo of"})
    out = model(batch())
    tok = model.bridge.tokenizer
    prompt_len = len(tok("a photo of").input_ids)
    assert (out.labels[:, : 4 + prompt_len] == IGNORE_INDEX).all()
    assert (out.labels[:, 4 + prompt_len] != IGNORE_INDEX).all()


def test_stage1_weights_load_and_generation_runs(llm_dirs):
    source = make_model(llm_dirs, "opt", qformer_text_input=True)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    target = make_model(llm_dirs, "opt")
    state = source.state_dict()
    state["itm_head.weight"] = torch.zeros(2, 64)
    unused = load_stage1_weights(target, state)
    assert "itm_head.weight" in unused and "qformer.embeddings.word_embeddings.weight" in unused
    assert torch.equal(target.qformer.query_tokens, source.qformer.query_tokens)
    target.eval()
    texts = target.generate(torch.randn(2, 3, 64, 64), ["a photo of"] * 2, GenerationConfig(max_new_tokens=4))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_batch_errors_name_the_field(llm_dirs):
    model = make_model(llm_dirs, "opt")
    with pytest.raises(KeyError, match="captions"):
        model({"images": torch.randn(2, 3, 64, 64)})
    with pytest.raises(ValueError, match="captions"):
        model({"images": torch.randn(2, 3, 64, 64), "captions": ["one"]})
