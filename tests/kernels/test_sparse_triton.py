"""The Triton sparse executor against the float64 reference executor (DESIGN.md section 7).

Tiny shapes run everywhere (Triton's CPU interpreter without a GPU); `@pytest.mark.gpu` tests
repeat the same checks at real sizes on a GPU. Each case covers one kernel mode:
block-level tiles (`q_block % 16 == 0`), per-token rows shared by a KV group (`q_block == 1`,
MoBA / NSA) and gathered token-level keys (`k_block == 1`, DSA).
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.core.contract import AttnkitError
from attnkit.core import masks

from .helpers import check_sparse, random_selection

# (name, shape kwargs): tiny, T never a multiple of the blocks, GQA 1 / 4 / 16, Tq = 1, varlen
TINY = {
    "block_gqa4_bf16": dict(B=2, Tq=40, Tk=40, Hq=4, Hkv=1, Hsel=4, D=16, q_block=16, k_block=16, width=2),
    "block_tq_ne_tk_fp32_noncausal": dict(Tq=24, Tk=41, Hq=2, Hkv=2, Hsel=1, D=16, q_block=16, k_block=24,
                                          width=2, causal=False, dtype=torch.float32),
    "token_group_fp16": dict(Tq=29, Tk=29, Hq=8, Hkv=2, Hsel=2, D=32, Dv=16, q_block=1, k_block=16, width=2,
                             dtype=torch.float16),
    "token_per_head_mha": dict(Tq=21, Tk=21, Hq=2, Hkv=2, Hsel=2, D=16, q_block=1, k_block=8, width=2),
    "gather_dsa_gqa16": dict(Tq=19, Tk=19, Hq=16, Hkv=1, Hsel=1, D=16, q_block=1, k_block=1, width=12),
    "decode_tq1": dict(Tq=1, Tk=45, Hq=4, Hkv=1, Hsel=1, D=16, q_block=1, k_block=16, width=2),
    "decode_tq1_gather": dict(Tq=1, Tk=45, Hq=4, Hkv=2, Hsel=2, D=16, q_block=1, k_block=1, width=20,
                              dtype=torch.float16),
    "varlen_block": dict(Tq=40, Tk=40, Hq=2, Hkv=1, Hsel=1, D=16, q_block=16, k_block=16, width=2,
                         cu_seqlens=torch.tensor([0, 17, 17, 40], dtype=torch.int32)),
}


@pytest.mark.parametrize("case", sorted(TINY))
def test_sparse_tiny(case, kernel_device):
    check_sparse(device=kernel_device, **TINY[case])


def test_all_rows_empty(kernel_device):
    """A selection with no key at all: out 0, lse -inf, zero gradients."""
    q = torch.randn(1, 20, 2, 16, device=kernel_device, requires_grad=True)
    k = torch.randn(1, 20, 1, 16, device=kernel_device, requires_grad=True)
    v = torch.randn(1, 20, 1, 16, device=kernel_device, requires_grad=True)
    sel = ak.core.selection.KVSelection(torch.full((1, 1, 20, 3), -1, dtype=torch.int32, device=kernel_device), 1, 16)
    out, lse = ak.ops.sparse_attention(q, k, v, sel, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_torch_compile(kernel_device):
    """The custom ops trace under torch.compile (fake impls + registered autograd)."""
    backend = "inductor" if kernel_device == "cuda" else "aot_eager"
    sel = random_selection(1, 1, 24, 24, 16, 16, 2, kernel_device, empty_frac=0.0)
    q, k, v = (torch.randn(1, 24, 2, 16, device=kernel_device, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return ak.ops.sparse_attention(q, k, v, sel, backend="triton")

    eager = f(q, k, v)
    ge = torch.autograd.grad(eager.sum(), (q, k, v))
    compiled = torch.compile(f, backend=backend, fullgraph=False)(q, k, v)
    gc = torch.autograd.grad(compiled.sum(), (q, k, v))
    assert torch.allclose(eager, compiled)
    for a, b in zip(ge, gc):
        assert torch.allclose(a, b, atol=1e-6)


def test_triton_rejects_mask_predicate(kernel_device):
    q = torch.randn(1, 16, 1, 16, device=kernel_device)
    sel = random_selection(1, 1, 16, 16, 16, 16, 1, kernel_device)
    with pytest.raises(AttnkitError, match="triton.*mask predicates"):
        ak.ops.sparse_attention(q, q, q, sel, mask=masks.sliding_window(4), backend="triton")


def test_flex_is_cuda_only_on_cpu():
    q = torch.randn(1, 128, 1, 16)
    sel = random_selection(1, 1, 128, 128, 128, 128, 1, "cpu")
    with pytest.raises(AttnkitError, match="flex.*CUDA only"):
        ak.ops.sparse_attention(q, q, q, sel, backend="flex")
    with pytest.raises(AttnkitError, match="flex.*CUDA only"):
        ak.ops.masked_attention(q, q, q, masks.sliding_window(8), backend="flex")


# --- the same checks at real sizes on a GPU -------------------------------------------------------

GPU_CASES = {
    "block128_d128_bf16": dict(B=2, Tq=2000, Tk=2000, Hq=8, Hkv=2, Hsel=8, D=128, q_block=128, k_block=128,
                               width=4),
    "block64_d64_fp16_gqa4": dict(Tq=3000, Tk=3000, Hq=8, Hkv=2, Hsel=2, D=64, q_block=64, k_block=64, width=8,
                                  dtype=torch.float16),
    "block_fp32_tq_ne_tk": dict(Tq=700, Tk=1500, Hq=4, Hkv=4, Hsel=1, D=64, q_block=64, k_block=128, width=3,
                                dtype=torch.float32),
    "nsa_token_gqa16": dict(Tq=1500, Tk=1500, Hq=16, Hkv=1, Hsel=1, D=128, q_block=1, k_block=64, width=8),
    "moba_token_per_head": dict(Tq=1100, Tk=1100, Hq=4, Hkv=4, Hsel=4, D=128, q_block=1, k_block=64, width=4),
    "dsa_gather_gqa16": dict(Tq=1200, Tk=1200, Hq=16, Hkv=1, Hsel=1, D=128, q_block=1, k_block=1, width=256),
    "decode_tq1": dict(Tq=1, Tk=5000, Hq=16, Hkv=4, Hsel=4, D=128, q_block=1, k_block=64, width=16),
    "varlen_block_gqa4": dict(Tq=2500, Tk=2500, Hq=8, Hkv=2, Hsel=2, D=128, q_block=128, k_block=128, width=4,
                              cu_seqlens=torch.tensor([0, 700, 700, 2100, 2500], dtype=torch.int32)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_sparse_gpu(case, gpu):
    check_sparse(device=gpu, chunk=256, **GPU_CASES[case])


@pytest.mark.gpu
def test_int64_offsets_gpu(gpu):
    """q/k/v of more than 2^31 elements: rows at the far end still read and write the right place."""
    T, H, D = 139264, 128, 128  # T * H * D = 2.28e9 > 2^31
    free = torch.cuda.mem_get_info()[0]
    if free < 30 * 2**30:
        pytest.skip(f"needs ~30 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    q = torch.randn(1, T, H, D, device=gpu, dtype=torch.bfloat16)
    k = torch.randn(1, T, H, D, device=gpu, dtype=torch.bfloat16)
    v = torch.randn(1, T, H, D, device=gpu, dtype=torch.bfloat16)
    nb = T // 128
    own = torch.arange(nb, device=gpu, dtype=torch.int32).view(1, 1, nb, 1)
    sel = ak.core.selection.KVSelection(torch.cat([own, own - 1], -1).clamp_min(-1), 128, 128)
    out, lse = ak.ops.sparse_attention(q, k, v, sel, return_lse=True, backend="triton")
    a = T - 256
    tail = (q[:, a:], k[:, a:], v[:, a:])  # the last block sees its own keys and the previous block's
    sub = ak.core.selection.KVSelection(torch.tensor([[[[0, -1], [1, 0]]]], dtype=torch.int32, device=gpu)
                                        .expand(1, 1, 2, 2).contiguous(), 128, 128)
    ref_out, ref_lse = ak.ops.sparse_attention(*(x[:, :, -4:].float() for x in tail), sub, return_lse=True,
                                               backend="reference")
    # compare the last block only (its keys are exactly `tail`; the block before also sees block nb - 3)
    torch.testing.assert_close(out[:, a + 128:, -4:].float(), ref_out[:, 128:], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[:, -4:, a + 128:], ref_lse[:, :, 128:], atol=1e-3, rtol=1e-3)
