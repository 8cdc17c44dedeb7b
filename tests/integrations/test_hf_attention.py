"""Hugging Face integration: `attn_implementation="attnkit"` on a tiny random Llama equals the
eager implementation for `dense`, every softmax-family method runs forward and backward through
`attnkit.hf.use`, and what attnkit cannot honour (explicit masks, dropout, bad methods or options)
raises instead of being ignored."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

import transformers

import attnkit.hf  # registers "attnkit"
from attnkit.core.contract import AttnkitError, OptionError, validate_attention
from attnkit.registry import methods

V, HID, HQ, HKV, T = 64, 32, 4, 2, 24


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**kw):
    return transformers.LlamaConfig(vocab_size=V, hidden_size=HID, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=128, **kw)


def _pair(**kw):
    torch.manual_seed(0)
    ak = transformers.AutoModelForCausalLM.from_config(_config(**kw), attn_implementation="attnkit")
    eager = transformers.AutoModelForCausalLM.from_config(_config(**kw), attn_implementation="eager")
    eager.load_state_dict(ak.state_dict())
    return ak, eager


def test_dense_equals_eager_logits_and_grads() -> None:
    ak, eager = _pair()
    ids = torch.randint(0, V, (2, T))
    out_a, out_e = ak(ids, labels=ids), eager(ids, labels=ids)
    torch.testing.assert_close(out_a.logits, out_e.logits, rtol=1e-5, atol=1e-5)
    out_a.loss.backward()
    out_e.loss.backward()
    for (n, pa), (_, pe) in zip(ak.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(pa.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {n}: {m}")


def test_dense_decode_with_cache_equals_eager() -> None:
    ak, eager = _pair()
    ids = torch.randint(0, V, (1, 8))
    a = ak.generate(ids, max_new_tokens=6, do_sample=False)
    e = eager.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, e)


def _options(spec) -> dict:
    D = HID // HQ
    call = validate_attention(torch.zeros(2, T, HQ, D), torch.zeros(2, T, HKV, D), torch.zeros(2, T, HKV, D))
    return {k: v for k, v in spec.example(call).items() if not isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", sorted(s.name for s in methods() if s.family != "linear"))
def test_every_method_forward_backward(name: str) -> None:
    spec = next(s for s in methods() if s.name == name)
    model, _ = _pair()
    attnkit.hf.use(model, method=name, **_options(spec))
    assert all(m.attnkit.method == name for m in attnkit.hf.attention_modules(model))
    ids = torch.randint(0, V, (2, T))
    out = model(ids, labels=ids)
    assert bool(torch.isfinite(out.logits).all())
    loss = out.loss + sum(attnkit.hf.aux_losses(model))  # DSA's indexer trains through its loss
    loss.backward()
    q_grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert q_grad is not None and bool(q_grad.abs().sum() > 0)
    for m in attnkit.hf.attention_modules(model):
        if m.attnkit_inputs is not None:
            assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.attnkit_inputs.parameters())


def test_sparse_method_changes_the_output_and_layers_argument() -> None:
    model, eager = _pair()
    ids = torch.randint(0, V, (1, T))
    attnkit.hf.use(model, method="sliding_window", window=2, layers=[1])
    mods = attnkit.hf.attention_modules(model)
    assert [getattr(m, "attnkit", attnkit.hf.HFMethod()).method for m in mods] == ["dense", "sliding_window"]
    assert not torch.allclose(model(ids).logits, eager(ids).logits)


def test_unsupported_inputs_raise() -> None:
    model, _ = _pair()
    ids = torch.randint(0, V, (2, T))
    model(ids, attention_mask=torch.ones(2, T, dtype=torch.long))  # no padding: fine (padding: test_hf_padding.py)
    with pytest.raises(AttnkitError, match="attention_mask"):
        model(ids[:1], attention_mask=torch.ones(1, 1, T, T))  # an explicit 4D mask
    dropout, _ = _pair(attention_dropout=0.1)
    with pytest.raises(AttnkitError, match="dropout"):
        dropout.train()(ids)


def test_bad_method_or_option_raises() -> None:
    model, _ = _pair()
    with pytest.raises(AttnkitError, match="method"):
        attnkit.hf.use(model, method="no_such_method")
    with pytest.raises(AttnkitError, match="linear"):
        attnkit.hf.use(model, method="gla")
    with pytest.raises(OptionError, match="topkk"):
        attnkit.hf.use(model, method="moba", block_size=4, topkk=8)
    with pytest.raises(OptionError, match="topk"):
        attnkit.hf.use(model, method="moba", block_size=4, topk=0)
    with pytest.raises(OptionError, match="block_size"):
        attnkit.hf.use(model, method="moba", topk=8)
    with pytest.raises(AttnkitError, match="layers"):
        attnkit.hf.use(model, method="dense", layers=[7])
