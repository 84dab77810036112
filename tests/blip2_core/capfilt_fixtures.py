"""Tiny CapFilt models built offline: a random BLIP captioner, a random open_clip ranker, test shards.

Nothing here touches the network. Shapes are chosen by a `CaptionerShape` / `RankerShape`, so the same
builders serve the unit tests (`TINY_*`), the CPU benchmark (`MID_*`) and the GPU benchmark
(`BLIP_LARGE_CAPTIONER`, ViT-L/14-shaped ranker through transformers' CLIPModel).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

# The words the tests rig the ranker with; every one is a whole token of the trained vocabulary.
COLOURS = ("red", "green", "blue")
COLOUR_RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}

SENTENCES = (
    "a picture of a red square on a white background",
    "a picture of a green circle next to a tall tree",
    "a picture of a blue car parked in the street",
    "a dog runs across the grass with a ball",
    "two people are sitting at a table with food",
    "a small boat on the water under a cloudy sky",
    "a cat is sleeping on a couch in the living room",
    "a man riding a bicycle down the road",
)

# BLIP's tokenizer is BERT's plus a [DEC] token that the captioner uses as BOS.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


@dataclass(frozen=True)
class CaptionerShape:
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    vocab_size: int | None  # None: just the trained vocabulary; else padded with filler tokens


@dataclass(frozen=True)
class RankerShape:
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    text_heads: int


TINY_CAPTIONER = CaptionerShape(32, 8, 32, 2, 4, 32, 2, 4, None)
TINY_RANKER = RankerShape(16, 32, 8, 32, 2, 32, 2, 4)
# Mid-size: a quarter of BLIP-large's widths, the real vocabulary size, so the LM head costs what it does.
MID_CAPTIONER = CaptionerShape(224, 16, 256, 6, 8, 256, 4, 8, 30524)
MID_RANKER = RankerShape(256, 224, 16, 256, 6, 256, 4, 8)
BLIP_LARGE_CAPTIONER = CaptionerShape(384, 16, 1024, 24, 16, 768, 12, 12, 30524)


def build_blip_tokenizer(vocab_size: int | None = None) -> BertTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on `SENTENCES`, with BLIP's [DEC] BOS token."""
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizers.BertNormalizer(lowercase=True)
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(special_tokens=list(SPECIAL_TOKENS)))
    vocab = trained.get_vocab()
    # Filler tokens make the vocabulary as large as the model's, so every sampled id decodes.
    for i in range((vocab_size or 0) - len(vocab)):
        vocab[f"zz{i}"] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = trained.normalizer
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )


def blip_config(shape: CaptionerShape, tokenizer: BertTokenizerFast) -> BlipConfig:
    vision = {
        "hidden_size": shape.vision_width,
        "intermediate_size": 4 * shape.vision_width,
        "num_hidden_layers": shape.vision_layers,
        "num_attention_heads": shape.vision_heads,
        "image_size": shape.image_size,
        "patch_size": shape.patch_size,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": shape.text_width,
        "intermediate_size": 4 * shape.text_width,
        "num_hidden_layers": shape.text_layers,
        "num_attention_heads": shape.text_heads,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    return BlipConfig(text_config=text, vision_config=vision)


def build_captioner(
    shape: CaptionerShape, seed: int = 0
) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    tokenizer = build_blip_tokenizer(shape.vocab_size)
    size = {"height": shape.image_size, "width": shape.image_size}
    processor = BlipProcessor(image_processor=BlipImageProcessor(size=size), tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(blip_config(shape, tokenizer)).eval()
    return model, processor


def save_captioner(out_dir: Path, shape: CaptionerShape = TINY_CAPTIONER, seed: int = 0) -> Path:
    """Save a random BLIP captioner + processor in save_pretrained format, like a local hub copy."""
    model, processor = build_captioner(shape, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def open_clip_model_config(shape: RankerShape) -> dict:
    """An open_clip model config; the text vocabulary is the packaged CLIP BPE (49408 entries)."""
    return {
        "embed_dim": shape.embed_dim,
        "vision_cfg": {
            "image_size": shape.image_size,
            "layers": shape.vision_layers,
            "width": shape.vision_width,
            "patch_size": shape.patch_size,
            "head_width": shape.vision_width // shape.text_heads,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": shape.text_width,
            "heads": shape.text_heads,
            "layers": shape.text_layers,
        },
    }


def save_ranker(
    out_dir: Path, shape: RankerShape = TINY_RANKER, name: str = "capfilt-tiny-clip", seed: int = 0
) -> tuple[Path, Path]:
    """Write `<name>.json` (an open_clip model config) and random weights as safetensors.

    Returns (config path, weights path). The model name open_clip registers is the config's stem.
    """
    import open_clip
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / f"{name}.json"
    config_path.write_text(json.dumps(open_clip_model_config(shape), indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights_path = out_dir / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights_path)
    return config_path, weights_path


def solid_image(colour: str, size: int = 48) -> Image.Image:
    """A plain image of one of `COLOURS`, with a little gradient so JPEG has something to encode."""
    image = Image.new("RGB", (size, size), COLOUR_RGB[colour])
    for x in range(size):
        image.putpixel((x, 0), (x * 5 % 256, 0, 0))
    return image


def noise_image(seed: int, size: int = 64) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shard(tar_path: Path, samples: list[tuple[str, bytes | None, str]]) -> Path:
    """Write a WebDataset tar in img2dataset's layout: <key>.jpg, <key>.txt, <key>.json per sample.

    `None` image bytes leave the .jpg out, as a sample whose image went missing.
    """
    with tarfile.open(tar_path, "w") as tar:
        for key, image, caption in samples:
            meta = json.dumps({"key": key, "caption": caption, "status": "success"}).encode()
            members = [(f"{key}.txt", caption.encode()), (f"{key}.json", meta)]
            if image is not None:
                members.insert(0, (f"{key}.jpg", image))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return tar_path
