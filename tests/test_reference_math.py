r"""The reference implementation against the math: hand-computed cases and the authors' formula."""

import pytest
import torch

from sophia import SophiaG
from sophia.reference import hessian_ema_reference, sophiag_reference

# The settings of the hand-checked steps below, apart from $B$ and $\lambda$.
SMALL_STEP = dict(lr=0.1, beta1=0.9, rho=0.5, eps=1e-15, maximize=False)


def one_step(param, grad, exp_avg, hessian, **hyper):
    steps = [torch.tensor(0.0)]
    sophiag_reference([param], [grad], [exp_avg], [hessian], steps, **hyper)
    return steps[0]


def test_two_element_example_worked_by_hand():
    # lr = 0.1, beta1 = 0.9, rho = 0.5, bs = 2, weight_decay = 0.1, m_0 = 0.
    #
    # weight decay:  theta <- (1 - 0.1 * 0.1) * [1, -2]          = [0.99, -1.98]
    # momentum:      m = 0.9 * 0 + 0.1 * [0.5, -0.1]              = [0.05, -0.01]
    # denominator:   max(rho * bs * h, eps) = 0.5 * 2 * [0.1, 0.001] = [0.1, 0.001]
    # ratio:         min(|m| / d, 1) = min([0.5, 10], 1)           = [0.5, 1]
    # update:        theta -= 0.1 * sign(m) * ratio = -0.1*[+0.5, -1] = [-0.05, +0.1]
    # result:        [0.94, -1.88]; the second coordinate is clipped.
    param = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grad = torch.tensor([0.5, -0.1], dtype=torch.float64)
    exp_avg = torch.zeros(2, dtype=torch.float64)
    hessian = torch.tensor([0.1, 0.001], dtype=torch.float64)
    step = one_step(param, grad, exp_avg, hessian, **SMALL_STEP, bs=2, weight_decay=0.1)
    torch.testing.assert_close(
        param, torch.tensor([0.94, -1.88], dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        exp_avg, torch.tensor([0.05, -0.01], dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert step.item() == 1.0
    # The Hessian EMA is not touched by a step.
    torch.testing.assert_close(
        hessian, torch.tensor([0.1, 0.001], dtype=torch.float64), rtol=0, atol=0
    )


def test_negative_and_zero_curvature_give_a_sign_step():
    # h = [-1, 0] (Hutchinson can be negative): max(rho*bs*h, eps) = eps for both, the
    # ratio |m|/eps is huge and clipped to 1, so each coordinate moves by exactly lr
    # against sign(m). With the authors' "+1e-15" the first coordinate would divide by a
    # negative number and move *uphill* by 0.05/(0.5 - 1e-15)*0.1, unclipped.
    # The third coordinate has m = 0: sign(0) = 0, it does not move.
    param = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    grad = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    exp_avg = torch.zeros(3, dtype=torch.float64)
    hessian = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
    one_step(param, grad, exp_avg, hessian, **SMALL_STEP, bs=1, weight_decay=0.0)
    torch.testing.assert_close(
        param, torch.tensor([0.9, 1.1, 1.0], dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_maximize_is_a_step_on_the_negated_gradient():
    a = torch.tensor([1.0, -2.0])
    b = a.clone()
    g = torch.tensor([0.3, 0.2])
    h = torch.tensor([0.5, 2.0])
    hyper = dict(lr=0.1, beta1=0.9, rho=0.1, bs=3, weight_decay=0.2, eps=1e-15)
    one_step(a, g, torch.zeros(2), h.clone(), maximize=True, **hyper)
    one_step(b, -g, torch.zeros(2), h.clone(), maximize=False, **hyper)
    assert torch.equal(a, b)


def test_hessian_ema_by_hand():
    # beta2 = 0.75. square=True:  h = 0.75 * [4, 8] + 0.25 * [2, -1]^2 = [3 + 1, 6 + 0.25]
    #               square=False: h = 0.75 * [4, 8] + 0.25 * [2, -1]   = [3.5, 5.75]
    h = torch.tensor([4.0, 8.0])
    hessian_ema_reference([h], [torch.tensor([2.0, -1.0])], beta2=0.75, square=True)
    assert torch.equal(h, torch.tensor([4.0, 6.25]))
    h = torch.tensor([4.0, 8.0])
    hessian_ema_reference([h], [torch.tensor([2.0, -1.0])], beta2=0.75, square=False)
    assert torch.equal(h, torch.tensor([3.5, 5.75]))


def test_reparameterizations_are_the_same_rule():
    # The first paper version: eta' * clip(m / max(h, eps'), rho'), clip to [-rho', rho'].
    # Ours: eta * clip(m / max(rho h, eps), 1) with eta = rho' eta', rho = rho', eps = rho' eps'.
    torch.manual_seed(0)
    m = torch.randn(1000, dtype=torch.float64)
    h = torch.rand(1000, dtype=torch.float64) * torch.logspace(
        -6, 2, 1000, dtype=torch.float64
    )
    eta_old, rho_old, eps_old = 1e-3, 0.05, 1e-12
    old = eta_old * (m / h.clamp(min=eps_old)).clamp(-rho_old, rho_old)
    eta, rho, eps = rho_old * eta_old, rho_old, rho_old * eps_old
    new = eta * (m / (rho * h).clamp(min=eps)).clamp(-1, 1)
    torch.testing.assert_close(old, new, rtol=1e-12, atol=0)


# The authors' update, written out independently from the formula in their code:
# weight decay, momentum, then p -= lr * sign(m) * min(|m| / (rho * bs * h + 1e-15), 1);
# and every k steps h = beta2 * h + (1 - beta2) * g_hat^2.
def authors_formula(param, grad, exp_avg, hessian, *, lr, beta1, rho, bs, weight_decay):
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    ratio = (exp_avg.abs() / (rho * bs * hessian + 1e-15)).clamp(None, 1)
    param.addcmul_(exp_avg.sign(), ratio, value=-lr)


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_the_authors_formula_over_hundreds_of_steps(foreach):
    # The same gradient sequence fed to our optimizer and to the formula, float32,
    # 300 steps with a Hessian refresh every 10 (after that step, as in the reference loop).
    gen = torch.Generator().manual_seed(1)
    shapes = [(64, 32), (32,), (7, 3, 5)]
    ours = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone() for p in ours]
    exp_avgs = [torch.zeros_like(p) for p in theirs]
    hessians = [torch.zeros_like(p) for p in theirs]
    hyper = dict(lr=6e-4, betas=(0.965, 0.99), rho=0.05, weight_decay=0.2)
    bs = 480
    opt = SophiaG(ours, **hyper, foreach=foreach)
    for t in range(300):
        grads = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step(bs=bs)
        for p, g, m, h in zip(theirs, grads, exp_avgs, hessians):
            authors_formula(
                p,
                g,
                m,
                h,
                lr=hyper["lr"],
                beta1=hyper["betas"][0],
                rho=hyper["rho"],
                bs=bs,
                weight_decay=hyper["weight_decay"],
            )
        if t % 10 == 9:
            sampled = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
            for p, g in zip(ours, sampled):
                p.grad = g.clone()
            opt.update_hessian()
            for h, g in zip(hessians, sampled):
                h.mul_(hyper["betas"][1]).addcmul_(g, g, value=1 - hyper["betas"][1])
    for p, q, m, h in zip(ours, theirs, exp_avgs, hessians):
        state = opt.state[p]
        # Bit for bit in float32: `+ 1e-15` and the max of the epsilon form differ only
        # where rho*bs*h is within float32 rounding of 1e-15 (never, here).
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
        torch.testing.assert_close(state["exp_avg"], m, rtol=0, atol=0)
        torch.testing.assert_close(state["hessian"], h, rtol=0, atol=0)
        assert state["step"].item() == 300


def test_clip_of_the_ratio_equals_the_authors_sign_times_min_bitwise():
    # clip(m/d, 1) and sign(m) * min(|m|/d, 1) are the same numbers, bit for bit:
    # |m|/d = |m/d| in IEEE arithmetic and multiplying by +-1 is exact.
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(100_000, generator=gen) * torch.logspace(-20, 5, 100_000)
    m[::97] = 0.0
    d = (
        torch.rand(100_000, generator=gen) * torch.logspace(-15, 5, 100_000).flip(0)
    ).clamp(min=1e-15)
    ours = (m / d).clamp(min=-1, max=1)
    theirs = m.sign() * (m.abs() / d).clamp(max=1)
    assert torch.equal(ours, theirs)
    assert (ours.abs() == 1).any() and ((ours.abs() < 1) & (ours != 0)).any()
