"""The Querying Transformer (Q-Former): a BERT-base encoder with learned queries and cross-attention.

What is implemented (paper section 3.1, SPEC.md):
- One transformer over the sequence [queries (Q) ; text tokens (T)], queries first. Text tokens get
  word + position embeddings (positions count text only); queries get neither. The concatenation
  goes through `layernorm` + dropout (BERT's embedding LayerNorm).
- `num_hidden_layers` BERT layers. Self-attention spans queries and text under one of the masks of
  `masks.py` (`mask_kind`). Layers 0, f, 2f, ... (f = cross_attention_freq) add cross-attention from
  the QUERIES ONLY to the image features (`encoder_hidden_states`, width = vision width). Queries use
  their own FFN (`intermediate_query`/`output_query`), text uses BERT's FFN (`intermediate`/`output`).
- `query_tokens` (1, Q, D), init N(0, 0.02), live here so that their parameter count is the Q-Former's.
  `forward` still takes `query_embeds` explicitly (callers pass `qformer.expand_queries(B)`), which
  also lets VQA fine-tuning or interop pass other query embeddings.
- A BERT LM head (`cls.predictions`) whose decoder weight IS the word-embedding matrix (tied by
  construction with F.linear, so a state dict holds the matrix once).
- `attention_mask` is the TEXT padding mask (B, T_total), 1 = real token, covering cached text plus
  the new `input_ids`; queries are never padded. `encoder_attention_mask` (B, S) masks image tokens.
- KV cache for decoding: with `use_cache=True` the output carries a `KVCache` with every layer's
  self-attention keys/values. A later call passes only new `input_ids` (no `query_embeds`, no image:
  cross-attention only ever feeds the queries, whose keys/values are already cached). Rows of the new
  tokens are cut from the full mask of the whole sequence, so a cached causal decode equals a full
  causal forward.

State-dict names follow transformers' `Blip2QFormerModel` for every piece it has (`layernorm`,
`encoder.layer.{i}.attention.attention.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
`crossattention.*`, `intermediate`, `output`, `intermediate_query`, `output_query`), its
`Blip2TextEmbeddings` for `embeddings.{word,position}_embeddings`, and BERT/LAVIS for the LM head
(`cls.predictions.transform.{dense,LayerNorm}`, `cls.predictions.bias`) and `query_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2_core.config import QFormerConfig
from blip2_core.masks import MaskKind, cross_attention_mask, self_attention_mask


@dataclass
class KVCache:
    """Self-attention keys/values of every position seen so far, per layer: (B, H, L, Dh) each."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    num_queries: int
    num_text: int

    def select(self, index: torch.Tensor) -> KVCache:
        """Reorder/replicate the batch dimension (beam search)."""
        layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers]
        return KVCache(layers, self.num_queries, self.num_text)


@dataclass
class QFormerOutput:
    last_hidden_state: torch.Tensor  # (B, Q + T, D): the positions given in this call, queries first
    past_key_values: KVCache | None = None


@dataclass
class BertLoadReport:
    loaded: list[str] = field(default_factory=list)  # our parameter names filled from the checkpoint
    initialised: list[str] = field(default_factory=list)  # ours left at their fresh initialisation
    ignored: list[str] = field(default_factory=list)  # checkpoint keys with no Q-Former counterpart


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float):
    """(B, H, L, Dh) x (B, H, S, Dh) -> (B, H, L, Dh).

    mask: additive float (B, 1, L, S), 0 where attention is allowed and the dtype's minimum where it
    is blocked (on CPU, SDPA runs about 25% faster with it than with the boolean form).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean mask (True = may attend) -> additive float mask for `attend`."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.dropout = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, hidden, context=None, mask=None, past=None):
        source = hidden if context is None else context
        q = self.split_heads(self.query(hidden))  # (B, H, L, Dh)
        k, v = self.split_heads(self.key(source)), self.split_heads(self.value(source))  # (B, H, S, Dh)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(2), (k, v)  # (B, L, D)


class AddNorm(nn.Module):
    """Projection, dropout, residual, LayerNorm: BERT's `*Output` blocks (post-norm)."""

    def __init__(self, cfg: QFormerConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_width)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, hidden, context=None, mask=None, past=None):
        out, present = self.attention(hidden, context, mask, past)
        return self.output(out, hidden), present


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        self.has_cross_attention = index % cfg.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.intermediate_size)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, hidden, num_queries, mask, image, image_mask, past):
        hidden, present = self.attention(hidden, mask=mask, past=past)  # (B, Q + T, D)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        parts = []
        if num_queries:
            if self.has_cross_attention:
                if image is None:
                    raise ValueError("encoder_hidden_states is required when queries are given")
                queries, _ = self.crossattention(queries, context=image, mask=image_mask)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1]:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1), present


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D)


class PredictionTransform(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class LMPrediction(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class LMHead(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.predictions = LMPrediction(cfg)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden = self.predictions.transform(hidden)
        return F.linear(hidden, word_embeddings, self.predictions.bias)  # (B, T, V), tied decoder


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.encoder_hidden_size <= 0:
            raise ValueError(
                "QFormerConfig.encoder_hidden_size is unset: build the config through Blip2Config "
                "(or load_preset), which derives it from vision.width"
            )
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        self.embeddings = TextEmbeddings(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg)
        self.cls = LMHead(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation; query FFNs start as copies of the text FFNs."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=std)
        nn.init.zeros_(self.cls.predictions.bias)
        self.copy_text_ffn_to_queries()

    @torch.no_grad()
    def copy_text_ffn_to_queries(self) -> None:
        for layer in self.encoder.layer:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())

    def expand_queries(self, batch_size: int) -> torch.Tensor:
        return self.query_tokens.expand(batch_size, -1, -1)  # (B, Q, D)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) text outputs -> (B, T, V) next-token logits."""
        return self.cls(hidden, self.embeddings.word_embeddings.weight)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        mask_kind: MaskKind = "bidirectional",
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> QFormerOutput:
        past = past_key_values
        if past is not None and query_embeds is not None:
            raise ValueError("query_embeds must come in the first call: the cache already holds the queries")
        past_queries, past_text = (past.num_queries, past.num_text) if past else (0, 0)
        hidden = self._embed(input_ids, query_embeds, past_text)  # (B, Q + T, D)
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        total_queries = past_queries + num_queries
        total_text = past_text + (0 if input_ids is None else input_ids.shape[1])
        if attention_mask is not None and attention_mask.shape[1] != total_text:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions but the text has {total_text} "
                "(cached + new); it is the text padding mask only, queries are never padded"
            )
        mask = self_attention_mask(mask_kind, total_queries, attention_mask, num_text=total_text)
        mask = mask[:, :, past_queries + past_text :]  # rows of the positions given now: (B, 1, L, L_total)
        mask = additive_mask(mask, hidden.dtype)
        image_mask = additive_mask(cross_attention_mask(encoder_attention_mask), hidden.dtype)
        presents = []
        for i, layer in enumerate(self.encoder.layer):
            layer_past = past.layers[i] if past else None
            hidden, present = layer(hidden, num_queries, mask, encoder_hidden_states, image_mask, layer_past)
            presents.append(present)
        cache = KVCache(presents, total_queries, total_text) if use_cache else None
        return QFormerOutput(last_hidden_state=hidden, past_key_values=cache)

    def _embed(self, input_ids, query_embeds, text_start: int) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if input_ids is not None:
            parts.append(self.embeddings(input_ids, text_start))
        if not parts:
            raise ValueError("give input_ids, query_embeds or both")
        return self.dropout(self.layernorm(torch.cat(parts, dim=1)))


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_new":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"qformer.hidden_act {name!r} is not supported (gelu, gelu_new, relu)")


# ---------------------------------------------------------------------------------------------------
# Initialisation from a BERT checkpoint in the Hugging Face layout


def read_bert_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a HF BERT checkpoint: a folder with model.safetensors / pytorch_model.bin, or the file."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _bert_key_to_ours(key: str) -> str | None:
    """HF BERT name -> Q-Former name; None for keys the Q-Former has no use for."""
    key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
    key = key.replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(("pooler.", "cls.seq_relationship.")) or "position_ids" in key:
        return None
    if key in ("embeddings.token_type_embeddings.weight", "cls.predictions.decoder.weight"):
        return None  # folded into positions / tied to the word embeddings
    if key == "cls.predictions.decoder.bias":
        return None  # the same tensor as cls.predictions.bias in HF BERT
    if key.startswith("embeddings.LayerNorm."):
        return key.replace("embeddings.LayerNorm.", "layernorm.")
    return key.replace(".attention.self.", ".attention.attention.")


@torch.no_grad()
def load_bert_checkpoint(qformer: QFormer, path: str | Path) -> BertLoadReport:
    """Fill the Q-Former's BERT parts from a HF BERT checkpoint (BertModel or BertForMaskedLM layout).

    - Vocabulary rows are copied for the checkpoint's vocabulary; the extra [DEC] row keeps its init.
    - BERT's token-type embedding for type 0 (the only type BERT ever saw here) is added to every
      position embedding, which keeps the pretrained function exactly (the Q-Former has no types).
    - Query FFNs are copied from the loaded text FFNs; cross-attention and queries stay random.
    Raises on any checkpoint key it cannot place and on any shape mismatch, naming the key.
    """
    source = read_bert_state_dict(path)
    ours = qformer.state_dict()
    report = BertLoadReport()
    for key, tensor in source.items():
        target = _bert_key_to_ours(key)
        if target is None:
            report.ignored.append(key)
            continue
        if target not in ours:
            raise ValueError(f"{path}: checkpoint key {key!r} has no Q-Former counterpart ({target!r})")
        _copy_rows(ours[target], tensor, key, path)
        report.loaded.append(target)
    token_type = source.get("bert.embeddings.token_type_embeddings.weight")
    if token_type is None:
        token_type = source.get("embeddings.token_type_embeddings.weight")
    if token_type is not None:
        ours["embeddings.position_embeddings.weight"] += token_type[0]
    qformer.copy_text_ffn_to_queries()
    report.loaded += [k for k in ours if "_query." in k and k.replace("_query.", ".") in report.loaded]
    report.initialised = [k for k in ours if k not in report.loaded]
    return report


def _copy_rows(dest: torch.Tensor, src: torch.Tensor, key: str, path) -> None:
    vocab_sized = key.endswith(("word_embeddings.weight", "predictions.bias"))
    if vocab_sized and src.shape[0] <= dest.shape[0] and src.shape[1:] == dest.shape[1:]:
        dest[: src.shape[0]].copy_(src)  # rows beyond the checkpoint's vocabulary: added tokens ([DEC])
    elif src.shape == dest.shape:
        dest.copy_(src)
    else:
        raise ValueError(
            f"{path}: {key!r} has shape {tuple(src.shape)}, the Q-Former wants {tuple(dest.shape)}"
        )


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
