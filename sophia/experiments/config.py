r"""
---
title: The configuration of a training run
summary: TrainConfig and its checks, the hyperparameters per optimizer, the learning-rate schedule, the output folder.
---

Everything a [training run](train.html) depends on, checked when it is made, before
any work: `TrainConfig`, the defaults of each optimizer (`OPTIMIZER_DEFAULTS`), the
schedule `lr_at`, and the checks of the output folder and the device that the
[command line](cli.html) shares. A bad value raises a `ValueError` that names the
field and shows the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import CORPORA
from .model import GPTConfig

# The optimizers the loop trains with. `signmomentum` is a baseline, not a new
# optimizer: `SophiaG` whose Hessian is never refreshed, so $h = 0$ for the whole run
# and every step is clipped, $\theta \leftarrow \theta - \eta_t \operatorname{sign}(m_t)$
# after the decoupled decay: sign momentum. Against it, Sophia-G shows what its
# Hessian adds.
OPTIMIZERS = ("adamw", "sophiag", "sophiah", "signmomentum")

# Those that refresh a Hessian estimate every $k$ steps.
REFRESHING = ("sophiag", "sophiah")

# What `compare` trains unless told: the baseline costs a quarter more time, so it is
# asked for by name (`--optimizers adamw sophiag signmomentum sophiah`).
COMPARED = ("adamw", "sophiag", "sophiah")

# The implementations of the step: `foreach=False`, `foreach=True`, `fused=True` (for
# AdamW, the same flags of `torch.optim.AdamW`). `None` leaves the choice to the
# optimizer (on the CPU, the reference; on CUDA, the fused kernel if it builds).
IMPLEMENTATIONS = ("reference", "foreach", "fused")

# ## Hyperparameters per optimizer
#
# Betas, weight decay and $\rho$ are the reference configurations' for GPT-2 125M;
# Sophia-H keeps Sophia-G's but for $\rho$, 0.01: the authors' $\gamma_H$ in their
# JAX code, with this estimate of the mean loss's Hessian (`bs=1`). The peak learning
# rates are ours, the best of a small sweep on the default model (Sophia's is about a
# tenth of AdamW's, as for other sign-like methods): the sweeps, and what they taught
# about $\rho$ and $\beta_1$, are on [the results page](../../results.md).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=6e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "sophiag": dict(lr=6e-4, betas=(0.965, 0.99), weight_decay=0.2, rho=0.05),
    "sophiah": dict(lr=6e-4, betas=(0.965, 0.99), weight_decay=0.2, rho=0.01),
}
# The baseline is Sophia-G in every setting but the refresh ($\rho$ then never acts).
OPTIMIZER_DEFAULTS["signmomentum"] = dict(OPTIMIZER_DEFAULTS["sophiag"])

# The seed of the validation batches, whatever the seed of the run, so that every
# evaluation of every run measures the same text.
EVAL_SEED = 20230523


# ## The configuration
#
# `None` means "the default": of this optimizer (`OPTIMIZER_DEFAULTS`) for `lr`,
# `betas`, `weight_decay` and `rho`, the model's `block_size` for `seq_len`,
# `steps // 10` for `warmup_steps`, and the optimizer's own choice for `impl`. The
# default `steps` and model make `python -m sophia.train compare` (three optimizers,
# three seeds) a job of a few minutes on two CPU cores.
@dataclass
class TrainConfig:
    r"""A training run: optimizer, hyperparameters, model, data, schedule, seed, output."""

    # Which optimizer, and which implementation of its step; the implementations
    # compute the same update, so the choice changes the wall-clock, not the curve.
    optimizer: str = "sophiag"
    impl: str | None = None
    # The model ([`GPTConfig`](model.html)), a corpus name or path
    # ([`load_corpus`](data.html)), and where a downloaded corpus is cached.
    model: GPTConfig = field(default_factory=GPTConfig)
    data: str = "stdlib"
    data_dir: str | None = None
    # `steps` optimizer steps, each on `batch_size` sequences of `seq_len` tokens.
    steps: int = 400
    batch_size: int = 16
    seq_len: int | None = None
    # The schedule: the peak, the floor as a fraction of it, the warm-up.
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    # $(\beta_1, \beta_2)$, $\lambda$, $\rho$, the refresh interval $k$ =
    # `hess_interval`, and the norm $c$ gradients are clipped to (zero: no clipping).
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    rho: float | None = None
    hess_interval: int = 10
    grad_clip: float = 1.0
    # An evaluation every `eval_interval` steps (and after the last), each the mean
    # over `eval_iters` validation batches.
    eval_interval: int = 25
    eval_iters: int = 10
    # `out=None` tracks nothing and writes nothing.
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    verbose: bool = True
    # A [checkpoint](checkpoint.html) every `checkpoint_every` steps (0: none) and
    # after the last; `resume` starts from it if there is one. Both need `out`.
    checkpoint_every: int = 0
    resume: bool = False

    # Names first, then the counts (`True` is an `int` in Python and is refused as
    # one), then the numbers.
    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                f"got {self.optimizer!r}"
            )
        if self.impl is not None and self.impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"impl must be one of {', '.join(IMPLEMENTATIONS)} (or None), "
                f"got {self.impl!r}"
            )
        if not isinstance(self.model, GPTConfig):
            raise ValueError(
                f"model must be a GPTConfig, got {type(self.model).__name__}"
            )
        counts = ("steps", "batch_size", "hess_interval", "eval_interval", "eval_iters")
        for name in counts:
            _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0)
        _check_int("checkpoint_every", self.checkpoint_every, low=0)
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be a bool, got {self.resume!r}")
        if self.out is not None and not str(self.out).strip():
            raise ValueError(
                f"out must name a folder, got {str(self.out)!r} "
                "(None writes nothing; '.' is the current folder)"
            )
        if (self.checkpoint_every or self.resume) and self.out is None:
            raise ValueError(
                "checkpoint_every and resume need an output folder: set out"
            )
        # The position embedding has `block_size` rows: a longer sequence cannot be read.
        if self.seq_len is not None:
            _check_int("seq_len", self.seq_len, low=1)
            if self.seq_len > self.model.block_size:
                raise ValueError(
                    f"seq_len={self.seq_len} is longer than the model's "
                    f"block_size={self.model.block_size}"
                )
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, low=0)
        # A zero learning rate does nothing and a zero $\rho$ makes every Sophia step
        # a sign step ($\max(0, \epsilon) = \epsilon$); a zero weight decay is a choice.
        for name in ("lr", "weight_decay", "rho"):
            value = getattr(self, name)
            if value is not None:
                _check_float(name, value, positive=name != "weight_decay")
        _check_float("grad_clip", self.grad_clip, positive=False)
        _check_float("min_lr_ratio", self.min_lr_ratio, positive=False)
        if self.min_lr_ratio > 1:
            raise ValueError(
                f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}"
            )
        # Each $\beta$ weighs the past of a moving average: at one it never moves,
        # above one it diverges.
        if self.betas is not None:
            if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
                raise ValueError(
                    f"betas must be a pair (beta1, beta2), got {self.betas!r}"
                )
            for i, beta in enumerate(self.betas):
                _check_float(f"betas[{i}]", beta, positive=False)
                if beta >= 1:
                    raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        # Only the corpus's name is checked here (loading it may download); the
        # device now, so that `cuda` on a machine without a GPU fails before any work.
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(
                f"data must be one of {', '.join(CORPORA)} or a file path, "
                f"got {self.data!r}"
            )
        parse_device(self.device)

    def hyper(self) -> dict[str, Any]:
        r"""`lr`, `betas`, `weight_decay` (and `rho` for Sophia), defaults filled in."""
        # A copy, so that a run never edits `OPTIMIZER_DEFAULTS`; a field the
        # optimizer lacks (`rho` for AdamW) is ignored, so one `--rho` serves a
        # whole comparison.
        hyper = dict(OPTIMIZER_DEFAULTS[self.optimizer])
        for name in ("lr", "betas", "weight_decay", "rho"):
            value = getattr(self, name)
            if value is not None and name in hyper:
                hyper[name] = tuple(value) if name == "betas" else value
        return hyper

    @property
    def context(self) -> int:
        r"""The sequence length trained on: `seq_len`, or the model's `block_size`."""
        return self.seq_len if self.seq_len is not None else self.model.block_size

    # $B$ counts predictions, not sequences: a sequence of $T$ tokens is $T$
    # next-token predictions. It is the `bs` of every Sophia-G step.
    @property
    def tokens_per_step(self) -> int:
        r"""$B$, the predictions per step: `batch_size` $\times$ the sequence length."""
        return self.batch_size * self.context

    # The reference warms up for a fiftieth of its run; in a run of a few hundred
    # steps that is too few steps for the optimizer's statistics to settle.
    @property
    def warmup(self) -> int:
        r"""The warm-up steps: `warmup_steps`, or `steps // 10`."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    def lr_at(self, step: int) -> float:
        r"""The learning rate of step `step` (0-based) under this run's schedule."""
        peak = self.hyper()["lr"]
        return lr_at(
            step,
            peak=peak,
            min_lr=peak * self.min_lr_ratio,
            warmup_steps=self.warmup,
            total_steps=self.steps,
        )

    # Numbers, strings, tuples and `None` only, so the result goes to `json.dumps`.
    def to_dict(self) -> dict[str, Any]:
        r"""A JSON-ready dictionary (the model configuration nested)."""
        return dataclasses.asdict(self)


# The name of a run in labml and in its files: the optimizer, its implementation when
# one was chosen, and the seed.
def run_name(config: TrainConfig) -> str:
    r"""`<optimizer>[-<impl>]-seed<seed>`, the name of the run of `config`."""
    name = (
        config.optimizer if config.impl is None else f"{config.optimizer}-{config.impl}"
    )
    return f"{name}-seed{config.seed}"


# ### The checks
#
# `_check_int` refuses `bool`, which Python counts as an `int`; `_check_float` refuses
# NaN and infinities, which pass comparisons the wrong way (`nan < 0` is false).
def _check_int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_float(name: str, value: Any, *, positive: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}"
        )


# A device must parse (`"cuda:0"` does, `"gpu"` does not) and be present.
def parse_device(device: Any) -> torch.device:
    r"""`device` as a `torch.device`; `ValueError` if it does not parse or is absent."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} is not available: torch.cuda.is_available() is False"
        )
    if parsed.type not in ("cpu", "cuda") and not hasattr(torch, parsed.type):
        raise ValueError(f"device {device!r} is not supported by this torch")
    return parsed


# ### The output folder
#
# Created with its parents if missing; writability is tested by writing, since
# permission bits do not tell the whole story (a read-only mount, an ACL, a full disk).
def check_out_dir(out: str | os.PathLike) -> Path:
    r"""Create `out` (and its parents) if needed; `ValueError` if it is not writable."""
    # `Path("")` is the current folder: an empty `--out` is a mistake, not a choice.
    if not str(out).strip():
        raise ValueError(
            f"output directory must not be empty, got {str(out)!r} "
            "(use --out . for the current folder)"
        )
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {str(out)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"cannot create output directory {str(out)!r}: {error.strerror or error}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(
            f"output directory {str(out)!r} is not writable: {error.strerror or error}"
        ) from None
    return path.resolve()


# ## The learning-rate schedule
#
# The reference's: a linear warm-up over the first $w$ = `warmup_steps` steps, then a
# half cosine from the peak $\eta_{\max}$ down to $\eta_{\min}$ at the last step:
# $$\eta_t = \begin{cases}
#   \eta_{\max} \,\dfrac{t + 1}{w} & t < w \\[1ex]
#   \eta_{\min} + \tfrac12 (\eta_{\max} - \eta_{\min})
#   \Big(1 + \cos\big(\pi\,\tfrac{t - w}{T - w}\big)\Big) & w \le t < T
# \end{cases}$$
# for steps $t = 0..T-1$ ($t + 1$, so that the first step does not have $\eta = 0$).
# (Strictly, the cosine reaches $\eta_{\min}$ at $t = T$; the last step runs a hair
# above it.)
#
# **Why warm up.** $h$ starts at zero and is first refreshed after $k$ steps, so every
# step before that is clipped, a sign-of-momentum step that moves *every* coordinate
# by the full $\eta$; the warm-up keeps those blind steps short. Later, $h$, an
# average started from zero with no bias correction, takes about $1/(1-\beta_2)$
# refreshes to reach its full size, and steps are clipped more than they will be.
#
# **Why decay.** Near a minimum the noise of the minibatch gradient, not the
# curvature, limits how close a step can land; a smaller $\eta$ averages the noise
# over more steps. The cosine spends most of the run near the peak and decays with no
# step change for the optimizer's state to absorb.
def lr_at(
    step: int, *, peak: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    r"""The learning rate at `step`: linear warm-up, then cosine to `min_lr`."""
    # The warm-up: $\eta_{\max} (t + 1)/w$, reaching the peak at step $w - 1$.
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    # Past the end of the schedule (a run continued beyond `total_steps`), the floor.
    if step >= total_steps:
        return min_lr
    # The fraction $(t - w)/(T - w)$ of the decay done, in $[0, 1)$; `max(1, ...)`
    # guards the division when the warm-up takes the whole run.
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))
