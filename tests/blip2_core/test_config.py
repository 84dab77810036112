"""Presets load strictly, derive their fields in one place and carry the paper's numbers."""

import json

import pytest

from blip2_core.config import Blip2Config, config_from_dict, config_to_dict, load_preset, preset_names

PAPER = [
    "paper-vitl-opt2.7b",
    "paper-vitg-opt2.7b",
    "paper-vitg-opt6.7b",
    "paper-vitl-flant5xl",
    "paper-vitg-flant5xl",
    "paper-vitg-flant5xxl",
]


def test_every_preset_is_shipped_and_loads():
    assert set(PAPER + ["tiny"]) <= set(preset_names())
    for name in preset_names():
        cfg = load_preset(name)
        assert cfg.name == name
        assert cfg.qformer.encoder_hidden_size == cfg.vision.width
        assert cfg.language_projection_dim == cfg.llm.hidden_size


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_follow_the_spec(name):
    cfg = load_preset(name)
    vit_g = "vitg" in name
    assert cfg.vision.model_name == ("EVA01-g-14" if vit_g else "ViT-L-14")
    assert cfg.qformer.encoder_hidden_size == (1408 if vit_g else 1024)
    assert cfg.vision.drop_last_block and cfg.vision.freeze
    assert cfg.vision.precision == "fp16"
    assert cfg.llm.precision == ("bf16" if "flant5" in name else "fp16")
    q = cfg.qformer
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads) == (768, 12, 12)
    assert (q.vocab_size, q.num_query_tokens, q.cross_attention_freq, q.embed_dim) == (30523, 32, 2, 256)
    assert q.max_text_len == 32
    for stage in (cfg.stage1, cfg.stage2):
        assert (stage.beta1, stage.beta2, stage.weight_decay, stage.lr) == (0.9, 0.98, 0.05, 1e-4)
        assert stage.warmup_steps == 2000
    assert cfg.stage1.batch_size == (1680 if vit_g else 2320)
    assert cfg.stage2.batch_size == (1520 if "flant5" in name else 1920)
    assert (cfg.stage1.steps, cfg.stage2.steps, cfg.stage2.min_lr) == (250_000, 80_000, 5e-5)


def test_llm_dims_of_the_paper_presets():
    dims = {
        n: (c.llm.kind, c.llm.hidden_size, c.llm.num_layers, c.llm.num_heads, c.llm.ffn_dim, c.llm.vocab_size)
        for n in PAPER
        for c in [load_preset(n)]
    }
    assert dims["paper-vitg-opt2.7b"] == ("opt", 2560, 32, 32, 10240, 50272)
    assert dims["paper-vitg-opt6.7b"] == ("opt", 4096, 32, 32, 16384, 50272)
    assert dims["paper-vitg-flant5xl"] == ("t5", 2048, 24, 32, 5120, 32128)
    assert dims["paper-vitg-flant5xxl"] == ("t5", 4096, 24, 64, 10240, 32128)
    t5 = load_preset("paper-vitg-flant5xxl").llm
    assert (t5.num_decoder_layers, t5.d_kv) == (24, 64)


def _write(tmp_path, data):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(data))
    return path


def test_unknown_keys_are_rejected_with_key_and_file(tmp_path):
    data = config_to_dict(load_preset("tiny"))
    data["qformer"]["num_querys"] = 4
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"custom\.json.*qformer\.num_querys"):
        load_preset(path)
    data = config_to_dict(load_preset("tiny"))
    data["visoin"] = {}
    with pytest.raises(ValueError, match="visoin"):
        load_preset(_write(tmp_path, data))


def test_derived_fields_cannot_be_set_and_types_are_checked(tmp_path):
    data = config_to_dict(load_preset("tiny"))
    data["qformer"]["encoder_hidden_size"] = 99
    with pytest.raises(ValueError, match="encoder_hidden_size.*derived"):
        load_preset(_write(tmp_path, data))
    data = config_to_dict(load_preset("tiny"))
    data["qformer"]["num_query_tokens"] = "8"
    with pytest.raises(TypeError, match="qformer.num_query_tokens"):
        load_preset(_write(tmp_path, data))


def test_invalid_values_and_unknown_names_are_explained():
    data = config_to_dict(load_preset("tiny"))
    data["llm"]["kind"] = "gpt"
    with pytest.raises(ValueError, match="llm.kind"):
        config_from_dict(data)
    with pytest.raises(ValueError, match="unknown preset 'tinny'.*tiny"):
        load_preset("tinny")


def test_round_trip_and_derivation_follow_the_vision_width():
    cfg = load_preset("paper-vitl-opt2.7b")
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg
    data = config_to_dict(cfg)
    data["vision"]["width"] = 1408
    assert config_from_dict(data).qformer.encoder_hidden_size == 1408
    assert Blip2Config().qformer.encoder_hidden_size == Blip2Config().vision.width
