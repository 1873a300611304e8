r"""Bad input: a clear error that names the argument and the value, and nothing changed."""

import math

import pytest
import torch
from conftest import assert_unchanged, snapshot

from sophia import SophiaG, SophiaH


@pytest.fixture(params=[False, True], ids=["reference", "foreach"])
def trained(request):
    r"""An optimizer after a few steps and a refresh, with gradients in place."""
    torch.manual_seed(0)
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = SophiaG(params, lr=0.01, foreach=request.param)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step(bs=8)
    opt.update_hessian()
    return params, opt


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lr=-1e-3), ValueError, r"lr must be a finite number >= 0.0, got -0.001"),
        (dict(lr=math.nan), ValueError, r"lr .* got nan"),
        (dict(lr=math.inf), ValueError, r"lr .* got inf"),
        (dict(lr="0.1"), TypeError, r"lr must be a real number, got '0.1'"),
        (dict(rho=0.0), ValueError, r"rho must be a finite number > 0.0, got 0.0"),
        (dict(rho=-0.04), ValueError, r"rho .* got -0.04"),
        (
            dict(betas=(1.0, 0.99)),
            ValueError,
            r"betas\[0\] must be in \[0, 1\), got 1.0",
        ),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] .* got -0.1"),
        (
            dict(betas=(0.9, 1.5)),
            ValueError,
            r"betas\[1\] must be in \[0, 1\), got 1.5",
        ),
        (dict(betas=(0.9,)), ValueError, r"betas must be a pair"),
        (dict(weight_decay=-0.1), ValueError, r"weight_decay .* got -0.1"),
        (dict(eps=0.0), ValueError, r"eps .* got 0.0"),
        (dict(foreach=True, fused=True), ValueError, r"foreach=True and fused=True"),
        (
            dict(lr=torch.tensor(0.1, device="meta")),
            TypeError,
            r"lr is a tensor .* needs fused=True",
        ),
        (
            dict(lr=torch.tensor([0.1, 0.2]), fused=True),
            ValueError,
            r"lr as a tensor must hold one",
        ),
        (
            dict(lr=torch.tensor(-0.1), fused=True),
            ValueError,
            r"lr must be a finite number >= 0.0, got -0.1",
        ),
        (dict(foreach="yes"), TypeError, r"foreach must be None or a bool, got 'yes'"),
        (dict(maximize=1), TypeError, r"maximize must be a bool, got 1"),
    ],
)
def test_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SophiaG([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_param_group_is_not_added():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = SophiaG([a])
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr .* got -1"):
        opt.add_param_group(dict(params=[b], lr=-1))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "key, value, exc, match",
    [
        ("lr", -0.5, ValueError, r"param_groups\[0\]: lr .* got -0.5"),
        ("lr", math.nan, ValueError, r"param_groups\[0\]: lr .* got nan"),
        ("rho", 0.0, ValueError, r"param_groups\[0\]: rho"),
        ("betas", (0.9, 1.0), ValueError, r"param_groups\[0\]: betas\[1\]"),
        ("weight_decay", -1.0, ValueError, r"param_groups\[0\]: weight_decay"),
    ],
)
def test_step_refuses_a_group_edited_into_a_bad_state(trained, key, value, exc, match):
    # A scheduler or a user may edit param_groups at any time: checked at every step.
    params, opt = trained
    opt.param_groups[0][key] = value
    before = snapshot(params, opt)
    with pytest.raises(exc, match=match):
        opt.step(bs=8)
    assert_unchanged(before, params, opt)
    with pytest.raises(exc, match=match):
        opt.update_hessian()
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize(
    "bs, exc",
    [
        (0, ValueError),
        (-5, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        ("5120", TypeError),
        (True, TypeError),
    ],
)
def test_step_refuses_bad_bs(trained, bs, exc):
    params, opt = trained
    before = snapshot(params, opt)
    with pytest.raises(exc, match=r"bs"):
        opt.step(bs=bs)
    assert_unchanged(before, params, opt)


def test_sparse_gradient_refuses_the_whole_step():
    for foreach in (False, True):
        dense = torch.randn(4, requires_grad=True)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = SophiaG([dense, emb.weight], foreach=foreach)
        dense.grad = torch.ones(4)
        emb(torch.tensor([1, 2])).sum().backward()
        before = snapshot([dense, emb.weight], opt)
        with pytest.raises(
            RuntimeError, match=r"sparse gradients: param_groups\[0\]\['params'\]\[1\]"
        ):
            opt.step()
        assert_unchanged(before, [dense, emb.weight], opt)
        with pytest.raises(RuntimeError, match=r"sparse"):
            opt.update_hessian()
        assert_unchanged(before, [dense, emb.weight], opt)


def test_update_hessian_before_any_step_works():
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = SophiaG([p], betas=(0.9, 0.5))
    p.grad = torch.tensor([2.0, -4.0])
    opt.update_hessian()
    # h = 0.5 * 0 + 0.5 * g^2
    assert torch.equal(opt.state[p]["hessian"], torch.tensor([2.0, 8.0]))
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(2))
    assert opt.state[p]["step"].item() == 0
    opt.step(bs=1)
    assert opt.state[p]["step"].item() == 1


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (
            lambda ps: [torch.ones(3, 4)],
            ValueError,
            r"estimates has 1 entries but the optimizer has 2 parameters",
        ),
        (
            lambda ps: [torch.ones(3, 4), torch.ones(4)],
            ValueError,
            r"estimates\[1\] has shape \(4,\) but its parameter has shape \(5,\)",
        ),
        (
            lambda ps: [torch.ones(4, 3), None],
            ValueError,
            r"estimates\[0\] has shape \(4, 3\)",
        ),
        (
            lambda ps: [torch.ones(3, 4), "h"],
            TypeError,
            r"estimates\[1\] must be a tensor or None, got str",
        ),
        (
            lambda ps: [torch.ones(3, 4, dtype=torch.int64), None],
            TypeError,
            r"estimates\[0\] has dtype torch.int64",
        ),
        (lambda ps: torch.ones(3, 4), TypeError, r"estimates must be a list"),
        (
            lambda ps: [torch.ones(3, 4), torch.ones(5, dtype=torch.complex64)],
            TypeError,
            r"estimates\[1\] has dtype",
        ),
        (
            lambda ps: [torch.ones(3, 4).to_sparse(), None],
            ValueError,
            r"estimates\[0\] is sparse",
        ),
        (
            lambda ps: [torch.ones(3, 4, device="meta"), None],
            ValueError,
            r"estimates\[0\] is on meta",
        ),
    ],
)
def test_update_hessian_rejects_mismatched_estimates(trained, make, exc, match):
    params, opt = trained
    before = snapshot(params, opt)
    with pytest.raises(exc, match=match):
        opt.update_hessian(make(params))
    assert_unchanged(before, params, opt)


def test_estimates_with_none_skip_parameters(trained):
    params, opt = trained
    h1 = opt.state[params[1]]["hessian"].clone()
    opt.update_hessian([torch.ones(3, 4), None])
    assert torch.equal(opt.state[params[1]]["hessian"], h1)


def test_win_rate_needs_a_bs():
    p = torch.zeros(2, requires_grad=True)
    opt = SophiaG([p])
    with pytest.raises(RuntimeError, match=r"call step\(\) first, or pass bs="):
        opt.win_rate()
    with pytest.raises(RuntimeError, match=r"no optimizer state"):
        opt.win_rate(bs=4)
    with pytest.raises(ValueError, match=r"bs .* got -1"):
        opt.win_rate(bs=-1)


def test_sophiah_rejects_bad_configuration():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"n_samples must be an int >= 1, got 0"):
        SophiaH(p, n_samples=0)
    with pytest.raises(
        ValueError,
        match=r"distribution must be 'rademacher' or 'gaussian', got 'normal'",
    ):
        SophiaH(p, distribution="normal")
    opt = SophiaH(p)
    with pytest.raises(ValueError, match=r"exactly one of estimates= or loss="):
        opt.update_hessian()
    with pytest.raises(ValueError, match=r"exactly one of estimates= or loss="):
        opt.update_hessian([torch.ones(2)], loss=p[0].sum())
