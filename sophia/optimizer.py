r"""
---
title: The SophiaG and SophiaH optimizers
summary: The torch.optim classes users import; state, parameter groups, and dispatch.
---

This module is what a user imports. It holds no math of its own: the step is the
[reference](reference.html), the [`torch._foreach` version](foreach.html) or
[the fused kernel](fused.html), the estimates come from
[`sophia.hessian`](hessian.html), and the checks and the choice among implementations
from [`sophia.checks`](checks.html). What lives here is the bookkeeping of a
`torch.optim` optimizer:

* the **constructor and calling convention of the authors' `SophiaG`**, so that ours is
  a drop-in replacement: `SophiaG(params, lr=1e-4, betas=(0.965, 0.99), rho=0.04,
  weight_decay=1e-1)`, then `update_hessian()` every $k$ steps and `step(bs=...)` every
  step, with the same state keys (`step`, `exp_avg`, `hessian`);
* the **PyTorch conventions** on top: keyword-only `foreach=` and `fused=`, `maximize`,
  per-group hyperparameters, schedulers, `state_dict()` / `load_state_dict()`;
* the **order that makes a refused step change nothing**: every check, the non-finite
  rule (`nonfinite=`) included, runs before the first write.

Under DDP and FSDP nothing changes but $B$, the *global* number of predictions; the
[scale page](../scale.md) says how to use the optimizer there, with mixed precision and
with checkpoints, and [how the optimizer is built](../engineering/optimizer.md) says why
it is built so.

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

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

# The checks and the choice of implementation (`NONFINITE_RULES`, `_default_foreach`
# and `_implementation` lived here before: the `as` form keeps offering them).
from .checks import NONFINITE_RULES as NONFINITE_RULES
from .checks import (
    _add_count,
    _check_bs,
    _check_group,
    _check_groups,
    _check_hutchinson_settings,
    _check_nonfinite_rule,
    _check_step_range,
    _hyper,
    _local,
    _match_estimates,
    _number,
    _params_with_grad,
    _plan,
    _sum_across_shards,
)
from .checks import _default_foreach as _default_foreach
from .checks import _implementation as _implementation

# The implementations share one signature (that of `sophiag_reference`), so the step
# picks one by name, per group. The fused module is imported only where it is used
# (a foreach step handed a flag borrows its step counting): a user who never asks for
# the kernel never builds it.
from .foreach import hessian_ema_foreach, sophiag_foreach
from .hessian import hutchinson
from .loading import _adopt_foreign, _check_state_dict
from .nonfinite import (
    _all_finite,
    device_flag,
    record_device_step,
    settle_device_skips,
    skip_nonfinite,
)
from .reference import (
    hessian_ema_reference,
    sophiag_reference,
    unclipped_count_reference,
)

__all__ = ["SophiaG", "SophiaH"]


# ## The implementations, by name
#
# `_plan` (in [`sophia.checks`](checks.html)) names one implementation per group; here
# is its function, for the step and for the Hessian EMA.
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
    r"""Sophia with the Gauss-Newton-Bartlett estimator: a drop-in replacement for the
    authors' `SophiaG`.

    The first five arguments are the authors' (names and defaults); the others are
    keyword-only and follow PyTorch's conventions.

    Args:
        params: parameters or parameter groups, as for any `torch.optim` optimizer.
        lr: $\eta$, the largest step one coordinate can take (before weight decay).
        betas: $(\beta_1, \beta_2)$, the EMA rates of the momentum and of the Hessian.
        rho: $\rho$, how many Newton steps fit in one clipped step.
        weight_decay: $\lambda$, decoupled weight decay, applied as
            $\theta \mathrel{*}= 1 - \eta\lambda$.
        maximize: maximize the objective instead of minimizing it.
        capturable: keep the step counters on the parameters' device; the step never
            synchronizes with the host either way.
        foreach: `True` for the `torch._foreach` version, `False` for the reference,
            `None` to choose as `torch.optim.AdamW` does.
        fused: `True` for the fused kernel (one pass over memory per step; CUDA, or
            the CPU build of the same kernel on the CPU; compiled on first use, with
            a line on stderr), `False` or `None` (the default) never: opt-in, as in
            `torch.optim.AdamW`.
            With `fused=True`, `lr` may be a one-element tensor (for CUDA graphs), and
            `torch.amp.GradScaler` hands the loss scale to the kernel instead of
            unscaling the gradients itself.
        eps: $\epsilon$ in $\max(\rho B h, \epsilon)$ (the authors hard-code `1e-15`).
        nonfinite: what a NaN or infinity in a gradient or an estimate does: `"raise"`
            (refuse with `FloatingPointError`, nothing changed), `"skip"` (skip the step
            or refresh, counted in `skipped_steps` / `skipped_refreshes`), or
            `"unchecked"`. On CUDA a step with foreach or `fused=True` is skipped on
            the device, without a wait, and reported at the next call that waits
            anyway (`state_dict()`, `update_hessian()`, `win_rate()`,
            `skipped_steps`), at the latest `sophia.nonfinite.SETTLE_EVERY` steps on.

    Per step: `step(closure=None, bs=5120)`, with `bs` the number of predictions
    (tokens) per step, $B$, over all data-parallel processes. Every $k$ steps:
    back-propagate the loss from `sophia.gnb_loss`, then `update_hessian()`
    (`update_hessian(scaler=scaler)` if that loss was scaled by a `GradScaler`).
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
        nonfinite: str = "raise",
    ) -> None:
        # Every setting, flags included, is a default a group may override (a group may
        # be `fused=True` and another `foreach=True`). `bs` is not: it belongs to each
        # `step()`.
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
        # Checked before `Optimizer.__init__`, so that an error names the argument
        # rather than the first group.
        _check_group(defaults, where="")
        _check_nonfinite_rule(nonfinite)
        super().__init__(params, defaults)
        self.nonfinite = nonfinite
        # Counters for the training loop to log, not part of `state_dict()`.
        self._skipped_steps = 0
        self.skipped_refreshes = 0
        # $B$ of the last step, for `win_rate()`.
        self._last_bs: float | None = None
        # The flag `torch.amp.GradScaler` looks for; only with `fused=True`, as in
        # `torch.optim.AdamW`, since with `fused=None` the choice is made at each step.
        if fused:
            self._step_supports_amp_scaling = True

    # Every group is checked with the defaults filled in before it joins, on a merged
    # copy, so that a refused group leaves the optimizer and the caller's dict as they
    # were.
    def add_param_group(self, param_group: dict) -> None:
        r"""Add a parameter group, after checking it with the defaults filled in (see
        `torch.optim.Optimizer`)."""
        merged = {**self.defaults, **param_group}
        _check_group(merged, where=f"param_groups[{len(self.param_groups)}]: ")
        super().add_param_group(param_group)

    # Checkpoints of the authors' `SophiaG` (or of an older version of this class) lack
    # our flags and may hold the step as a Python number: `load_state_dict` ends here,
    # and the defaults are filled in so they load and continue unchanged.
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault(
            "_skipped_steps", self.__dict__.pop("skipped_steps", 0)
        )
        self.__dict__.setdefault("skipped_refreshes", 0)
        flags = dict(maximize=False, capturable=False, foreach=None, fused=None)
        for group in self.param_groups:
            for key, value in {**flags, "eps": 1e-15}.items():
                group.setdefault(key, value)
        # Every implementation counts the step in place, so it must be a tensor (on the
        # CPU: the count does not enter the update).
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)

    # ## Loading a checkpoint
    #
    # Every entry is checked against the parameters before anything is loaded (see
    # [`sophia.loading`](loading.html)). Another optimizer's state (AdamW's) loads with
    # this optimizer's settings, and so does a state with `exp_avg` and no `hessian`,
    # each with a warning.
    def load_state_dict(self, state_dict: dict) -> None:
        r"""Load a state written by `state_dict()` (or by the authors' `SophiaG`, or by
        AdamW), after checking it fits."""
        missing_hessian = _check_state_dict(state_dict, self.param_groups)
        state_dict, note = _adopt_foreign(state_dict, self.param_groups)
        if note is not None:
            warnings.warn(note, stacklevel=2)
        elif missing_hessian:
            warnings.warn(
                f"the loaded state of {missing_hessian} parameter(s) has no 'hessian' "
                "(a checkpoint of another optimizer?): h starts at zero, and their "
                "steps are sign steps of size lr until the next update_hessian()",
                stacklevel=2,
            )
        super().load_state_dict(state_dict)

    # ## State
    #
    # Per parameter, the reference's three keys, created lazily (a parameter that never
    # gets a gradient never gets state): `step`, a `float32` scalar on the CPU, or on
    # the parameter's device with `capturable` or `fused` so that counting never waits;
    # `exp_avg` $m$ and `hessian` $h$, zeros of the parameter's shape, dtype and memory
    # format. A missing key (another optimizer's checkpoint) gets zeros too, as in the
    # authors' code: with $h = 0$ every step is a sign-of-momentum step of size $\eta$.
    def _state_for(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            device = (
                p.device
                if group["capturable"] or group["fused"]
                else torch.device("cpu")
            )
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        for key in ("exp_avg", "hessian"):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # Steps skipped for non-finite gradients; reading it waits for the steps skipped
    # on the device (see [`sophia.nonfinite`](nonfinite.html)).
    @property
    def skipped_steps(self) -> int:
        settle_device_skips(self)
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps = value

    # The state, after the steps skipped on the device are accounted for.
    def state_dict(self) -> dict:
        r"""As `torch.optim.Optimizer.state_dict`, after reporting steps skipped on
        the device."""
        settle_device_skips(self)
        return super().state_dict()

    # ## The step
    #
    # Every check first (groups, `bs`), then the closure, the gradients, the plan and
    # the non-finite rule, and only then the updates: a step that raised halfway would
    # leave the layers one step apart. With `fused=True`, a `GradScaler` sets
    # `grad_scale` and `found_inf` instead of unscaling and skipping itself (see
    # [the docs](../engineering/optimizer.md#under-a-gradscaler)), and forwards `bs`.
    @torch.no_grad()
    def step(
        self, closure: Callable[[], Tensor] | None = None, bs: float = 5120
    ) -> Tensor | None:
        r"""Take one Sophia step; `bs` is $B$, the number of predictions behind the
        Hessian estimate."""
        _check_bs(bs)
        bs = _number(bs)
        _check_groups(self.param_groups)
        # The closure back-propagates, with gradients on; the step uses its gradients.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = _plan(_params_with_grad(self.param_groups))
        _check_step_range(plan, self.param_groups)
        # A scaler that hands over its flags has already looked for non-finite values;
        # otherwise the flag stays on the device where the step can take it, and the
        # step is recorded, with the counters it counted anyway.
        scaled = any(flag is not None for flag in self._scaler_flags())
        flag = None if scaled else device_flag(self, plan)
        if not scaled and flag is None and skip_nonfinite(self, plan, refresh=False):
            return loss
        counted = []
        for group, params, grads, implementation in plan:
            counted += self._step_group(group, params, grads, implementation, bs, flag)
        if flag is not None:
            record_device_step(self, flag, counted)
        self._last_bs = bs
        return loss

    # The loss scale and the overflow flag, set by a `GradScaler` just before it calls
    # `step()` (`grad_scale` is `None` after `scaler.unscale_`); otherwise absent.
    def _scaler_flags(self) -> tuple[Tensor | None, Tensor | None]:
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    # One group's update. A fused group hands the scale and the overflow flag to the
    # kernel, and a foreach group the non-finite flag (`nonfinite`) to its step, each
    # reading the flag only where a skipped step would create state; any other group
    # reads the flag (a wait for the device) and skips, or unscales the gradients out
    # of place so that `p.grad` keeps the scaled values, as the kernel leaves them.
    # Then state (zeros at a first step) and the chosen function. Returned: the
    # counters counted whatever the flag says (below).
    def _step_group(
        self,
        group: dict,
        params: list,
        grads: list,
        implementation: str,
        bs: float,
        nonfinite: Tensor | None = None,
    ) -> list[Tensor]:
        grad_scale, found_inf = self._scaler_flags()
        found_inf = nonfinite if nonfinite is not None else found_inf
        extra = {}
        if implementation == "fused" or nonfinite is not None:
            extra = dict(found_inf=found_inf)
            if implementation == "fused":
                extra["grad_scale"] = grad_scale
            new = any("exp_avg" not in self.state.get(p, {}) for p in params)
            if new and found_inf is not None and bool(found_inf.item()):
                return []
        elif found_inf is not None or grad_scale is not None:
            if found_inf is not None and bool(found_inf.item()):
                return []
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale.to(grads[0].device))
        states = [self._state_for(p, group) for p in params]
        steps, counted = [s["step"] for s in states], []
        # A foreach group's counters are on the CPU (unless `capturable`), where the
        # flag cannot decide their count without a wait: they count here, every step,
        # the step is handed none, and the record takes the skipped steps back off.
        if nonfinite is not None and not (group["capturable"] or group["fused"]):
            torch._foreach_add_(steps, 1)
            steps, counted = [], steps
        _step_function(implementation)(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["hessian"] for s in states],
            steps,
            **_hyper(group),
            bs=bs,
            maximize=group["maximize"],
            **extra,
        )
        return counted

    # ## The Hessian refresh
    #
    # With no argument, the authors' call: every parameter with a gradient folds
    # $\hat g \odot \hat g$ into its `hessian`, $\hat g$ being the gradient of the
    # sampled-label loss. With a list, one entry per parameter of all groups in order
    # (`None` skips one), the entries are folded in as they are: Hutchinson's estimates,
    # or any other estimator's. It may come before the first `step()`.
    @torch.no_grad()
    def update_hessian(
        self,
        estimates: Sequence[Tensor | None] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        r"""Fold a Hessian-diagonal estimate into the EMA $h$:
        $h \leftarrow \beta_2 h + (1-\beta_2)\hat h$.

        `scaler`: the `torch.amp.GradScaler` that scaled the sampled-label loss before
        its backward pass; its scale $s$ is divided out of $\hat g$ before squaring, and
        a refresh whose gradients overflowed is skipped (counted in
        `skipped_refreshes`).
        """
        settle_device_skips(self)
        _check_groups(self.param_groups)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                "scaler must be a torch.amp.GradScaler or None, "
                f"got {type(scaler).__name__}"
            )
        # A generator of estimates is read once, so that an error can name an entry.
        if isinstance(estimates, Iterable) and not isinstance(estimates, Tensor):
            estimates = list(estimates)
        if estimates is None:
            groups, square = _params_with_grad(self.param_groups), True
        elif scaler is not None:
            raise ValueError(
                "scaler= applies to the gradients in p.grad, not to estimates=: "
                "unscale them yourself"
            )
        else:
            groups, square = _match_estimates(estimates, self.param_groups), False
        plan = _plan(groups)
        # Under a scaler, `p.grad` holds $s\,\hat g$: divide $s$ out (exact, a power of
        # two) into new tensors, and skip a refresh that overflowed, whatever
        # `nonfinite` says.
        if scaler is not None and scaler.is_enabled() and square:
            inv_scale = 1.0 / scaler.get_scale()
            plan = [
                (group, params, torch._foreach_mul(list(tensors), inv_scale), impl)
                for group, params, tensors, impl in plan
            ]
            if not _all_finite([t for _, _, tensors, _ in plan for t in tensors]):
                self.skipped_refreshes += 1
                return
        # Otherwise the step's rule: a NaN folded into $h$ would stay there for good.
        elif skip_nonfinite(
            self, plan, refresh=True, estimates=None if square else estimates
        ):
            return
        # Each group with its own $\beta_2$ and implementation; a refresh is not a step.
        for group, params, ests, implementation in plan:
            hessians = [self._state_for(p, group)["hessian"] for p in params]
            _hessian_function(implementation)(
                hessians, ests, beta2=_number(group["betas"][1]), square=square
            )

    # ## Diagnostics: the clip win rate
    #
    # The fraction of coordinates *not* clipped, $|m| < \max(\rho B h, \epsilon)$, as
    # the reference training loop logs it after `update_hessian()`; the reference README
    # tunes $\rho$ to keep it in 0.1 to 0.5. Each group is counted with its own $\rho$
    # and $\epsilon$ by the reference counter, on this process's shards, and the counts
    # are summed over the processes. It waits for the device: keep it out of the hot
    # loop and of a captured CUDA graph.
    @torch.no_grad()
    def win_rate(self, bs: float | None = None) -> float:
        r"""Fraction of coordinates with $|m| < \max(\rho B h, \epsilon)$, i.e. not
        clipped."""
        settle_device_skips(self)
        # Without an argument, the $B$ of the last step; before any step there is none.
        if bs is None:
            bs = self._last_bs
        if bs is None:
            raise RuntimeError("win_rate() needs B: call step() first, or pass bs=")
        _check_bs(bs)
        bs = _number(bs)
        counts: dict[tuple, list] = {}
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p]
                if "exp_avg" not in s:
                    continue
                unclipped, total = unclipped_count_reference(
                    [_local(s["exp_avg"])],
                    [_local(s["hessian"])],
                    rho=_number(group["rho"]),
                    bs=bs,
                    eps=_number(group["eps"]),
                )
                _add_count(counts, s["exp_avg"], unclipped, total)
        unclipped, total = _sum_across_shards(counts)
        if total == 0:
            raise RuntimeError(
                "win_rate() has no optimizer state to measure: take a step first"
            )
        return unclipped / total


class SophiaH(SophiaG):
    r"""Sophia with Hutchinson's estimator (Sophia-H), one import away.

    The same update as `SophiaG`; what differs is the estimate. Hutchinson's
    $\hat h = u \odot (\nabla^2 L\, u)$ estimates the Hessian diagonal of the loss
    itself, so it needs no factor $B$: `step()` defaults to `bs=1`, and the stored
    `hessian` is the paper's $h$. Every $k$ steps, pass a loss whose graph is still
    alive (built with gradients enabled, not yet back-propagated without
    `retain_graph`): `opt.update_hessian(loss=loss)`; or pass estimates you computed
    yourself.

    Defaults: the authors publish no PyTorch Sophia-H. Their JAX code (levanter) uses
    $\gamma_H$ = `rho=0.01` with this estimate of the mean loss's Hessian, a quarter
    of its $\gamma_G$, and so do we; the rest is `SophiaG`'s (`lr=1e-4`,
    `betas=(0.965, 0.99)`, `weight_decay=0.1`). Our $\rho$ sweep for Sophia-H could
    not tell 0.01 from 0.05 (the results page, step 2).
    `n_samples` probes (default 1, as in the paper) of the
    `distribution` (`"rademacher"`, the lower-variance choice, or `"gaussian"`) are
    averaged per refresh.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.01,
        weight_decay: float = 1e-1,
        *,
        n_samples: int = 1,
        distribution: str = "rademacher",
        maximize: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        eps: float = 1e-15,
        nonfinite: str = "raise",
    ) -> None:
        # The estimator's settings describe the estimator, which runs over all groups at
        # once: attributes, not group settings, and so not in `state_dict()` (to resume,
        # construct the optimizer with the same arguments).
        _check_hutchinson_settings(n_samples, distribution)
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
            nonfinite=nonfinite,
        )
        self.n_samples = n_samples
        self.distribution = distribution

    def step(
        self, closure: Callable[[], Tensor] | None = None, bs: float = 1
    ) -> Tensor | None:
        r"""Take one Sophia step; with Hutchinson's estimates $B = 1$."""
        return super().step(closure, bs=bs)

    def update_hessian(
        self,
        estimates: Sequence[Tensor | None] | None = None,
        *,
        loss: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        r"""Fold Hutchinson's estimate of $\operatorname{diag}\nabla^2 L$ (from `loss=`)
        or given `estimates` into $h$."""
        # Exactly one source of estimates: both would be ambiguous.
        if (estimates is None) == (loss is None):
            raise ValueError(
                "SophiaH.update_hessian needs exactly one of estimates= or loss="
            )
        if loss is not None:
            _check_groups(self.param_groups)
            estimates = self._hutchinson_estimates(loss, generator)
        super().update_hessian(estimates)

    # Hutchinson's estimates of every parameter that requires a gradient (`None`, no
    # refresh, for the others), in the order `update_hessian` expects. A group with
    # `maximize=True` minimizes $-L$, whose Hessian is $-\nabla^2 L$: its estimates are
    # negated, so that $h$ is the curvature of what is minimized.
    def _hutchinson_estimates(
        self, loss: Tensor, generator: torch.Generator | None
    ) -> list[Tensor | None]:
        params = [p for group in self.param_groups for p in group["params"]]
        signs = [
            -1.0 if group["maximize"] else 1.0
            for group in self.param_groups
            for _ in group["params"]
        ]
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError(
                "SophiaH has no parameter that requires a gradient (every parameter "
                "of its groups has requires_grad=False): nothing to estimate"
            )
        # The double backward needs gradient mode, even under the caller's `no_grad`.
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
        return [
            (next(found) * sign) if p.requires_grad else None
            for p, sign in zip(params, signs)
        ]
