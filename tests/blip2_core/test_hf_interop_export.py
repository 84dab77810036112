"""Export of models trained here to transformers: a tiny stage-2 / stage-1 model with a tiny EVA image tower
(EVA01-g-14's architecture at width 32, registered with timm and open_clip here), saved as a training
checkpoint + run config, exported with `export_hf`, loaded with transformers' from_pretrained, must give our
LM logits / ITM scores / ITC similarities (fp32, <= 1e-5). Towers HF cannot represent are refused by name."""

import dataclasses
import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.eva import _create_eva
from tiny_models import build_tokenizer, tiny_opt_config
from transformers import (
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    OPTForCausalLM,
)

from blip2_core.checkpoints import trainable_state
from blip2_core.config import VisionConfig, config_to_dict, load_preset
from blip2_core.hf_interop import (
    RUN_CONFIG_FILE,
    ExportError,
    eva_vision_to_hf,
    export_hf,
    export_model,
    image_token_id,
)
from blip2_core.stage1 import Blip2Stage1
from blip2_core.stage2 import Blip2Stage2
from blip2_core.vision import VisionEncoder, create_clip

torch.set_num_threads(1)
TOWER = "blip2-test-eva-tiny"  # open_clip name; its timm trunk is TIMM_EVA
TIMM_EVA = "blip2_test_eva_tiny"
TIMM_EVA02 = "blip2_test_eva02_tiny"
IMAGE, PATCH, WIDTH, BLOCKS = 28, 7, 32, 3  # 3 blocks: the last is dropped, HF gets 2
CAPTIONS = ["a photo of a cat", "two green circles next to a yellow triangle"]


def blip2_test_eva_tiny(pretrained=False, **kwargs):
    """EVA01-g-14's trunk (eva_giant_patch14_224's architecture) at toy size."""
    args = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=BLOCKS, num_heads=4, mlp_ratio=2.5)
    return _create_eva(TIMM_EVA, pretrained=pretrained, **dict(args, **kwargs))


def blip2_test_eva02_tiny(pretrained=False, **kwargs):
    """An EVA02-style trunk: rope, layer scale and SwiGLU, none of which HF's Blip2VisionModel has."""
    args = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=BLOCKS, num_heads=4, mlp_ratio=2.0)
    args |= dict(use_rot_pos_emb=True, init_values=0.1, swiglu_mlp=True)
    return _create_eva(TIMM_EVA02, pretrained=pretrained, **dict(args, **kwargs))


@pytest.fixture(scope="module", autouse=True)
def tiny_towers(tmp_path_factory):
    """Register the tiny EVA trunks with timm and their CLIP configs with open_clip."""
    root = tmp_path_factory.mktemp("open_clip_configs")
    for fn in (blip2_test_eva_tiny, blip2_test_eva02_tiny):
        if fn.__name__ not in timm.list_models():
            register_model(fn)
        name = fn.__name__.replace("_", "-")
        vision = dict(image_size=IMAGE, timm_model_name=fn.__name__, timm_model_pretrained=False)
        vision |= dict(timm_pool="token", timm_proj=None)
        text = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
        config = dict(embed_dim=16, vision_cfg=vision, text_cfg=text, custom_text=True)
        (root / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(root / f"{name}.json")


def perturb(module, seed):
    """Random inits leave biases/LayerNorms at 0/1 and EVA's q/v biases at 0: perturb everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Frozen assets of a run: EVA tower weights (open_clip format) and a tiny OPT with spare vocab rows."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    visual = perturb(create_clip(TOWER).visual, seed=1)
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(root / "tower.safetensors"))
    tokenizer = build_tokenizer("opt")
    torch.manual_seed(0)
    llm = OPTForCausalLM(
        tiny_opt_config(len(tokenizer) + 8)
    )  # OPT-2.7B too has rows the tokenizer never uses
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root


def run_config(run):
    cfg = load_preset("tiny")
    vision = VisionConfig(
        model_name=TOWER, pretrained=str(run / "tower.safetensors"), width=WIDTH, image_size=IMAGE
    )  # precision fp16 as the paper presets: the frozen tower's weights are upcast on export
    qformer = dataclasses.replace(cfg.qformer, num_hidden_layers=2, num_query_tokens=4, vocab_size=120)
    qformer = dataclasses.replace(qformer, dec_token_id=119, hidden_size=32)
    llm = dataclasses.replace(cfg.llm, name=str(run / "llm"), hidden_size=32)
    return dataclasses.replace(cfg, vision=vision, qformer=qformer, llm=llm)


def save_checkpoint(model, run, name):
    """What training leaves: <run>/blip2_config.json and <run>/checkpoints/step-*/model.safetensors."""
    folder = run / name / "checkpoints" / "step-000010"
    folder.mkdir(parents=True)
    (run / name / RUN_CONFIG_FILE).write_text(json.dumps(config_to_dict(model.cfg)))
    save_file(trainable_state(model), str(folder / "model.safetensors"))
    return folder


def test_stage2_export_loads_in_transformers_with_the_same_lm_logits(run):
    torch.manual_seed(0)
    ours = Blip2Stage2(run_config(run))
    perturb(ours.ln_vision, 2), perturb(ours.qformer, 3), perturb(ours.bridge.llm_projection, 4)
    ours.visual_encoder.to(torch.float32)  # compare in fp32: the export holds the exact upcast weights
    ours.eval()
    dst = export_hf(save_checkpoint(ours, run, "stage2"), run / "stage2-hf")
    hf = Blip2ForConditionalGeneration.from_pretrained(dst).eval()
    assert hf.config.vision_config.num_hidden_layers == BLOCKS - 1
    tokenizer = AutoTokenizer.from_pretrained(dst)  # "<image>" added where the query slots go
    assert tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_id

    images = torch.randn(2, 3, IMAGE, IMAGE)
    text = ours.bridge.text_inputs(CAPTIONS)  # [BOS caption EOS] ids as our forward builds them
    image_ids = torch.full((2, 4), hf.config.image_token_id)
    with torch.no_grad():
        got = ours({"images": images, "captions": CAPTIONS}).logits  # (B, Q + T, V)
        expected = hf(
            pixel_values=images,
            input_ids=torch.cat([image_ids, text.input_ids], 1),
            attention_mask=torch.cat([torch.ones_like(image_ids), text.attention_mask], 1),
        ).logits
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    print(f"stage-2 export: LM logits max abs diff vs transformers {diff:.3e}")
    assert diff <= 1e-5


def test_stage2_export_is_bit_exact_when_ln_vision_shares_the_towers_eps(run):
    """HF has one layer_norm_eps for the blocks and post_layernorm; our ln_vision uses torch's 1e-5, EVA 1e-6.
    That eps is the export's only approximation: with equal eps the logits are identical."""
    torch.manual_seed(0)
    ours = Blip2Stage2(run_config(run))
    perturb(ours.ln_vision, 2), perturb(ours.qformer, 3), perturb(ours.bridge.llm_projection, 4)
    ours.ln_vision.eps = 1e-6
    ours.visual_encoder.to(torch.float32)
    hf = Blip2ForConditionalGeneration.from_pretrained(export_model(ours.eval(), run / "stage2-eps")).eval()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.equal(
            ours.query_output(images), hf.get_image_features(images, return_dict=True).qformer_outputs[0]
        )


def test_stage1_export_loads_in_transformers_with_the_same_itm_and_itc(run):
    torch.manual_seed(0)
    ours = Blip2Stage1(run_config(run))
    for i, part in enumerate([ours.ln_vision, ours.qformer, ours.vision_projection, ours.text_projection]):
        perturb(part, 10 + i)
    perturb(ours.itm_head, 20)
    ours.visual_encoder.to(torch.float32)
    ours.eval()
    dst = export_hf(save_checkpoint(ours, run, "stage1"), run / "stage1-hf")
    hf = Blip2ForImageTextRetrieval.from_pretrained(dst).eval()

    images = torch.randn(3, 3, IMAGE, IMAGE)
    ids = torch.randint(5, 120, (3, 7))
    ids[:, 0] = 101 % 120
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        itm_expected = hf(
            pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True
        ).logits_per_image  # (B, 2)
        itc_expected = hf(
            pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False
        ).logits_per_image  # (B_img, B_txt) max over queries of the cosine
        itm_got = ours.itm_logits(ours.encode_image(images), ids, mask)
        image_feats = ours.image_features(images).image_feats  # (B, Q, E)
        text_feat = ours.text_features(ids, mask).text_feat  # (B, E)
        itc_got = torch.einsum("iqe,te->itq", image_feats, text_feat).max(dim=-1).values
    itm_diff = (itm_got - itm_expected).abs().max().item()
    itc_diff = (itc_got - itc_expected).abs().max().item()
    print(f"stage-1 export: ITM max abs diff {itm_diff:.3e}, ITC {itc_diff:.3e}")
    assert itm_diff <= 1e-5 and itc_diff <= 1e-5


def test_open_clip_tower_with_ln_pre_is_refused_by_name():
    model = Blip2Stage1(load_preset("tiny"))  # the blip2-tiny-clip tower, OpenAI-CLIP style like ViT-L-14
    with pytest.raises(ExportError, match="ln_pre") as err:
        export_model(model, "/nonexistent/never-written")
    assert "paper-vitg-opt2.7b" in str(err.value) and "paper-vitl-opt2.7b" not in str(err.value)


def test_eva02_style_tower_is_refused_naming_each_missing_part(run):
    encoder = VisionEncoder(VisionConfig(model_name="blip2-test-eva02-tiny", width=WIDTH, image_size=IMAGE))
    with pytest.raises(ExportError) as err:
        eva_vision_to_hf(encoder, torch.nn.LayerNorm(WIDTH))
    for part in ("rope", "layer scale", "GluMlp"):
        assert part in str(err.value)


def test_llm_without_a_spare_embedding_row_for_the_image_token_is_refused():
    tokenizer = build_tokenizer("opt")
    llm = OPTForCausalLM(tiny_opt_config(len(tokenizer)))
    with pytest.raises(ExportError, match="no spare row"):
        image_token_id(llm, tokenizer)
    assert image_token_id(OPTForCausalLM(tiny_opt_config(len(tokenizer) + 1)), tokenizer) == len(tokenizer)


def test_stage2_with_text_into_the_qformer_is_refused(run):
    model = Blip2Stage2(run_config(run), qformer_text_input=True)  # VQA fine-tuning's question input
    with pytest.raises(ExportError, match="qformer_text_input"):
        export_model(model, run / "never-written")
    assert not (run / "never-written").exists()
