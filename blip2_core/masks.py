"""The three Q-Former self-attention masks of BLIP-2 (paper Fig. 2), in one place.

The sequence is `num_queries` learned queries followed by T text tokens. A mask entry True means
"this row (the attending position) may read this column". Padding only removes columns (keys), never
rows, so no row is ever empty while at least one key is visible (SDPA would return NaN for it).

- bidirectional (ITM):     everything sees everything.
- unimodal (ITC):          queries see only queries; text sees only text.
- causal (ITG, multimodal causal): queries see only queries; text token t sees all queries and the
                           text tokens 0..t.
"""

from __future__ import annotations

from typing import Literal

import torch

MaskKind = Literal["bidirectional", "unimodal", "causal"]
MASK_KINDS: tuple[str, ...] = ("bidirectional", "unimodal", "causal")


def self_attention_mask(
    kind: MaskKind,
    num_queries: int,
    text_padding_mask: torch.Tensor | None,
    num_text: int | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, L, L) with L = num_queries + T; True = may attend.

    text_padding_mask: (B, T), 1/True for real text tokens; None means no text padding (then give
    `num_text`, or nothing for a queries-only sequence).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {kind!r}")
    if text_padding_mask is not None:
        batch, num_text = text_padding_mask.shape
        device = text_padding_mask.device
        text_valid = text_padding_mask.bool()
    else:
        batch, num_text, device = 1, num_text or 0, None
        text_valid = torch.ones(1, num_text, dtype=torch.bool)
    length = num_queries + num_text
    is_query = torch.arange(length, device=device) < num_queries  # (L,)
    if kind == "bidirectional":
        layout = torch.ones(length, length, dtype=torch.bool, device=device)
    elif kind == "unimodal":
        layout = is_query[:, None] == is_query[None, :]  # same modality only
    else:
        text_causal = torch.ones(length, length, device=device).tril().bool()
        # Query rows read query columns; text rows read queries and earlier-or-equal text.
        layout = torch.where(is_query[:, None], is_query[None, :], is_query[None, :] | text_causal)
    key_valid = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_valid], 1)
    return (layout[None, :, :] & key_valid[:, None, :]).unsqueeze(1)  # (B, 1, L, L)


def cross_attention_mask(encoder_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1 = real image token  ->  boolean (B, 1, 1, S) for SDPA; None stays None."""
    if encoder_attention_mask is None:
        return None
    return encoder_attention_mask.bool()[:, None, None, :]
