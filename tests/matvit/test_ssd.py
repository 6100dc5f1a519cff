"""Mamba2's chunked state-space-dual scan equals the step-by-step recurrence it stands for."""

import pytest
import torch

from matvit import ssd


def inputs(length: int, seed: int = 0, batch: int = 2, heads: int = 3, headdim: int = 4, d_state: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, headdim, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g, dtype=torch.float64) - 1)
    a = -torch.exp(torch.rand(heads, generator=g, dtype=torch.float64)) * dt  # log decays, negative
    b, c = (torch.randn(batch, length, d_state, generator=g, dtype=torch.float64) for _ in range(2))
    return x * dt[..., None], a, b, c


@pytest.mark.parametrize("length, chunk", [(16, 4), (16, 16), (17, 4), (17, 5), (23, 8), (5, 64), (1, 4), (50, 7)])
def test_chunked_scan_equals_the_recurrence(length, chunk):
    x, a, b, c = inputs(length, seed=length * 100 + chunk)
    torch.testing.assert_close(ssd.chunked(x, a, b, c, chunk), ssd.recurrence(x, a, b, c), rtol=1e-10, atol=1e-10)


def test_float32_and_gradients_agree():
    x, a, b, c = (t.float().requires_grad_() for t in inputs(19, seed=3))
    y = ssd.chunked(x, a, b, c, 6)
    expected = ssd.recurrence(x, a, b, c)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), (x, a, b, c))
    oracle = torch.autograd.grad((expected * weights).sum(), (x, a, b, c))
    for got, want in zip(grads, oracle, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_a_step_sees_only_what_precedes_it():
    x, a, b, c = inputs(12, seed=7)
    changed = x.clone()
    changed[:, 8:] += 1.0
    before, after = ssd.chunked(x, a, b, c, 5), ssd.chunked(changed, a, b, c, 5)
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=1e-12)
    assert not torch.allclose(before[:, 8:], after[:, 8:])
