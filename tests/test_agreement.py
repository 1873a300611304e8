r"""The reference and the torch._foreach version agree, on toy quadratics and beyond.

On the CPU, a foreach op is PyTorch calling the per-tensor kernel on each tensor, and
our two versions do the same ops in the same order: they agree bitwise. On a GPU the
foreach kernels are other code; there the promise is 1e-6 relative per element.
"""

import pytest
import torch
from conftest import assert_unchanged, snapshot

from sophia import SophiaG

STEPS = 200
K = 10


def quadratic(n, kind, gen, dtype=torch.float64):
    r"""A symmetric positive-definite A and a b for L(theta) = 1/2 theta^T A theta - b^T theta."""
    if kind == "diagonal":
        A = torch.diag(torch.rand(n, generator=gen, dtype=dtype) + 0.1)
    elif kind == "dense":
        M = torch.randn(n, n, generator=gen, dtype=dtype)
        A = M @ M.T / n + 0.1 * torch.eye(n, dtype=dtype)
    elif kind == "ill-conditioned":
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
        A = Q @ torch.diag(torch.logspace(-3, 3, n, dtype=dtype)) @ Q.T
    b = torch.randn(n, generator=gen, dtype=dtype)
    return A, b


def run(
    foreach,
    A,
    b,
    *,
    shapes,
    dtype,
    groups,
    steps=STEPS,
    no_grad_every=0,
    seed=0,
    estimates=False,
    noise=0.1,
):
    r"""Minimize (or maximize) the quadratic over a parameter vector split into tensors of `shapes`.

    Each group is (indices of the tensors, hyperparameters). Every K steps, after the
    step, a Hessian refresh: the sampled gradient is the gradient plus noise (GNB's
    convention, squared by the optimizer) or, with `estimates=True`, the exact diagonal
    of A plus noise (Hutchinson's convention). The noise comes from a generator seeded
    identically for both runs.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = [torch.Size(s).numel() for s in shapes]
    theta0 = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    params = [
        t.reshape(s).to(dtype).clone().requires_grad_()
        for t, s in zip(theta0.split(sizes), shapes)
    ]
    param_groups = [
        dict(params=[params[i] for i in idx], **hyper) for idx, hyper in groups
    ]
    opt = SophiaG(param_groups, foreach=foreach)
    diag = torch.diagonal(A)
    noise_gen = torch.Generator().manual_seed(seed + 1)

    def grads_at():
        theta = torch.cat([p.detach().to(A.dtype).reshape(-1) for p in params])
        g = A @ theta - b
        return [x.reshape(s).to(dtype) for x, s in zip(g.split(sizes), shapes)]

    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, grads_at())):
            skip = no_grad_every and (t + i) % no_grad_every == 0
            p.grad = None if skip else g
        opt.step(bs=16)
        if t % K == K - 1:
            if estimates:
                est = [
                    (
                        d
                        + noise
                        * torch.randn(d.shape, generator=noise_gen, dtype=d.dtype)
                    )
                    .reshape(s)
                    .to(dtype)
                    for d, s in zip(diag.split(sizes), shapes)
                ]
                opt.update_hessian(est)
            else:
                for p, g in zip(params, grads_at()):
                    p.grad = g + noise * torch.randn(
                        g.shape, generator=noise_gen, dtype=torch.float64
                    ).to(dtype)
                opt.update_hessian()
    return params, opt


def assert_agree(ref, fe, *, exact):
    (p_ref, opt_ref), (p_fe, opt_fe) = ref, fe
    for a, b in zip(p_ref, p_fe):
        sa, sb = opt_ref.state.get(a, {}), opt_fe.state.get(b, {})
        assert sa.keys() == sb.keys()
        pairs = [(a.detach(), b.detach())] + [(sa[k], sb[k]) for k in sa]
        for x, y in pairs:
            if exact:
                assert torch.equal(x, y), (x - y).abs().max()
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def max_rel_diff(ref, fe):
    worst = 0.0
    for a, b in zip(ref[0], fe[0]):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, ((a - b).abs() / a.abs().clamp(min=1e-30)).max().item())
    return worst


HYPER = dict(lr=1e-2, betas=(0.9, 0.99), rho=0.5, weight_decay=0.0)
SHAPES = [(4, 5), (7,), (2, 3, 2), (1,), (10,)]


@pytest.mark.parametrize("kind", ["diagonal", "dense", "ill-conditioned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("estimates", [False, True])
def test_reference_and_foreach_agree_bitwise_on_quadratics(kind, dtype, estimates):
    n = sum(torch.Size(s).numel() for s in SHAPES)
    A, b = quadratic(n, kind, torch.Generator().manual_seed(3))
    groups = [(range(len(SHAPES)), HYPER)]
    ref = run(
        False, A, b, shapes=SHAPES, dtype=dtype, groups=groups, estimates=estimates
    )
    fe = run(True, A, b, shapes=SHAPES, dtype=dtype, groups=groups, estimates=estimates)
    assert_agree(ref, fe, exact=True)
    # The run actually moved: not two copies of the starting point.
    start = run(False, A, b, shapes=SHAPES, dtype=dtype, groups=groups, steps=0)
    assert max_rel_diff(start, ref) > 1e-3


def test_agree_with_weight_decay_maximize_groups_and_missing_grads():
    # Three groups with their own hyperparameters, one maximizing the negated
    # quadratic (which is minimizing the quadratic); some tensors lose their gradient
    # on some steps and must then be left alone.
    n = sum(torch.Size(s).numel() for s in SHAPES)
    A, b = quadratic(n, "dense", torch.Generator().manual_seed(4))
    groups = [
        ([0, 1], dict(lr=1e-2, betas=(0.9, 0.99), rho=0.5, weight_decay=0.1)),
        ([2, 3], dict(lr=3e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.0)),
        ([4], dict(lr=5e-3, betas=(0.8, 0.9), rho=1.0, weight_decay=0.2)),
    ]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ref = run(
            False, A, b, shapes=SHAPES, dtype=dtype, groups=groups, no_grad_every=3
        )
        fe = run(True, A, b, shapes=SHAPES, dtype=dtype, groups=groups, no_grad_every=3)
        assert_agree(ref, fe, exact=True)

    maximize = [(idx, dict(hyper, maximize=True)) for idx, hyper in groups]
    # Without noise in the refresh, since (-g + n)^2 differs from (g + n)^2.
    ref = run(
        False, -A, -b, shapes=SHAPES, dtype=torch.float32, groups=maximize, noise=0.0
    )
    fe = run(
        True, -A, -b, shapes=SHAPES, dtype=torch.float32, groups=maximize, noise=0.0
    )
    assert_agree(ref, fe, exact=True)
    minimize = run(
        False, A, b, shapes=SHAPES, dtype=torch.float32, groups=groups, noise=0.0
    )
    for x, y in zip(ref[0], minimize[0]):
        assert torch.equal(x, y)


def test_a_parameter_without_grad_is_untouched_and_gets_no_state():
    for foreach in (False, True):
        a = torch.randn(3, requires_grad=True)
        b = torch.randn(3, requires_grad=True)
        b_before = b.detach().clone()
        opt = SophiaG([a, b], lr=0.1, foreach=foreach)
        a.grad = torch.ones(3)
        opt.step()
        opt.update_hessian()
        assert b not in opt.state
        assert torch.equal(b.detach(), b_before)
        b.grad = torch.ones(3)
        a.grad = None
        a_before = snapshot([a], opt)
        opt.step()
        assert_unchanged(a_before, [a], opt)


def test_mixed_devices_and_dtypes_in_one_group():
    # The foreach version groups tensors by (device, dtype); the CPU is the only device
    # here, so mix dtypes (a GPU run of the test suite adds a CUDA tensor).
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for foreach in (False, True):
        gen = torch.Generator().manual_seed(5)
        params = []
        for device in devices:
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                params.append(
                    torch.randn(6, generator=gen)
                    .to(device=device, dtype=dtype)
                    .requires_grad_()
                )
        opt = SophiaG(params, lr=1e-2, rho=0.1, foreach=foreach)
        for t in range(30):
            for p in params:
                p.grad = (2 * p.detach().float() - 1).to(p.dtype)
            opt.step(bs=4)
            if t % 5 == 4:
                opt.update_hessian()
        results.append(params)
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.device == b.device
        if a.device.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_complex_parameters_are_pairs_of_reals():
    # A complex parameter z = x + iy must follow exactly the trajectory of the real
    # parameter (x, y): Hessian estimate |grad component|^2 per real coordinate.
    for foreach in (False, True):
        gen = torch.Generator().manual_seed(6)
        z = torch.randn(5, dtype=torch.complex64, generator=gen).requires_grad_()
        r = torch.view_as_real(z.detach()).clone().requires_grad_()
        opt_z = SophiaG([z], lr=1e-2, rho=0.1, foreach=foreach)
        opt_r = SophiaG([r], lr=1e-2, rho=0.1, foreach=foreach)
        target = torch.randn(5, dtype=torch.complex64, generator=gen)
        for t in range(50):
            loss_z = (z - target).abs().pow(2).sum()
            loss_r = (r - torch.view_as_real(target)).pow(2).sum()
            opt_z.zero_grad()
            opt_r.zero_grad()
            loss_z.backward()
            loss_r.backward()
            opt_z.step(bs=1)
            opt_r.step(bs=1)
            if t % 5 == 4:
                opt_z.zero_grad()
                opt_r.zero_grad()
                (z - target).abs().pow(2).sum().backward()
                (r - torch.view_as_real(target)).pow(2).sum().backward()
                opt_z.update_hessian()
                opt_r.update_hessian()
        torch.testing.assert_close(
            torch.view_as_real(z.detach()), r.detach(), rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(
            torch.view_as_real(opt_z.state[z]["hessian"]), opt_r.state[r]["hessian"]
        )
        assert (torch.view_as_real(opt_z.state[z]["hessian"]) >= 0).all()


def test_default_dispatch_follows_adamw(monkeypatch):
    # On the CPU, foreach=None picks the reference, as torch.optim.AdamW does.
    import sophia.optimizer as mod

    calls = []
    monkeypatch.setattr(
        mod, "sophiag_reference", lambda *a, **k: calls.append("reference")
    )
    monkeypatch.setattr(mod, "sophiag_foreach", lambda *a, **k: calls.append("foreach"))
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    SophiaG([p]).step()
    SophiaG([p], foreach=True).step()
    SophiaG([p], foreach=False).step()
    assert calls == ["reference", "foreach", "reference"]
    assert mod._default_foreach([torch.zeros(1, device="meta")]) is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_and_foreach_agree_on_cuda(dtype):
    n = sum(torch.Size(s).numel() for s in SHAPES)
    A, b = quadratic(n, "dense", torch.Generator().manual_seed(3))
    A, b = A.cuda(), b.cuda()
    groups = [(range(len(SHAPES)), dict(HYPER, weight_decay=0.1))]
    ref = run(False, A, b, shapes=SHAPES, dtype=dtype, groups=groups)
    fe = run(True, A, b, shapes=SHAPES, dtype=dtype, groups=groups)
    assert max_rel_diff(ref, fe) <= (1e-6 if dtype == torch.float32 else 1e-2)
