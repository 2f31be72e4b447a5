"""One home for padding rows of token ids (moewm.engine.padding): the pad id rule and left / right padded batches."""

from types import SimpleNamespace

import pytest
import torch

from moewm.engine.padding import pad_id, pad_rows


def test_pad_id_is_the_pad_token_else_eos_else_zero():
    assert pad_id(SimpleNamespace(pad_token_id=5, eos_token_id=7)) == 5
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0  # id 0 is a real pad id, not "missing"


def test_pad_id_of_the_byte_tokenizer_is_its_pad_token(tokenizer):
    assert pad_id(tokenizer) == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_right_padding_puts_each_row_at_the_start():
    ids, mask = pad_rows([[1, 2, 3], [4], []], pad=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_padding_puts_each_row_at_the_end():
    ids, mask = pad_rows([[1, 2, 3], (4,), torch.tensor([5, 6])], pad=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_no_rows_or_only_empty_rows_give_zero_width():
    assert pad_rows([], pad=0)[0].shape == (0, 0)
    ids, mask = pad_rows([[], []], pad=3, side="left")
    assert ids.shape == mask.shape == (2, 0)


def test_an_unknown_side_is_refused():
    with pytest.raises(ValueError, match="side"):
        pad_rows([[1]], pad=0, side="middle")  # type: ignore[arg-type]
