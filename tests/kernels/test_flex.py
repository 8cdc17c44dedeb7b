"""The `flex` backend: BlockMasks built from selection indices, and FlexAttention on a GPU."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core import masks
from attnkit.ops._flex import selection_block_mask

from .helpers import check_sparse, random_selection


@pytest.mark.parametrize("tq,tk,hq,hkv,hsel,causal", [(300, 300, 4, 2, 2, True), (200, 390, 2, 1, 1, True),
                                                     (256, 256, 2, 2, 2, False)])
def test_block_mask_from_selection_cpu(tq, tk, hq, hkv, hsel, causal):
    """The BlockMask (full + partial blocks, mask_mod) equals the selection: checked through
    FlexAttention's eager path on the CPU, in float64, against the reference executor."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, tq, hq, 16, dtype=torch.float64)
    k = torch.randn(1, tk, hkv, 16, dtype=torch.float64)
    v = torch.randn(1, tk, hkv, 16, dtype=torch.float64)
    sel = random_selection(1, hsel, tq, tk, 128, 128, 2, "cpu")
    bm = selection_block_mask(sel, 1, hq, hkv, tq, tk, causal)
    out, lse = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                              enable_gqa=hq != hkv, return_lse=True)
    ref_out, ref_lse = ak.ops.sparse_attention(q, k, v, sel, causal=causal, return_lse=True, backend="reference")
    torch.testing.assert_close(out.transpose(1, 2), ref_out, atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(torch.where(torch.isinf(lse), 0, lse), torch.where(torch.isinf(ref_lse), 0, ref_lse))


FLEX_GPU = {
    "block128_bf16_gqa4": dict(B=2, Tq=1900, Tk=1900, Hq=8, Hkv=2, Hsel=8, D=128, q_block=128, k_block=128, width=4),
    "block256x128_fp16_tq_ne_tk": dict(Tq=1000, Tk=1800, Hq=4, Hkv=4, Hsel=1, D=64, q_block=256, k_block=128,
                                       width=3, dtype=torch.float16),
    "block128_with_mask": dict(Tq=1500, Tk=1500, Hq=4, Hkv=1, Hsel=1, D=128, q_block=128, k_block=128, width=4,
                               mask=masks.sliding_window(300) | masks.sinks(16)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(FLEX_GPU))
def test_flex_selection_gpu(case, gpu):
    check_sparse(device=gpu, backend="flex", chunk=256, **FLEX_GPU[case])


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [masks.sliding_window(256) | masks.sinks(4), masks.dilated(3, window=64)],
                         ids=["window_sinks", "dilated"])
def test_flex_masked_gpu(mask, gpu):
    check_sparse(device=gpu, backend="flex", chunk=256, Tq=1700, Tk=1700, Hq=8, Hkv=2, Hsel=1, D=128,
                 q_block=128, k_block=128, width=1, mask=mask, masked_op=True)
