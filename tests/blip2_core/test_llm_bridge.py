"""The stage-2 bridge on tiny OPT / T5 models saved locally: labels, prefix split, losses, freezing."""

import pytest
import torch
from tiny_models import save_tiny_llm

from blip2_core.llm_bridge import (
    IGNORE_INDEX,
    LLMBridge,
    decoder_text_inputs,
    load_llm,
    prefix_lm_text_inputs,
    resolve_dtype,
)

torch.set_num_threads(1)
CAPTIONS = ["a red square on a blue background", "two green circles"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {kind: save_tiny_llm(kind, root / kind) for kind in ("opt", "t5")}


def make_bridge(path, **kwargs) -> LLMBridge:
    llm, tokenizer = load_llm(path)
    torch.manual_seed(0)
    return LLMBridge(llm, tokenizer, qformer_hidden=24, **kwargs)


def test_decoder_labels_cover_caption_and_newline_eos_only(llm_dirs):
    _, tok = load_llm(llm_dirs["opt"])
    text = decoder_text_inputs(tok, CAPTIONS, ["Question: what? Answer:"] * 2, eos_text="\n", max_text_len=32)
    newline = tok("\n", add_special_tokens=False).input_ids[0]
    prompt_len = len(tok("Question: what? Answer:").input_ids)
    for i, caption in enumerate(CAPTIONS):
        ids, labels, mask = text.input_ids[i], text.labels[i], text.attention_mask[i]
        n = int(mask.sum())
        assert ids[0] == tok.bos_token_id
        assert (labels[:prompt_len] == IGNORE_INDEX).all()  # BOS and prompt are context only
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == tok.pad_token_id).all()
        assert labels[n - 1] == newline  # OPT's EOS is "\n" and it is learned
        assert tok.decode(labels[prompt_len:n]).strip() == caption


def test_prefix_split_is_uniform_seeded_and_lossless(llm_dirs):
    _, tok = load_llm(llm_dirs["t5"])
    captions = [CAPTIONS[0]] * 200
    split = lambda seed: prefix_lm_text_inputs(tok, captions, None, 32, torch.Generator().manual_seed(seed))
    a, b, c = split(1), split(1), split(2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    tokens = tok(CAPTIONS[0], add_special_tokens=False).input_ids
    prefix_lens = a.attention_mask.sum(1) - 1  # minus the encoder's EOS
    for i in range(len(captions)):
        k = int(prefix_lens[i])
        target = a.labels[i][a.labels[i] != IGNORE_INDEX].tolist()
        assert a.input_ids[i, :k].tolist() + target[:-1] == tokens  # prefix + suffix is the caption
        assert target[-1] == tok.eos_token_id and 1 <= k <= len(tokens) - 1
    # every split point 1..n-1 is drawn, none far more often than uniform predicts
    counts = torch.bincount(prefix_lens, minlength=len(tokens))[1:]
    assert (counts > 0).all() and counts.max() < 3 * len(captions) / (len(tokens) - 1)


def test_prompt_goes_to_encoder_and_whole_caption_is_target(llm_dirs):
    _, tok = load_llm(llm_dirs["t5"])
    text = prefix_lm_text_inputs(
        tok, ["red"], ["Question: what colour? Short answer:"], 32, torch.Generator()
    )
    assert text.input_ids[0].tolist() == tok("Question: what colour? Short answer:").input_ids
    assert text.labels[0].tolist() == tok("red").input_ids


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_loss_matches_the_llms_own_loss(llm_dirs, kind):
    bridge = make_bridge(llm_dirs[kind])
    queries = torch.randn(2, 4, 24)
    out = bridge(queries, CAPTIONS, ["a photo of"] * 2)
    embeds, mask = bridge.embed_with_queries(
        bridge.project(queries), *_text(bridge, CAPTIONS, ["a photo of"] * 2)
    )
    if kind == "opt":
        assert (out.labels[:, :4] == IGNORE_INDEX).all()  # query slots never carry a label
    # transformers computes its own (shifted for OPT, decoder-side for T5) loss from the same labels
    reference = bridge.llm(inputs_embeds=embeds, attention_mask=mask, labels=out.labels).loss
    assert torch.allclose(out.loss, reference, atol=1e-6)


def _text(bridge, captions, prompts):
    text = bridge.text_inputs(captions, prompts)
    return text.input_ids, text.attention_mask


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_llm_stays_frozen_and_in_eval_while_projection_learns(llm_dirs, kind):
    bridge = make_bridge(llm_dirs[kind])
    bridge.train()
    assert not bridge.llm.training and bridge.training
    before = {k: v.clone() for k, v in bridge.llm.state_dict().items()}
    queries = torch.randn(2, 4, 24)
    opt = torch.optim.AdamW([p for p in bridge.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(20):
        loss = bridge(queries, CAPTIONS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(before[k], v) for k, v in bridge.llm.state_dict().items())
    assert all(p.grad is None for p in bridge.llm.parameters())
    assert {n for n, p in bridge.named_parameters() if p.requires_grad} == {
        "llm_projection.weight",
        "llm_projection.bias",
    }


def test_loss_depends_on_the_visual_prompt(llm_dirs):
    bridge = make_bridge(llm_dirs["opt"])
    a = bridge(torch.randn(2, 4, 24), CAPTIONS).loss
    b = bridge(torch.randn(2, 4, 24), CAPTIONS).loss
    assert not torch.allclose(a, b)


def test_llm_is_cast_to_the_configured_dtype(llm_dirs):
    llm, tok = load_llm(llm_dirs["t5"], dtype="bfloat16")
    bridge = LLMBridge(llm, tok, qformer_hidden=24)
    assert {p.dtype for p in bridge.llm.parameters()} == {torch.bfloat16}
    assert bridge.llm_projection.weight.dtype == torch.float32  # the trainable part stays fp32
    out = bridge(torch.randn(2, 4, 24), CAPTIONS)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


def test_load_llm_names_the_bad_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="llm_path"):
        load_llm(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="llm_dtype"):
        resolve_dtype("float8")
