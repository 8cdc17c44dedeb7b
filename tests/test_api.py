"""The public face: attention(), explain(), list_methods(), the CLI and the README's table."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit as ak
from attnkit import registry
from attnkit.core.contract import validate_attention

ROOT = Path(__file__).resolve().parents[1]


def qkv(T=16, Hq=4, Hkv=2, D=8):
    return torch.randn(1, T, Hq, D), torch.randn(1, T, Hkv, D), torch.randn(1, T, Hkv, D)


def test_every_method_runs_through_attention_with_its_example_options() -> None:
    for spec in registry.methods():
        q, k, v = qkv(Hkv=2 if spec.capabilities.gqa else 4)
        call = validate_attention(q, k, v)
        opts = spec.example(call)
        out = ak.attention(q, k, v, method=spec.name, **opts)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape[:3] == q.shape[:3] and torch.isfinite(out).all(), spec.name


def test_explain_lists_every_backend_with_a_reason() -> None:
    q, k, v = qkv()
    exp = ak.explain(q, k, v, method="dense")
    assert exp.chosen == "sdpa" and [r[0] for r in exp.rows] == ["sdpa", "reference"]
    exp = ak.explain(q, k, v, method="dense", return_lse=True)
    assert exp.chosen == "reference"
    assert dict((n, r) for n, _, r in exp.rows)["sdpa"] == "cannot return the LSE (return_lse=True)"
    exp = ak.explain(q[:, :3], k, v, method="dense")
    assert exp.chosen == "reference" and "bottom-right" in exp.rows[0][2]
    exp = ak.explain(q, k, v, method="dense", cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32))
    assert exp.chosen == "reference" and "varlen" in exp.rows[0][2]
    exp = ak.explain(q, k, v, method="dense", backend="reference")
    assert exp.chosen == "reference" and "another backend was requested" in exp.rows[0][2]
    assert "chosen 'reference'" in str(exp)


def test_auto_and_sdpa_agree_with_reference() -> None:
    q, k, v = qkv(T=33)
    for causal in (True, False):
        a = ak.attention(q, k, v, causal=causal)
        b = ak.attention(q, k, v, causal=causal, backend="reference")
        assert (a - b).abs().max() < 1e-5
    # Tq = 1 causal is served by sdpa as non-causal attention over every key
    a = ak.attention(q[:, -1:], k, v)
    b = ak.attention(q[:, -1:], k, v, backend="reference")
    assert ak.explain(q[:, -1:], k, v).chosen == "sdpa" and (a - b).abs().max() < 1e-5


def test_list_methods_rows() -> None:
    rows = {r["name"]: r for r in ak.list_methods()}
    for name in ("dense", "sliding_window", "dilated", "strided"):
        assert name in rows
    assert rows["dense"]["backends"] == ["sdpa", "reference"]
    assert rows["sliding_window"]["options"] == ["window", "sinks"]
    assert rows["dense"]["capabilities"] == dict(causal=True, non_causal=True, gqa=True, varlen=True,
                                                 backward=True, decode=True, lse=True,
                                                 selection_reads_whole_prompt=False, decode_dense=False)
    assert rows["vertical_slash"]["capabilities"]["selection_reads_whole_prompt"]
    assert rows["token_sparse"]["capabilities"]["decode_dense"] and not rows["block_topk"]["capabilities"]["decode_dense"]
    for r in rows.values():
        assert (ROOT / r["docs"]).is_file(), f"{r['name']}: docs page {r['docs']} is missing"


def test_readme_carries_the_generated_capability_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = registry.markdown_table()
    assert table in readme, "README.md's capability table is stale: paste `attnkit list --markdown` into it"


def test_cli_list_and_markdown() -> None:
    out = subprocess.run([sys.executable, "-m", "attnkit", "list", "--markdown"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == registry.markdown_table()
    out = subprocess.run([sys.executable, "-m", "attnkit", "list"], capture_output=True, text=True, check=True)
    assert "sliding_window" in out.stdout


def test_registry_rejects_duplicates_and_bad_specs() -> None:
    spec = registry.get_method("dense")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec)
    with pytest.raises(TypeError, match="options must be a MethodOptions dataclass"):
        registry.register(registry.MethodSpec("x", "exact", "", "", dict, registry.Capabilities(), ()))


def test_capability_errors() -> None:
    caps = registry.Capabilities(non_causal=False, gqa=False, varlen=False, lse=False, decode=False)
    spec = registry.MethodSpec("_restricted", "exact", "", "", registry.NoOptions, caps,
                               (registry.Backend("reference", lambda call, opts: None),))
    q, k, v = qkv()
    for kwargs, match in [
        (dict(causal=False), "causal: method '_restricted' is causal only"),
        (dict(), "k: method '_restricted' needs Hkv == Hq"),
    ]:
        with pytest.raises(ak.AttnkitError, match=match):
            registry.check_capabilities(spec, validate_attention(q, k, v, **kwargs))
    k1, v1 = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    for kwargs, match in [
        (dict(cu_seqlens=torch.tensor([0, 16], dtype=torch.int32)), "cu_seqlens: method '_restricted' has no varlen"),
        (dict(return_lse=True), "return_lse: method '_restricted' has no softmax LSE"),
    ]:
        with pytest.raises(ak.AttnkitError, match=match):
            registry.check_capabilities(spec, validate_attention(q, k1, v1, **kwargs))
    with pytest.raises(ak.AttnkitError, match="q: method '_restricted' needs Tq == Tk"):
        registry.check_capabilities(spec, validate_attention(q[:, :2], k1, v1))


def test_backend_checks_devices_dtypes_and_grad() -> None:
    b = registry.Backend("gpu_only", lambda c, o: None, devices=("cuda",))
    q, k, v = qkv()
    assert "runs on cuda, inputs are on cpu" == b.why_not(validate_attention(q, k, v), None)
    b = registry.Backend("half", lambda c, o: None, dtypes=(torch.float16,))
    assert "dtype fp32 not supported (supports fp16)" == b.why_not(validate_attention(q, k, v), None)
    b = registry.Backend("fwd", lambda c, o: None, backward=False)
    qg = q.requires_grad_()
    assert "forward only" in b.why_not(validate_attention(qg, k, v), None)
    with torch.no_grad():
        assert b.why_not(validate_attention(qg, k, v), None) is None
    b = registry.Backend("missing", lambda c, o: None, available=lambda: "triton not installed")
    assert b.why_not(validate_attention(q, k, v), None) == "triton not installed"


def test_numpy_and_0d_tensor_scalars_mean_their_value() -> None:
    np = pytest.importorskip("numpy")  # numpy comes with the test extras (hypothesis' numpy support)
    q, k, v = qkv()
    want = ak.attention(q, k, v, "sliding_window", window=3, scale=0.5)
    for scale in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert torch.equal(ak.attention(q, k, v, "sliding_window", window=3, scale=scale), want), repr(scale)
    assert torch.equal(ak.attention(q, k, v, "sliding_window", window=np.int64(3), scale=0.5), want)
    with pytest.raises(ak.AttnkitError, match="scale"):
        ak.attention(q, k, v, scale=torch.tensor(0.5, requires_grad=True))  # not a constant


@pytest.mark.parametrize("spec", registry.methods(), ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(0, 6, 6), (1, 0, 6), (1, 6, 0)], ids=["B=0", "Tq=0", "Tk=0"])
def test_empty_inputs_give_empty_results_as_sdpa(spec, shape) -> None:
    B, Tq, Tk = shape
    if Tq != Tk and (spec.family == "linear" or not spec.capabilities.decode):
        return  # the method refuses Tq != Tk whatever the sizes
    hkv = 2 if spec.capabilities.gqa else 4
    q = torch.randn(B, Tq, 4, 8, requires_grad=True)
    k, v = torch.randn(B, Tk, hkv, 8, requires_grad=True), torch.randn(B, Tk, hkv, 8, requires_grad=True)
    opts = spec.example(validate_attention(q, k, v, allow_empty=True))
    causal = not spec.capabilities.non_causal
    out, lse = ak.attention(q, k, v, spec.name, causal=causal, return_lse=True, **opts) if spec.capabilities.lse else \
        (ak.attention(q, k, v, spec.name, causal=causal, **opts), None)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(4 // hkv, 2).transpose(1, 2),
                                                            v.repeat_interleave(4 // hkv, 2).transpose(1, 2)).transpose(1, 2)
    assert out.shape == sdpa.shape and torch.equal(out, sdpa)
    if lse is not None:
        assert lse.shape == (B, 4, Tq) and torch.isneginf(lse).all()
    out.sum().backward()
    assert q.grad.shape == q.shape and not q.grad.any()


def test_layout_bhtd_is_explicit_and_a_likely_swap_warns() -> None:
    q, k, v = (torch.randn(1, 4, 80, 8) for _ in range(3))  # [B, H, T, D]: 4 heads, 80 tokens
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, lse = ak.attention(q, k, v, layout="bhtd", return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert lse.shape == (1, 4, 80)
    with pytest.warns(UserWarning, match="layout='bhtd'"):
        ak.attention(q, k, v)  # read as 80 heads of 4 tokens: the classic mistake
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ak.attention(q, k, v, layout="bthd")  # declared: no warning
        ak.attention(*qkv())  # typical [B, T, H, D] shapes: no warning
        ak.attention(torch.randn(1, 1, 32, 8), torch.randn(1, 100, 8, 8), torch.randn(1, 100, 8, 8))  # decode
    with pytest.raises(ak.AttnkitError, match="layout"):
        ak.attention(q, k, v, layout="bshd")


@pytest.mark.parametrize("where", ["k", "v"])
def test_dense_auto_keeps_a_future_nan_out_of_earlier_rows(where) -> None:
    q, k, v = qkv(T=12)
    want = ak.attention(q, k, v)
    x = (k if where == "k" else v).clone()
    x[0, 9] = float("nan")
    got = ak.attention(q, *((x, v) if where == "k" else (k, x)))
    assert torch.equal(got[:, :9], want[:, :9]) and torch.isnan(got[:, 9:]).any(-1).all()
