r"""Demonstrations for the errata page (`docs/errata.md`): how popular implementations get
Sophia wrong, and what each mistake does.

Every test restates one mistaken formula in a few lines of our own (described from what
those projects do, not copied from them), runs it beside this package's code on a tiny
problem, and asserts the effect. The numbers the errata page quotes are the constants
asserted here; if a test changes, the page must change with it.

Running this file as a script (`python tests/test_errata.py`) also draws the figure of
the docs' landing page, `docs/img/paths-2d.png`, from the same paths that
`test_clipping_escapes_negative_curvature` checks.
"""

from __future__ import annotations

import math
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import non_raw_docstrings

import sophia.hessian
from sophia import SophiaG, SophiaH, exact_hessian_diagonal, gnb_loss, hutchinson

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sophia_step(theta, grad, *, hessian=None, **hyper):
    r"""One step of this package's `SophiaG` on a copy of `theta`, with the state's
    `hessian` set to `hessian` first (zeros if `None`); returns the new parameters."""
    p = torch.nn.Parameter(theta.clone())
    opt = SophiaG([p], **hyper)
    if hessian is not None:
        opt.update_hessian([hessian / (1 - opt.defaults["betas"][1])])
    p.grad = grad.clone()
    opt.step(bs=1)
    return p.detach()


# ---------------------------------------------------------------------------------------
# 1. A denominator capped at rho instead of a clipped ratio
# ---------------------------------------------------------------------------------------

# The mistaken update divides the momentum by $h + \epsilon$ capped *from above* at
# $\rho$, and steps by $\eta$ times that ratio, unclipped:
# $\theta \leftarrow \theta - \eta\, m / \min(h + \epsilon, \rho)$. With the defaults that
# implementation uses ($\eta = 10^{-3}$, $\beta_1 = 0.9$, $\epsilon = 10^{-8}$, $\rho = 1$):
CAP = dict(lr=1e-3, beta1=0.9, eps=1e-8, rho=1.0)


def _capped_denominator_step(theta, grad, hessian):
    m = (1 - CAP["beta1"]) * grad
    return theta - CAP["lr"] * m / torch.clamp(hessian + CAP["eps"], max=CAP["rho"])


def test_capped_denominator_gives_unbounded_steps():
    theta = torch.zeros(1, dtype=DTYPE)
    ours = dict(
        lr=CAP["lr"], betas=(CAP["beta1"], 0.99), rho=CAP["rho"], weight_decay=0.0
    )

    # Before the first refresh, $h = 0$: a gradient of 0.01 gives $m = 10^{-3}$ and a
    # step of $\eta m / \epsilon = 100$, a hundred thousand times $\eta$. Ours takes a
    # sign step of exactly $\eta$.
    grad = torch.tensor([0.01], dtype=DTYPE)
    theirs = _capped_denominator_step(theta, grad, torch.zeros(1, dtype=DTYPE))
    assert theirs.abs().item() == pytest.approx(100.0, rel=1e-9)
    assert _sophia_step(theta, grad, **ours).abs().item() == pytest.approx(
        CAP["lr"], rel=1e-12
    )

    # Where $h$ is large the cap makes the denominator $\rho$, and the step is
    # $\eta\, m / \rho$: it grows with the gradient without bound. A gradient spike of
    # $10^4$ moves the parameter by 1.0 (a thousand times $\eta$); ours moves by at most $\eta$.
    spike = torch.tensor([1e4], dtype=DTYPE)
    big_h = torch.tensor([50.0], dtype=DTYPE)
    theirs = _capped_denominator_step(theta, spike, big_h)
    assert theirs.abs().item() == pytest.approx(1.0, rel=1e-9)
    assert _sophia_step(theta, spike, hessian=big_h, **ours).abs().item() <= CAP[
        "lr"
    ] * (1 + 1e-12)


# ---------------------------------------------------------------------------------------
# 2. Weight decay applied twice
# ---------------------------------------------------------------------------------------


# The mistaken step adds $\lambda\theta$ to the gradient (L2 regularization) *and* then
# decays the parameter by $\eta\lambda\theta$ (decoupled decay). We put the extra L2 term
# into our own step, so that it is the only difference.
def test_weight_decay_applied_twice():
    lr, weight_decay = 1e-3, 0.1
    theta = torch.ones(1, dtype=DTYPE)
    zero_grad = torch.zeros(1, dtype=DTYPE)
    hyper = dict(lr=lr, betas=(0.965, 0.99), rho=0.04, weight_decay=weight_decay)

    # Ours: a parameter with no gradient shrinks by $\eta\lambda\theta = 10^{-4}$.
    ours = _sophia_step(theta, zero_grad, **hyper)
    assert (theta - ours).item() == pytest.approx(lr * weight_decay, rel=1e-9)

    # With $\lambda\theta$ also in the gradient, $m = (1 - \beta_1)\lambda\theta$ is not zero;
    # before the first refresh ($h = 0$) the clip turns it into a full step of $\eta$, so
    # the parameter shrinks by $\eta\lambda\theta + \eta$: eleven times the asked decay.
    twice = _sophia_step(theta, zero_grad + weight_decay * theta, **hyper)
    assert ((theta - twice) / (theta - ours)).item() == pytest.approx(11.0, rel=1e-9)


# ---------------------------------------------------------------------------------------
# 3. Hutchinson on a detached gradient
# ---------------------------------------------------------------------------------------


# The Hessian-vector product is $\nabla_\theta \langle g, u\rangle$: it needs $g$ as a
# function of $\theta$, i.e. computed with `create_graph=True`. The mistaken estimator
# takes the gradient stored in `p.grad` (a plain tensor, no graph) and differentiates
# $\langle g, u\rangle$ again. There is nothing to differentiate: autograd refuses.
def test_hutchinson_needs_the_graph_of_the_gradient():
    a = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=DTYPE))
    theta = torch.randn(3, generator=_gen(0), dtype=DTYPE, requires_grad=True)
    loss = 0.5 * theta @ a @ theta
    loss.backward(retain_graph=True)
    u = torch.randn(3, generator=_gen(1), dtype=DTYPE)

    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad((theta.grad * u).sum(), theta)
    # Under `torch.no_grad()` even a gradient *with* a graph gives nothing to differentiate.
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    with torch.no_grad():
        product = (g * u).sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(product, theta)

    # Ours differentiates the gradient's graph: for a diagonal Hessian one Rademacher
    # probe gives the diagonal exactly.
    (estimate,) = hutchinson(loss, [theta], generator=_gen(2))
    torch.testing.assert_close(estimate, torch.diagonal(a), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# 4. A Rademacher probe that is always -1
# ---------------------------------------------------------------------------------------

# `randint(low, high)` draws from $\{low, \ldots, high - 1\}$: its upper bound is
# exclusive. `randint_like(p, 0, 1)` is therefore all zeros, and `* 2 - 1` makes the
# probe $u = -\mathbf 1$ every time. Then $u \odot (H u) = H \mathbf 1$: the *row sums* of
# $H$, every refresh the same, not its diagonal.
LAPLACIAN = [[2.0, -1.0, 0.0], [-1.0, 2.0, -1.0], [0.0, -1.0, 2.0]]


def test_rademacher_probe_with_exclusive_bound_is_always_minus_one():
    p = torch.empty(100_000, dtype=DTYPE)
    probe = torch.randint_like(p, 0, 1, generator=_gen(3)) * 2 - 1
    assert (probe == -1).all()

    # On $L = \frac12\theta^\top H\theta$ with the 1-D Laplacian $H$ (diagonal 2, neighbours
    # -1) the mistaken estimate is $[1, 0, 1]$ at every refresh: the middle coordinate
    # looks flat, and takes sign steps forever.
    h = torch.tensor(LAPLACIAN, dtype=DTYPE)
    theta = torch.randn(3, generator=_gen(4), dtype=DTYPE, requires_grad=True)
    loss = 0.5 * theta @ h @ theta
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    u = torch.randint_like(theta, 0, 1) * 2 - 1
    (hu,) = torch.autograd.grad(g, theta, grad_outputs=u.detach(), retain_graph=True)
    torch.testing.assert_close(
        u * hu, torch.tensor([1.0, 0.0, 1.0], dtype=DTYPE), rtol=0, atol=1e-12
    )

    # Ours draws from $\{0, 1\}$: the mean of 4000 probes is within 5 standard errors of
    # the diagonal $[2, 2, 2]$ (the variance of one probe is $\sum_{j\ne i} H_{ij}^2$).
    n = 4000
    (ours,) = hutchinson(loss, [theta], n_samples=n, generator=_gen(5))
    standard_error = torch.sqrt((h**2).sum(1) - h.diagonal() ** 2) / math.sqrt(n)
    assert ((ours - 2.0).abs() <= 5 * standard_error).all(), ours


# ---------------------------------------------------------------------------------------
# 5. "Gauss-Newton-Bartlett" over the batch dimension, with probabilities as targets
# ---------------------------------------------------------------------------------------

# A tiny softmax regression $z = W x$ over $S$ sequences of $T$ positions each. Its logits
# are linear in $W$, so the Gauss-Newton matrix *is* the Hessian, and
# `exact_hessian_diagonal` gives the truth the estimators aim at.
SEQUENCES, POSITIONS, FEATURES, CLASSES = 4, 8, 3, 5


def _softmax_regression(seed: int):
    g = _gen(seed)
    x = torch.randn(SEQUENCES, POSITIONS, FEATURES, generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (SEQUENCES, POSITIONS), generator=g)
    w = (
        0.5 * torch.randn(CLASSES, FEATURES, generator=g, dtype=DTYPE)
    ).requires_grad_()
    return x, y, w


def _relative_error(estimate, truth) -> float:
    return ((estimate - truth).norm() / truth.norm()).item()


def test_gnb_over_the_batch_dimension_is_not_the_gauss_newton_diagonal():
    x, y, w = _softmax_regression(6)
    logits = x @ w.T
    true_loss = F.cross_entropy(logits.reshape(-1, CLASSES), y.reshape(-1))
    (truth,) = exact_hessian_diagonal(true_loss, [w])

    # The mistaken estimator: per sequence, "targets" are the softmax of the logits over
    # the *positions* (dimension 0 of a `(T, V)` block) instead of a label sampled from
    # each prediction's softmax over the vocabulary; the loss is the cross-entropy against
    # those probabilities, averaged over sequences, and $B$ counts sequences.
    soft = (
        sum(F.cross_entropy(z, torch.softmax(z, dim=0).detach()) for z in logits)
        / SEQUENCES
    )
    (g,) = torch.autograd.grad(soft, w, retain_graph=True)
    mistaken = SEQUENCES * g * g
    assert _relative_error(mistaken, truth) == pytest.approx(
        MISTAKEN_GNB["relative error"], abs=0.005
    )
    assert (mistaken.sum() / truth.sum()).item() == pytest.approx(
        MISTAKEN_GNB["size"], abs=0.001
    )

    # With the probabilities of the right dimension as targets the gradient vanishes
    # exactly: $\nabla_z \ell = p - p = 0$. The estimate is zero whatever the curvature.
    right_dim = F.cross_entropy(
        logits.reshape(-1, CLASSES),
        torch.softmax(logits, -1).reshape(-1, CLASSES).detach(),
    )
    (g0,) = torch.autograd.grad(right_dim, w, retain_graph=True)
    assert g0.abs().max().item() < 1e-15

    # Ours: labels sampled from each prediction, $B$ = every prediction. The mean of
    # 2000 estimates is within 5 % of the truth (it is unbiased: what remains is noise).
    sampler = _gen(7)
    total = torch.zeros_like(w)
    n = 2000
    for _ in range(n):
        loss, b = gnb_loss(logits, generator=sampler)
        (g,) = torch.autograd.grad(loss, w, retain_graph=True)
        total += b * g * g
    assert b == SEQUENCES * POSITIONS
    assert _relative_error(total / n, truth) < 0.05


# What the page quotes of the mistaken estimator on this problem: its relative error
# $\lVert \hat h - \operatorname{diag} G\rVert / \lVert \operatorname{diag} G\rVert$, and its
# size, $\sum \hat h / \sum \operatorname{diag} G$.
MISTAKEN_GNB = {"relative error": 0.99, "size": 0.010}


# ---------------------------------------------------------------------------------------
# 6. The true-label gradient squared, every step; momentum updated twice
# ---------------------------------------------------------------------------------------


# The exact expectation of the Gauss-Newton-Bartlett estimate over the sampled labels, for
# softmax regression: each prediction's gradient is $(p_b - e_c) x_b^\top$ for label $c$,
# drawn with probability $p_{bc}$; the $B$ gradients are independent with mean zero, so
# $\mathbb E[B \hat g^2] = \frac1B \sum_b \sum_c p_{bc} \big((p_b - e_c) x_b^\top\big)^2$.
def _expected_gnb(x, w):
    p = torch.softmax(x @ w.T, dim=-1)
    eye = torch.eye(w.shape[0], dtype=x.dtype)
    per_label = (p[:, None, :] - eye[None]) ** 2
    return torch.einsum("bc,bcv,bd->vd", p, per_label, x**2) / x.shape[0]


def test_true_label_gradient_squared_grows_with_the_batch():
    # Labels from a teacher, a student at $W = 0$ (far from fitting them).
    g = _gen(8)
    n, features, classes = 1024, 3, 5
    x = torch.randn(n, features, generator=g, dtype=DTYPE)
    teacher = 2 * torch.randn(classes, features, generator=g, dtype=DTYPE)
    y = torch.multinomial(torch.softmax(x @ teacher.T, -1), 1, generator=g).squeeze(-1)
    w = torch.zeros(classes, features, dtype=DTYPE, requires_grad=True)

    ratios = {}
    for batch in (16, 1024):
        loss = F.cross_entropy(x[:batch] @ w.T, y[:batch])
        (truth,) = exact_hessian_diagonal(loss, [w])
        # Sophia-G's estimate, in expectation, *is* the diagonal, at any batch size.
        torch.testing.assert_close(
            _expected_gnb(x[:batch], w.detach()), truth, rtol=1e-10, atol=0
        )
        # The true-label gradient squared, times $B$: $B\, (\nabla L)^2$ plus noise. Away
        # from a minimum the mean gradient dominates, and this grows with $B$.
        (g_true,) = torch.autograd.grad(loss, w)
        ratios[batch] = ((batch * g_true**2).sum() / truth.sum()).item()
    assert ratios[16] == pytest.approx(TRUE_LABEL_RATIO[16], abs=0.05)
    assert ratios[1024] == pytest.approx(TRUE_LABEL_RATIO[1024], abs=0.5)


# $\sum B\,g^2 / \sum \operatorname{diag} G$ at $B = 16$ and $B = 1024$ (the page quotes them).
TRUE_LABEL_RATIO = {16: 2.37, 1024: 100.9}


# Updating $m$ twice per step with the same gradient is one update with $\beta_1^2$:
# $\beta_1(\beta_1 m + (1-\beta_1) g) + (1-\beta_1) g = \beta_1^2 m + (1 - \beta_1^2) g$.
# Shown with our own `SophiaG`'s momentum: two steps on the same gradient (the mistake)
# leave the `exp_avg` of one step with $\beta_1^2$, and one step (ours) forgets at the
# rate $\beta_1$.
def _momentum_after(m0, grads, beta1):
    p = torch.nn.Parameter(torch.zeros_like(m0))
    opt = SophiaG([p], lr=1e-3, betas=(beta1, 0.99), weight_decay=0.0)
    p.grad = torch.zeros_like(m0)
    opt.step(bs=1)
    opt.state[p]["exp_avg"].copy_(m0)
    for g in grads:
        p.grad = g.clone()
        opt.step(bs=1)
    return opt.state[p]["exp_avg"].clone()


def test_momentum_updated_twice_halves_its_memory():
    beta1 = 0.965
    m0 = torch.randn(10, generator=_gen(9), dtype=DTYPE)
    g = torch.randn(10, generator=_gen(10), dtype=DTYPE)
    once = _momentum_after(m0, [g], beta1)
    twice = _momentum_after(m0, [g, g], beta1)
    torch.testing.assert_close(
        once, beta1 * m0 + (1 - beta1) * g, rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        twice, _momentum_after(m0, [g], beta1**2), rtol=1e-12, atol=1e-15
    )
    assert not torch.allclose(once, twice)

    # The half-life $\ln 2 / -\ln(\text{decay per step})$ of the average, in steps, with
    # the decay read off the optimizer's state on a zero gradient: 19.5 becomes 9.7.
    one = torch.ones(1, dtype=DTYPE)
    zero = torch.zeros(1, dtype=DTYPE)
    half_life = {
        n: math.log(2) / -math.log(_momentum_after(one, [zero] * n, beta1).item())
        for n in (1, 2)
    }
    assert half_life[1] == pytest.approx(19.5, abs=0.05)
    assert half_life[2] == pytest.approx(9.7, abs=0.05)


# ---------------------------------------------------------------------------------------
# 7. A stale estimate
# ---------------------------------------------------------------------------------------


# The mistaken schedule reads the step counter *before* counting the step to decide when
# to compute an estimate (counter $\equiv 0 \bmod k$), and *after* counting it to decide
# when to fold the stored estimate into $h$ (counter $\equiv 0 \bmod k$ again). Simulated
# here, step by step.
def _stale_schedule(steps: int, k: int) -> list[tuple[int, int]]:
    r"""Pairs (step at which an estimate was computed, step at which it was folded in)."""
    counter, computed_at, pairs = 0, None, []
    for step in range(1, steps + 1):
        if counter > 0 and counter % k == 0:
            computed_at = step
        counter += 1
        if computed_at is not None and counter % k == 0:
            pairs.append((computed_at, step))
    return pairs


def test_stale_estimate_is_nine_steps_old():
    pairs = _stale_schedule(100, k=10)
    assert len(pairs) == 9
    assert {folded - computed for computed, folded in pairs} == {9}

    # What nine steps mean, on $L(\theta) = \log\cosh\theta$ (curvature
    # $\operatorname{sech}^2\theta$) from $\theta = 3$: our `SophiaH` refreshes there,
    # takes nine steps (clipped to sign steps of $\eta = 0.1$: $h$ is tiny), and
    # refreshes again. Ours folds in the curvature where $\theta$ is now (in one
    # dimension a Rademacher probe gives it exactly); the stale schedule would fold in
    # the one at $\theta = 3$, 5.9 times smaller: the Newton step there, $m / (\rho h)$,
    # would be 5.9 times too long, unless the clip catches it.
    lr, theta0 = 0.1, 3.0
    theta = torch.nn.Parameter(torch.tensor([theta0], dtype=DTYPE))
    opt = SophiaH([theta], lr=lr, betas=(0.9, 0.0), weight_decay=0.0)

    def loss():
        return torch.log(torch.cosh(theta)).sum()

    def curvature_here():
        opt.update_hessian(loss=loss(), generator=_gen(11))
        return opt.state[theta]["hessian"].item()

    stale = curvature_here()
    for _ in range(9):
        opt.zero_grad()
        loss().backward()
        opt.step()
    opt.state[theta]["hessian"].zero_()
    current = curvature_here()
    assert theta.item() == pytest.approx(theta0 - 9 * lr, rel=1e-12)
    assert stale == pytest.approx(1 / math.cosh(theta0) ** 2, rel=1e-12)
    assert current == pytest.approx(1 / math.cosh(theta.item()) ** 2, rel=1e-12)
    assert current / stale == pytest.approx(5.9, abs=0.05)


# ---------------------------------------------------------------------------------------
# 9. Docstrings that are not raw strings
# ---------------------------------------------------------------------------------------


# In a plain string literal, `\b`, `\f`, `\n`, `\t` are escapes: LaTeX's `\begin`,
# `\frac`, `\nabla`, `\theta` silently become a backspace, a form feed, a newline and a
# tab followed by the rest of the word, and an unknown escape such as `\sum` draws a
# warning at compile time (and is to become an error). A raw string keeps the backslash.
#
# What the page says each escape becomes:
MANGLED = {
    r"\begin": "\x08egin",
    r"\frac": "\x0crac",
    r"\nabla": "\nabla",
    r"\theta": "\theta",
}


# Shown on our own estimators' module, `sophia/hessian.py`, whose docstrings hold
# LaTeX: as written (raw) the literate check passes and the text keeps its commands;
# with the `r` prefixes taken off, the check flags every docstring, compiling warns of
# the unknown escapes, and the commands come out mangled as the page says.
def test_non_raw_docstrings_mangle_latex():
    source = pathlib.Path(sophia.hessian.__file__).read_text()
    assert non_raw_docstrings(source) == []
    assert r"\nabla" in sophia.hessian.__doc__ and r"\theta" in sophia.hessian.__doc__

    plain = source.replace('r"""', '"""')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flagged = non_raw_docstrings(plain)
        doc = compile(plain, "hessian.py", "exec").co_consts[0]
    assert len(flagged) == source.count('r"""')
    # A `DeprecationWarning` up to Python 3.11, a `SyntaxWarning` from 3.12 on.
    assert any(
        issubclass(w.category, (SyntaxWarning, DeprecationWarning)) for w in caught
    )
    for command in (r"\nabla", r"\theta"):
        assert command not in doc and MANGLED[command] in doc, command

    # Each of the page's four commands, in a docstring of its own.
    for command, mangled in MANGLED.items():
        text = eval(compile(f'"""{command}"""', "<docstring>", "eval"))
        assert text == mangled, command
        assert eval(compile(f'r"""{command}"""', "<docstring>", "eval")) == command


# ---------------------------------------------------------------------------------------
# 10. Where the authors' own code is fragile
# ---------------------------------------------------------------------------------------


# The authors' step, restated: $\theta \mathrel{-}= \eta\,\operatorname{sign}(m)\,
# \min(|m| / (\rho B h + 10^{-15}), 1)$. It is right for Sophia-G, whose $h \ge 0$; with a
# negative $h$ (Hutchinson) the denominator is negative, the "min" keeps the negative
# ratio, and the step goes uphill, by an amount that is unbounded as $\rho B h \to 0^-$.
def _authors_update(m, h, *, lr, rho, bs):
    return -lr * m.sign() * (m.abs() / (rho * bs * h + 1e-15)).clamp(max=1)


def test_authors_guard_does_not_stop_a_negative_hessian():
    lr, rho = 0.1, 0.05
    m = torch.tensor([0.05, 0.05], dtype=DTYPE)
    h = torch.tensor([-1.0, -1e-3], dtype=DTYPE)
    update = _authors_update(m, h, lr=lr, rho=rho, bs=1)
    # $m > 0$ (the loss increases with $\theta$), yet both steps are positive: uphill.
    assert (update > 0).all()
    assert update.tolist() == pytest.approx([0.1, 100.0], rel=1e-9)
    # Ours: the guard $\max(\rho B h, \epsilon)$ makes both a downhill sign step of $\eta$.
    ours = _sophia_step(
        torch.zeros(2, dtype=DTYPE),
        m,
        hessian=h,
        lr=lr,
        betas=(0.0, 0.99),
        rho=rho,
        weight_decay=0.0,
    )
    torch.testing.assert_close(
        ours, torch.full((2,), -lr, dtype=DTYPE), rtol=1e-12, atol=0
    )


def test_authors_fragile_corners():
    # `capturable=True` calls `.neg()` on the learning rate, a Python float.
    with pytest.raises(AttributeError, match="neg"):
        (6e-4).neg()

    # A complex gradient squared is not a curvature: $(1 + 2i)^2 = -3 + 4i$. Ours treats
    # the real and imaginary parts as two real parameters and folds in $1$ and $4$.
    g = torch.tensor([1 + 2j], dtype=torch.complex128)
    assert (g * g).item() == -3 + 4j
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.complex128))
    opt = SophiaG([p], betas=(0.965, 0.0))
    p.grad = g.clone()
    opt.update_hessian()
    assert opt.state[p]["hessian"].item() == 1 + 4j

    # In `float16`, $10^{-15}$ rounds to zero, so $m = 0$, $h = 0$ gives $0/0$ = NaN.
    m = torch.zeros(2, dtype=torch.float16)
    h = torch.zeros(2, dtype=torch.float16)
    assert torch.isnan(_authors_update(m, h, lr=1e-4, rho=0.04, bs=480)).all()
    # Ours computes in `float32`: the same state gives a finite parameter.
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    opt = SophiaG([p])
    p.grad = torch.zeros(2, dtype=torch.float16)
    opt.step(bs=480)
    assert torch.isfinite(p).all()


# ---------------------------------------------------------------------------------------
# The landing page's picture: why the clip matters, in two dimensions
# ---------------------------------------------------------------------------------------

# $f(x, y) = 16x^2 + \tfrac14 (y^2 - 1)^2$: a sharp valley in $x$ (curvature 32) and a
# double well in $y$, with minima at $(0, \pm1)$ and a saddle at $(0, 0)$ where $f = 1/4$.
# Near $y = 0$ the curvature $3y^2 - 1$ in $y$ is negative. Each method sees the exact
# gradient and the exact Hessian diagonal at every step.
START = (0.8, 0.15)
STEPS = 40


def _landscape(t):
    return 16 * t[..., 0] ** 2 + (t[..., 1] ** 2 - 1) ** 2 / 4


def _gradient_and_diagonal(t):
    t = t.detach().clone().requires_grad_()
    loss = _landscape(t)
    (g,) = torch.autograd.grad(loss, t, create_graph=True)
    (diagonal,) = exact_hessian_diagonal(loss, [t])
    return g.detach(), diagonal


def _paths(steps: int = STEPS) -> dict[str, torch.Tensor]:
    r"""The paths of gradient descent, diagonal Newton (no clip) and Sophia from `START`."""
    paths = {}
    # Gradient descent, at the largest stable step for the sharp direction ($< 2/32$).
    t = torch.tensor(START, dtype=DTYPE)
    path = [t]
    for _ in range(steps):
        g, _ = _gradient_and_diagonal(t)
        t = t - 0.059 * g
        path.append(t)
    paths["gradient descent"] = torch.stack(path)
    # Newton's method on the diagonal, $\theta \leftarrow \theta - g / h$, no clip.
    t = torch.tensor(START, dtype=DTYPE)
    path = [t]
    for _ in range(steps):
        g, h = _gradient_and_diagonal(t)
        t = t - g / h
        path.append(t)
    paths["diagonal Newton, no clip"] = torch.stack(path)
    # This package's `SophiaG` with the exact diagonal folded in every step; $\eta/\rho = 1$,
    # so an unclipped step is a full Newton step, and a clipped one moves 0.1.
    p = torch.nn.Parameter(torch.tensor(START, dtype=DTYPE))
    opt = SophiaG([p], lr=0.1, betas=(0.5, 0.5), rho=0.1, weight_decay=0.0)
    path = [p.detach().clone()]
    for _ in range(steps):
        g, h = _gradient_and_diagonal(p)
        opt.update_hessian([h])
        p.grad = g
        opt.step(bs=1)
        path.append(p.detach().clone())
    paths["Sophia"] = torch.stack(path)
    return paths


def _steps_to(path, tolerance=1e-4):
    below = (_landscape(path) < tolerance).nonzero()
    return int(below[0]) if len(below) else None


def test_clipping_escapes_negative_curvature():
    paths = _paths()
    # Newton divides by the negative curvature and walks *up* to the saddle, where it stays.
    newton = paths["diagonal Newton, no clip"]
    assert newton[-1].abs().max().item() < 1e-12 and _landscape(
        newton[-1]
    ).item() == pytest.approx(0.25)
    # Sophia's guard and clip turn negative curvature into sign steps downhill; once the
    # curvature is positive it takes Newton steps. It reaches $f < 10^{-4}$ in 12 steps,
    # gradient descent in 65.
    assert _steps_to(paths["Sophia"]) == 12
    assert _steps_to(_paths(100)["gradient descent"]) == 65


def draw(out: pathlib.Path) -> None:
    r"""Draw the three paths over the contours of the landscape into `out` (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = _paths()
    xs = torch.linspace(-1.0, 1.0, 300, dtype=DTYPE)
    ys = torch.linspace(-0.4, 1.4, 300, dtype=DTYPE)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    levels = [0.01, 0.03, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16]
    ax.contour(xs, ys, _landscape(grid), levels=levels, colors="0.75", linewidths=0.8)
    styles = {
        "gradient descent": "tab:blue",
        "diagonal Newton, no clip": "tab:red",
        "Sophia": "tab:green",
    }
    for name, path in paths.items():
        ax.plot(
            path[:, 0],
            path[:, 1],
            "o-",
            ms=3,
            lw=1.2,
            color=styles[name],
            label=f"{name} ({STEPS} steps)",
        )
    ax.plot([0, 0], [1, 0], "k*", ms=9)
    ax.annotate("minimum", (0, 1), textcoords="offset points", xytext=(6, 6))
    ax.annotate("saddle", (0, 0), textcoords="offset points", xytext=(6, -12))
    ax.plot(*START, "ks", ms=5)
    ax.annotate("start", START, textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("$x$ (curvature 32)")
    ax.set_ylabel("$y$ (curvature $3y^2-1$)")
    ax.set_title(
        r"$f(x,y)=16x^2+\frac{1}{4}(y^2-1)^2$, exact gradient and Hessian diagonal"
    )
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    draw(
        pathlib.Path(__file__).resolve().parent.parent / "docs" / "img" / "paths-2d.png"
    )
