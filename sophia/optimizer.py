r"""
---
title: The SophiaG and SophiaH optimizers
summary: The torch.optim classes users import; state, parameter groups, checks, and dispatch to an implementation.
---

# The `SophiaG` and `SophiaH` optimizers

This module is what a user imports. It holds no math of its own: the step is the
[reference](reference.html) or the [`torch._foreach` version](foreach.html), and the
Hessian estimates come from [`sophia.hessian`](hessian.html). What lives here is the
bookkeeping a serious `torch.optim` optimizer needs:

* the **constructor and calling convention of the authors' `SophiaG`**, so that ours is
  a drop-in replacement: `SophiaG(params, lr=1e-4, betas=(0.965, 0.99), rho=0.04,
  weight_decay=1e-1)`, then `update_hessian()` every $k$ steps and `step(bs=...)` every
  step, with the same state keys (`step`, `exp_avg`, `hessian`), so checkpoints move
  both ways;
* the **PyTorch conventions** on top: keyword-only `foreach=` and `fused=` (see
  [the fused kernel](fused.html)), `maximize`,
  per-group hyperparameters, learning-rate schedulers, `state_dict()` /
  `load_state_dict()`, `zero_grad()`;
* **checks on every input**, done before anything is changed, so that a step that is
  refused leaves parameters and state exactly as they were.

A training loop with Sophia-G (the reference recipe; `gnb_loss` samples the labels and
returns $B$, the number of predictions in the batch it was given; in the recipe the
Hessian batch has the training batch's shape, so $B$ is also `y.numel()`):

```python
opt = SophiaG(model.parameters(), lr=6e-4, rho=0.05, weight_decay=0.2)
B = batch_size * block_size
for it, (x, y) in enumerate(batches):
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step(bs=B)
    opt.zero_grad(set_to_none=True)
    if it % k == k - 1:
        sampled_loss, B = gnb_loss(model(next_x))
        sampled_loss.backward()
        opt.update_hessian()
        opt.zero_grad(set_to_none=True)
```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .foreach import hessian_ema_foreach, sophiag_foreach
from .hessian import hutchinson
from .reference import hessian_ema_reference, sophiag_reference, unclipped_count_reference

__all__ = ["SophiaG", "SophiaH"]


# ## Checking the hyperparameters
#
# Every check names the argument and the value it got. They run in the constructor,
# when a parameter group is added, and again at every step, because a learning-rate
# scheduler or a user may edit `param_groups[i]["lr"]` at any time: a NaN learning rate
# caught before the step costs nothing, one caught after has already been written into
# every parameter.
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool) -> None:
    if not _is_number(value):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    ok = value >= low if low_inclusive else value > low
    if not (math.isfinite(value) and ok):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_group(group: dict, where: str, *, at_step: bool = False) -> None:
    _check_lr(group, where, at_step=at_step)
    _check_number(f"{where}rho", group["rho"], low=0.0, low_inclusive=False)
    _check_number(f"{where}weight_decay", group["weight_decay"], low=0.0, low_inclusive=True)
    _check_number(f"{where}eps", group["eps"], low=0.0, low_inclusive=False)
    betas = group["betas"]
    if not (isinstance(betas, Sequence) and len(betas) == 2):
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_number(f"{where}betas[{i}]", beta, low=0.0, low_inclusive=True)
        if not beta < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {beta!r}")
    for flag in ("maximize", "capturable"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{where}{flag} must be a bool, got {group[flag]!r}")
    for flag in ("foreach", "fused"):
        if group[flag] is not None and not isinstance(group[flag], bool):
            raise TypeError(f"{where}{flag} must be None or a bool, got {group[flag]!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError(f"{where}foreach=True and fused=True cannot both be set: pick one implementation")


# The learning rate is a Python number, or, with `fused=True`, a one-element floating
# tensor that the kernel reads from device memory, so that a step captured in a CUDA
# graph follows a schedule that writes into that tensor. A tensor's value is checked
# when the group is made, not at every step: reading it would wait for the device, and
# inside a CUDA graph capture that is an error.
def _check_lr(group: dict, where: str, *, at_step: bool) -> None:
    lr = group["lr"]
    if not isinstance(lr, Tensor):
        _check_number(f"{where}lr", lr, low=0.0, low_inclusive=True)
        return
    if not group["fused"]:
        raise TypeError(f"{where}lr is a tensor ({lr.dtype}, {lr.device}); a tensor lr needs fused=True")
    if lr.numel() != 1 or not lr.is_floating_point():
        raise ValueError(f"{where}lr as a tensor must hold one floating-point value, got shape "
                         f"{tuple(lr.shape)} and dtype {lr.dtype}")
    if not at_step:
        _check_number(f"{where}lr", lr.item(), low=0.0, low_inclusive=True)


# `bs` is $B$, the number of predictions behind one estimate (see the reference). It
# multiplies the stored `hessian`, so a zero, negative or infinite value would turn
# every step into a sign step, flip it, or stall it.
def _check_bs(bs: Any) -> None:
    _check_number("bs", bs, low=0.0, low_inclusive=False)


# ## Choosing an implementation
#
# As in `torch.optim.AdamW`: `foreach=True` or `False` is obeyed; `foreach=None` picks
# the foreach version when every parameter is a plain tensor on a device that has
# foreach kernels (CUDA, XPU, or a custom accelerator), and the reference otherwise.
# On the CPU, PyTorch's foreach ops are a loop over the per-tensor kernels, so there
# is nothing to gain and the reference is the default there, as it is for AdamW.
#
# The [fused kernel](fused.html) is used when asked for (`fused=True`, on CUDA or, with
# the CPU build of the same kernel, on the CPU), and when nothing is asked for
# (`fused=None`, `foreach=None`) on CUDA parameters it can take, if it can be built on
# this machine: the first step then compiles it once (about a minute, cached on disk).
# Where it cannot be built, `fused=None` quietly uses the foreach version instead.
def _foreach_devices() -> set[str]:
    return {"cuda", "xpu", torch._C._get_privateuse1_backend_name()}


def _default_foreach(params: list[Tensor]) -> bool:
    devices = _foreach_devices()
    return all(type(p) in (Tensor, torch.nn.Parameter) and p.device.type in devices for p in params)


def _implementation(group: dict, params: list[Tensor], tensors: Sequence[Tensor] = ()) -> str:
    if group["fused"]:
        return "fused"
    if group["foreach"] is not None:
        return "foreach" if group["foreach"] else "reference"
    if not _default_foreach(params):
        return "reference"
    if group["fused"] is None and all(p.device.type == "cuda" for p in params):
        from . import fused

        if fused.fused_available("cuda") and fused.fused_supports([*params, *tensors]):
            return "fused"
    return "foreach"


def _step_function(implementation: str) -> Callable:
    if implementation == "fused":
        from .fused import sophiag_fused

        return sophiag_fused
    return sophiag_foreach if implementation == "foreach" else sophiag_reference


def _hessian_function(implementation: str) -> Callable:
    if implementation == "fused":
        from .fused import hessian_ema_fused

        return hessian_ema_fused
    return hessian_ema_foreach if implementation == "foreach" else hessian_ema_reference


class SophiaG(Optimizer):
    r"""Sophia with the Gauss-Newton-Bartlett estimator: a drop-in replacement for the authors' `SophiaG`.

    Arguments (the authors' names and defaults):
        params: parameters or parameter groups, as for any `torch.optim` optimizer.
        lr: $\eta$, the largest step one coordinate can take (before weight decay).
        betas: $(\beta_1, \beta_2)$, the EMA rates of the momentum and of the Hessian.
        rho: $\rho$, how many Newton steps fit in one clipped step.
        weight_decay: $\lambda$, decoupled weight decay, applied as $\theta \mathrel{*}= 1 - \eta\lambda$.

    Keyword-only (PyTorch conventions):
        maximize: maximize the objective instead of minimizing it.
        capturable: keep the step counters on the parameters' device; the step never
            synchronizes with the host either way.
        foreach: `True` for the `torch._foreach` version, `False` for the reference,
            `None` to choose as `torch.optim.AdamW` does.
        fused: `True` for the fused kernel (one pass over memory per step; CUDA, or
            the CPU build of the same kernel on the CPU), `False` never, `None` to use it
            on CUDA when it can be built and to fall back to foreach quietly otherwise.
            With `fused=True`, `lr` may be a one-element tensor (for CUDA graphs), and
            `torch.amp.GradScaler` hands the loss scale to the kernel instead of
            unscaling the gradients itself.
        eps: $\epsilon$ in $\max(\rho B h, \epsilon)$ (the authors hard-code `1e-15`).

    Per step: `step(closure=None, bs=5120)`, with `bs` the number of predictions
    (tokens) per step, $B$. Every $k$ steps: back-propagate the loss from
    `sophia.gnb_loss`, then `update_hessian()`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        maximize: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        eps: float = 1e-15,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            fused=fused,
        )
        _check_group(defaults, where="")
        super().__init__(params, defaults)
        self._last_bs: float | None = None
        if fused:
            self._step_supports_amp_scaling = True

    # Every group is checked with its defaults filled in, before it joins the
    # optimizer: a bad group is never half-added.
    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **param_group}
        _check_group(merged, where=f"param_groups[{len(self.param_groups)}]: ")
        super().add_param_group(param_group)

    # Checkpoints written by the authors' `SophiaG` (or by an older version of this
    # class) lack our keyword-only flags and may hold the step as a Python number:
    # fill in the defaults so they load and continue unchanged.
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("eps", 1e-15)
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)

    # ## State
    #
    # Per parameter, the three keys of the reference: `step` (a `float32` scalar
    # tensor, on the CPU unless `capturable` or `fused`, where it lives on the
    # parameter's device so that counting it never waits for the device), `exp_avg`
    # $m$ and `hessian` $h$, both of
    # the parameter's shape and dtype (so a `bfloat16` model keeps `bfloat16` state,
    # as with `torch.optim.AdamW`; the math is done in `float32` anyway). A state
    # missing a key, e.g. loaded from another optimizer's checkpoint, gets zeros for
    # it, as the authors' code does for `hessian`: with $h = 0$ every step is a
    # sign-of-momentum step of size $\eta$ until the next refresh.
    def _state_for(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            device = p.device if group["capturable"] or group["fused"] else torch.device("cpu")
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        for key in ("exp_avg", "hessian"):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # Parameters with a gradient, per group. A parameter whose `.grad` is `None` is
    # skipped and its state is not touched (not even created). Sparse gradients are
    # refused: Sophia's state is dense, and a sparse $m$ would be a different
    # algorithm.
    def _params_with_grad(self) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        plan = []
        for gi, group in enumerate(self.param_groups):
            params, grads = [], []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"SophiaG does not support sparse gradients: param_groups[{gi}]['params'][{pi}] "
                        f"has a gradient with layout {p.grad.layout}"
                    )
                params.append(p)
                grads.append(p.grad)
            plan.append((group, params, grads))
        return plan

    # ## The step
    #
    # Order matters for "a refused step changes nothing": first every check (the
    # hyperparameters of every group, `bs`), then the closure, then the gradients (a
    # sparse one anywhere refuses the whole step), the choice of implementation per
    # group and, for the fused kernel, its own checks (it is built, if need be, and
    # every tensor has a dtype, layout and device it takes), and only then the updates.
    #
    # `torch.amp.GradScaler` and fused optimizers have a contract: when the optimizer
    # says `_step_supports_amp_scaling`, the scaler does not unscale the gradients nor
    # skip the step itself; it sets `optimizer.grad_scale` (the loss scale) and
    # `optimizer.found_inf` (non-zero if any gradient overflowed) and calls `step()`.
    # The fused kernel then divides each gradient by the scale as it reads it, and skips
    # the whole step, without waiting for the device, when `found_inf` is set. A group
    # that is not fused (a mixed configuration) does the same with ordinary ops.
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, bs: float = 5120) -> Tensor | None:
        r"""Take one Sophia step; `bs` is $B$, the number of predictions behind the Hessian estimate."""
        _check_bs(bs)
        for gi, group in enumerate(self.param_groups):
            _check_group(group, where=f"param_groups[{gi}]: ", at_step=True)

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plan = self._plan(self._params_with_grad())
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, params, grads, implementation in plan:
            extra = {}
            if implementation == "fused":
                extra = dict(grad_scale=grad_scale, found_inf=found_inf)
            elif found_inf is not None or grad_scale is not None:
                if found_inf is not None and bool(found_inf.item()):
                    continue
                if grad_scale is not None:
                    grads = torch._foreach_div(grads, grad_scale.to(grads[0].device))
            states = [self._state_for(p, group) for p in params]
            _step_function(implementation)(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["hessian"] for s in states],
                [s["step"] for s in states],
                lr=group["lr"],
                beta1=group["betas"][0],
                rho=group["rho"],
                bs=bs,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                **extra,
            )
        self._last_bs = bs
        return loss

    # Per group with work to do: its implementation, and for the fused kernel, the
    # kernel's own checks, all before the first write.
    def _plan(self, groups: list[tuple[dict, list[Tensor], list[Tensor]]]) -> list[tuple]:
        plan = []
        for group, params, tensors in groups:
            if not params:
                continue
            implementation = _implementation(group, params, tensors)
            if implementation == "fused":
                from .fused import check_fused_tensors

                check_fused_tensors({"params": params, "grads or estimates": tensors})
            plan.append((group, params, tensors, implementation))
        return plan

    # ## The Hessian refresh
    #
    # `update_hessian()` with no argument is the authors' call: every parameter with a
    # gradient folds $\hat g \odot \hat g$ into its `hessian`, where $\hat g$ is the
    # gradient the caller just back-propagated from the sampled-label loss. With a
    # list, one entry per parameter of all groups in order (`None` skips one), the
    # entries are folded in as they are: that is how Hutchinson's estimates, or any
    # other estimator's, reach the optimizer. It may be called before the first
    # `step()`: the state is created with zeros.
    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[Tensor | None] | None = None) -> None:
        r"""Fold a Hessian-diagonal estimate into the EMA $h$: $h \leftarrow \beta_2 h + (1-\beta_2)\hat h$."""
        for gi, group in enumerate(self.param_groups):
            _check_group(group, where=f"param_groups[{gi}]: ", at_step=True)
        if estimates is None:
            groups = self._params_with_grad()
            square = True
        else:
            groups = self._match_estimates(estimates)
            square = False

        for group, params, ests, implementation in self._plan(groups):
            hessians = [self._state_for(p, group)["hessian"] for p in params]
            _hessian_function(implementation)(hessians, ests, beta2=group["betas"][1], square=square)

    # The estimates must line up with the parameters one to one: same count, same
    # shape, same device, real for a real parameter and complex for a complex one,
    # floating point, dense. All are checked before any is folded in.
    def _match_estimates(self, estimates: Sequence[Tensor | None]) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        if isinstance(estimates, Tensor) or not isinstance(estimates, Iterable):
            raise TypeError(
                "estimates must be a list with one tensor (or None) per parameter, "
                f"got {type(estimates).__name__}"
            )
        estimates = list(estimates)
        n_params = sum(len(group["params"]) for group in self.param_groups)
        if len(estimates) != n_params:
            raise ValueError(
                f"estimates has {len(estimates)} entries but the optimizer has {n_params} parameters "
                "(one entry per parameter of all groups, in order; None to skip one)"
            )
        plan, index = [], 0
        for group in self.param_groups:
            params, ests = [], []
            for p in group["params"]:
                est = estimates[index]
                if est is not None:
                    _check_estimate(index, est, p)
                    params.append(p)
                    ests.append(est)
                index += 1
            plan.append((group, params, ests))
        return plan

    # ## Diagnostics: the clip win rate
    #
    # The fraction of coordinates that are *not* clipped, $|m| < \max(\rho B h,
    # \epsilon)$, computed from the current state as the reference training loop does
    # (it logs it right after `update_hessian()`). `bs` defaults to the `bs` of the last
    # step. The reference README tunes $\rho$ so that this stays in 0.1 to 0.5: near 0,
    # Sophia is sign-momentum; near 1, the clip never acts.
    @torch.no_grad()
    def win_rate(self, bs: float | None = None) -> float:
        r"""Fraction of coordinates with $|m| < \max(\rho B h, \epsilon)$, i.e. not clipped."""
        if bs is None:
            bs = self._last_bs
        if bs is None:
            raise RuntimeError("win_rate() needs B: call step() first, or pass bs=")
        _check_bs(bs)
        unclipped, total = 0, 0
        for group in self.param_groups:
            states = [self.state[p] for p in group["params"] if "exp_avg" in self.state[p]]
            u, n = unclipped_count_reference(
                [s["exp_avg"] for s in states],
                [s["hessian"] for s in states],
                rho=group["rho"],
                bs=bs,
                eps=group["eps"],
            )
            unclipped += u
            total += n
        if total == 0:
            raise RuntimeError("win_rate() has no optimizer state to measure: take a step first")
        return unclipped / total


def _check_estimate(index: int, est: Any, p: Tensor) -> None:
    where = f"estimates[{index}]"
    if not isinstance(est, Tensor):
        raise TypeError(f"{where} must be a tensor or None, got {type(est).__name__}")
    if est.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(est.shape)} but its parameter has shape {tuple(p.shape)}")
    if est.device != p.device:
        raise ValueError(f"{where} is on {est.device} but its parameter is on {p.device}")
    if est.is_sparse:
        raise ValueError(f"{where} is sparse ({est.layout}); estimates must be dense")
    if not (est.is_floating_point() or est.is_complex()):
        raise TypeError(f"{where} has dtype {est.dtype}; estimates must be floating point")
    if est.is_complex() != p.is_complex():
        raise TypeError(f"{where} has dtype {est.dtype} but its parameter has dtype {p.dtype}")


class SophiaH(SophiaG):
    r"""Sophia with Hutchinson's estimator (Sophia-H), one import away.

    The same update as `SophiaG`; what differs is the estimate. Hutchinson's
    $\hat h = u \odot (\nabla^2 L\, u)$ estimates the Hessian diagonal of the loss
    itself, so it needs no factor $B$: `step()` defaults to `bs=1`, and the stored
    `hessian` is the paper's $h$. Every $k$ steps, pass a loss whose graph is still alive
    (built with gradients enabled, not yet back-propagated without `retain_graph`):
    `opt.update_hessian(loss=loss)`; or pass estimates you computed yourself.

    Defaults: the authors publish no PyTorch defaults for Sophia-H. We keep `SophiaG`'s
    (`lr=1e-4`, `betas=(0.965, 0.99)`, `rho=0.04`, `weight_decay=0.1`) because with
    `bs=1` the two optimizers see the same quantity $h$, an estimate of the same
    Hessian diagonal. `n_samples` probes (default 1, as in the paper) of the
    `distribution` (`"rademacher"`, the lower-variance choice, or `"gaussian"`) are
    averaged per refresh.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        n_samples: int = 1,
        distribution: str = "rademacher",
        maximize: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        eps: float = 1e-15,
    ) -> None:
        if not (isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples >= 1):
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            fused=fused,
            eps=eps,
        )
        self.n_samples = n_samples
        self.distribution = distribution

    def step(self, closure: Callable[[], Tensor] | None = None, bs: float = 1) -> Tensor | None:
        r"""Take one Sophia step; with Hutchinson's estimates $B = 1$."""
        return super().step(closure, bs=bs)

    # With `loss=`, the estimate is computed here, over every parameter that requires
    # a gradient. A group with `maximize=True` maximizes the loss, i.e. minimizes
    # $-L$, whose Hessian is $-\nabla^2 L$: its estimates are negated, so that $h$ is
    # always the curvature of the quantity being minimized.
    def update_hessian(
        self,
        estimates: Sequence[Tensor | None] | None = None,
        *,
        loss: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        r"""Fold Hutchinson's estimate of $\operatorname{diag}\nabla^2 L$ (from `loss=`) or given `estimates` into $h$."""
        if (estimates is None) == (loss is None):
            raise ValueError("SophiaH.update_hessian needs exactly one of estimates= or loss=")
        if loss is not None:
            for gi, group in enumerate(self.param_groups):
                _check_group(group, where=f"param_groups[{gi}]: ")
            params = [p for group in self.param_groups for p in group["params"]]
            signs = [-1.0 if group["maximize"] else 1.0 for group in self.param_groups for _ in group["params"]]
            trainable = [p for p in params if p.requires_grad]
            with torch.enable_grad():
                found = iter(
                    hutchinson(
                        loss,
                        trainable,
                        n_samples=self.n_samples,
                        distribution=self.distribution,
                        generator=generator,
                    )
                )
            estimates = [
                (next(found) * sign) if p.requires_grad else None for p, sign in zip(params, signs)
            ]
        super().update_hessian(estimates)
