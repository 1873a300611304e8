r"""Non-finite values: a NaN or an infinity in a gradient or an estimate never reaches the
parameters silently, and negative curvature (Hutchinson) keeps every update bounded.

The rule (`SophiaG(nonfinite=...)`): `"raise"` refuses the step or refresh with a
`FloatingPointError` naming the parameter, `"skip"` skips it and counts it, and only
`"unchecked"`, asked for by name, lets a NaN through. In every refused or skipped case,
parameters and state are bit for bit as they were.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, hyper, implementations, snapshot

from sophia import SophiaG, SophiaH

FOUND = implementations()
IMPLS, IMPL_IDS = list(FOUND.values()), list(FOUND)
HYPER = hyper(lr=0.1, betas=(0.9, 0.99))


def make_params():
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=gen).requires_grad_(),
        torch.randn(5, generator=gen).requires_grad_(),
    ]


# A few finite steps and a refresh first, so that there is state to protect.
def warmed_up(flags, **kwargs):
    params = make_params()
    opt = SophiaG(params, **HYPER, **flags, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(bs=8)
        opt.update_hessian()
    return params, opt


@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_gradient_refuses_the_step_and_changes_nothing(flags, bad):
    params, opt = warmed_up(flags)
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[2] = bad
    before = snapshot(params, opt)
    with pytest.raises(
        FloatingPointError,
        match=r"param_groups\[0\]\['params'\]\[1\] has a gradient with 1 non-finite",
    ):
        opt.step(bs=8)
    assert_unchanged(before, params, opt)
    # Once the gradient is fixed, training goes on.
    params[1].grad[2] = 0.0
    opt.step(bs=8)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_the_first_step_refused_creates_no_state(flags):
    params = make_params()
    opt = SophiaG(params, **HYPER, **flags)
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    with pytest.raises(FloatingPointError, match=r"NaN"):
        opt.step()
    assert not opt.state


@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_skip_skips_the_whole_step_and_counts_it(flags):
    params, opt = warmed_up(flags, nonfinite="skip")
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = math.inf
    before = snapshot(params, opt)
    opt.step(bs=8)
    assert opt.skipped_steps == 1
    assert_unchanged(before, params, opt)


# The opt-out does what it says: no look, and the NaN goes through.
def test_unchecked_lets_a_nan_through():
    params = make_params()
    opt = SophiaG(params, **HYPER, nonfinite="unchecked")
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = math.nan
    opt.step()
    assert torch.isnan(params[0][0, 0])


def test_nonfinite_must_be_a_known_rule():
    with pytest.raises(ValueError, match=r"nonfinite must be one of .* got 'ignore'"):
        SophiaG(make_params(), nonfinite="ignore")


# ## The refresh
@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_a_nonfinite_sampled_gradient_refuses_the_refresh(flags):
    params, opt = warmed_up(flags)
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[1, 1] = math.nan
    before = snapshot(params, opt)
    with pytest.raises(
        FloatingPointError,
        match=r"update_hessian refused: param_groups\[0\]\['params'\]\[0\]",
    ):
        opt.update_hessian()
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_a_nonfinite_estimate_refuses_or_skips_the_refresh(flags):
    params, opt = warmed_up(flags)
    estimates = [torch.ones(3, 4), torch.tensor([1.0, math.inf, 1.0, 1.0, 1.0])]
    before = snapshot(params, opt)
    with pytest.raises(
        FloatingPointError,
        match=r"estimates\[1\] has a Hessian estimate with 1 non-finite value\(s\) \(inf\)",
    ):
        opt.update_hessian(estimates)
    assert_unchanged(before, params, opt)
    opt.nonfinite = "skip"
    opt.update_hessian(estimates)
    assert opt.skipped_refreshes == 1
    assert_unchanged(before, params, opt)


# ## Negative curvature
#
# Hutchinson's estimates can be negative. With $h < 0$ the guard
# $\max(\rho B h, \epsilon) = \epsilon$ makes the ratio huge, and the clip turns the step
# into a sign-of-momentum step: downhill (against $m$), of size exactly $\eta$ per
# coordinate, finite. The authors' `+ 1e-15` would divide by a negative number and step
# uphill by $|m| / |\rho B h|$, without bound.
@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_negative_h_gives_a_bounded_downhill_sign_step(flags):
    p = torch.tensor([1.0, -2.0, 3.0, 0.5], requires_grad=True)
    opt = SophiaH([p], lr=0.01, betas=(0.0, 0.0), rho=0.05, weight_decay=0.0, **flags)
    opt.update_hessian([torch.tensor([-1e-3, -5.0, -1e30, -1e-30])])
    p.grad = torch.tensor([1e-6, -3.0, 2.0, -0.5])
    before = p.detach().clone()
    opt.step()
    change = p.detach() - before
    assert torch.isfinite(p).all()
    # Exactly $-\eta\,\operatorname{sign}(m)$, up to the rounding of $\theta - \eta$ in `float32`.
    torch.testing.assert_close(change, -0.01 * torch.sign(p.grad), rtol=0, atol=1e-7)


# Finite but extreme values stay bounded too: an $h$ that overflows $\rho B h$ to
# infinity gives a zero step ($m/\infty = 0$), a tiny one a full sign step.
@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_extreme_finite_curvature_keeps_the_step_bounded(flags):
    p = torch.zeros(3, requires_grad=True)
    opt = SophiaG([p], lr=0.5, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, **flags)
    opt.update_hessian([torch.tensor([3e38, 1e-38, 0.0])])
    p.grad = torch.tensor([1e30, 1.0, -1.0])
    opt.step(bs=1e30)
    assert torch.equal(p.detach(), torch.tensor([0.0, -0.5, 0.5]))
