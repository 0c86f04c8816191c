"""The pure-torch decay functions against hand-written per-tensor formulas."""

from __future__ import annotations

import pytest
import torch

from lightning_wd.decay import add_l2_to_grads_, decay_weights_, group_by_device_and_dtype


def tensors(dtypes=(torch.float32, torch.float64, torch.float32)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=g).to(dt) for dt in dtypes]


@pytest.mark.parametrize("lr", [0.1, torch.tensor(0.1)], ids=["float_lr", "tensor_lr"])
def test_decay_weights_matches_per_tensor_formula(lr):
    params = tensors()
    expected = [p.mul(1 - lr * 0.3) for p in params]  # torch.optim.AdamW's per-tensor formula
    decay_weights_(params, lr, 0.3)
    for p, e in zip(params, expected):
        assert torch.equal(p, e)


def test_decay_weights_skip_flag_keeps_weights_on_skipped_steps():
    params = tensors()
    before = [p.clone() for p in params]
    decay_weights_(params, 0.1, 0.3, skip=torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    decay_weights_(params, 0.1, 0.3, skip=torch.tensor(0.0))
    assert all(torch.allclose(p, b * 0.97) for p, b in zip(params, before))


def test_zero_decay_touches_nothing():
    params = tensors()
    before = [p.clone() for p in params]
    decay_weights_(params, 0.1, 0.0)
    grads = [torch.zeros_like(p) for p in params]
    add_l2_to_grads_(params, grads, 0.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all((g == 0).all() for g in grads)


def test_add_l2_matches_adam_formula_and_carries_grad_scale():
    params = tensors()
    grads = [torch.ones_like(p) for p in params]
    add_l2_to_grads_(params, grads, 0.5)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, 1 + 0.5 * p)
    scaled = [torch.ones_like(p) * 1024 for p in params]
    add_l2_to_grads_(params, scaled, 0.5, grad_scale=torch.tensor(1024.0))
    for p, g in zip(params, scaled):
        torch.testing.assert_close(g / 1024, 1 + 0.5 * p)


def test_grouping_is_by_device_and_dtype_and_keeps_pairs_aligned():
    a = tensors((torch.float32, torch.float64, torch.float32, torch.bfloat16))
    b = [t + 1 for t in a]
    groups = group_by_device_and_dtype(a, b)
    assert set(groups) == {(torch.device("cpu"), dt) for dt in (torch.float32, torch.float64, torch.bfloat16)}
    for (_, dtype), (xs, ys) in groups.items():
        assert all(x.dtype == dtype for x in xs)
        assert all(torch.equal(x + 1, y) for x, y in zip(xs, ys))
    assert len(groups[(torch.device("cpu"), torch.float32)][0]) == 2


def test_one_foreach_call_per_device_dtype_group():
    """The batched path: one ``_foreach_mul_`` per (device, dtype), never one ``mul_`` per tensor."""
    params = tensors((torch.float32,) * 6 + (torch.float64,) * 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decay_weights_(params, 0.1, 0.3)
    top_level = [e.name for e in prof.events() if e.cpu_parent is None]
    assert top_level.count("aten::_foreach_mul_") == 2
    # (on CPU the foreach kernel loops over tensors inside itself; on CUDA it is one launch per group)
    assert "aten::mul_" not in top_level
