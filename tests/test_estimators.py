r"""Tests of `sophia.hessian`: the three Hessian-diagonal estimators against the math.

Monte Carlo checks use fixed seeds and `float64`, and a tolerance of five standard
errors per coordinate: the standard error comes either from the variance formulas
derived in `sophia/hessian.py` (Hutchinson, with the Hessian known exactly) or from the
sample variance of the estimates (Gauss-Newton-Bartlett). A correct estimator fails
such a check with probability below $10^{-6}$ per coordinate; a biased one fails it as
soon as its bias exceeds five standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sophia.hessian import exact_hessian_diagonal, gnb_loss, hutchinson

DTYPE = torch.float64
SIGMAS = 5.0


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(n: int, seed: int) -> torch.Tensor:
    r"""A dense symmetric $n \times n$ matrix with no zero off-diagonal row."""
    m = torch.randn(n, n, generator=_gen(seed), dtype=DTYPE)
    return (m + m.T) / 2 + n * torch.eye(n, dtype=DTYPE)


def _quadratic(a: torch.Tensor, seed: int = 0):
    r"""$L = \tfrac12 \theta^\top A \theta + b^\top \theta$ with $\theta$ split into two
    parameter tensors (so the per-parameter bookkeeping is exercised). Returns
    `(loss, params)`; the Hessian is `a`."""
    n = a.shape[0]
    g = _gen(seed)
    theta1 = torch.randn(2, 2, generator=g, dtype=DTYPE).requires_grad_()
    theta2 = torch.randn(n - 4, generator=g, dtype=DTYPE).requires_grad_()
    b = torch.randn(n, generator=g, dtype=DTYPE)
    theta = torch.cat([theta1.reshape(-1), theta2])
    loss = 0.5 * theta @ a @ theta + b @ theta
    return loss, [theta1, theta2]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _single_probe_samples(loss, params, n, distribution, seed):
    r"""`n` independent one-probe estimates, flattened, as an `(n, numel)` tensor."""
    g = _gen(seed)
    return torch.stack(
        [
            _flat(hutchinson(loss, params, distribution=distribution, generator=g))
            for _ in range(n)
        ]
    )


def _variance(h: torch.Tensor, distribution: str) -> torch.Tensor:
    r"""Variance of one Hutchinson estimate per coordinate, for the Hessian `h`:
    Rademacher $\sum_{j\ne i} H_{ij}^2$, Gaussian $\sum_j H_{ij}^2 + H_{ii}^2$."""
    squares = (h**2).sum(dim=1)
    diag2 = h.diagonal() ** 2
    return squares - diag2 if distribution == "rademacher" else squares + diag2


# ---------------------------------------------------------------------------------------
# Hutchinson
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_converges_to_diagonal_of_quadratic(distribution):
    n, samples = 7, 2000
    a = _symmetric(n, seed=1)
    loss, params = _quadratic(a)
    single = _single_probe_samples(loss, params, samples, distribution, seed=2)
    mean = single.mean(dim=0)
    var = _variance(a, distribution)
    assert (var > 0).all()
    tol = SIGMAS * torch.sqrt(var / samples) + 1e-12
    assert ((mean - a.diagonal()).abs() <= tol).all(), (mean, a.diagonal(), tol)
    # The variance formula itself: the sample variance $s^2$ has standard error
    # $\sqrt{(\mu_4 - \sigma^4)/N}$, estimated from the samples' fourth central moment.
    centered = single - mean
    sample_var = (centered**2).mean(dim=0)
    fourth = (centered**4).mean(dim=0)
    var_tol = SIGMAS * torch.sqrt((fourth - sample_var**2) / samples)
    assert ((sample_var - var).abs() <= var_tol).all(), (sample_var, var, var_tol)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_n_samples_is_the_mean_of_single_probes(distribution):
    a = _symmetric(7, seed=3)
    loss, params = _quadratic(a)
    samples = 50
    single = _single_probe_samples(loss, params, samples, distribution, seed=4)
    averaged = _flat(
        hutchinson(
            loss,
            params,
            n_samples=samples,
            distribution=distribution,
            generator=_gen(4),
        )
    )
    torch.testing.assert_close(averaged, single.mean(dim=0), rtol=1e-12, atol=1e-12)


def test_hutchinson_converges_on_a_nonlinear_model():
    r"""A tiny MLP: the full Hessian from `torch.func.hessian` gives both the target and
    the Rademacher variance."""
    params, loss_fn = _tiny_mlp()
    loss = loss_fn(*params)
    full = _full_hessian(loss_fn, params)
    samples = 2000
    mean = _flat(hutchinson(loss, params, n_samples=samples, generator=_gen(5)))
    tol = SIGMAS * torch.sqrt(_variance(full, "rademacher") / samples) + 1e-12
    assert ((mean - full.diagonal()).abs() <= tol).all()


def test_hutchinson_rademacher_is_exact_for_a_diagonal_hessian():
    a = torch.diag(torch.arange(1, 8, dtype=DTYPE) - 3.5)
    loss, params = _quadratic(a)
    for seed in range(5):
        estimate = _flat(hutchinson(loss, params, generator=_gen(seed)))
        torch.testing.assert_close(estimate, a.diagonal(), rtol=0, atol=1e-14)


def test_hutchinson_rademacher_probe_has_both_signs():
    r"""On $L = \tfrac12\sum_i a_i\theta_i^2 + c\,\theta_0\theta_1$ one Rademacher probe gives
    $\hat h_0 = a_0 + c\,u_0u_1$ and $\hat h_1 = a_1 + c\,u_0u_1$. A correct probe makes
    $u_0u_1 = \pm1$, so both $a_0 \pm c$ appear across seeds and their mean is $a_0$. The
    always-$-1$ probe (`randint_like(p, 0, 1) * 2 - 1`) gives $a_0 + c$ every time."""
    a = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    c = 0.5
    theta = torch.randn(3, generator=_gen(0), dtype=DTYPE).requires_grad_()
    loss = 0.5 * (a * theta**2).sum() + c * theta[0] * theta[1]
    g = _gen(7)
    estimates = torch.stack(
        [hutchinson(loss, [theta], generator=g)[0] for _ in range(64)]
    )
    assert set(estimates[:, 0].tolist()) == {a[0].item() - c, a[0].item() + c}
    assert set(estimates[:, 1].tolist()) == {a[1].item() - c, a[1].item() + c}
    assert (estimates[:, 2] == a[2]).all()
    assert abs(estimates[:, 0].mean().item() - a[0].item()) <= SIGMAS * c / math.sqrt(
        64
    )


def test_hutchinson_gaussian_probe_is_continuous():
    r"""On $\tfrac12 a\theta^2$ a Gaussian probe gives $a u^2$: positive, all different."""
    theta = torch.ones(4, dtype=DTYPE, requires_grad=True)
    loss = 1.5 * (theta**2).sum()
    estimate = hutchinson(loss, [theta], distribution="gaussian", generator=_gen(0))[0]
    assert (estimate > 0).all()
    assert len(set(estimate.tolist())) == estimate.numel()


@pytest.mark.parametrize("shape", [(), (5,)])
def test_sum_of_squares_has_hessian_two(shape):
    r"""Levanter's check: $L = \sum x^2$ has $\operatorname{diag}(H) = 2$."""
    x = torch.randn(shape, generator=_gen(0), dtype=DTYPE).requires_grad_()
    loss = (x**2).sum()
    expected = torch.full(shape, 2.0, dtype=DTYPE)
    torch.testing.assert_close(hutchinson(loss, [x], generator=_gen(1))[0], expected)
    torch.testing.assert_close(hutchinson(loss, [x], n_samples=3)[0], expected)
    torch.testing.assert_close(exact_hessian_diagonal(loss, [x])[0], expected)


def test_hutchinson_reproducible_with_generator():
    a = _symmetric(7, seed=8)
    loss, params = _quadratic(a)
    for distribution in ("rademacher", "gaussian"):
        first = _flat(
            hutchinson(
                loss, params, n_samples=3, distribution=distribution, generator=_gen(9)
            )
        )
        again = _flat(
            hutchinson(
                loss, params, n_samples=3, distribution=distribution, generator=_gen(9)
            )
        )
        other = _flat(
            hutchinson(
                loss, params, n_samples=3, distribution=distribution, generator=_gen(10)
            )
        )
        assert torch.equal(first, again)
        assert not torch.equal(first, other)


def test_hutchinson_reuses_caller_gradients():
    a = _symmetric(7, seed=11)
    loss, params = _quadratic(a)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    with_grads = hutchinson(loss, params, grads=grads, n_samples=4, generator=_gen(12))
    without = hutchinson(loss, params, n_samples=4, generator=_gen(12))
    for x, y in zip(with_grads, without):
        assert torch.equal(x, y)


def test_hutchinson_output_shapes_dtypes_and_unused_params():
    w = torch.randn(3, 2, generator=_gen(0), dtype=torch.float32).requires_grad_()
    linear_only = torch.randn(4, dtype=torch.float32).requires_grad_()
    unused = torch.randn(2, 5, dtype=torch.float32).requires_grad_()
    loss = (w.tanh() ** 2).sum() + linear_only.sum()
    params = [w, linear_only, unused]
    for estimates in (
        hutchinson(loss, params, generator=_gen(1)),
        hutchinson(loss, iter(params), distribution="gaussian"),
        exact_hessian_diagonal(loss, params),
    ):
        assert len(estimates) == len(params)
        for e, p in zip(estimates, params):
            assert e.shape == p.shape and e.dtype == p.dtype and e.device == p.device
            assert not e.requires_grad
        assert torch.equal(estimates[1], torch.zeros_like(linear_only))
        assert torch.equal(estimates[2], torch.zeros_like(unused))
        assert estimates[0].abs().sum() > 0
    # The graph of the loss is still there for the caller.
    loss.backward()
    assert w.grad is not None


def test_hutchinson_linear_loss_gives_zeros():
    theta = torch.randn(3, dtype=DTYPE, requires_grad=True)
    loss = (2.0 * theta).sum()
    assert torch.equal(hutchinson(loss, [theta])[0], torch.zeros(3, dtype=DTYPE))


def test_hutchinson_half_precision_parameter():
    w = torch.randn(8, generator=_gen(0)).to(torch.bfloat16).requires_grad_()
    loss = (w.float() ** 2).sum() * 1.5
    estimate = hutchinson(loss, [w], n_samples=2, generator=_gen(1))[0]
    assert estimate.dtype == torch.bfloat16
    torch.testing.assert_close(estimate.float(), torch.full((8,), 3.0))


# ---------------------------------------------------------------------------------------
# The exact diagonal
# ---------------------------------------------------------------------------------------


def _tiny_mlp():
    r"""A two-layer tanh network with a cross-entropy loss, `float64`: returns
    `(params, loss_fn)` with `loss_fn(*params)` the scalar loss."""
    g = _gen(20)
    x = torch.randn(6, 3, generator=g, dtype=DTYPE)
    y = torch.randint(0, 2, (6,), generator=g)
    params = [
        torch.randn(4, 3, generator=g, dtype=DTYPE).requires_grad_(),
        torch.randn(4, generator=g, dtype=DTYPE).requires_grad_(),
        torch.randn(2, 4, generator=g, dtype=DTYPE).requires_grad_(),
        torch.randn(2, generator=g, dtype=DTYPE).requires_grad_(),
    ]

    def loss_fn(w1, b1, w2, b2):
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    return params, loss_fn


def _full_hessian(loss_fn, params) -> torch.Tensor:
    r"""The full Hessian of `loss_fn` in the flattened parameters, by `torch.autograd.functional`."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def flat_loss(flat):
        pieces = torch.split(flat, sizes)
        return loss_fn(*(piece.reshape(shape) for piece, shape in zip(pieces, shapes)))

    flat = _flat([p.detach() for p in params])
    return torch.autograd.functional.hessian(flat_loss, flat)


def test_exact_diagonal_of_quadratic():
    a = _symmetric(7, seed=21)
    loss, params = _quadratic(a)
    torch.testing.assert_close(
        _flat(exact_hessian_diagonal(loss, params)), a.diagonal(), rtol=0, atol=1e-12
    )


def test_exact_diagonal_matches_autograd_functional_hessian():
    params, loss_fn = _tiny_mlp()
    loss = loss_fn(*params)
    diagonal = exact_hessian_diagonal(loss, params)
    blocks = torch.autograd.functional.hessian(
        loss_fn, tuple(p.detach() for p in params)
    )
    for i, (d, p) in enumerate(zip(diagonal, params)):
        expected = (
            blocks[i][i].reshape(p.numel(), p.numel()).diagonal().reshape(p.shape)
        )
        torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-12)
    # The network's own curvature makes some diagonal entries negative (a Gauss-Newton
    # diagonal never is), so this is a real test of the second-order terms.
    assert _flat(diagonal).min() < 0 < _flat(diagonal).max()


def test_exact_diagonal_float32():
    a = _symmetric(7, seed=22).float()
    theta = torch.randn(7, generator=_gen(0)).requires_grad_()
    loss = 0.5 * theta @ a @ theta
    torch.testing.assert_close(exact_hessian_diagonal(loss, [theta])[0], a.diagonal())


# ---------------------------------------------------------------------------------------
# Gauss-Newton-Bartlett
# ---------------------------------------------------------------------------------------


def _labels_from_gradient(logits_grad: torch.Tensor) -> torch.Tensor:
    r"""The sampled labels, read back from $\partial \hat L / \partial z_b = (p_b - e_{\hat y_b})/B$:
    the only negative entry of each row is at $\hat y_b$."""
    return logits_grad.reshape(-1, logits_grad.shape[-1]).argmin(dim=-1)


@pytest.mark.parametrize(
    ("shape", "predictions"),
    [((5,), 1), ((3, 5), 3), ((2, 4, 5), 8), ((2, 3, 4, 1), 24)],
)
def test_gnb_counts_predictions_and_has_grad(shape, predictions):
    logits = torch.randn(shape, generator=_gen(0), dtype=DTYPE).requires_grad_()
    loss, b = gnb_loss(logits, generator=_gen(1))
    assert type(b) is int and b == predictions
    assert loss.dim() == 0 and loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    assert (b * logits.grad * logits.grad >= 0).all()


def test_gnb_loss_is_cross_entropy_against_the_sampled_labels():
    logits = torch.randn(4, 6, 10, generator=_gen(2), dtype=DTYPE).requires_grad_()
    loss, b = gnb_loss(logits, generator=_gen(3))
    loss.backward()
    labels = _labels_from_gradient(logits.grad)
    expected = F.cross_entropy(logits.detach().reshape(b, -1), labels)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)


def test_gnb_nonnegative_on_a_network():
    params, _ = _tiny_mlp()
    w1, b1, w2, b2 = params
    x = torch.randn(3, 5, 3, generator=_gen(4), dtype=DTYPE)
    logits = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    loss, b = gnb_loss(logits, generator=_gen(5))
    assert b == 15
    grads = torch.autograd.grad(loss, params)
    for grad in grads:
        assert (b * grad * grad >= 0).all()


def test_gnb_samples_follow_the_softmax():
    r"""Label frequencies match $\operatorname{softmax}(z)$ within five binomial standard errors."""
    n = 20000
    row = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=DTYPE)
    logits = row.expand(n, -1).clone().requires_grad_()
    loss, _ = gnb_loss(logits, generator=_gen(6))
    loss.backward()
    counts = torch.bincount(_labels_from_gradient(logits.grad), minlength=4).to(DTYPE)
    p = torch.softmax(row, dim=0)
    tol = SIGMAS * torch.sqrt(p * (1 - p) / n)
    assert ((counts / n - p).abs() <= tol).all()


def test_gnb_reproducible_with_generator():
    logits = torch.randn(500, 7, generator=_gen(7), dtype=DTYPE).requires_grad_()

    def labels(seed):
        loss, _ = gnb_loss(logits, generator=_gen(seed))
        (grad,) = torch.autograd.grad(loss, logits)
        return _labels_from_gradient(grad)

    assert torch.equal(labels(8), labels(8))
    assert not torch.equal(labels(8), labels(9))


def test_gnb_half_precision_logits():
    logits = (
        torch.randn(2, 3, 11, generator=_gen(10)).to(torch.bfloat16).requires_grad_()
    )
    loss, b = gnb_loss(logits, generator=_gen(11))
    assert b == 6 and loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_gnb_unbiased_for_gauss_newton_of_softmax_regression():
    r"""Softmax regression $z_n = W x_n$: the mean of $B\,\hat g\odot\hat g$ over many
    samples matches $G_{cd} = \frac1N\sum_n x_{nd}^2\, p_{nc}(1 - p_{nc})$, which for this
    linear model is also the exact Hessian diagonal of the true-label loss."""
    n, classes, dim, samples = 8, 3, 4, 3000
    g = _gen(12)
    x = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    w = torch.randn(classes, dim, generator=g, dtype=DTYPE).requires_grad_()

    p = torch.softmax(x @ w.detach().T, dim=-1)
    gauss_newton = (p * (1 - p)).T @ (x**2) / n

    true_loss = F.cross_entropy(x @ w.T, y)
    torch.testing.assert_close(
        exact_hessian_diagonal(true_loss, [w])[0], gauss_newton, rtol=0, atol=1e-10
    )

    logits = x @ w.T
    sampler = _gen(13)
    estimates = []
    for _ in range(samples):
        loss, b = gnb_loss(logits, generator=sampler)
        (grad,) = torch.autograd.grad(loss, w, retain_graph=True)
        estimates.append(b * grad * grad)
    estimates = torch.stack(estimates)
    assert b == n and (estimates >= 0).all()
    mean = estimates.mean(dim=0)
    standard_error = estimates.std(dim=0) / math.sqrt(samples)
    assert (standard_error > 0).all()
    assert ((mean - gauss_newton).abs() <= SIGMAS * standard_error).all(), (
        mean,
        gauss_newton,
    )


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _simple_loss():
    theta = torch.randn(3, dtype=DTYPE, requires_grad=True)
    return (theta**2).sum(), theta


@pytest.mark.parametrize(
    ("logits", "error", "match"),
    [
        (torch.tensor(1.0), ValueError, r"`logits`.*shape \(\)"),
        (torch.zeros(3, 0), ValueError, r"`logits`.*shape \(3, 0\)"),
        (torch.zeros(0, 4), ValueError, r"`logits`.*shape \(0, 4\)"),
        (torch.zeros(3, 4, dtype=torch.long), TypeError, r"`logits`.*torch.int64"),
        (torch.tensor([[0.0, float("nan")]]), ValueError, r"`logits`.*NaN"),
        (torch.tensor([[0.0, float("inf")]]), ValueError, r"`logits`.*\+inf"),
        (
            torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]),
            ValueError,
            r"`logits`.*every class at -inf",
        ),
        ([[0.0, 1.0]], TypeError, r"`logits`.*list"),
    ],
)
def test_gnb_bad_input(logits, error, match):
    with pytest.raises(error, match=match):
        gnb_loss(logits)


def test_gnb_masked_classes_are_never_sampled():
    # A logit of -inf is a masked class: allowed, and never drawn (a drawn masked
    # class would make its cross-entropy, hence the mean loss, infinite).
    logits = torch.zeros(2000, 4)
    logits[:, 1] = float("-inf")
    loss, B = gnb_loss(
        logits.requires_grad_(), generator=torch.Generator().manual_seed(0)
    )
    assert B == 2000 and torch.isfinite(loss)


def test_gnb_bad_generator():
    with pytest.raises(TypeError, match="`generator`"):
        gnb_loss(torch.zeros(2, 3), generator=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_samples": 0}, ValueError, r"`n_samples`.*0"),
        ({"n_samples": -2}, ValueError, r"`n_samples`.*-2"),
        ({"n_samples": 1.5}, TypeError, r"`n_samples`.*1\.5"),
        ({"n_samples": True}, TypeError, r"`n_samples`.*True"),
        ({"distribution": "normal"}, ValueError, r"`distribution`.*'normal'"),
        ({"generator": "seed"}, TypeError, r"`generator`.*str"),
        (
            {"grads": [torch.zeros(3), torch.zeros(3)]},
            ValueError,
            r"`grads` has 2 entries",
        ),
        ({"grads": [torch.zeros(4)]}, ValueError, r"`grads\[0\]`.*shape \(4,\)"),
        ({"grads": [torch.zeros(3)]}, ValueError, r"`grads`.*create_graph=True"),
    ],
)
def test_hutchinson_bad_arguments(kwargs, error, match):
    loss, theta = _simple_loss()
    with pytest.raises(error, match=match):
        hutchinson(loss, [theta], **kwargs)


@pytest.mark.parametrize("fn", [hutchinson, exact_hessian_diagonal])
def test_bad_loss_and_params(fn):
    loss, theta = _simple_loss()
    frozen = torch.randn(2, dtype=DTYPE)
    complex_param = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=r"`loss`.*shape \(3,\)"):
        fn(theta * 2, [theta])
    with pytest.raises(ValueError, match=r"`loss` has no grad_fn"):
        fn(torch.tensor(1.0), [theta])
    with pytest.raises(TypeError, match=r"`loss`.*torch.int64"):
        fn(torch.tensor(1), [theta])
    with pytest.raises(TypeError, match=r"`loss`.*float"):
        fn(1.0, [theta])
    with pytest.raises(ValueError, match=r"`params` is empty"):
        fn(loss, [])
    with pytest.raises(TypeError, match=r"`params`.*Tensor"):
        fn(loss, theta)
    with pytest.raises(ValueError, match=r"`params\[1\]`.*requires_grad=False"):
        fn(loss, [theta, frozen])
    with pytest.raises(TypeError, match=r"`params\[1\]`.*complex.*torch.complex64"):
        fn(loss, [theta, complex_param])
    with pytest.raises(TypeError, match=r"`params\[0\]`.*str"):
        fn(loss, ["theta"])


def test_exact_diagonal_refuses_large_models():
    theta = torch.zeros(11, requires_grad=True)
    loss = (theta**2).sum()
    with pytest.raises(ValueError, match=r"11 coordinates.*max_numel=10"):
        exact_hessian_diagonal(loss, [theta], max_numel=10)
    with pytest.raises(ValueError, match=r"`max_numel`.*0"):
        exact_hessian_diagonal(loss, [theta], max_numel=0)
    assert exact_hessian_diagonal(loss, [theta], max_numel=11)[0].shape == (11,)


def test_hutchinson_explains_a_missing_second_derivative():
    # Flash attention has no double backward; the error must say what to do.
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            loss = (
                torch.nn.functional.scaled_dot_product_attention(
                    q, q, q, is_causal=True
                )
                .pow(2)
                .sum()
            )
        except RuntimeError:
            pytest.skip("no flash attention kernel on this build")
    with pytest.raises(RuntimeError, match=r"no second derivative .*SDPBackend.MATH"):
        hutchinson(loss, [q])
    with sdpa_kernel(SDPBackend.MATH):
        loss = (
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            .pow(2)
            .sum()
        )
    assert hutchinson(loss, [q])[0].shape == q.shape
