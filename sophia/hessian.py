r"""
---
title: Hessian estimators
summary: Three estimates of the Hessian diagonal, as functions a training loop can swap.
---

Sophia divides its momentum by $\rho\,h$, where $h$ is a moving average of estimates
$\hat h$ of the diagonal of the Hessian $\nabla^2 L(\theta)$. The
[optimizer](optimizer.html) does not care where $\hat h$ comes from: it folds whatever
it is given into $h$. This module makes the estimates, and it knows nothing about the
optimizer. Three functions:

* `gnb_loss`, the **Gauss-Newton-Bartlett** estimator of Sophia-G (Algorithm 2 of
  [Liu et al.](https://arxiv.org/abs/2305.14342)). It returns a loss against labels
  sampled from the model's own predictions; back-propagate it and its gradient $\hat g$
  gives $\hat h = B\,\hat g \odot \hat g$. Cost: one forward and one backward pass.
  Never negative.
* `hutchinson`, the **Hutchinson** estimator of Sophia-H (Algorithm 1):
  $\hat h = u \odot (\nabla^2 L\, u)$ for a random probe $u$. Cost: a gradient with
  its graph kept, then one double backward per probe. Unbiased for the true Hessian
  diagonal, and so sometimes negative.
* `exact_hessian_diagonal`, the true $\operatorname{diag}(\nabla^2 L)$, one backward
  pass per coordinate. For teaching and for tests, on models with a few thousand
  parameters at most.

## How each one reaches the optimizer

`SophiaG.update_hessian()` with no argument folds `p.grad * p.grad` into the state
`hessian`, and `step(bs=B)` multiplies by $B$ later: that is the reference code's
convention for Gauss-Newton-Bartlett, and `gnb_loss` returns the $B$ to pass.

```python
loss, B = gnb_loss(model(x_fresh))
loss.backward()
opt.update_hessian()
opt.zero_grad(set_to_none=True)
# ... and on every step: opt.step(bs=B)
```

`hutchinson` returns $\hat h$ itself, one tensor per parameter, so it goes in through
`update_hessian(estimates=...)`, and its scale is already that of the Hessian: step
with `bs=1`. Mixing the two conventions (Hutchinson estimates stepped with `bs=B`)
makes every step $B$ times too timid.

```python
loss = loss_fn(model(x), y)
grads = torch.autograd.grad(loss, params, create_graph=True)
estimates = hutchinson(loss, params, grads=grads)
opt.update_hessian(estimates=estimates)
```

## Notation

| symbol | meaning | code name |
|---|---|---|
| $\theta$ | parameters | `params` |
| $L$ | the loss, a scalar | `loss` |
| $H = \nabla^2 L(\theta)$ | the Hessian | — |
| $g = \nabla_\theta L$ | the gradient | `grads` |
| $u$ | a random probe, one tensor per parameter | `probes` |
| $\hat h$ | one stochastic estimate of $\operatorname{diag}(H)$ | `estimates` |
| $B$ | number of predictions (tokens) in the batch | `B`, the optimizer's `bs` |
| $\hat y$ | labels sampled from the model's predictions | `labels` |
| $\hat g$ | gradient of the loss against $\hat y$ | `p.grad` after `backward` |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gnb_loss", "hutchinson", "exact_hessian_diagonal"]


# ## Checking the inputs
#
# The estimators share their checks; each message names the argument and the value,
# shape or dtype it got. First, a loss or logits: a real floating-point tensor.
def _check_real_tensor(value: object, name: str, fn: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{fn}: `{name}` must be a torch.Tensor, got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"{fn}: `{name}` must be a real floating-point tensor, "
            f"got dtype {value.dtype}"
        )


# The loss must be a real floating-point scalar that is part of a graph: without a
# `grad_fn` there is nothing to differentiate (the usual cause is a forward pass under
# `torch.no_grad()`, or parameters with `requires_grad=False`).
def _check_loss(loss: object, fn: str) -> None:
    _check_real_tensor(loss, "loss", fn)
    if loss.numel() != 1:
        raise ValueError(
            f"{fn}: `loss` must be a scalar, got shape {tuple(loss.shape)}"
        )
    if loss.grad_fn is None:
        raise ValueError(
            f"{fn}: `loss` has no grad_fn (requires_grad={loss.requires_grad}); "
            "compute it from the parameters with autograd enabled"
        )


# Parameters arrive as any iterable (`model.parameters()` is a generator, not a
# sequence); we make a list. A lone tensor is refused: iterating over it would silently
# yield its rows. Each parameter must be a real floating-point tensor that requires
# grad. Complex parameters are refused: the Hessian of a real loss in a complex
# parameter $z = x + iy$ is that of the pair $(x, y)$, and a complex probe does not
# estimate it; view them as real with `torch.view_as_real` first.
def _check_params(params: object, fn: str) -> list[Tensor]:
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        raise TypeError(
            f"{fn}: `params` must be a sequence of tensors, "
            f"got {type(params).__name__}; wrap a single tensor in a list"
        )
    params = list(params)
    if not params:
        raise ValueError(f"{fn}: `params` is empty")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"{fn}: `params[{i}]` must be a torch.Tensor, got {type(p).__name__}"
            )
        if p.is_complex():
            raise TypeError(
                f"{fn}: `params[{i}]` has complex dtype {p.dtype}; complex parameters "
                "are not supported, pass torch.view_as_real views of them instead"
            )
        if not p.is_floating_point():
            raise TypeError(
                f"{fn}: `params[{i}]` must be floating point, got dtype {p.dtype}"
            )
        if not p.requires_grad:
            raise ValueError(
                f"{fn}: `params[{i}]` (shape {tuple(p.shape)}) has requires_grad=False"
            )
    return params


# Logits of shape $(\ldots, V)$ with at least one prediction. A logit of $-\infty$ is a
# masked class (probability zero) and is fine; NaN, $+\infty$, or a prediction whose
# every class is masked has no distribution to sample from. (This check waits for the
# device once per refresh.)
def _check_logits(logits: object, fn: str) -> None:
    _check_real_tensor(logits, "logits", fn)
    shape = tuple(logits.shape)
    if logits.dim() < 1:
        raise ValueError(f"{fn}: `logits` must have shape (..., V), got shape {shape}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{fn}: `logits` has vocabulary size V = 0 (shape {shape})")
    if logits.numel() == 0:
        raise ValueError(f"{fn}: `logits` has no predictions (shape {shape})")
    detached = logits.detach()
    if bool(torch.isnan(detached).any() | torch.isposinf(detached).any()):
        raise ValueError(
            f"{fn}: `logits` (shape {shape}, dtype {logits.dtype}) "
            "contains NaN or +inf values"
        )
    if bool(torch.isneginf(detached).all(dim=-1).any()):
        raise ValueError(
            f"{fn}: `logits` (shape {shape}) has a prediction with every class at -inf"
        )


# A `generator`, when given, makes the random draws (sampled labels, probes)
# reproducible; anything else in its place is a mistake worth a clear message.
def _check_generator(generator: object, fn: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: `generator` must be a torch.Generator or None, "
            f"got {type(generator).__name__}"
        )


# Gradients from the caller: one per parameter, of the same shape. `None` (what
# `torch.autograd.grad(..., allow_unused=True)` returns for a parameter the loss does
# not use) stands for a zero gradient.
def _check_grads(grads: object, params: list[Tensor], fn: str) -> list[Tensor]:
    if isinstance(grads, Tensor) or not isinstance(grads, Iterable):
        raise TypeError(
            f"{fn}: `grads` must be a sequence of tensors, got {type(grads).__name__}"
        )
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(
            f"{fn}: `grads` has {len(grads)} entries but `params` has {len(params)}"
        )
    checked = []
    for i, (g, p) in enumerate(zip(grads, params)):
        if g is None:
            g = torch.zeros_like(p)
        elif not isinstance(g, Tensor):
            raise TypeError(
                f"{fn}: `grads[{i}]` must be a torch.Tensor or None, "
                f"got {type(g).__name__}"
            )
        elif g.shape != p.shape:
            raise ValueError(
                f"{fn}: `grads[{i}]` has shape {tuple(g.shape)} "
                f"but `params[{i}]` has shape {tuple(p.shape)}"
            )
        checked.append(g)
    return checked


# Half-precision tensors are summed in `float32`, like the optimizer's working copies
# (see the [reference](reference.html)): every other dtype is its own working dtype.
def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ## Gauss-Newton-Bartlett (Sophia-G)
#
# ### What it estimates
#
# Take a batch of $B$ predictions, logits $z_b = f(\theta, x_b) \in \mathbb R^V$ over a
# vocabulary of $V$ classes, and the mean cross-entropy
# $$L(\theta) = \frac1B \sum_{b=1}^B \ell(z_b, y_b), \qquad
#   \ell(z, y) = -\log \operatorname{softmax}(z)_y .$$
# With $J_b = \partial z_b / \partial \theta$ the Jacobian of the network and
# $p_b = \operatorname{softmax}(z_b)$, the Hessian is
# \begin{align}
#   \nabla^2 L = \underbrace{\frac1B \sum_b J_b^\top S_b J_b}_{G,\ \text{Gauss-Newton}}
#   + \frac1B \sum_b \sum_{c} \frac{\partial \ell}{\partial z_{bc}}\,
#     \nabla^2_\theta z_{bc},
#   \qquad S_b = \nabla_z^2 \ell(z_b, y_b) = \operatorname{diag}(p_b) - p_b p_b^\top .
# \end{align}
# The second term involves the curvature of the network itself and can be of either
# sign; the first, the Gauss-Newton matrix $G$, is positive semi-definite (each $S_b$
# is a covariance matrix) and does not depend on the labels $y_b$. Sophia-G estimates
# $\operatorname{diag}(G)$.
#
# ### Bartlett's identities
#
# Sample a label from the model's own prediction, $\hat y_b \sim p_b$. The gradient of
# the loss against it, in logit space, is
# $\nabla_z \ell(z_b, \hat y_b) = p_b - e_{\hat y_b}$, and
# \begin{align}
#   \mathbb E_{\hat y_b}\big[p_b - e_{\hat y_b}\big] &= p_b - p_b = 0
#     && \text{(Bartlett's first identity)}, \\
#   \mathbb E_{\hat y_b}\big[(p_b - e_{\hat y_b})(p_b - e_{\hat y_b})^\top\big]
#     &= \operatorname{diag}(p_b) - p_b p_b^\top = S_b
#     && \text{(Bartlett's second identity)}.
# \end{align}
# So one prediction's parameter gradient $g_b = J_b^\top (p_b - e_{\hat y_b})$ has mean
# zero and $\mathbb E[g_b g_b^\top] = J_b^\top S_b J_b$.
#
# ### Why $B\,\hat g \odot \hat g$ is unbiased
#
# Back-propagating the *mean* loss against the sampled labels gives
# $\hat g = \frac1B \sum_b g_b$. Its square has $B^2$ terms; the labels of different
# predictions are sampled independently, so for $b \ne b'$ the cross terms average to
# $\mathbb E[g_b] \odot \mathbb E[g_{b'}] = 0$ by the first identity, and only the $B$
# squares survive:
# \begin{align}
#   \mathbb E\big[B\, \hat g \odot \hat g\big]
#   = \frac{B}{B^2} \sum_{b, b'} \mathbb E\big[g_b \odot g_{b'}\big]
#   = \frac1B \sum_b \mathbb E\big[g_b \odot g_b\big]
#   = \frac1B \sum_b \operatorname{diag}\big(J_b^\top S_b J_b\big)
#   = \operatorname{diag}(G).
# \end{align}
# This is why the factor is $B$, the number of *predictions*: for a language model,
# batch size times sequence length, every token being one prediction with its own
# sampled label. And $\hat h = B\,\hat g \odot \hat g$ is a square, so it is never
# negative, whatever the network: Sophia-G's denominator never changes sign.
#
# ### Data parallelism
#
# Each of $W$ workers computes $\hat g$ over its own $B_{\text{local}}$ predictions and
# the all-reduce averages them, which is $\hat g$ over all $B = W B_{\text{local}}$
# predictions. The derivation above then holds with the *global* $B$: pass
# `bs = world_size * B_local`, not the $B$ this function returns on one worker. (The
# reference code also clips this gradient by its norm before squaring it; that shrinks
# the estimate whenever the clip is active, so it is no longer unbiased.)
#
# ### Cost
#
# One forward pass (on a fresh batch, in the reference training loop), one backward
# pass, and sampling $B$ labels: the same as a training step, every $k$ steps.
#
# ### The code
#
# The function only builds the loss; the caller back-propagates it, so `p.grad` holds
# $\hat g$ and `update_hessian()` squares it. Positions that should not count (padding)
# must be left out of `logits` by the caller, since $B$ counts every prediction passed.
def gnb_loss(
    logits: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    r"""Return `(loss, B)`: the mean cross-entropy of `logits` against labels sampled
    from `softmax(logits)`, and the number of predictions $B$.

    `logits` has shape `(..., V)`; every position of the leading dimensions is one
    prediction. Back-propagate `loss`, and $B\,\hat g \odot \hat g$ of the resulting
    gradients is an unbiased, non-negative estimate of the Gauss-Newton diagonal; pass
    `B` to the optimizer as `bs` (times the number of data-parallel workers).
    `generator` makes the sampled labels reproducible.
    """
    fn = "gnb_loss"
    _check_generator(generator, fn)
    _check_logits(logits, fn)

    # Every position of the leading dimensions is one prediction: $(\ldots, V)$ becomes
    # $(B, V)$, and $B$ is a Python `int`, ready to be the optimizer's `bs`.
    logits_2d = logits.reshape(-1, logits.shape[-1])
    num_predictions = logits_2d.shape[0]

    # Sample $\hat y_b \sim \operatorname{softmax}(z_b)$ for every prediction $b$; the
    # labels are data, and no gradient flows through the sampling. The probabilities
    # are in `float32` even for half-precision logits: with 8 bits of mantissa
    # (`bfloat16`) the small probabilities of a large vocabulary would be badly rounded.
    # `torch.multinomial`, one draw per row, samples as the reference training loop's
    # `Categorical(logits=logits).sample()` does, and takes a `generator`, which lives
    # on one device: we sample there and bring the labels back (a generator on the
    # logits' device saves copying the probabilities).
    with torch.no_grad():
        probs = torch.softmax(logits_2d.detach().float(), dim=-1)
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        labels = labels.to(logits.device)

    # The loss against the sampled labels,
    # $$\hat L(\theta) = \frac1B \sum_{b=1}^B \ell(z_b, \hat y_b),$$
    # so that its gradient is $\hat g = \frac1B \sum_b g_b$, the mean the derivation
    # above squares. Half-precision logits are cast to `float32` for the log-softmax and
    # the mean over $B$ predictions (as autocast would); the gradient flows back
    # through the cast in the logits' own dtype.
    if logits_2d.dtype in (torch.float16, torch.bfloat16):
        logits_2d = logits_2d.float()
    loss = F.cross_entropy(logits_2d, labels)
    return loss, num_predictions


# ## Hutchinson (Sophia-H)
#
# ### What it estimates
#
# Draw a random probe $u$ with $\mathbb E[u u^\top] = I$ and return
# $$\hat h = u \odot (H u).$$
# Coordinate by coordinate, $\hat h_i = u_i \sum_j H_{ij} u_j
#   = H_{ii} u_i^2 + \sum_{j \ne i} H_{ij} u_i u_j$, and
# $\mathbb E[u_i^2] = 1$, $\mathbb E[u_i u_j] = 0$ for $j \ne i$, so
# $$\mathbb E[\hat h] = \operatorname{diag}(H):$$
# unbiased for the true Hessian diagonal, for any loss (not only cross-entropy).
#
# ### Negative estimates
#
# Where the loss is not convex, $H_{ii}$ itself can be negative, and even where it is
# positive the noise term $\sum_{j\ne i} H_{ij}u_iu_j$ can make one estimate negative.
# A negative denominator $\rho h$ would turn the step uphill: Sophia divides by
# $\max(\rho h, \epsilon)$ and clips the ratio to $[-1, 1]$, so a coordinate with
# $h \le 0$ takes a sign step of size $\eta$ (the [errata](../errata.md) say why the
# reference code's `+ 1e-15` does not).
#
# ### Variance, and which probe to use
#
# Two probes are offered, both with $\mathbb E[u u^\top] = I$.
#
# **Rademacher**, $u_i = \pm1$ with probability $\tfrac12$ each. Then $u_i^2 = 1$
# exactly, the diagonal term is $H_{ii}$ with no noise, and all the noise is in the
# off-diagonal terms. The products $u_i u_j$, $j \ne i$, are themselves $\pm 1$ with
# mean zero and are uncorrelated with each other ($\mathbb E[u_i^2 u_j u_k] =
# \mathbb E[u_j u_k] = \delta_{jk}$), so
# $$\operatorname{Var}[\hat h_i] = \sum_{j\ne i} H_{ij}^2 .$$
# For a diagonal Hessian one probe is exact.
#
# **Gaussian**, $u \sim \mathcal N(0, I)$. Now $u_i^2$ is random too:
# $\mathbb E[u_i^4] = 3$, so $\operatorname{Var}[u_i^2] = 2$. The diagonal term and the
# off-diagonal terms are uncorrelated ($\mathbb E[u_i^3 u_j] = 0$), and
# $\mathbb E[u_i^2 u_j u_k] = \delta_{jk}$ for $j, k \ne i$, so
# $$\operatorname{Var}[\hat h_i] = 2 H_{ii}^2 + \sum_{j\ne i} H_{ij}^2
#   = \sum_j H_{ij}^2 + H_{ii}^2 .$$
# Gaussian probes are never better: they add $2H_{ii}^2$ to the Rademacher variance.
# The paper's Algorithm 1 writes $u \sim \mathcal N(0, I)$; we default to Rademacher.
# Averaging $N$ independent probes divides either variance by $N$.
#
# ### Cost
#
# The Hessian-vector product is the gradient of a scalar (Pearlmutter's trick):
# $$H u = \nabla_\theta \big\langle \nabla_\theta L(\theta),\ u \big\rangle .$$
# So: one backward pass for $g = \nabla_\theta L$ with `create_graph=True` (which also
# records the graph of the backward, so it is somewhat slower than a plain backward and
# keeps more memory alive), then, per probe, one backward through that graph, which
# contains both the forward and the backward pass. That double backward costs roughly
# as much as a forward plus a backward pass, i.e. about two backward passes per probe;
# the exact factor depends on the operations in the model. A training loop that needs
# $g$ anyway can pass it as `grads` and save the first backward.
#
# ### Probes and reproducibility
#
# A probe is drawn on the generator's device (generators are per-device) and moved to
# the parameter's. The Rademacher probe is `randint(0, 2) * 2 - 1`: the upper bound of
# `randint` is exclusive, so `randint(0, 1)` would always be $0$, and the probe always
# $-1$ (a bug in a popular implementation: it makes every $u_iu_j = 1$, and the estimate
# becomes the row sums of $H$, not its diagonal).
def _probe(
    like: Tensor, distribution: str, generator: torch.Generator | None
) -> Tensor:
    device = generator.device if generator is not None else like.device
    draw = dict(generator=generator, device=device, dtype=like.dtype)
    if distribution == "rademacher":
        u = torch.randint(0, 2, like.shape, **draw).mul_(2).sub_(1)
    else:
        u = torch.randn(like.shape, **draw)
    return u.to(like.device)


# The probe distributions `hutchinson` accepts, and the check of its settings.
_DISTRIBUTIONS = ("rademacher", "gaussian")


def _check_probe_settings(n_samples: object, distribution: object, fn: str) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TypeError(f"{fn}: `n_samples` must be an int >= 1, got {n_samples!r}")
    if n_samples < 1:
        raise ValueError(f"{fn}: `n_samples` must be an int >= 1, got {n_samples!r}")
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"{fn}: `distribution` must be one of {_DISTRIBUTIONS}, "
            f"got {distribution!r}"
        )


# The gradient $g = \nabla_\theta L$ with its own graph (`create_graph=True`), zero
# for a parameter the loss does not use. Only the gradients that are functions of
# $\theta$ take part in the double backward (`live`): if $g_j$ is a constant, row and
# column $j$ of $H$ are zero, and so is its estimate. Caller's gradients of which *none*
# has a graph were surely computed without `create_graph=True`: say so, rather than
# return zeros.
def _gradient_with_graph(
    loss: Tensor, params: list[Tensor], grads: object, fn: str
) -> tuple[Sequence[Tensor], list[int]]:
    if grads is None:
        grads = torch.autograd.grad(
            loss, params, create_graph=True, allow_unused=True, materialize_grads=True
        )
        from_caller = False
    else:
        grads = _check_grads(grads, params, fn)
        from_caller = True
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live and from_caller:
        raise ValueError(
            f"{fn}: none of `grads` has a graph; compute them with "
            "torch.autograd.grad(loss, params, create_graph=True)"
        )
    return grads, live


# ### Kernels with no second derivative
#
# $H u$ is what `grad_outputs=u` computes: the vector-Jacobian product of $g$ with $u$,
# and the Jacobian of $g$ is $H$. The graph is retained for the next probe (and for the
# caller, who may still back-propagate `loss`).
#
# Some of PyTorch's fastest kernels have no second derivative: the flash and
# memory-efficient attention of `F.scaled_dot_product_attention` among them. Their
# error names an ATen function and nothing else, so we say what to do: build the loss
# for Hutchinson with the math kernel, inside
# `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`. (Gauss-Newton-Bartlett needs only
# a first backward, so the fast kernels serve it.)
def _hessian_vector_products(
    grads: Sequence[Tensor], params: list[Tensor], live: list[int], probes: list[Tensor]
) -> tuple[Tensor, ...]:
    try:
        return torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[probes[i] for i in live],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    except RuntimeError as error:
        if "derivative for" not in str(error) or "not implemented" not in str(error):
            raise
        raise RuntimeError(
            "hutchinson: the loss's graph has an operation with no second derivative "
            f"({error}). Hutchinson's estimator differentiates the gradient; build the "
            "loss it is given without such kernels, e.g. run that forward pass inside "
            "`torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)` "
            "for attention"
        ) from error


# ### The estimator
def hutchinson(
    loss: Tensor,
    params: Sequence[Tensor],
    *,
    n_samples: int = 1,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    grads: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    r"""Hutchinson's estimate of the Hessian diagonal: the mean over `n_samples` probes
    $u$ of $u \odot (\nabla^2 L\, u)$, one detached tensor per parameter.

    `distribution` is `"rademacher"` ($\pm 1$) or `"gaussian"` ($\mathcal N(0, I)$).
    `grads`, if given, must be $\nabla_\theta L$ computed with `create_graph=True`;
    otherwise it is computed here. The graph of `loss` is retained. Parameters that do
    not influence the loss get zeros. Unbiased, but entries can be negative.
    """
    fn = "hutchinson"
    _check_probe_settings(n_samples, distribution, fn)
    _check_generator(generator, fn)
    _check_loss(loss, fn)
    params = _check_params(params, fn)
    grads, live = _gradient_with_graph(loss, params, grads, fn)

    # The running sums $\sum_s u^{(s)} \odot (H u^{(s)})$, in `float32` for half
    # precision, so that averaging probes does not round each term to 8 bits.
    sums = [torch.zeros_like(p, dtype=_opmath_dtype(p.dtype)) for p in params]

    for _ in range(n_samples):
        # One probe $u$, one tensor per parameter.
        probes = [_probe(p, distribution, generator) for p in params]
        if not live:
            continue
        # $H u = \nabla_\theta \langle g, u \rangle$, by double backward (above).
        hvps = _hessian_vector_products(grads, params, live, probes)
        # $$\hat h = u \odot (H u).$$
        for total, u, hu in zip(sums, probes, hvps):
            total.add_(u.to(total.dtype) * hu.to(total.dtype))

    # The mean over the probes, $\frac1N \sum_s u^{(s)} \odot (H u^{(s)})$, rounded
    # once into the parameter's dtype.
    return [(total / n_samples).to(p.dtype) for total, p in zip(sums, params)]


# ## The exact diagonal
#
# For small models we can afford the truth. Row $i$ of the Hessian is the gradient of
# the $i$-th coordinate of the gradient, $H_{i\cdot} = \nabla_\theta\, g_i$, and we keep
# only its $i$-th entry:
# $$H_{ii} = \frac{\partial g_i}{\partial \theta_i} .$$
# Within one parameter tensor we differentiate $g_i$ with respect to that tensor only;
# the other tensors' entries of row $i$ are off-diagonal and not needed.
#
# **Cost.** One backward pass through the graph of the gradient *per coordinate*, about
# $2n$ backward passes for $n$ coordinates: fine for a few thousand, hopeless for a
# real network, so more than `max_numel` coordinates are refused. `torch.func.hessian`
# would build the $n \times n$ matrix; this loop needs $O(n)$ memory beyond the graph.
# Exact up to rounding: use `float64` when it is the ground truth of a test.
def exact_hessian_diagonal(
    loss: Tensor,
    params: Sequence[Tensor],
    *,
    max_numel: int = 100_000,
) -> list[Tensor]:
    r"""The exact diagonal of $\nabla^2 L$ with respect to `params`, one detached tensor
    per parameter, by one backward pass per coordinate. Refuses more than `max_numel`
    coordinates in total. The graph of `loss` is retained.
    """
    fn = "exact_hessian_diagonal"
    if isinstance(max_numel, bool) or not isinstance(max_numel, int) or max_numel < 1:
        raise ValueError(f"{fn}: `max_numel` must be an int >= 1, got {max_numel!r}")
    _check_loss(loss, fn)
    params = _check_params(params, fn)
    total_numel = sum(p.numel() for p in params)
    if total_numel > max_numel:
        raise ValueError(
            f"{fn}: `params` have {total_numel} coordinates in total, more than "
            f"max_numel={max_numel}; this costs one backward pass per coordinate, use "
            "hutchinson or gnb_loss for large models (or raise max_numel)"
        )

    # The gradient $g = \nabla_\theta L$, with its graph, once for all coordinates.
    grads = torch.autograd.grad(
        loss, params, create_graph=True, allow_unused=True, materialize_grads=True
    )

    diagonals = []
    for p, g in zip(params, grads):
        diagonal = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        # A gradient without a graph is a constant: the whole block of $H$ is zero.
        if g.requires_grad:
            g_flat = g.reshape(-1)
            for i in range(p.numel()):
                # $$H_{ii} = \partial g_i / \partial \theta_i ,$$
                # the $i$-th entry of the gradient of $g_i$ with respect to this tensor.
                (row,) = torch.autograd.grad(
                    g_flat[i],
                    p,
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
                diagonal[i] = row.reshape(-1)[i]
        diagonals.append(diagonal.reshape(p.shape))
    return diagonals
