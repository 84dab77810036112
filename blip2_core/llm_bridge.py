"""The stage-2 bridge: Q-Former query outputs -> one linear layer -> soft visual prompt for a frozen LLM.

Two LLM families (SPEC.md, stage 2):
- decoder-only (OPT, or any causal LM that accepts `inputs_embeds`): [queries | BOS prompt caption EOS],
  language-modelling loss on the caption only. OPT's EOS is "\\n".
- encoder-decoder (T5 / FlanT5): prefix language modelling. The caption is split at a point drawn uniformly
  per sample; [queries | prefix] go into the encoder and the suffix is the decoder's target. With an explicit
  prompt (instructed generation, VQA) the prompt goes into the encoder and the whole caption is the target.

The LLM is frozen here (weights never move, dropout never on) and loads from a local directory in exactly
one place, `load_llm`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)

from blip2_core.config import LLMConfig

IGNORE_INDEX = -100  # label value that cross-entropy skips: query slots, padding, prompt tokens

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"llm_dtype: unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_llm(
    path: str | Path, dtype: str | torch.dtype = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen LLM and its tokenizer from a local `save_pretrained` directory (never the network)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"llm_path: {path} has no config.json (expected a save_pretrained directory)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    llm = auto.from_pretrained(path, local_files_only=True, dtype=resolve_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return freeze(llm), tokenizer


def llm_from_config(config: PretrainedConfig, dtype: str | torch.dtype = "float32") -> PreTrainedModel:
    """A randomly initialised LLM from a config alone (parameter counts on `meta`, GPU benchmarks)."""
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return freeze(auto.from_config(config, dtype=resolve_dtype(dtype)))


def hf_llm_config(cfg: LLMConfig) -> PretrainedConfig:
    """The transformers config of the LLM a preset names, from its dimensions alone (no weights, no hub)."""
    if cfg.kind == "opt":
        return OPTConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            word_embed_proj_dim=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    if cfg.kind == "t5":
        return T5Config(  # FlanT5 (T5 v1.1): gated-GELU FFN, untied output embedding
            vocab_size=cfg.vocab_size,
            d_model=cfg.hidden_size,
            d_kv=cfg.d_kv,
            d_ff=cfg.ffn_dim,
            num_layers=cfg.num_layers,
            num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
            num_heads=cfg.num_heads,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=0,
            decoder_start_token_id=0,
        )
    raise ValueError(f"llm.kind: unknown LLM kind {cfg.kind!r}; expected 'opt' or 't5'")


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


# ---------------------------------------------------------------------------------------------------------
# Text side: token ids and labels for each objective


@dataclass
class TextInputs:
    """Token ids for one LLM forward. Decoder: `input_ids` is the whole text and `labels` aligns with it.
    Encoder-decoder: `input_ids` goes to the encoder and `labels` is the decoder target."""

    input_ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) or (B, S) long, IGNORE_INDEX where no loss


def pad_right(rows: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to (B, T_max); returns (ids, mask)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def decoder_text_inputs(
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    prompts: list[str] | None,
    eos_text: str,
    max_text_len: int,
) -> TextInputs:
    """[BOS] prompt caption EOS, with labels only on caption and EOS (prompt and BOS are context)."""
    prompts = prompts or [""] * len(captions)
    ids, prompt_lens = [], []
    for prompt, caption in zip(prompts, captions, strict=True):
        # Tokenise the whole string once (BPE merges across the prompt/caption seam as at inference) and
        # count the prompt's own tokens, the way the reference code does.
        prompt_ids = tokenizer(prompt).input_ids
        ids.append(tokenizer(prompt + caption + eos_text).input_ids[: len(prompt_ids) + max_text_len])
        prompt_lens.append(len(prompt_ids))
    input_ids, attention_mask = pad_right(ids, tokenizer.pad_token_id)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = IGNORE_INDEX
    return TextInputs(input_ids, attention_mask, labels)


def split_point(num_tokens: int, generator: torch.Generator) -> int:
    """Uniform split so that prefix and suffix are both non-empty when the caption has >= 2 tokens."""
    if num_tokens < 2:
        return 0
    return int(torch.randint(1, num_tokens, (1,), generator=generator).item())


def prefix_lm_text_inputs(
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    prompts: list[str] | None,
    max_text_len: int,
    generator: torch.Generator,
) -> TextInputs:
    """Encoder input and decoder target for an encoder-decoder LLM.

    Without prompts (pretraining): caption tokens split at a uniform point; prefix -> encoder, suffix + EOS
    -> target. With prompts: prompt -> encoder, whole caption + EOS -> target.
    """
    eos = [tokenizer.eos_token_id]
    encoder_rows, target_rows = [], []
    for i, caption in enumerate(captions):
        tokens = tokenizer(caption, add_special_tokens=False).input_ids[:max_text_len]
        if prompts is None:
            k = split_point(len(tokens), generator)
            encoder_rows.append(tokens[:k] + eos)
            target_rows.append(tokens[k:] + eos)
        else:
            encoder_rows.append(tokenizer(prompts[i]).input_ids)
            target_rows.append(tokens + eos)
    input_ids, attention_mask = pad_right(encoder_rows, tokenizer.pad_token_id)
    targets, target_mask = pad_right(target_rows, tokenizer.pad_token_id)
    return TextInputs(input_ids, attention_mask, targets.masked_fill(target_mask == 0, IGNORE_INDEX))


# ---------------------------------------------------------------------------------------------------------
# Objectives


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss. logits (B, L, V) at every position, labels (B, L) aligned with the inputs."""
    shifted = logits[:, :-1].float()  # position t predicts token t + 1
    return F.cross_entropy(shifted.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def prefix_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Decoder target loss of an encoder-decoder LLM. logits (B, S, V) already aligned with labels (B, S)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class BridgeOutput:
    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # decoder: (B, Q + T, V); encoder-decoder: (B, S, V)
    labels: torch.Tensor  # decoder: (B, Q + T); encoder-decoder: (B, S)


class LLMBridge(nn.Module):
    """Projection of the query outputs plus the frozen LLM; owns the LLM's tokenizer."""

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        qformer_hidden: int,
        max_text_len: int = 32,
        eos_text: str = "\n",
        split_seed: int = 0,
    ):
        super().__init__()
        self.llm = freeze(llm)
        self.tokenizer = tokenizer
        self.is_encoder_decoder = bool(llm.config.is_encoder_decoder)
        self.llm_projection = nn.Linear(qformer_hidden, llm.get_input_embeddings().embedding_dim)
        self.max_text_len = max_text_len
        self.eos_text = eos_text
        self.eos_token_id = self._eos_token_id()
        self.split_generator = torch.Generator().manual_seed(split_seed)

    def _eos_token_id(self) -> int:
        if self.is_encoder_decoder:
            return self.tokenizer.eos_token_id
        ids = self.tokenizer(self.eos_text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"eos_text: {self.eos_text!r} must be exactly one token, got ids {ids}")
        return ids[0]

    def train(self, mode: bool = True) -> "LLMBridge":
        super().train(mode)
        self.llm.eval()  # frozen: dropout stays off whatever the caller's mode
        return self

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def project(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, Q, H_qformer) -> (B, Q, D_llm) soft visual prompt in the LLM's dtype."""
        return self.llm_projection(query_output.to(self.llm_projection.weight.dtype)).to(self.llm_dtype)

    def embed_with_queries(
        self, visual_prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the visual prompt (B, Q, D) to text embeddings: (B, Q + T, D) and mask (B, Q + T)."""
        text_embeds = self.llm.get_input_embeddings()(input_ids.to(visual_prompt.device))
        query_mask = torch.ones(
            visual_prompt.shape[:2], dtype=attention_mask.dtype, device=visual_prompt.device
        )
        mask = torch.cat([query_mask, attention_mask.to(visual_prompt.device)], dim=1)
        return torch.cat([visual_prompt, text_embeds], dim=1), mask

    def text_inputs(self, captions: list[str], prompts: list[str] | None = None) -> TextInputs:
        if self.is_encoder_decoder:
            return prefix_lm_text_inputs(
                self.tokenizer, captions, prompts, self.max_text_len, self.split_generator
            )
        return decoder_text_inputs(self.tokenizer, captions, prompts, self.eos_text, self.max_text_len)

    def forward(
        self, query_output: torch.Tensor, captions: list[str], prompts: list[str] | None = None
    ) -> BridgeOutput:
        """query_output (B, Q, H) from the Q-Former; captions and optional prompts, B strings each."""
        visual_prompt = self.project(query_output)
        text = self.text_inputs(captions, prompts)
        embeds, mask = self.embed_with_queries(visual_prompt, text.input_ids, text.attention_mask)
        labels = text.labels.to(embeds.device)
        if self.is_encoder_decoder:
            decoder_input_ids = self.llm._shift_right(labels)
            logits = self.llm(
                inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids
            ).logits
            return BridgeOutput(prefix_lm_loss(logits, labels), logits, labels)
        query_labels = torch.full(
            visual_prompt.shape[:2], IGNORE_INDEX, dtype=torch.long, device=embeds.device
        )
        labels = torch.cat([query_labels, labels], dim=1)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        return BridgeOutput(lm_loss(logits, labels), logits, labels)
