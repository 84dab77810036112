"""Beam search and sampling: a scripted model for exact cases, tiny Q-Former / OPT / T5 for the real paths."""

import math

import pytest
import torch
from tiny_models import save_tiny_llm

from blip2_core.config import Blip2Config, QFormerConfig, VisionConfig
from blip2_core.generate import (
    GenerationConfig,
    QFormerCaptioner,
    beam_search,
    decode,
    generate_captions_qformer,
    generate_with_llm,
    top_p_filter,
    vqa_prompt,
)
from blip2_core.llm_bridge import LLMBridge, load_llm
from blip2_core.qformer import QFormer

torch.set_num_threads(1)
EOS, PAD = 0, 9


class ScriptedModel:
    """Next-token distribution depends only on the last token: a Markov chain given as probabilities."""

    def __init__(self, table: dict[int, dict[int, float]], batch: int = 1, vocab: int = 10):
        self.batch, self.vocab = batch, vocab
        self.table = torch.full((vocab + 1, vocab), 1e-9)
        for prev, row in table.items():
            for token, p in row.items():
                self.table[prev, token] = p
        self.start = vocab  # row index of the "no token yet" state

    def first(self):
        return self.table[self.start].log().expand(self.batch, -1).clone(), torch.zeros(self.batch)

    def next(self, tokens, state):
        return self.table[tokens[:, 0]].log(), state

    def select(self, state, index):
        return state[index]


# start -> EOS 0.4 (log .4, length 1) | 1 0.6 -> EOS 0.6 (log .36, length 2) | 2 0.4 -> EOS 0.5 (log .12, 3)
#                                                              | 3 0.5 -> EOS 0.9 (log .108, 4)
CHAIN = {10: {EOS: 0.4, 1: 0.6}, 1: {EOS: 0.6, 2: 0.4}, 2: {EOS: 0.5, 3: 0.5}, 3: {EOS: 0.9, 4: 0.1}}


@pytest.mark.parametrize("length_penalty, expected", [(0.0, [EOS]), (1.0, [1, EOS]), (-1.0, [EOS])])
def test_length_penalty_picks_the_expected_hypothesis(length_penalty, expected):
    cfg = GenerationConfig(num_beams=3, length_penalty=length_penalty, max_new_tokens=5)
    out = decode(ScriptedModel(CHAIN), 1, cfg, EOS, PAD, vocab_size=10)
    assert out.sequences[0, : out.lengths[0]].tolist() == expected
    sums = {(EOS,): math.log(0.4), (1, EOS): math.log(0.36)}
    assert out.scores[0].item() == pytest.approx(sums[tuple(expected)] / len(expected) ** length_penalty)


def test_min_and_max_new_tokens_are_honoured_on_the_scripted_chain():
    cfg = GenerationConfig(num_beams=2, length_penalty=0.0, min_new_tokens=2)
    out = decode(ScriptedModel(CHAIN), 1, cfg, EOS, PAD, 10)
    assert out.sequences[0, : out.lengths[0]].tolist() == [1, 2, EOS]  # EOS forbidden at steps 0 and 1
    cfg = GenerationConfig(num_beams=2, length_penalty=0.0, min_new_tokens=3)
    out = decode(ScriptedModel(CHAIN), 1, cfg, EOS, PAD, 10)
    assert out.sequences[0, : out.lengths[0]].tolist() == [1, 2, 3, EOS]
    loop = {10: {3: 1.0}, 3: {3: 0.9, EOS: 0.1}}
    out = decode(ScriptedModel(loop), 1, GenerationConfig(max_new_tokens=4), EOS, PAD, 10)
    assert out.sequences[0].tolist() == [3, 3, 3, 3] and out.lengths[0] == 4


def test_top_p_keeps_the_smallest_set_reaching_p():
    log_probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = top_p_filter(log_probs, 0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert top_p_filter(log_probs, 0.01).isfinite()[0].tolist() == [True, False, False, False]


def test_repetition_penalty_avoids_seen_tokens():
    loop = {10: {3: 0.6, 4: 0.4}, 3: {3: 0.5, 4: 0.3, EOS: 0.2}, 4: {3: 0.4, EOS: 0.6}}
    plain = decode(ScriptedModel(loop), 1, GenerationConfig(max_new_tokens=3), EOS, PAD, 10)
    assert plain.sequences[0].tolist() == [3, 3, 3]
    cfg = GenerationConfig(max_new_tokens=3, repetition_penalty=2.0)
    penalised = decode(ScriptedModel(loop), 1, cfg, EOS, PAD, 10)
    assert penalised.sequences[0, :2].tolist() == [3, 4]


# --------------------------------------------------------------------------------------------------------
# Real models


@pytest.fixture(scope="module")
def qformer():
    cfg = Blip2Config(
        vision=VisionConfig(width=24),
        qformer=QFormerConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=50,
            dec_token_id=49,
            num_query_tokens=4,
            initializer_range=0.3,  # peaky random logits: no near-ties for the equality tests
            init_checkpoint=None,
        ),
    )
    torch.manual_seed(0)
    return QFormer(cfg.qformer).eval()


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {kind: save_tiny_llm(kind, root / kind) for kind in ("opt", "t5")}


def caption(qformer, image, **kwargs):
    cfg = GenerationConfig(**{"max_new_tokens": 8, **kwargs})
    return generate_captions_qformer(qformer, image, dec_token_id=49, eos_token_id=2, pad_token_id=0, cfg=cfg)


def test_qformer_cache_and_no_cache_give_identical_tokens(qformer):
    image = torch.randn(3, 5, 24)
    for kwargs in ({}, {"num_beams": 3}, {"do_sample": True, "top_p": 0.9, "seed": 3}):
        cached = caption(qformer, image, **kwargs)
        full = caption(qformer, image, use_cache=False, **kwargs)
        assert torch.equal(cached.sequences, full.sequences), kwargs


def test_qformer_greedy_equals_beam_search_of_width_one(qformer):
    image = torch.randn(3, 5, 24)
    greedy = caption(qformer, image)
    # Width 1 without a length reward: an EOS that wins its step ends the search, exactly as in greedy.
    cfg = GenerationConfig(num_beams=1, length_penalty=0.0, max_new_tokens=8)
    bos = torch.full((3, 1), 49)
    beam = beam_search(QFormerCaptioner(qformer, image, bos, True), 3, cfg, 2, 0, 50, None)
    assert torch.equal(greedy.sequences, beam.sequences)


def test_qformer_min_max_length_and_sampling(qformer):
    image = torch.randn(4, 5, 24)
    out = caption(qformer, image, num_beams=3, min_new_tokens=5, max_new_tokens=6)
    assert (out.lengths >= 5).all() and (out.lengths <= 6).all()
    for row, n in zip(out.sequences, out.lengths, strict=True):
        assert 2 not in row[: n - 1].tolist()  # no EOS before the end
    samples = caption(qformer, image, do_sample=True, top_p=0.9, num_return_sequences=3, seed=1)
    again = caption(qformer, image, do_sample=True, top_p=0.9, num_return_sequences=3, seed=1)
    assert samples.sequences.shape[0] == 12 and torch.equal(samples.sequences, again.sequences)
    assert len({tuple(r.tolist()) for r in samples.sequences}) > 4  # samples differ


def make_bridge(path):
    llm, tokenizer = load_llm(path)
    torch.manual_seed(0)
    return LLMBridge(llm, tokenizer, qformer_hidden=24).eval()


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_llm_cache_and_no_cache_agree_for_greedy_and_beams(llm_dirs, kind):
    bridge = make_bridge(llm_dirs[kind])
    queries = torch.randn(2, 4, 24)
    prompts = [vqa_prompt(kind, "what colour is the square?"), vqa_prompt(kind, "how many?")]
    for cfg in (GenerationConfig(max_new_tokens=6), GenerationConfig(num_beams=3, max_new_tokens=6)):
        texts, cached = generate_with_llm(bridge, queries, prompts, cfg)
        _, full = generate_with_llm(
            bridge, queries, prompts, GenerationConfig(**{**vars(cfg), "use_cache": False})
        )
        assert torch.equal(cached.sequences, full.sequences) and len(texts) == 2


def test_opt_greedy_matches_transformers_generate(llm_dirs):
    bridge = make_bridge(llm_dirs["opt"])
    queries = torch.randn(1, 4, 24)
    _, ours = generate_with_llm(bridge, queries, ["a photo of"], GenerationConfig(max_new_tokens=6))
    ids = bridge.tokenizer(["a photo of"], return_tensors="pt")
    embeds, mask = bridge.embed_with_queries(bridge.project(queries), ids.input_ids, ids.attention_mask)
    reference = bridge.llm.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=bridge.eos_token_id,
    )
    assert ours.sequences[0, : ours.lengths[0]].tolist() == reference[0].tolist()[: int(ours.lengths[0])]


def test_greedy_is_myopic_where_beam_search_is_not():
    greedy = decode(ScriptedModel(CHAIN, batch=2), 2, GenerationConfig(), EOS, PAD, 10)
    assert greedy.sequences.tolist() == [[1, EOS], [1, EOS]]  # 0.6 * 0.6 < 0.4, found only by beams
    assert greedy.scores[0].item() == pytest.approx(math.log(0.36))


def test_vqa_prompts_follow_the_paper():
    assert vqa_prompt("opt", "why?") == "Question: why? Answer:"
    assert vqa_prompt("t5", "why?") == "Question: why? Short answer:"
    with pytest.raises(ValueError, match="llm_kind"):
        vqa_prompt("gpt", "why?")
