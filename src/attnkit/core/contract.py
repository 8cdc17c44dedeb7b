"""The tensor contract shared by every attnkit op (docs/design.md "The contract").

Validation happens here, once, before any computation: an error names the argument, what was
expected and what was passed. Everything downstream may assume a normalised `AttentionCall`.

Layout is sequence-first, as flash-attn and fla:
    q: [B, Tq, Hq, D]   k: [B, Tk, Hkv, D]   v: [B, Tk, Hkv, Dv]   out: [B, Tq, Hq, Dv]
`causal=True` aligns the diagonal bottom-right (query i sees keys j <= i + Tk - Tq).
Variable length: B == 1 with `cu_seqlens` (int32 [N+1], starts at 0, nondecreasing, ends at T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttnkitError(ValueError):
    """Bad input to an attnkit op. Always names the argument, the expectation and the value."""


class OptionError(AttnkitError):
    """A method option is out of range or unknown."""


class BackendError(RuntimeError):
    """No backend can serve a call (the message lists every backend and why)."""


def _fail(arg: str, expected: str, got: object) -> AttnkitError:
    return AttnkitError(f"{arg}: expected {expected}, got {got}")


@dataclass(frozen=True)
class AttentionCall:
    """A validated attention call: tensors plus the sizes every backend needs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float
    cu_seqlens: Optional[torch.Tensor]
    return_lse: bool

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def tq(self) -> int:
        return self.q.shape[1]

    @property
    def tk(self) -> int:
        return self.k.shape[1]

    @property
    def hq(self) -> int:
        return self.q.shape[2]

    @property
    def hkv(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1 if self.cu_seqlens is not None else self.batch

    @property
    def empty(self) -> bool:
        """No query or no key: the result is known without computing (`ops._backends.run_empty`)."""
        return self.q.numel() == 0 or self.tk == 0

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in (self.q, self.k, self.v))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every path: float32, or float64 for float64 inputs (the oracle path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def plain_scalar(value: object) -> object:
    """A numpy scalar or a 0-d tensor (without grad) as the Python number it holds; anything else
    unchanged. `scale=np.float32(0.5)`, `window=np.int64(3)` and `scale=torch.tensor(0.5)` mean
    what they say; a scale that requires grad is not a constant and is refused by the checks."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 and not value.requires_grad and value.dtype != torch.bool else value
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def check_tensor(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    """Check that `t` is a floating tensor of rank `ndim` in a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise _fail(name, f"a torch.Tensor {layout}", type(t).__name__)
    if t.dim() != ndim:
        raise _fail(name, f"{ndim} dims {layout}", f"shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise _fail(name, "dtype float16, bfloat16, float32 or float64", t.dtype)
    return t


def check_cu_seqlens(cu_seqlens: object, total: int, batch: int, device: torch.device) -> torch.Tensor:
    """Validate varlen offsets: int32 [N+1], starts at 0, nondecreasing, ends at `total`."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise _fail("cu_seqlens", "an int32 torch.Tensor [N+1]", type(cu_seqlens).__name__)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise _fail("cu_seqlens", "dtype int32", cu_seqlens.dtype)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise _fail("cu_seqlens", "1-D with at least 2 entries [N+1]", f"shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise _fail("q", "batch size 1 when cu_seqlens is given (sequences packed along T)", f"batch {batch}")
    if cu_seqlens.device != device:
        raise _fail("cu_seqlens", f"device {device} (same as q)", cu_seqlens.device)
    cpu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cpu[0]) != 0:
        raise _fail("cu_seqlens", "cu_seqlens[0] == 0", int(cpu[0]))
    if bool((cpu[1:] < cpu[:-1]).any()):
        raise _fail("cu_seqlens", "nondecreasing offsets", cpu.tolist())
    if int(cpu[-1]) != total:
        raise _fail("cu_seqlens", f"cu_seqlens[-1] == total tokens {total}", int(cpu[-1]))
    return cu_seqlens.to(torch.int32)


def validate_attention(
    q: object,
    k: object,
    v: object,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    allow_empty: bool = False,
) -> AttentionCall:
    """Validate and normalise an attention call per docs/design.md "The contract".

    `allow_empty`: accept B == 0, Tq == 0 or Tk == 0 (the entry points that answer them as SDPA
    does: an empty output, or zeros and LSE -inf when there are no keys; `AttentionCall.empty`)."""
    q = check_tensor("q", q, 4, "[B, Tq, Hq, D]")
    k = check_tensor("k", k, 4, "[B, Tk, Hkv, D]")
    v = check_tensor("v", v, 4, "[B, Tk, Hkv, Dv]")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise _fail(name, f"dtype {q.dtype} (same as q)", t.dtype)
        if t.device != q.device:
            raise _fail(name, f"device {q.device} (same as q)", t.device)
    B, Tq, Hq, D = q.shape
    if k.shape[0] != B:
        raise _fail("k", f"batch {B} (same as q)", f"shape {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise _fail("v", f"[B, Tk, Hkv] = {tuple(k.shape[:3])} (same as k)", f"shape {tuple(v.shape)}")
    if k.shape[3] != D:
        raise _fail("k", f"head dim {D} (same as q)", f"shape {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise _fail("k", f"a number of KV heads dividing Hq={Hq} (MHA, GQA or MQA)", f"Hkv={Hkv}")
    if D == 0 or v.shape[3] == 0:
        raise _fail("q", "a positive head dim", f"D={D}, Dv={v.shape[3]}")
    if not allow_empty and (B == 0 or Tq == 0 or k.shape[1] == 0):
        raise _fail("q", "non-empty batch and sequence dims", f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise _fail("causal", "a bool", type(causal).__name__)
    if not isinstance(return_lse, bool):
        raise _fail("return_lse", "a bool", type(return_lse).__name__)
    scale = plain_scalar(scale)
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and scale < float("inf")):
        raise _fail("scale", "a finite float > 0 (or None for D ** -0.5)", repr(scale))
    if cu_seqlens is not None:
        if Tq != k.shape[1]:
            raise _fail("k", f"Tk == Tq == {Tq} with cu_seqlens (packed self-attention)", f"Tk={k.shape[1]}")
        cu_seqlens = check_cu_seqlens(cu_seqlens, Tq, B, q.device)
    return AttentionCall(q, k, v, causal, float(scale), cu_seqlens, return_lse)


# --- layout adapters: explicit, never guessed from shapes --------------------------------------


def from_bhtd(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] (SDPA / Hugging Face layout) -> [B, T, H, D] (attnkit layout). A view."""
    if x.dim() != 4:
        raise _fail("x", "4 dims [B, H, T, D]", f"shape {tuple(x.shape)}")
    return x.transpose(1, 2)


def to_bhtd(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] (attnkit layout) -> [B, H, T, D] (SDPA / Hugging Face layout). A view."""
    if x.dim() != 4:
        raise _fail("x", "4 dims [B, T, H, D]", f"shape {tuple(x.shape)}")
    return x.transpose(1, 2)


def seq_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """Per-sequence lengths from varlen offsets."""
    c = cu_seqlens.detach().to("cpu", torch.int64)
    return (c[1:] - c[:-1]).tolist()
