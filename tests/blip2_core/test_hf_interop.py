"""The acceptance test of checkpoint interop: tiny random HF BLIP-2 models saved locally, imported into our
modules, must reproduce transformers' own LM logits, ITM scores and ITC similarities (fp32, <= 1e-5), and
export must give back bit-identical weights."""

import pytest
import torch
from tiny_models import build_tokenizer, tiny_opt_config
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from blip2_core.hf_interop import (
    export_hf,
    export_model,
    hf_key_to_ours,
    import_hf,
    lavis_to_ours,
    load_imported,
)

torch.set_num_threads(1)
NUM_QUERIES = 4
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
)
QFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99
)


def randomise(model):
    """HF initialises biases/LayerNorms to 0/1 and queries to 0: perturb everything so no term hides."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_generation(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_gen")
    tokenizer = build_tokenizer("opt")
    text = tiny_opt_config(len(tokenizer) + 1)
    image_token = len(tokenizer)  # an id the tokenizer never produces
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES,
        image_token_index=image_token,
    )
    config.architectures = ["Blip2ForConditionalGeneration"]
    torch.manual_seed(0)
    model = randomise(Blip2ForConditionalGeneration(config))
    model.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    return model, tokenizer, image_token, root


@pytest.fixture(scope="module")
def hf_retrieval(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_itm")
    config = Blip2Config(
        vision_config=VISION,
        qformer_config={**QFORMER, "use_qformer_text_input": True},
        num_query_tokens=NUM_QUERIES,
        image_text_hidden_size=16,
    )
    config.architectures = ["Blip2ForImageTextRetrieval"]
    torch.manual_seed(0)
    model = randomise(Blip2ForImageTextRetrieval(config))
    model.save_pretrained(root / "src")
    return model, root


def test_imported_generation_model_gives_transformers_lm_logits(hf_generation):
    hf, tokenizer, image_token, root = hf_generation
    ours = load_imported(import_hf(root / "src", root / "ours"))
    images = torch.randn(2, 3, 30, 30)
    text = tokenizer(["a photo of a cat", "two green circles"], padding=True, return_tensors="pt")
    image_ids = torch.full((2, NUM_QUERIES), image_token)
    with torch.no_grad():
        expected = hf(
            pixel_values=images,
            input_ids=torch.cat([image_ids, text.input_ids], 1),
            attention_mask=torch.cat([torch.ones_like(image_ids), text.attention_mask], 1),
        ).logits
        visual_prompt = ours.bridge.project(ours.query_output(images))
        embeds, mask = ours.bridge.embed_with_queries(visual_prompt, text.input_ids, text.attention_mask)
        got = ours.bridge.llm(inputs_embeds=embeds, attention_mask=mask).logits
    assert got.shape == expected.shape
    print(f"LM logits max abs diff vs transformers: {(got - expected).abs().max().item():.3e}")
    assert (got - expected).abs().max().item() <= 1e-5


def test_imported_retrieval_model_gives_transformers_itm_and_itc(hf_retrieval):
    hf, root = hf_retrieval
    ours = load_imported(import_hf(root / "src", root / "ours"))
    images = torch.randn(3, 3, 30, 30)
    ids = torch.randint(5, 99, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        itm_expected = hf(
            pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True
        ).logits_per_image  # (B, 2)
        itc_expected = hf(
            pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False
        ).logits_per_image  # (B_img, B_txt)
        image_embeds = ours.encode_image(images)
        itm_got = ours.itm_logits(image_embeds, ids, mask)
        image_feats = ours.image_features(images).image_feats  # (B, Q, E)
        text_feat = ours.text_features(ids, mask).text_feat  # (B, E)
        itc_got = torch.einsum("iqe,te->itq", image_feats, text_feat).max(dim=-1).values
    print(
        f"ITM max abs diff: {(itm_got - itm_expected).abs().max().item():.3e}, "
        f"ITC: {(itc_got - itc_expected).abs().max().item():.3e}"
    )
    assert (itm_got - itm_expected).abs().max().item() <= 1e-5
    assert (itc_got - itc_expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("which", ["hf_generation", "hf_retrieval"])
def test_export_round_trip_is_bit_identical(which, request):
    hf, root = request.getfixturevalue(which)[0], request.getfixturevalue(which)[-1]
    exported = export_hf(import_hf(root / "src", root / "ours2"), root / "back")
    reloaded = type(hf).from_pretrained(exported).eval()
    original, back = hf.state_dict(), reloaded.state_dict()
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_lavis_names_map_onto_ours():
    lavis = {
        "Qformer.bert.embeddings.LayerNorm.weight": torch.ones(4),
        "Qformer.bert.encoder.layer.0.attention.self.query.weight": torch.ones(4, 4),
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": torch.ones(4, 6),
        "Qformer.cls.predictions.decoder.weight": torch.ones(9, 4),
        "query_tokens": torch.ones(1, 2, 4),
        "opt_proj.weight": torch.ones(8, 4),
        "visual_encoder.blocks.0.attn.qkv.weight": torch.ones(18, 6),
        "visual_encoder.blocks.0.attn.q_bias": torch.full((6,), 1.0),
        "visual_encoder.blocks.0.attn.v_bias": torch.full((6,), 3.0),
        "visual_encoder.blocks.0.norm1.weight": torch.ones(6),
        "ln_vision.weight": torch.ones(6),
        "temp": torch.tensor(0.07),
    }
    ours = lavis_to_ours(lavis)
    assert set(ours) == {
        "qformer.layernorm.weight",
        "qformer.encoder.layer.0.attention.attention.query.weight",
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "qformer.query_tokens",
        "bridge.llm_projection.weight",
        "visual_encoder.encoder.layers.0.self_attn.qkv.weight",
        "visual_encoder.encoder.layers.0.self_attn.qkv.bias",
        "visual_encoder.encoder.layers.0.layer_norm1.weight",
        "ln_vision.weight",
        "temp",
    }
    bias = ours["visual_encoder.encoder.layers.0.self_attn.qkv.bias"]
    assert bias.tolist() == [1.0] * 6 + [0.0] * 6 + [3.0] * 6  # q | zero k | v, as HF stores it
    assert hf_key_to_ours("vision_model.post_layernorm.weight") == "ln_vision.weight"


@pytest.mark.parametrize("which", ["hf_generation", "hf_retrieval"])
def test_export_model_of_an_imported_model_gives_back_the_same_weights(which, request):
    """export_model (the path of trained models) on the HF-layout tower: every HF weight comes back."""
    hf, root = request.getfixturevalue(which)[0], request.getfixturevalue(which)[-1]
    ours = load_imported(import_hf(root / "src", root / "ours3"))
    reloaded = type(hf).from_pretrained(export_model(ours, root / "back3")).eval()
    original, back = hf.state_dict(), reloaded.state_dict()
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
