"""Hugging Face generate with KV policies on a tiny random Llama (transformers >= 5)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the dev env")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from attnkit.core.contract import OptionError  # noqa: E402
from attnkit.integrations.hf_kv import kv_policy  # noqa: E402

L, HKV, D, T, NEW = 2, 2, 16, 24, 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=HKV, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(1, 96, (2, T), generator=torch.Generator().manual_seed(1))


def _generate(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          min_new_tokens=NEW, **kw)


@pytest.fixture(scope="module")
def plain(model, prompt):
    return _generate(model, prompt)


BYTES_PER_TOKEN = 2 * D * 4  # key + value, float32


@pytest.mark.parametrize("name,opts", [
    ("streaming", dict(sinks=2, window=64)), ("h2o", dict(budget=1.0)), ("snapkv", dict(budget=1.0, obs_window=4)),
    ("razor", dict(sinks=4, window=64, probe_period=8)), ("quest", dict(topk=64)),
])
def test_full_budget_matches_plain_generate(model, prompt, plain, name, opts):
    with kv_policy(model, name, **opts) as kv:
        out = _generate(model, prompt)
        mem = kv.memory()
    assert torch.equal(out, plain), f"{name}: tokens differ from plain generate"
    # every token but the last generated one is cached, in every layer and KV head
    assert mem["kept"] == L * 2 * HKV * (T + NEW - 1) * BYTES_PER_TOKEN
    assert model.config._attn_implementation == "sdpa"  # restored on exit


@pytest.mark.parametrize("name,opts", [
    ("streaming", dict(sinks=2, window=6)), ("h2o", dict(budget=10)), ("h2o", dict(budget=0.5)),
    ("snapkv", dict(budget=0.25, obs_window=4)), ("razor", dict(sinks=2, window=4, probe_period=8)),
    ("quest", dict(topk=1)), ("recycled", dict(stride=2, topk=4)), ("santa", dict(samples=8)),
])
def test_each_policy_generates_and_accounts_memory(model, prompt, name, opts):
    with kv_policy(model, name, **opts) as kv:
        out = _generate(model, prompt)
        kept = kv.num_kept()
        mem = kv.memory()
    assert out.shape == (2, T + NEW)
    assert mem["kept"] == sum(int(n.sum()) for n in kept.values()) * BYTES_PER_TOKEN
    if name == "streaming":
        assert all(n.tolist() == [[8] * HKV] * 2 for n in kept.values())
    if name == "h2o" and opts["budget"] == 10:
        assert all(n.tolist() == [[10] * HKV] * 2 for n in kept.values())
    if name == "snapkv":  # ceil(0.25 * 24) after prefill, then the generated tokens
        assert all(n.tolist() == [[6 + NEW - 1] * HKV] * 2 for n in kept.values())
    if name == "razor":
        rh = kv.policy.retrieval_heads
        for layer, n in kept.items():
            want = torch.where(rh[layer], T + NEW - 1, 2 + 4 + 1 + NEW - 1)
            assert n.tolist() == [want.tolist()] * 2


def test_left_padding_is_dropped_at_prefill(model, prompt):
    ids = prompt.clone()
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    with kv_policy(model, "snapkv", budget=1.0, obs_window=4) as kv:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        kept = kv.num_kept()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(out, ref)
    assert kept[0][:, 0].tolist() == [T + NEW - 1 - 3, T + NEW - 1]


def test_bad_policy_arguments(model):
    with pytest.raises(OptionError, match="budget"):
        with kv_policy(model, "snapkv", budget=0):
            pass
    with pytest.raises(OptionError, match="policy"):
        with kv_policy(model, "bogus"):
            pass
    assert model.config._attn_implementation == "sdpa"


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=HKV, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("name,opts", [
    ("streaming", dict(sinks=2, window=6)), ("streaming", dict(sinks=2, budget=0.5)), ("h2o", dict(budget=10)),
    ("h2o", dict(budget=0.5)), ("snapkv", dict(budget=0.5, obs_window=4)), ("razor", dict(sinks=2, window=4)),
    ("quest", dict(topk=2)), ("recycled", dict(stride=2, topk=4)), ("routed", dict(method="moba",
                                                                                   options=dict(block_size=4, topk=2))),
])
def test_left_padded_batch_equals_each_row_alone(model64, name, opts):
    """Every policy and reader counts positions from each row's first real token: a left-padded
    batch keeps and generates per row what that row keeps and generates alone."""
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 96, (n,), generator=g) for n in (T, 17, 9)]
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    extra = dict(probe_period=8) if name == "razor" else {}
    with kv_policy(model64, name, **opts, **extra) as kv:
        out = model64.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        kept = kv.num_kept()
        batched_pos = {i: kv.session.cache.layer(i).kept()["pos"] for i in kept}
        for b, r in enumerate(rows):
            alone = model64.generate(r.unsqueeze(0), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                     max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            assert out[b, T:].tolist() == alone[0, len(r):].tolist(), f"{name}: row {b} generated differently"
            for i, n in kv.num_kept().items():
                assert kept[i][b].tolist() == n[0].tolist(), f"{name}: layer {i} row {b} kept {kept[i][b]} vs {n[0]}"
                pos = kv.session.cache.layer(i).kept()["pos"][0]
                assert batched_pos[i][b, :, :pos.shape[-1]].tolist() == pos.tolist(), f"{name}: kept positions differ"


def test_sparse_prefill_composes_with_a_policy(model64, prompt):
    """`attnkit.hf.use(model, method)` inside `kv_policy`: the prompt runs the method (with or
    without a cache), then the policy compresses and decodes."""
    import attnkit.hf

    ids = prompt[:1]
    dense = model64(ids).logits
    attnkit.hf.use(model64, "moba", block_size=4, topk=1)
    try:
        sparse = model64(ids).logits
        assert not torch.allclose(sparse, dense)
        with kv_policy(model64, "streaming", sinks=2, window=8) as kv:
            with_cache = model64(ids, use_cache=True).logits
            no_cache = model64(ids, use_cache=False).logits
            out = model64.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
            kept = kv.num_kept()
        torch.testing.assert_close(with_cache, sparse, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(no_cache, sparse, rtol=1e-10, atol=1e-10)
        assert out.shape == (1, T + 3) and all(n.tolist() == [[10] * HKV] for n in kept.values())
    finally:
        for m in attnkit.hf.attention_modules(model64):
            del m.attnkit, m.attnkit_inputs, m.attnkit_aux_loss
        model64.set_attn_implementation("sdpa")


def test_right_padding_raises(model, prompt):
    from attnkit.core.contract import AttnkitError

    mask = torch.ones_like(prompt)
    mask[0, -3:] = 0
    with kv_policy(model, "streaming", sinks=2, window=6):
        with pytest.raises(AttnkitError, match="left-padded"):
            model.generate(prompt, attention_mask=mask, max_new_tokens=2, do_sample=False)
