"""MIL heads: shapes, attention, permutation invariance, large bags, the factory."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidInput
from services.mil.heads import GatedAttentionMIL, TransformerMIL, build_head

SMALL = {
    "abmil": {"hidden_dim": 16, "attention_dim": 8},
    "transmil": {"hidden_dim": 16, "heads": 2, "layers": 2},
}


def _head(name: str, in_dim: int = 12, n_tasks: int = 6, **extra: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_head(name, in_dim, n_tasks, **{**SMALL[name], **extra}).eval()


@pytest.mark.parametrize("name", ["abmil", "transmil"])
@pytest.mark.parametrize("n", [1, 37])
def test_one_logit_per_task_and_attention_rows_sum_to_one(name: str, n: int) -> None:
    head = _head(name)
    out = head(torch.randn(n, 12))
    assert out.logits.shape == (6,) and out.attention.shape == (6, n)
    assert torch.isfinite(out.logits).all()
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(6))


@pytest.mark.parametrize("name", ["abmil", "transmil"])
def test_a_batch_of_one_equals_the_bare_bag_and_order_does_not_matter(name: str) -> None:
    head = _head(name)
    x = torch.randn(40, 12)
    out = head(x)
    batched = head(x[None])
    torch.testing.assert_close(batched.logits, out.logits)
    # A bag is a set: permuting its instances permutes attention, logits stay.
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    shuffled = head(x[order])
    torch.testing.assert_close(shuffled.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled.attention, out.attention[:, order], atol=1e-6, rtol=1e-5)


def test_abmil_attends_per_task() -> None:
    # Two tasks reading different instances get different maps.
    head = _head("abmil")
    attention = head(torch.randn(30, 12)).attention
    assert not torch.allclose(attention[0], attention[1])


def test_abmil_takes_a_20k_bag_in_linear_memory() -> None:
    head = _head("abmil", in_dim=64)
    with torch.inference_mode():
        out = head(torch.randn(20_000, 64))
    assert out.attention.shape == (6, 20_000)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(6))


def test_transformer_caps_instances_with_a_fixed_sample_in_evaluation() -> None:
    head = _head("transmil", in_dim=8, max_instances=256)
    x = torch.randn(20_000, 8)
    with torch.inference_mode():
        first, second = head(x), head(x)
    seen = (first.attention[0] > 0).sum().item()
    assert seen == 256
    torch.testing.assert_close(first.logits, second.logits)
    torch.testing.assert_close(first.attention, second.attention)
    torch.testing.assert_close(first.attention.sum(dim=1), torch.ones(6))
    # In training each step draws a new sample.
    head.train()
    with torch.no_grad():
        a, b = head(x).attention[0] > 0, head(x).attention[0] > 0
    assert a.sum() == b.sum() == 256 and not torch.equal(a, b)


def test_transformer_is_trainable_end_to_end() -> None:
    head = _head("transmil").train()
    out = head(torch.randn(20, 12))
    out.logits.sum().backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None for g in grads)
    assert head.class_tokens.grad is not None and head.class_tokens.grad.abs().sum() > 0


def test_factory_names_aliases_and_errors() -> None:
    assert isinstance(build_head("abmil", 8, 2), GatedAttentionMIL)
    assert isinstance(build_head("transmil", 8, 2, hidden_dim=16, heads=2), TransformerMIL)
    assert isinstance(build_head("transformer", 8, 2, hidden_dim=16, heads=2), TransformerMIL)
    with pytest.raises(InvalidInput, match="unknown MIL head 'clam'"):
        build_head("clam", 8)
    with pytest.raises(InvalidInput, match="depth"):
        build_head("abmil", 8, depth=3)
    with pytest.raises(InvalidInput, match="divisible"):
        build_head("transmil", 8, hidden_dim=10, heads=4)
    with pytest.raises(InvalidInput, match="n_tasks"):
        build_head("abmil", 8, 0)


@pytest.mark.parametrize("name", ["abmil", "transmil"])
def test_bad_bags_are_refused(name: str) -> None:
    head = _head(name)
    with pytest.raises(InvalidInput, match="no instances"):
        head(torch.zeros(0, 12))
    with pytest.raises(InvalidInput, match=r"\(N, 12\)"):
        head(torch.zeros(5, 7))
    with pytest.raises(InvalidInput, match="one bag at a time"):
        head(torch.zeros(2, 5, 12))
