"""Each mask blocks exactly what the paper's Fig. 2 says, and padding only hides key columns."""

import pytest
import torch

from blip2_core.masks import cross_attention_mask, self_attention_mask

Q, T = 3, 4


def _allowed(kind: str, row: int, col: int) -> bool:
    row_query, col_query = row < Q, col < Q
    if kind == "bidirectional":
        return True
    if kind == "unimodal":
        return row_query == col_query
    return col_query if row_query else (col_query or col <= row)  # causal


@pytest.mark.parametrize("kind", ["bidirectional", "unimodal", "causal"])
def test_every_entry_follows_the_rule_and_padding_hides_columns(kind):
    padding = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    mask = self_attention_mask(kind, Q, padding)
    assert mask.shape == (2, 1, Q + T, Q + T) and mask.dtype == torch.bool
    for b in range(2):
        for row in range(Q + T):
            for col in range(Q + T):
                key_real = col < Q or bool(padding[b, col - Q])
                assert bool(mask[b, 0, row, col]) == (_allowed(kind, row, col) and key_real), (b, row, col)


def test_the_three_masks_differ_where_the_paper_says():
    causal, unimodal, bidi = (
        self_attention_mask(k, Q, None, num_text=T)[0, 0] for k in ("causal", "unimodal", "bidirectional")
    )
    assert bidi.all()
    assert not unimodal[:Q, Q:].any() and not unimodal[Q:, :Q].any()  # no cross-modal reading
    assert not causal[:Q, Q:].any() and causal[Q:, :Q].all()  # queries blind to text; text reads queries
    assert not causal[Q, Q + 1] and causal[Q + 1, Q]  # text cannot read later text
    assert (self_attention_mask("causal", Q, None, num_text=0) == True).all()  # noqa: E712 queries only


def test_no_row_is_ever_empty_with_padding():
    padding = torch.tensor([[1, 0, 0, 0]])
    for kind in ("bidirectional", "unimodal", "causal"):
        assert self_attention_mask(kind, Q, padding).any(dim=-1).all()


def test_unknown_kind_and_cross_mask():
    with pytest.raises(ValueError, match="mask_kind"):
        self_attention_mask("full", Q, None, num_text=T)
    image_mask = cross_attention_mask(torch.tensor([[1, 1, 0]]))
    assert image_mask.shape == (1, 1, 1, 3) and image_mask.tolist() == [[[[True, True, False]]]]
    assert cross_attention_mask(None) is None
