"""Q-Former: HF-compatible naming and math, masks in action, KV cache, BERT initialisation."""

import dataclasses

import pytest
import torch

import blip2_core.qformer as qformer_module
from blip2_core.qformer import QFormer, load_bert_checkpoint


def _inputs(cfg, batch=2, text_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (batch, text_len), generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[1, text_len - 2 :] = 0
    image = torch.randn(batch, 17, cfg.qformer.encoder_hidden_size, generator=g)
    return ids, mask, image


def test_layout_queries_ffn_copies_and_cross_attention_every_other_layer(tiny_config, tiny_qformer):
    q = tiny_config.qformer
    assert tiny_qformer.query_tokens.shape == (1, q.num_query_tokens, q.hidden_size)
    assert [layer.has_cross_attention for layer in tiny_qformer.encoder.layer] == [
        i % q.cross_attention_freq == 0 for i in range(q.num_hidden_layers)
    ]
    for layer in tiny_qformer.encoder.layer:
        assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
        assert torch.equal(layer.output_query.dense.weight, layer.output.dense.weight)
    assert tiny_qformer.encoder.layer[0].crossattention.attention.key.in_features == q.encoder_hidden_size
    big = QFormer(
        dataclasses.replace(tiny_config, qformer=dataclasses.replace(q, num_query_tokens=512)).qformer
    )
    assert big.query_tokens.std().item() == pytest.approx(0.02, rel=0.1)


def test_matches_transformers_blip2_qformer_by_state_dict(tiny_config, tiny_qformer):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    q = tiny_config.qformer
    hf = Blip2QFormerModel(
        Blip2QFormerConfig(
            vocab_size=q.vocab_size,
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_hidden_layers,
            num_attention_heads=q.num_attention_heads,
            intermediate_size=q.intermediate_size,
            cross_attention_frequency=q.cross_attention_freq,
            encoder_hidden_size=q.encoder_hidden_size,
            use_qformer_text_input=True,
            layer_norm_eps=q.layer_norm_eps,
        )
    ).eval()
    ours = {
        k: v
        for k, v in tiny_qformer.state_dict().items()
        if not k.startswith(("embeddings.", "cls.", "query_"))
    }
    assert set(ours) == set(hf.state_dict())
    hf.load_state_dict(ours, strict=True)
    _, _, image = _inputs(tiny_config)
    queries = tiny_qformer.expand_queries(2)
    with torch.no_grad():
        expected = hf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        got = tiny_qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_an_explicit_softmax_attention(tiny_config, tiny_qformer, monkeypatch):
    ids, mask, image = _inputs(tiny_config)
    args = dict(input_ids=ids, query_embeds=tiny_qformer.expand_queries(2), attention_mask=mask)
    sdpa = tiny_qformer(**args, encoder_hidden_states=image, mask_kind="causal").last_hidden_state

    def eager(q, k, v, m, dropout_p):
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores + m if m is not None else scores  # additive float mask
        return scores.softmax(-1) @ v

    monkeypatch.setattr(qformer_module, "attend", eager)
    reference = tiny_qformer(**args, encoder_hidden_states=image, mask_kind="causal").last_hidden_state
    torch.testing.assert_close(sdpa, reference, atol=1e-5, rtol=1e-5)


def _run(qf, ids, mask, image, kind):
    return qf(ids, qf.expand_queries(ids.shape[0]), mask, image, mask_kind=kind).last_hidden_state


def test_masks_in_action(tiny_config, tiny_qformer):
    ids, mask, image = _inputs(tiny_config)
    nq = tiny_config.qformer.num_query_tokens
    changed = ids.clone()
    changed[:, 3] += 1  # a text token in the middle
    for kind in ("unimodal", "causal"):
        a, b = _run(tiny_qformer, ids, mask, image, kind), _run(tiny_qformer, changed, mask, image, kind)
        torch.testing.assert_close(a[:, :nq], b[:, :nq])  # queries never read text
    a, b = _run(tiny_qformer, ids, mask, image, "causal"), _run(tiny_qformer, changed, mask, image, "causal")
    torch.testing.assert_close(a[:, nq : nq + 3], b[:, nq : nq + 3])  # earlier text cannot see token 3
    assert not torch.allclose(a[:, nq + 3 :], b[:, nq + 3 :])
    a, b = (
        _run(tiny_qformer, ids, mask, image, "bidirectional"),
        _run(tiny_qformer, changed, mask, image, "bidirectional"),
    )
    assert not torch.allclose(a[:, :nq], b[:, :nq])  # ITM queries do read the text
    other_image = image + 1.0
    a, b = (
        _run(tiny_qformer, ids, mask, image, "unimodal"),
        _run(tiny_qformer, ids, mask, other_image, "unimodal"),
    )
    torch.testing.assert_close(a[:, nq:], b[:, nq:])  # text never reads the queries (nor the image)


def test_unimodal_pass_equals_separate_query_and_text_passes(tiny_config, tiny_qformer):
    ids, mask, image = _inputs(tiny_config)
    nq = tiny_config.qformer.num_query_tokens
    joint = _run(tiny_qformer, ids, mask, image, "unimodal")
    queries = tiny_qformer(query_embeds=tiny_qformer.expand_queries(2), encoder_hidden_states=image)
    text = tiny_qformer(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(joint[:, :nq], queries.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint[:, nq:], text.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak_into_real_tokens(tiny_config, tiny_qformer):
    ids, mask, image = _inputs(tiny_config)
    other = ids.clone()
    other[1, -2:] = 7  # change only padded positions of sample 1
    for kind in ("bidirectional", "causal"):
        a, b = _run(tiny_qformer, ids, mask, image, kind), _run(tiny_qformer, other, mask, image, kind)
        real = tiny_config.qformer.num_query_tokens + 4
        torch.testing.assert_close(a[1, :real], b[1, :real])


def test_kv_cache_decoding_equals_a_full_causal_pass(tiny_config, tiny_qformer):
    ids, mask, image = _inputs(tiny_config)
    nq = tiny_config.qformer.num_query_tokens
    full = _run(tiny_qformer, ids, mask, image, "causal")
    cache = tiny_qformer(
        query_embeds=tiny_qformer.expand_queries(2), encoder_hidden_states=image, use_cache=True
    )
    cache = cache.past_key_values
    assert (cache.num_queries, cache.num_text) == (nq, 0)
    for t in range(ids.shape[1]):  # one token at a time, the image is never read again
        step = tiny_qformer(
            input_ids=ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            mask_kind="causal",
            past_key_values=cache,
            use_cache=True,
        )
        cache = step.past_key_values
        torch.testing.assert_close(step.last_hidden_state[:, 0], full[:, nq + t], atol=1e-5, rtol=1e-5)
    assert cache.num_text == ids.shape[1] and cache.layers[0][0].shape[2] == nq + ids.shape[1]
    reordered = cache.select(torch.tensor([1, 1, 0]))
    assert torch.equal(reordered.layers[0][0][2], cache.layers[0][0][0])


def test_cache_misuse_and_bad_masks_are_explained(tiny_config, tiny_qformer):
    ids, mask, image = _inputs(tiny_config)
    cache = tiny_qformer(
        query_embeds=tiny_qformer.expand_queries(2), encoder_hidden_states=image, use_cache=True
    )
    with pytest.raises(ValueError, match="query_embeds must come in the first call"):
        tiny_qformer(query_embeds=tiny_qformer.expand_queries(2), past_key_values=cache.past_key_values)
    with pytest.raises(ValueError, match="attention_mask covers 5 positions"):
        tiny_qformer(input_ids=ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        tiny_qformer(query_embeds=tiny_qformer.expand_queries(2))


def test_lm_head_is_tied_to_the_word_embeddings(tiny_qformer):
    hidden = torch.randn(2, 3, tiny_qformer.cfg.hidden_size)
    logits = tiny_qformer.lm_logits(hidden)
    transformed = tiny_qformer.cls.predictions.transform(hidden)
    expected = (
        transformed @ tiny_qformer.embeddings.word_embeddings.weight.T + tiny_qformer.cls.predictions.bias
    )
    torch.testing.assert_close(logits, expected)
    assert not any("decoder" in k for k in tiny_qformer.state_dict())


def test_bert_initialisation_reproduces_bert(tiny_config, tiny_bert_dir):
    from transformers import BertModel

    torch.manual_seed(0)
    qf = QFormer(tiny_config.qformer).eval()
    dec_row = qf.embeddings.word_embeddings.weight[-1].clone()
    report = load_bert_checkpoint(qf, tiny_bert_dir)
    assert "encoder.layer.0.attention.attention.query.weight" in report.loaded
    assert "encoder.layer.0.crossattention.attention.key.weight" in report.initialised
    assert "query_tokens" in report.initialised
    assert any("pooler" in k or "token_type" in k for k in report.ignored)
    torch.testing.assert_close(qf.embeddings.word_embeddings.weight[-1], dec_row)  # [DEC] keeps its init
    for layer in qf.encoder.layer:
        assert torch.equal(layer.output_query.dense.weight, layer.output.dense.weight)

    bert = BertModel.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(0, 30000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = qf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_bert_loading_reads_bin_files_and_rejects_strangers(tiny_config, tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_bert_dir / "model.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin")
    qf = QFormer(tiny_config.qformer)
    load_bert_checkpoint(qf, tmp_path)
    torch.testing.assert_close(qf.layernorm.weight, state["bert.embeddings.LayerNorm.weight"])
    state["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="layer.9.output.dense.weight"):
        load_bert_checkpoint(qf, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_bert_checkpoint(qf, tmp_path / "nowhere")
