"""KVSelection: validation errors name the field; dense conversions agree with the definition."""

import pytest
import torch

from attnkit.core.contract import AttnkitError
from attnkit.core.selection import KVSelection


def test_to_dense_mask_definition_and_head_mapping() -> None:
    # Hsel = Hkv = 2 with Hq = 4: query heads 0, 1 use row 0; 2, 3 use row 1
    idx = torch.tensor([[[[0, -1]], [[1, 0]]]], dtype=torch.int32)  # [1, 2, 1, 2]
    sel = KVSelection(idx, q_block=4, k_block=2)
    m = sel.to_dense_mask(hq=4, hkv=2, tq=3, tk=4)
    assert m.shape == (1, 4, 3, 4)
    assert m[0, 0, 0].tolist() == [True, True, False, False]
    assert torch.equal(m[0, 0], m[0, 1])
    assert m[0, 3, 2].tolist() == [True, True, True, True]


def test_from_dense_blocks_roundtrip() -> None:
    blocks = torch.rand(2, 3, 4, 5) < 0.5
    sel = KVSelection.from_dense_blocks(blocks, 2, 3)
    assert torch.equal(sel.to_dense_blocks(5), blocks)
    sel.validate(2, 3, 3, 8, 15)


@pytest.mark.parametrize(
    "sel, match",
    [
        (KVSelection(torch.zeros(1, 1, 4), 1, 1), r"selection\.indices: expected an int tensor \[B, Hsel, Nq, S\]"),
        (KVSelection(torch.zeros(1, 1, 4, 1), 1, 1), r"selection\.indices: expected dtype int32"),
        (KVSelection(torch.zeros(2, 1, 4, 1, dtype=torch.int32), 1, 1), r"expected batch 1"),
        (KVSelection(torch.zeros(1, 3, 4, 1, dtype=torch.int32), 1, 1), r"expected Hsel in \(Hq=4, Hkv=2, 1\)"),
        (KVSelection(torch.zeros(1, 1, 3, 1, dtype=torch.int32), 1, 1), r"expected Nq = ceil\(4 / q_block 1\) = 4"),
        (KVSelection(torch.full((1, 1, 4, 1), 8, dtype=torch.int32), 1, 1), r"expected key-block ids in \[-1, 8\)"),
        (KVSelection(torch.full((1, 1, 4, 1), -2, dtype=torch.int32), 1, 1), r"expected key-block ids in \[-1, 8\)"),
        (KVSelection(torch.tensor([[[[1, 1]] * 4]], dtype=torch.int32), 1, 1), r"rows free of duplicates"),
        (KVSelection(torch.zeros(1, 1, 4, 1, dtype=torch.int32), 0, 1), r"selection\.q_block: expected an int >= 1"),
        (KVSelection(torch.zeros(1, 1, 4, 1, dtype=torch.int32), 1, 2.0), r"selection\.k_block: expected an int >= 1"),
    ],
)
def test_validation_errors(sel, match) -> None:
    with pytest.raises(AttnkitError, match=match):
        sel.validate(batch=1, hq=4, hkv=2, tq=4, tk=8)


def test_padding_repeats_are_not_duplicates() -> None:
    KVSelection(torch.tensor([[[[2, -1, -1]]]], dtype=torch.int32), 4, 1).validate(1, 1, 1, 4, 4)


def test_selection_draws_itself_and_knows_its_density() -> None:
    # 3 query blocks of 4 queries, key blocks of 4: block 0 everywhere, plus the diagonal
    idx = torch.tensor([[[[0, -1], [0, 1], [0, 2]]]], dtype=torch.int32)
    sel = KVSelection(idx, q_block=4, k_block=4)
    text = str(sel)
    assert text.splitlines()[1:] == ["#..", "##.", "#.#"], text
    assert "q_block=4" in text.splitlines()[0]
    # causal pairs: 4*5/2 + (4*4 + 4*5/2) + (8*4 + 4*5/2) = 10 + 26 + 42 = 78; visited: 10 + 26 + (16 + 10) = 62
    assert abs(sel.density(12, 12) - 62 / 78) < 1e-12, sel.density(12, 12)
    assert abs(sel.density(12, 12, causal=False) - (4 * 4 + 8 * 4 + 8 * 4) / 144) < 1e-12
