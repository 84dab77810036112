"""Tiny language models and tokenizers built offline and saved locally, for CPU tests.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a few sentences, and the models are
random OPT / T5 configs of hidden size 32 saved with `save_pretrained`, the same on-disk format as the
released checkpoints, so the code under test loads them through its one real loading path.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SENTENCES = [
    "a photo of a red square on a blue background",
    "a picture of two green circles next to a yellow triangle",
    "Question: what colour is the square? Answer: red",
    "Question: how many circles are there? Short answer: two",
    "the cat sits on the mat and the dog sleeps",
    "three small blue triangles above one large red circle",
]

# OPT's real layout: <s>=0, <pad>=1, </s>=2 (also its BOS), <unk>=3; it prepends "</s>" to every input.
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
# T5's real layout: <pad>=0 (also the decoder start), </s>=1, <unk>=2; it appends "</s>".
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def build_tokenizer(kind: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer laid out like OPT's (kind="opt") or T5's (kind="t5")."""
    specials = {"opt": OPT_SPECIALS, "t5": T5_SPECIALS}[kind]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    if kind == "opt":
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_opt_config(vocab_size: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
    )


def tiny_t5_config(vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=0,  # transformers 5 needs it for generate; T5 starts decoding from <pad>
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


def save_tiny_llm(kind: str, dst_dir: str | Path, seed: int = 0) -> Path:
    """Build a random tiny OPT (kind="opt") or T5 (kind="t5") with its tokenizer and save both to dst_dir."""
    dst = Path(dst_dir)
    tokenizer = build_tokenizer(kind)
    torch.manual_seed(seed)
    if kind == "opt":
        model = OPTForCausalLM(tiny_opt_config(len(tokenizer)))
    else:
        model = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer)))
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst
