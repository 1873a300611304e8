r"""
---
title: Training a GPT with Sophia, AdamW as the baseline
summary: The reference training recipe (clipping, warm-up and cosine, Hessian refresh every k steps on a fresh batch), timed and tracked with labml; a compare command with seeds, a figure and a table.
---

# Training a GPT with Sophia

This module trains the [small GPT](model.html) on the [offline corpus](data.html) with
one of three optimizers, following the recipe of the authors' `train_sophiag.py`, and
measures what the paper claims: how many steps Sophia needs to reach AdamW's
validation loss, and what the Hessian refreshes cost in wall-clock.

```
python -m sophia.train --optimizer sophiag --out runs/sophiag
python -m sophia.train compare --out runs/compare
```

The first trains one model and writes its result (and labml's run files) under
`--out`. The second trains AdamW, Sophia-G and Sophia-H from the same initial weights,
on the same batches in the same order, for each of `--seeds`, and writes a figure, a
CSV file and a Markdown table into `--out`. Its defaults (a model of about 0.8 M
parameters, a few hundred steps) make it a job of a few minutes on two CPU cores, with
no download. On a GPU (Colab), the bigger model and Tiny Shakespeare:

```
python -m sophia.train compare --model gpu --device cuda --data shakespeare --steps 2000 --out runs/gpu
```

(the default learning rates were tuned for the CPU model: sweep `--lr` with single
runs, then pass the best to `compare` as `--lr adamw=... --lr sophiag=...`, before
trusting a comparison of the GPU model). From a notebook, `train(TrainConfig(...))`
returns a `RunResult` and `compare(...)` a list of them.

## The recipe

Every step: a batch of `batch_size` sequences of `seq_len` tokens, the mean
cross-entropy over its $B = $ `batch_size` $\times$ `seq_len` predictions, back-propagation,
gradient clipping to norm `grad_clip`, the learning rate of the schedule, one optimizer
step. Then, for Sophia, every $k$ = `hess_interval` steps, *after* that step's update,
a refresh of the Hessian estimate on a fresh batch:

* **Sophia-G** ([`SophiaG`](optimizer.html)): the logits of the fresh batch, labels
  sampled from the model's own predictions ([`gnb_loss`](hessian.html)), back-propagation,
  clipping (as the reference does), `update_hessian()`. Every step passes `bs` $= B$,
  so that the stored $\hat g \odot \hat g$ times $B$ is the Gauss-Newton-Bartlett estimate.
* **Sophia-H** (`SophiaH`): the true-label loss of the fresh batch, and
  `update_hessian(loss=...)`, which computes Hutchinson's $u \odot (\nabla^2 L\, u)$ by
  a double backward pass. Its estimate is of the Hessian of the mean loss itself, so
  its steps use `bs` $= 1$.
* **AdamW** (`torch.optim.AdamW`): no refresh.

Defaults follow the reference configurations where they carry over (betas, weight
decay, $\rho$, $k$, clipping, warm-up then cosine decay to `min_lr_ratio` of the
peak). The peak learning rates do not: those were tuned for GPT-2 with half a million
tokens per step, and ours are set for this small model and batch (see
`OPTIMIZER_DEFAULTS`).

## Same data, same samples

Each run draws its randomness from separate `torch.Generator`s, one per purpose, all
seeded from `seed`: the initial weights, the training batches, the refresh batches,
the sampled labels or probes. So the training batches of a run do not depend on which
optimizer consumes them or on whether it refreshes a Hessian: AdamW and Sophia with
the same seed see the same data in the same order. The validation batches are the
same fixed set at every evaluation of every run.

## What is timed

`wall_seconds` is the time spent training: steps and refreshes, not evaluation (which
costs every optimizer the same). `hessian_seconds` is the part spent in refreshes
(batch, forward, backward, `update_hessian`), so the overhead of Sophia is their
ratio. On a GPU the clock waits for the device (`torch.cuda.synchronize`) at every
boundary it measures.

## Checkpoints

With `--checkpoint-every N` (`TrainConfig(checkpoint_every=N)`), every $N$ steps and
after the last one the run writes everything it needs to go on into
`out/<name>-seed<seed>.ckpt.pt`: the step count, the model, the optimizer's state, the
state of every stream of randomness (the batches, the refresh batches, the sampled
labels, and PyTorch's global generator), and the record so far. The learning rate
needs nothing saved: the schedule is a function of the step. With `--resume`, a run
whose checkpoint exists starts from it and continues *exactly* as the uninterrupted
run would have (same batches, same samples, same parameters, bit for bit, on the same
machine with the same number of threads); without a checkpoint it starts from the
beginning, so a job script can always pass `--resume`. See "Checkpoints" below.

## Tracking with labml

With `--out DIR`, the run is a [labml](https://github.com/labmlai/labml) experiment:
`monit.loop` shows the progress, `tracker` records the loss, learning rate,
validation loss and clip win rate, and labml's screen writer prints them. Nothing is
sent anywhere (only the `screen` writer is on; no app URL is used), and every file
labml writes goes under `DIR`: see "Keeping labml inside `--out`" below.
"""

from __future__ import annotations

# The standard library does the bookkeeping: `argparse` the command line, `csv` and
# `json` the results, `statistics` the means over seeds, `time.perf_counter` the
# clock. labml and matplotlib are optional and imported inside the functions that
# use them, so that `import sophia.train` works without either: a notebook that
# calls `train(TrainConfig(out=None))` needs neither.
import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `sdpa_kernel` chooses which implementation of attention a forward pass uses; the
# Sophia-H refresh needs the one that can be differentiated twice.
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..hessian import gnb_loss
from ..optimizer import SophiaG, SophiaH
from .data import CORPORA, Corpus, DataUnavailableError, load_corpus
from .model import GPT, GPTConfig

# What a notebook or a test may use: a run (`TrainConfig`, `train`, `RunResult`), a
# comparison and its outputs, and the pieces of a run that are worth calling alone
# (the schedule `lr_at`, the optimizer factory, the evaluation).
__all__ = [
    "TrainConfig",
    "RunResult",
    "train",
    "compare",
    "summarize",
    "write_comparison",
    "plot",
    "evaluate",
    "make_optimizer",
    "check_out_dir",
    "lr_at",
    "checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
    "main",
    "MissingDependencyError",
    "OPTIMIZERS",
    "IMPLEMENTATIONS",
    "OPTIMIZER_DEFAULTS",
]

# The optimizers this loop trains with.
OPTIMIZERS = ("adamw", "sophiag", "sophiah")

# The implementations of the step: `SophiaG(foreach=False)`, `foreach=True`, `fused=True`
# (for AdamW, the same flags of `torch.optim.AdamW`). Not choosing one leaves the choice
# to the optimizer (on the CPU, the reference; on CUDA, the fused kernel if it builds).
IMPLEMENTATIONS = ("reference", "foreach", "fused")

# ## Hyperparameters per optimizer
#
# Betas, weight decay and $\rho$ are those of the reference configurations for GPT-2
# 125M (see the notation page): AdamW's usual ones, and Sophia's. Sophia-H keeps
# Sophia-G's, since with `bs=1` both optimizers hold an estimate of the same Hessian
# diagonal.
#
# The peak learning rates are ours. The reference's were tuned for a 125M model and
# half a million tokens per step; these come from a sweep on the default model, batch
# and number of steps, seed 0, over a few values per optimizer
# ($\{1, 3, 6, 10\} \times 10^{-3}$ for AdamW, $\{3, 6, 10\} \times 10^{-4}$ for
# Sophia-G, with $\rho$ between the reference value and 200 times it), each the best
# of its grid. Sophia's best learning rate is about a tenth of AdamW's, as for other
# sign-like methods (Lion): until its curvature estimate has grown, most of Sophia's
# coordinates are clipped, and a clipped step moves every coordinate by the full
# learning rate.
#
# Two observations from that sweep, for whoever tunes further. With the reference
# $\rho$, Sophia-G's clip win rate here stays near 0.04, below the 0.1 to 0.5 the
# authors recommend (in a run this short, $h$, an average started from zero with no
# bias correction, never reaches its full size); a $\rho$ twenty times larger brings
# it to about 0.3 with the same final loss. And $\beta_1$ matters more than $\rho$: on
# seed 0, Sophia-G with AdamW's $\beta_1$ closes most of its gap to AdamW. We keep the
# reference's values; `--rho` and `--betas` change them.
#
# The weight decays are the reference's too, and they are not as different as they
# look. Decoupled weight decay shrinks each weight by the factor $1 - \eta_t\lambda$
# per step, so what matters is the product $\eta\lambda$, and Sophia's peak learning
# rate is the smaller: per step, Sophia decays its weights less than AdamW does.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=6e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "sophiag": dict(lr=6e-4, betas=(0.965, 0.99), weight_decay=0.2, rho=0.05),
    "sophiah": dict(lr=6e-4, betas=(0.965, 0.99), weight_decay=0.2, rho=0.05),
}

# The validation batches are drawn from a generator with this seed, whatever the seed
# of the run, so that every evaluation of every run measures the same text.
EVAL_SEED = 20230523


# ## The configuration
#
# Everything a run depends on, checked when it is made: a bad value raises a
# `ValueError` naming the field and the value, before any work is done. `None` means
# "the default of this optimizer" (`OPTIMIZER_DEFAULTS`) for `lr`, `betas`,
# `weight_decay` and `rho`, the model's `block_size` for `seq_len`, `steps // 10` for
# `warmup_steps`, and the optimizer's own choice for `impl`. The default `steps` and
# model make `python -m sophia.train compare` (three optimizers, three seeds) a job of
# a few minutes on two CPU cores.
@dataclass
class TrainConfig:
    r"""A training run: optimizer and its hyperparameters, model, data, schedule, evaluation, seed, device, output."""

    # Which optimizer, and which implementation of its step (see `IMPLEMENTATIONS`).
    # The implementations compute the same update, so the choice changes the
    # wall-clock, not the curve.
    optimizer: str = "sophiag"
    impl: str | None = None
    # The model and the text: a [`GPTConfig`](model.html), a corpus name or path (see
    # [`load_corpus`](data.html)), and where a downloaded corpus is cached.
    model: GPTConfig = field(default_factory=GPTConfig)
    data: str = "stdlib"
    data_dir: str | None = None
    # The length of the run and the batch: `steps` optimizer steps, each on
    # `batch_size` sequences of `seq_len` tokens. A sequence shorter than the model's
    # context trains the same model on shorter windows.
    steps: int = 400
    batch_size: int = 16
    seq_len: int | None = None
    # The schedule: a peak learning rate, the floor of the cosine as a fraction of the
    # peak, and the length of the warm-up.
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    # The optimizer's hyperparameters: $(\beta_1, \beta_2)$, $\lambda$, and, for
    # Sophia, $\rho$ and the refresh interval $k$ = `hess_interval`. `grad_clip` is the
    # norm $c$ that gradients are clipped to, for every optimizer; zero turns it off.
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    rho: float | None = None
    hess_interval: int = 10
    grad_clip: float = 1.0
    # An evaluation every `eval_interval` steps (and after the last), each the mean
    # over `eval_iters` validation batches.
    eval_interval: int = 25
    eval_iters: int = 10
    # The seed of everything random in the run (see "Same data, same samples"), the
    # device, and the output folder; `out=None` tracks nothing and writes nothing.
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    verbose: bool = True
    # Checkpoints (see "Checkpoints"): one every `checkpoint_every` steps (0 for none)
    # and after the last step, in `out`; `resume` starts from the checkpoint if there is
    # one. Both need `out`.
    checkpoint_every: int = 0
    resume: bool = False

    # The checks, in the order of the fields. Names first (an optimizer, an
    # implementation), then the counts, which must be positive integers (`True` is
    # an `int` in Python and is refused as one), then the numbers.
    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.impl is not None and self.impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"impl must be one of {', '.join(IMPLEMENTATIONS)} (or None), got {self.impl!r}"
            )
        if not isinstance(self.model, GPTConfig):
            raise ValueError(
                f"model must be a GPTConfig, got {type(self.model).__name__}"
            )
        for name in (
            "steps",
            "batch_size",
            "hess_interval",
            "eval_interval",
            "eval_iters",
        ):
            _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0)
        _check_int("checkpoint_every", self.checkpoint_every, low=0)
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be a bool, got {self.resume!r}")
        if (self.checkpoint_every or self.resume) and self.out is None:
            raise ValueError(
                "checkpoint_every and resume need an output folder: set out"
            )
        # The model's position embedding has `block_size` rows, so no longer sequence
        # can be read; the model would refuse it at the first forward pass, and this
        # says so before any work.
        if self.seq_len is not None:
            _check_int("seq_len", self.seq_len, low=1)
            if self.seq_len > self.model.block_size:
                raise ValueError(
                    f"seq_len={self.seq_len} is longer than the model's block_size={self.model.block_size}"
                )
        # A warm-up of zero steps is allowed: the schedule then starts at the peak.
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, low=0)
        # A learning rate of zero would make the optimizer do nothing, and a $\rho$ of
        # zero would make every Sophia step a sign step, since $\max(0, \epsilon) =
        # \epsilon$; a weight decay of zero is a legitimate choice.
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
        # Each $\beta$ is the weight of the past in a moving average: at one the average
        # never moves from its start, above one it diverges, so both lie in $[0, 1)$.
        if self.betas is not None:
            if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
                raise ValueError(
                    f"betas must be a pair (beta1, beta2), got {self.betas!r}"
                )
            for i, beta in enumerate(self.betas):
                _check_float(f"betas[{i}]", beta, positive=False)
                if beta >= 1:
                    raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        # Whether the corpus exists is known only when it is loaded (a download may be
        # needed); here only its name is checked. The device is checked now: a run on
        # `cuda` on a machine without a GPU should fail before loading anything.
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(
                f"data must be one of {', '.join(CORPORA)} or a file path, got {self.data!r}"
            )
        _parse_device(self.device)

    # The hyperparameters of this run's optimizer: the defaults, with what was given.
    def hyper(self) -> dict[str, Any]:
        r"""`lr`, `betas`, `weight_decay` (and `rho` for Sophia), defaults filled in."""
        # A copy of the defaults, so that a run never edits `OPTIMIZER_DEFAULTS`. A
        # field given for an optimizer that has no such hyperparameter (`rho` for
        # AdamW) is ignored, which lets one `--rho` serve a whole comparison.
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

    # $B$ counts predictions, not sequences: a sequence of $T$ tokens is $T$ next-token
    # predictions, each with its own term in the mean loss and its own sampled label
    # in the Gauss-Newton-Bartlett estimate. This is the `bs` of every Sophia-G step
    # (see "One step" below for why the estimate needs it).
    @property
    def tokens_per_step(self) -> int:
        r"""$B$, the number of predictions per step: `batch_size` $\times$ the sequence length."""
        return self.batch_size * self.context

    # By default a fixed fraction of the run. The reference warms up for 2000 of its
    # 100 000 steps, a fiftieth, but in a run of a few hundred steps that would be a
    # handful of steps, too few for the optimizer's statistics to settle.
    @property
    def warmup(self) -> int:
        r"""The warm-up steps: `warmup_steps`, or `steps // 10`."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    # The schedule of this run: its peak, its floor `min_lr_ratio` times the peak, its
    # warm-up and its length, given to the function `lr_at` below.
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

    # Every field is a number, a string, a tuple or `None`, and `asdict` recurses into
    # the nested `GPTConfig`, so the result goes straight to `json.dumps` (tuples
    # become lists) and into the record of the run.
    def to_dict(self) -> dict[str, Any]:
        r"""A JSON-ready dictionary (the model configuration nested)."""
        return dataclasses.asdict(self)


# ### The checks
#
# Each raises a `ValueError` that names the field and shows the value, the form the
# command line prints as one line of error. `_check_int` refuses `bool`, which Python
# counts as an `int`; `_check_float` refuses NaN and infinities, which pass every
# comparison test the wrong way (`nan < 0` is false, so NaN would pass a check for
# negative values).
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


# A device must parse (`"cuda:0"` does, `"gpu"` does not), and must be present: asking
# for CUDA on a machine without it is a mistake to report now, not at the first
# `model.to(device)`.
def _parse_device(device: Any) -> torch.device:
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


# ## The learning-rate schedule
#
# The reference's: a linear warm-up over the first $w$ = `warmup_steps` steps, then a
# half cosine from the peak $\eta_\max$ down to $\eta_\min$ at the last step:
# $$\eta_t = \begin{cases}
#   \eta_\max \,\dfrac{t + 1}{w} & t < w \\[1ex]
#   \eta_\min + \tfrac12 (\eta_\max - \eta_\min)\Big(1 + \cos\big(\pi\,\tfrac{t - w}{T - w}\big)\Big) & w \le t < T
# \end{cases}$$
# for steps $t = 0..T-1$ ($t + 1$, so that the first step does not have
# $\eta = 0$). $\eta_\min$ is `min_lr_ratio` times the peak. (Strictly, the cosine
# reaches $\eta_\min$ at $t = T$, one step after the last one taken; the last step
# runs a hair above it.)
#
# **Why warm up.** At the start every statistic an optimizer keeps is poor. For AdamW,
# the second-moment estimate has seen a few gradients; for Sophia it is worse: $h$
# starts at zero and is first refreshed after $k$ steps, so every step before that is
# clipped, a sign-of-momentum step that moves *every* coordinate by the full $\eta$.
# The warm-up keeps those blind steps short. Later, $h$ is an average started from
# zero with no bias correction, and it takes about $1/(1-\beta_2)$ refreshes to reach
# its full size; until then it is too small, and steps are clipped more than they will
# be.
#
# **Why decay.** Near a minimum the noise of the minibatch gradient, not the
# curvature, limits how close a step can land; a smaller $\eta$ averages the noise
# over more steps. The cosine spends most of the run near the peak and decays
# smoothly, with no step change for the optimizer's state to absorb.
def lr_at(
    step: int, *, peak: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    r"""The learning rate at `step`: linear warm-up over `warmup_steps`, then cosine to `min_lr` at `total_steps`."""
    # The warm-up: $\eta_\max (t + 1)/w$, reaching the peak at step $w - 1$.
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    # Past the end of the schedule (a run continued beyond `total_steps`), the floor.
    if step >= total_steps:
        return min_lr
    # The fraction $(t - w)/(T - w)$ of the decay done, in $[0, 1)$; `max(1, ...)`
    # guards the division when the warm-up takes the whole run.
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    # $\eta_\min + \tfrac12(\eta_\max - \eta_\min)(1 + \cos \pi\,\text{progress})$: from
    # $\eta_\max$ at progress 0 to $\eta_\min$ at progress 1.
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


# ## The optimizer
#
# Two parameter groups, as in nanoGPT: weight decay on the matrices, none on biases
# and LayerNorm gains ([`GPT.param_groups`](model.html)). `impl` maps to the flags
# `foreach=False`, `foreach=True`, `fused=True`, for Sophia and for AdamW alike.
# `None` passes no flag, so each optimizer picks its own default.
def _impl_flags(impl: str | None) -> dict[str, bool]:
    if impl is None:
        return {}
    return {
        "reference": dict(foreach=False),
        "foreach": dict(foreach=True),
        "fused": dict(fused=True),
    }[impl]


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer:
    r"""The optimizer of `config` over the model's parameter groups."""
    hyper = config.hyper()
    # The weight decay travels inside the groups (the decayed one carries it, the
    # other has zero), so it is not passed to the constructor again. The `lr` given
    # here is the peak; the loop overwrites it at every step with the schedule's.
    groups = model.param_groups(hyper["weight_decay"])
    flags = _impl_flags(config.impl)
    # AdamW keeps PyTorch's other defaults (its $\epsilon$, no AMSGrad).
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=hyper["lr"], betas=hyper["betas"], **flags)
    # Sophia-G and Sophia-H share their constructor and their step; they differ in
    # how `update_hessian` gets its estimate, and in the default `bs` of `step`.
    cls = SophiaG if config.optimizer == "sophiag" else SophiaH
    return cls(groups, lr=hyper["lr"], betas=hyper["betas"], rho=hyper["rho"], **flags)


# The fused kernel is compiled on first use (about a minute). That minute must not be
# charged to the first training step, so it is built here, before the clock starts;
# a machine that cannot build it says so now, in one message, before any training.
#
# AdamW's fused step is PyTorch's own and needs no build. An explicit `fused` builds
# (or fails) now, for the CPU emulation as for CUDA; with no choice on CUDA, Sophia
# takes the fused kernel if it builds, so we ask now whether it does.
def _prepare_fused(config: TrainConfig, device: torch.device) -> None:
    if config.optimizer == "adamw":
        return
    if config.impl == "fused":
        from ..fused import load_extension

        load_extension(device.type)
    elif config.impl is None and device.type == "cuda":
        from ..fused import fused_available

        fused_available("cuda")


# ## Randomness, one stream per purpose
#
# Every stream is a `torch.Generator` with its own seed derived from `seed`, so that
# drawing more from one (a refresh batch) never shifts another (the training batches).
# The batch offsets are drawn on the CPU, where the corpus lives; the sampled labels
# and Hutchinson's probes on the device of the model, where they are used.
#
# `init` seeds the initial weights, `train` draws the training batches, `hessian`
# the fresh batches of the refreshes, `samples` the labels $\hat y$ of
# Gauss-Newton-Bartlett or the probes $u$ of Hutchinson. AdamW never touches the
# last two, and its `train` stream is the same as Sophia's: that is what makes "the
# same seed, the same batches" true.
STREAMS = ("init", "train", "hessian", "samples")


# The seed of stream $i$ of run seed $s$ is $s \cdot n + i$, with $n$ the number of
# streams: distinct for every pair $(s, i)$, so that no two streams of any two runs
# of a comparison are the same sequence. A generator can only be used on its own
# device, hence the `device=` of the one that samples on the model's device.
def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    gens = {}
    for i, name in enumerate(STREAMS):
        on = device if name == "samples" else torch.device("cpu")
        gens[name] = torch.Generator(device=on).manual_seed(seed * len(STREAMS) + i)
    return gens


# CUDA runs asynchronously: a call returns as soon as its kernel is queued, and a
# clock read right after it measures the queueing, not the work. Waiting for the
# device at each boundary makes `perf_counter` measure what ran in between. On the
# CPU every operation has finished when it returns, and there is nothing to wait for.
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ## Evaluation
#
# The mean loss over `eval_iters` validation batches, the same batches every time
# (drawn from a generator seeded with `EVAL_SEED`). With bytes as tokens the loss is in
# nats per byte; the perplexity is $e^{L}$.
#
# Nats per byte divided by $\ln 2$ is bits per byte, the unit of compression: a model
# at $L$ nats per byte could compress the validation text to $L/\ln 2$ bits per byte
# with an arithmetic coder. A perplexity of $e^{L}$ says the model is, on average, as
# unsure of the next byte as a uniform choice among $e^{L}$ bytes would be.
#
# Each batch has the same number of predictions, so the mean of the batch means is
# the mean over all predictions. `eval_iters` batches are a sample of the validation
# split, not all of it; because every evaluation uses the same sample, the
# differences between two evaluations (or two runs) are not blurred by drawing
# different text.
@torch.no_grad()
def evaluate(
    model: GPT, corpus: Corpus, config: TrainConfig, device: torch.device
) -> float:
    r"""The mean validation loss over the fixed evaluation batches."""
    # Evaluation mode turns dropout off; the mode the model was in is restored at the
    # end, so that calling this in the middle of training changes nothing.
    # `no_grad` (the decorator) keeps no graph: evaluation never back-propagates.
    was_training = model.training
    model.eval()
    # A new generator with the fixed seed at every call: the same batches every time.
    gen = torch.Generator().manual_seed(EVAL_SEED)
    total = 0.0
    for _ in range(config.eval_iters):
        x, y = corpus.batch(
            "val", config.batch_size, config.context, generator=gen, device=device
        )
        _, loss = model(x, y)
        total += loss.item()
    model.train(was_training)
    return total / config.eval_iters


# ## The result of a run
#
# Plain numbers and lists, so that a result is written as JSON and read back
# (`to_dict`, `from_dict`) without pickling, and a comparison can be summarized again
# from its `runs.json` long after the runs.
@dataclass
class RunResult:
    r"""What a run measured: the losses at each evaluation, the times, the win rates."""

    # Which run: the optimizer, its implementation (`"default"` when the optimizer
    # chose), the seed, the number of steps, the size of the model and $B$.
    optimizer: str
    impl: str
    seed: int
    steps: int
    n_params: int
    tokens_per_step: int
    # The validation curve: at each evaluation, the number of steps taken, the loss,
    # and the training wall-clock so far (the x-axis of the second panel of the
    # figure). The first evaluation is at step zero, before any training.
    eval_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    # The training loss of every step (on its own batch, so noisier than the
    # validation loss), and, for Sophia, the step after which each refresh ran and the
    # clip win rate measured right after it.
    train_losses: list[float] = field(default_factory=list)
    refresh_steps: list[int] = field(default_factory=list)
    win_rates: list[float] = field(default_factory=list)
    # The clock (see "What is timed") and the configuration, as a dictionary.
    wall_seconds: float = 0.0
    hessian_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    # What a run is judged by: the last evaluation, after the last step.
    @property
    def final_val_loss(self) -> float:
        r"""The validation loss at the end of training."""
        return self.val_losses[-1]

    @property
    def final_perplexity(self) -> float:
        r"""$e^{L}$ of the final validation loss."""
        return math.exp(self.final_val_loss)

    # The paper's cost claim is about this ratio. A Sophia-G refresh is one more
    # forward and backward pass every $k$ steps, so its overhead should be near
    # $1/(k+1)$ of the wall-clock, less where the optimizer step itself is a large
    # share of a step. A Sophia-H refresh adds a double backward, and costs more.
    @property
    def hessian_overhead(self) -> float:
        r"""The fraction of the training wall-clock spent in Hessian refreshes."""
        return (
            self.hessian_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        )

    # Refreshes included, so Sophia's number is the average cost of a step over a
    # cycle of $k$, the cost that decides the wall-clock of a run.
    @property
    def ms_per_step(self) -> float:
        r"""Training wall-clock per step, refreshes included, in milliseconds."""
        return 1000.0 * self.wall_seconds / self.steps

    def to_dict(self) -> dict[str, Any]:
        r"""A JSON-ready dictionary."""
        return dataclasses.asdict(self)

    # Reading `runs.json` back: the keys are the field names, so the dictionary is
    # the keyword arguments (the nested configuration stays a dictionary).
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        r"""The inverse of `to_dict`."""
        return cls(**data)


# ## Keeping labml inside `--out`
#
# labml 0.5.3 decides where to write in three places, and each is pointed into
# `out`:
#
# * the *lab*: it walks up from the training script's directory looking for a
#   `.labml.yaml`, and without one uses that directory, so runs would land in a
#   `logs/` folder inside the installed package. We write `out/.labml.yaml`, create
#   the lab from `out`, and set its `path` (and `experiments_path`) explicitly, which
#   takes precedence over any `.labml.yaml` further up. Runs go to `out/logs/NAME/UUID/`.
# * the *computer*: on `experiment.start()` it records the project in
#   `~/.labml/projects/`. We give it a home under `out` (`out/.labml/`).
# * the *writers*: only `screen`; the `app` writer, which would post to a labml server
#   if a URL were configured anywhere, is never enabled.
#
# It also asks git about the lab's directory and warns when `out` is not a repository;
# we record the state of this package's checkout instead (when GitPython finds one).
# These touch labml's internals (`labml.internal`), so they are pinned to its 0.5 API.
#
# labml's notebook output imports `display` from `IPython.core.display`, which IPython
# 9 removed (it lives in `IPython.core.display_functions`). In a plain Python process
# labml never imports IPython; inside Jupyter with IPython 9 we put the name back
# where labml looks for it before labml needs it.
#
# Only if IPython is already imported (we are in a notebook): importing it ourselves
# would cost time and change nothing. Looking a name up in `core_display` may emit a
# `DeprecationWarning` (IPython deprecates names there), which a test run with
# warnings as errors would turn into a failure, so warnings are silenced around that
# one question. An IPython that has neither name is left as it is.
def _ipython_shim() -> None:
    if "IPython" not in sys.modules:
        return
    try:
        import IPython.core.display as core_display

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            present = hasattr(core_display, "display")
        if not present:
            from IPython.core.display_functions import display

            core_display.display = display
    except ImportError:
        pass


# labml and matplotlib are optional dependencies (the `train` extra of this package);
# a missing one is an error with its own type, so that the command line can report it
# in one line, with the `pip` command that fixes it.
class MissingDependencyError(RuntimeError):
    r"""An optional package this needs (labml to track a run, matplotlib to draw) is not installed."""


# The optional packages of the command, checked before any training: a comparison of
# several minutes should not fail at the end, when it draws its figure.
#
# `find_spec` answers without importing the package, so the check is cheap, and a
# package that is present is imported only where it is used.
def require(module: str, purpose: str) -> None:
    r"""Raise `MissingDependencyError` unless `module` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{purpose} needs the {module} package: pip install {module}"
        )


# The stand-in for labml's `get_git_status`, with its signature: a dictionary of what
# labml records about the code (remotes, commit, message, dirtiness, diff) and a
# status, `None` for "no problem", so that labml prints no notice. We record the
# commit of the checkout this module was imported from, the code that actually
# trained, and leave the remotes and the diff empty: a run's files should not copy a
# working tree's uncommitted changes, nor the addresses of its remotes, into `--out`.
# Without GitPython, or outside a repository (an installed package), the commit is
# "unknown" and the run goes on.
def _git_info() -> tuple[dict[str, Any], None]:
    info = dict(
        remotes=[], commit="unknown", commit_message="", is_dirty=False, diff=""
    )
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parent, search_parent_directories=True)
        info["commit"] = repo.head.commit.hexsha
        info["commit_message"] = repo.head.commit.message.strip().splitlines()[0]
        info["is_dirty"] = repo.is_dirty()
    except Exception:
        pass
    return info, None


# ### Pointing labml at `out`
#
# Step by step, what the list above says: labml is imported (with the IPython shim
# first); `out` gets a `.labml.yaml` of its own, the first one labml's upward search
# finds, so that the lab is rooted at `out` and labml prints no notice that it found
# none; the lab singleton is replaced by one rooted at `out`, and the settings that
# decide where files go are given explicitly, so that no `.labml.yaml` further up can
# move them; and the computer singleton is rebuilt while `HOME` points to `out`, so
# that the files labml keeps "in the user's home" are under `out/.labml/`.
#
# These are process-wide singletons, so the last call wins: every run sets them
# again for its own `out`, and two runs with different folders, one after the other
# in the same process (a comparison, a notebook), each write into their own.
def _confine_labml(out: Path) -> None:
    _ipython_shim()
    try:
        from labml import lab
        from labml.internal import lab as lab_internal
        from labml.internal.computer import configs as computer_configs
    except ImportError as error:
        raise MissingDependencyError(
            "tracking with --out needs labml (pip install 'labml>=0.5.3'); "
            "or call train() with out=None"
        ) from error
    # A file that exists is left alone: a user may have edited it. `check_repo_dirty`
    # off, because labml would otherwise refuse to start a run from a checkout with
    # uncommitted changes.
    labml_yaml = out / ".labml.yaml"
    if not labml_yaml.exists():
        labml_yaml.write_text(
            "# labml's settings for the runs in this folder (written by sophia.train)\n"
            "check_repo_dirty: false\n"
        )
    # A new lab, rooted at `out`; the configuration given through `lab.configure` is
    # merged after any `.labml.yaml`, so it wins. Runs go to `out/logs/`, and labml's
    # data folder (where its caches go) to `out/data/`.
    lab_internal._internal = lab_internal.Lab(out)
    lab.configure(
        dict(
            path=str(out),
            experiments_path="logs",
            data_path="data",
            check_repo_dirty=False,
        )
    )
    # The computer's configuration: a file with a random identifier, made once, as
    # labml would make it in `~/.labml/configs.yaml`.
    home = out / ".labml"
    home.mkdir(exist_ok=True)
    computer_yaml = home / "configs.yaml"
    if not computer_yaml.exists():
        computer_yaml.write_text(f"uuid: {uuid.uuid4().hex}\n")
    # `HOME` is changed only while the computer object is built, and restored (or
    # removed, if it was not set) whatever happens, because every other library in
    # the process reads it too.
    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = str(out)
    try:
        computer_configs._internal = computer_configs.Computer()
    finally:
        if saved_home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = saved_home


# ### The tracker
#
# One interface, two backends: labml when the run has an output folder, plain
# `print`s at each evaluation otherwise (or nothing, with `verbose=False`), so the loop
# reads the same either way.
#
# It is a context manager because a labml run is one: `experiment.start()` opens the
# run (writes its files, starts the screen writer) and must be closed when training
# ends, normally or by an exception. The `ExitStack` holds that context when there is
# one, and nothing otherwise, so `__exit__` needs no case of its own.
class _Tracker:
    def __init__(self, config: TrainConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.labml = config.out is not None
        self._stack = contextlib.ExitStack()

    # Opening a labml run. `experiment.create` reads the git state through the name
    # `get_git_status` in labml's experiment module; that name is swapped for
    # `_git_info` during the call and put back after it, even if the call fails.
    # `python_file` is where labml starts looking for its lab: `out`, which
    # `_confine_labml` has just set up. The run then records this module as its
    # script, which is what actually ran. The whole configuration goes in as flat
    # `name.sub` keys, labml's form for nested settings.
    def __enter__(self) -> _Tracker:
        if self.labml:
            out = Path(self.config.out).expanduser().resolve()
            _confine_labml(out)
            from labml import experiment
            from labml.internal import experiment as experiment_internal

            # Inside Jupyter, labml roots the lab at the working directory instead of at
            # `python_file`, and warns when that directory has no `.labml.yaml`: the run is
            # created from inside `out`, whose `.labml.yaml` it then finds.
            real_git_status = experiment_internal.get_git_status
            experiment_internal.get_git_status = _git_info
            cwd = os.getcwd()
            try:
                os.chdir(out)
                experiment.create(
                    name=self.name,
                    python_file=str(out),
                    writers={"screen"},
                    disable_screen=not self.config.verbose,
                )
            finally:
                os.chdir(cwd)
                experiment_internal.get_git_status = real_git_status
            experiment_internal.experiment_singleton().run.python_file = __file__
            experiment.configs(_flatten(self.config.to_dict()))
            self._stack.enter_context(experiment.start())
        return self

    # Closing the run, passing on the exception if there is one (labml marks the run
    # as failed or interrupted).
    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    # The step counter of the loop. labml's `monit.loop` also advances labml's global
    # step, which is the x-axis of everything `tracker` records, and draws the
    # progress line with the time per step and the time left.
    def loop(self, start: int, steps: int) -> Iterator[int]:
        if self.labml:
            from labml import monit

            return iter(monit.loop(range(start, steps)))
        return iter(range(start, steps))

    # Values for the current step; labml buffers them until `save`, which writes one
    # line per step to the screen and the run's files.
    def add(self, **values: float) -> None:
        if self.labml:
            from labml import tracker

            tracker.add(values)

    # The end of a step: labml writes the values added since the last `save` under
    # the current global step.
    def save(self) -> None:
        if self.labml:
            from labml import tracker

            tracker.save()

    # An evaluation: with labml, the validation loss joins the values of the step it
    # follows and `new_line` keeps that screen line (labml otherwise overwrites the
    # progress line in place), so the screen shows one line per evaluation. Without
    # labml, one printed line per evaluation, with the perplexity and the training
    # time so far.
    def evaluation(self, step: int, val_loss: float, seconds: float) -> None:
        if self.labml:
            from labml import tracker

            tracker.add(val_loss=val_loss)
            tracker.save()
            tracker.new_line()
        elif self.config.verbose:
            print(
                f"{self.name} step {step:5d}  val loss {val_loss:.4f}  ppl {math.exp(val_loss):7.2f}  "
                f"train time {seconds:6.1f}s",
                flush=True,
            )


# `{"model": {"n_layer": 4}}` becomes `{"model.n_layer": 4}`, and tuples (the betas)
# become lists, which labml stores as it stores any JSON value.
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


# ## The training loop
#
# The page's main function. Before the loop: checks that need the corpus, the
# streams of randomness, the model, the optimizer, the record. In the loop, per
# step: the learning rate, one step on a training batch, and for Sophia every $k$
# steps a refresh of $h$ on a fresh batch; an evaluation every `eval_interval` steps.
def train(config: TrainConfig, *, corpus: Corpus | None = None) -> RunResult:
    r"""Train a GPT as `config` says and return what was measured.

    `corpus` may be given to reuse one already loaded; otherwise `config.data` is
    loaded. With `config.out`, the run is tracked with labml under that folder and its
    result is written to `out/<optimizer>-seed<seed>.json`.
    """
    # Everything that can fail fails here, before the first step: the output folder,
    # the corpus (a download), the sizes, the fused kernel's build. A comparison of
    # several runs should not die in its third run for a reason known at the start.
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(config).__name__}")
    device = _parse_device(config.device)
    if config.out is not None:
        out = check_out_dir(config.out)
    if corpus is None:
        corpus = load_corpus(config.data, cache_dir=config.data_dir)
    # A token id at or above the model's `vocab_size` has no row in the embedding.
    if corpus.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the corpus has {corpus.vocab_size} token values but the model's vocab_size is {config.model.vocab_size}"
        )
    corpus.check_fits(config.context)
    _prepare_fused(config, device)

    gens = _generators(config.seed, device)
    # The initial weights come from the default generator, re-seeded from the `init`
    # stream inside `fork_rng`, so that the caller's random state is left as it was.
    # (`nn.init` draws from the default generator and takes no other, hence the
    # detour.) The model is built on the CPU and then moved, so a seed gives the same
    # initial weights on every device, and every optimizer of a comparison starts
    # from the same point.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gens["init"])))
        model = GPT(config.model)
    model.to(device)
    model.train()
    # The optimizer is made after the move, so that its state is created on the
    # device of the parameters.
    opt = make_optimizer(model, config)
    # The tensors that gradient clipping measures: all trainable parameters, one
    # global norm over all of them.
    params = [p for p in model.parameters() if p.requires_grad]
    # $k$, the refresh interval, and $B$, the predictions per step.
    k = config.hess_interval
    B = config.tokens_per_step
    # The run's name in labml and in the name of its result file.
    name = _run_name(config)
    # The record starts empty; the loop appends to it and adds to its clocks.
    result = RunResult(
        optimizer=config.optimizer,
        impl=config.impl or "default",
        seed=config.seed,
        steps=config.steps,
        n_params=model.num_params(),
        tokens_per_step=B,
        config=config.to_dict(),
    )

    # A batch of the training split from one stream: `"train"` for the steps,
    # `"hessian"` for the refreshes. Both come from the same text, through different
    # generators, so a refresh batch is fresh (not the batch just trained on) and
    # drawing it does not shift the sequence of training batches.
    def batch(stream: str) -> tuple[Tensor, Tensor]:
        return corpus.batch(
            "train",
            config.batch_size,
            config.context,
            generator=gens[stream],
            device=device,
        )

    # An evaluation, recorded with the step count and the training time so far. It
    # runs outside the timed regions: its cost is the same for every optimizer, and
    # the wall-clock compares what differs.
    def record_eval(step: int) -> None:
        val_loss = evaluate(model, corpus, config, device)
        result.eval_steps.append(step)
        result.val_losses.append(val_loss)
        result.eval_seconds.append(result.wall_seconds)
        tracker.evaluation(step, val_loss, result.wall_seconds)

    # A resumed run takes up where its checkpoint left off: the model, the optimizer's
    # state, every stream of randomness and the record so far are those of the step it
    # was written at (see "Checkpoints" below), and the loop starts at that step.
    ckpt = checkpoint_path(config) if config.out is not None else None
    start = 0
    if config.resume and ckpt.exists():
        saved = load_checkpoint(ckpt, config)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        for stream, gen in gens.items():
            gen.set_state(saved["generators"][stream])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        result = RunResult.from_dict(saved["result"])
        start = saved["step"]

    # The loss of the untrained model comes first (near $\ln V$), so that every curve
    # starts from the same point at step zero.
    with _Tracker(config, f"{name}-seed{config.seed}") as tracker:
        if start == 0:
            record_eval(0)
        for step in tracker.loop(start, config.steps):
            # ### One step
            #
            # The learning rate of the schedule, written into every group (AdamW's
            # and Sophia's groups both read `lr` at each step).
            #
            # Both optimizers read `group["lr"]` afresh at every step, so writing it
            # is all a schedule takes; no scheduler object, whose state would have to
            # be kept in step with the optimizer's.
            lr = config.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr

            # The clock starts once the device has finished earlier work.
            _sync(device)
            start = time.perf_counter()
            # Token ids and next-token targets, each `(batch_size, T)`.
            x, y = batch("train")
            # The mean cross-entropy over the $B$ predictions of the batch, its
            # gradient, and the gradient clipped to norm `grad_clip`:
            # $g \leftarrow g \cdot \min(1, c / \lVert g \rVert)$.
            #
            # The norm is global, $\lVert g \rVert^2 = \sum_p \lVert g_p \rVert^2$ over every
            # parameter tensor $p$, and all gradients are scaled by the same factor, so
            # clipping shortens the gradient without turning it. It guards against
            # the rare batch whose gradient is many times the usual size. For AdamW it
            # mostly changes how much one such batch counts in the moving averages (the
            # step divides by $\sqrt{v}$, which scales with the gradient); for Sophia it
            # scales $m$, which is then compared with $\rho B h$ in the clip.
            _, loss = model(x, y)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            # Sophia-G's step gets $B$, the predictions behind the estimate; Sophia-H's
            # keeps its default `bs=1` (its estimate needs no factor $B$).
            #
            # Where $B$ comes from. The refresh below back-propagates the mean loss
            # over $B$ predictions against sampled labels, so its gradient is
            # $\hat g = \frac1B \sum_b g_b$, with $g_b$ the gradient of prediction $b$.
            # With labels drawn from the model, $\mathbb E[g_b] = 0$ and
            # $\mathbb E[g_b \odot g_b] = \operatorname{diag}(G_b)$, the Gauss-Newton
            # diagonal of that prediction (see [the estimators](hessian.html)); the
            # labels are drawn independently, so the cross terms vanish and
            # $$\mathbb E[\hat g \odot \hat g] = \frac{1}{B^2} \sum_b \operatorname{diag}(G_b)
            #   = \frac1B \operatorname{diag}(G), \qquad G = \frac1B \sum_b G_b .$$
            # The optimizer stores the average of $\hat g \odot \hat g$; times $B$, it is
            # an estimate of $\operatorname{diag}(G)$ for the mean loss, the same loss
            # whose gradient the step uses. Pass the wrong $B$ and $\rho$ silently
            # means something else.
            if config.optimizer == "sophiag":
                opt.step(bs=B)
            else:
                opt.step()
            # `set_to_none` frees the gradients instead of filling them with zeros: the
            # next backward pass allocates them afresh, and the refresh below starts
            # from no gradient at all.
            opt.zero_grad(set_to_none=True)
            # `item()` copies the loss to the CPU, which waits for the device; it is
            # inside the timed region because every optimizer pays it once per step.
            train_loss = loss.item()
            _sync(device)
            result.wall_seconds += time.perf_counter() - start
            result.train_losses.append(train_loss)
            tracker.add(loss=train_loss, lr=lr)

            # ### The Hessian refresh
            #
            # Every $k$ steps, after the step (the reference's
            # `iter_num % hess_interval == hess_interval - 1`), on a fresh batch.
            #
            # **Why after the step.** The estimate is taken at the parameters the
            # next step starts from, $\theta_t$ after $t$ steps, and the next $k$
            # steps use it: this is line 2 of Algorithm 3, "if $t \bmod k = 1$,
            # refresh $h_t$ at $\theta_{t-1}$", with the 0-based step $k - 1$ here
            # being the paper's $t = k$. One difference from the paper's
            # $t = 1$: the first refresh comes after $k$ steps, not before the first,
            # so the first $k$ steps run with $h = 0$, all clipped, all of size
            # $\eta_t$, in the warm-up, where $\eta_t$ is small.
            #
            # **Why a fresh batch.** On the batch the step was just computed from, the
            # estimate would share that batch's inputs with the gradient just folded
            # into $m$, and the errors of the numerator and the denominator of
            # $m/(\rho B h)$ could be correlated instead of averaging out. A batch of
            # its own (the `hessian` stream) keeps the estimate independent of the
            # gradients.
            #
            # The refresh is timed on its own clock as well as the run's, for the
            # overhead.
            if config.optimizer != "adamw" and step % k == k - 1:
                _sync(device)
                start = time.perf_counter()
                x, y = batch("hessian")
                if config.optimizer == "sophiag":
                    # Sophia-G: labels sampled from the model's predictions, the
                    # gradient $\hat g$ of the loss against them, clipped as the
                    # reference does; `update_hessian()` folds
                    # $\hat g \odot \hat g$ into $h$. The logits are `(batch_size, T, V)`:
                    # one sampled label per position, $B$ in all.
                    #
                    # No targets: the true labels $y$ play no part, only the inputs,
                    # and `gnb_loss` returns its own count of predictions, the same
                    # $B$ as `tokens_per_step`, which the steps already pass.
                    logits, _ = model(x)
                    sampled_loss, _ = gnb_loss(logits, generator=gens["samples"])
                    sampled_loss.backward()
                    # The clip, as in the reference. It is not neutral: where it acts
                    # it scales $\hat g$ by $c/\lVert \hat g \rVert$ and so $h$ by its
                    # square, making $h$ smaller and the next steps bolder. By the
                    # computation above, $\mathbb E\lVert \hat g \rVert^2 =
                    # \operatorname{tr}(G)/B$, which shrinks as the batch grows, while
                    # a true-label gradient keeps its mean $\nabla L$; so it acts less
                    # often here than on the step's gradient, but whether it acts in a
                    # given run is a thing to measure, not to assume.
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    # $h \leftarrow \beta_2 h + (1 - \beta_2)\,\hat g \odot \hat g$, from
                    # the `.grad` of every parameter.
                    opt.update_hessian()
                else:
                    # Sophia-H: Hutchinson's $u \odot (\nabla^2 L\, u)$ of the
                    # true-label loss of the fresh batch. Its Hessian-vector product
                    # differentiates the backward pass, and the fused attention kernels
                    # of `scaled_dot_product_attention` (flash, memory-efficient) have no
                    # derivative of their backward: this forward pass uses the plain
                    # ("math") attention, which is made of differentiable operations.
                    #
                    # In detail: a Hessian-vector product is the gradient of
                    # $\langle \nabla_\theta L, u \rangle$, so autograd must
                    # differentiate the backward pass of every operation in the
                    # forward. The fused kernels compute attention's backward in one
                    # kernel that has no derivative of its own, and the second backward
                    # fails ("derivative for ... is not implemented"; `hutchinson`
                    # explains what to do). The kernel is chosen when the forward runs
                    # and recorded in the graph, so only the forward needs the context;
                    # the double backward inside `update_hessian` follows the graph.
                    # The math kernel is slower and holds the $(T, T)$ attention matrix
                    # of every head, a cost paid once per $k$ steps.
                    #
                    # The true labels, not sampled ones: Hutchinson's estimate is of
                    # the Hessian of the loss being minimized, $\operatorname{diag}
                    # \nabla^2 L$, including the term that Gauss-Newton leaves out, and
                    # needs the loss itself. Its scale is that of the mean loss already,
                    # hence `bs=1`.
                    with sdpa_kernel(SDPBackend.MATH):
                        _, true_loss = model(x, y)
                    opt.update_hessian(loss=true_loss, generator=gens["samples"])
                # The refresh leaves gradients behind (Sophia-G's sampled-label ones,
                # Sophia-H's first backward); they must not leak into the next step.
                opt.zero_grad(set_to_none=True)
                _sync(device)
                elapsed = time.perf_counter() - start
                result.hessian_seconds += elapsed
                result.wall_seconds += elapsed
                # The clip win rate: the fraction of coordinates whose next step is
                # not clipped, $|m| < \rho B h$.
                #
                # Strictly, it is measured on the state as it is now, with the new
                # $h$ and the $m$ of the step just taken; the next step first mixes
                # one more gradient into $m$. It is computed outside the timed region:
                # it is a diagnostic, not part of the algorithm. Near zero, Sophia is
                # taking sign-of-momentum steps, like Lion or signSGD; near one, the
                # clip never acts and it is a diagonal Newton method with momentum.
                # `win_rate()` uses the `bs` of the last step, so the same $B$.
                win_rate = opt.win_rate()
                result.refresh_steps.append(step + 1)
                result.win_rates.append(win_rate)
                tracker.add(win_rate=win_rate)

            # One line of tracked values per step; an evaluation after every
            # `eval_interval` steps, and always after the last one, so that every
            # curve ends at the final model.
            tracker.save()
            done = step + 1
            if done % config.eval_interval == 0 or done == config.steps:
                record_eval(done)
            # A checkpoint every `checkpoint_every` steps and after the last, once the
            # step, its refresh and its evaluation are all done: a run resumed from it
            # starts with the next step.
            if config.checkpoint_every and (
                done % config.checkpoint_every == 0 or done == config.steps
            ):
                save_checkpoint(
                    ckpt,
                    step=done,
                    config=config,
                    model=model,
                    optimizer=opt,
                    generators=gens,
                    result=result,
                )

    # The result, next to labml's files, named after the optimizer, its
    # implementation and the seed, so that the runs of a comparison do not
    # overwrite each other.
    if config.out is not None:
        path = out / f"{name}-seed{config.seed}.json"
        path.write_text(json.dumps(result.to_dict(), indent=1))
    return result


# ## Checkpoints
#
# What a run needs to go on exactly where it stopped, and nothing else:
#
# * the number of steps taken; the learning rate is a function of it (`lr_at`), so the
#   schedule needs no state of its own;
# * the model's parameters, and the optimizer's `state_dict()`: for Sophia, `step`,
#   `exp_avg` $m$ and `hessian` $h$ per parameter (checked when loaded: see
#   [the optimizer](optimizer.html));
# * the state of every stream of randomness: the training batches, the refresh
#   batches, the labels $\hat y$ sampled by Gauss-Newton-Bartlett (or Hutchinson's
#   probes), and PyTorch's global generator (dropout); without the third, the resumed
#   run would sample other labels and estimate another $h$;
# * the record so far (`RunResult`), so that the curves of a resumed run are whole.
#
# The file is `out/<name>-seed<seed>.ckpt.pt`, one per run, overwritten at each
# checkpoint. The configuration is stored with it, and a run resumes only from a
# checkpoint of the same configuration (apart from where it writes and how often):
# resuming with another learning rate or batch size would silently be a third run,
# neither the old one nor the new.
_NOT_COMPARED = ("out", "verbose", "checkpoint_every", "resume")


# The name of a run: its optimizer, and its implementation when one was chosen.
def _run_name(config: TrainConfig) -> str:
    return (
        config.optimizer if config.impl is None else f"{config.optimizer}-{config.impl}"
    )


def checkpoint_path(config: TrainConfig) -> Path:
    r"""Where the run of `config` writes its checkpoint: `out/<name>-seed<seed>.ckpt.pt`."""
    if config.out is None:
        raise ValueError("a run without out has no checkpoint")
    return (
        Path(config.out).expanduser().resolve()
        / f"{_run_name(config)}-seed{config.seed}.ckpt.pt"
    )


# The configuration as stored and compared: JSON's view of it (tuples become lists),
# without the fields that say where and how often to write.
def _comparable(config: TrainConfig) -> dict[str, Any]:
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_COMPARED}
    return json.loads(json.dumps(data))


# ### Writing one, atomically
#
# A kill (or a full disk, or a power cut) in the middle of a write must not cost the
# previous checkpoint. So the new one is written to a temporary file in the same
# folder, flushed to the disk (`fsync`), and only then renamed over the old one:
# `os.replace` within one file system is atomic, so at every moment the checkpoint's
# name points at a whole file, the old or the new. A kill before the rename leaves the
# old checkpoint in place and a temporary file named after the process, which is never
# read and may be deleted; an error in the write (a full disk) removes it. On POSIX
# systems the folder is synced as well, so that the rename itself is on the disk.
def save_checkpoint(
    path: Path,
    *,
    step: int,
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    result: RunResult,
) -> None:
    r"""Write the checkpoint of a run after `step` steps to `path`, atomically."""
    device = next(model.parameters()).device
    payload = dict(
        format=1,
        step=step,
        config=_comparable(config),
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        generators={stream: gen.get_state() for stream, gen in generators.items()},
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        result=result.to_dict(),
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ### Reading one back
#
# `weights_only=True`: a checkpoint holds tensors, numbers, strings and containers of
# them, and nothing else is accepted (unpickling arbitrary objects from a file runs
# arbitrary code). Every tensor is loaded on the CPU; `load_state_dict` of the model
# and of the optimizer moves them to the parameters' device. A file that is not a
# checkpoint of this module, or one of another configuration, is refused with a
# `ValueError` that says which fields differ.
def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    r"""Read the checkpoint at `path` and check that it belongs to a run of `config`."""
    # `weights_only=True`: tensors, numbers, strings and containers, nothing that runs code
    # on loading, which is all a checkpoint holds. Onto the CPU first: the model and the
    # optimizer move each tensor to its parameter's device as they load it.
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"cannot read the checkpoint {str(path)!r}: {error}"
        ) from error
    if not isinstance(saved, dict) or saved.get("format") != 1:
        raise ValueError(f"{str(path)!r} is not a checkpoint written by sophia.train")
    # The configuration, field by field; every field that differs is named in the error.
    now = _comparable(config)
    differ = sorted(
        k
        for k in set(now) | set(saved["config"])
        if now.get(k) != saved["config"].get(k)
    )
    if differ:
        details = ", ".join(
            f"{k}: {saved['config'].get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in differ
        )
        raise ValueError(
            f"the checkpoint {str(path)!r} is of another configuration ({details})"
        )
    if not 0 < saved["step"] <= config.steps:
        raise ValueError(
            f"the checkpoint {str(path)!r} is at step {saved['step']}, outside 1..{config.steps}"
        )
    return saved


# ## The output folder
#
# `--out` may name a folder that does not exist yet: it is created, with its parents
# (`runs/compare` in a fresh checkout). One that cannot be created, exists as a file,
# or cannot be written to is refused before any training, with the reason.
def check_out_dir(out: str | os.PathLike) -> Path:
    r"""Create `out` (and its parents) if needed; raise `ValueError` if it is not a writable folder."""
    # `~` is expanded here, since a path from Python (not a shell) keeps it literally.
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {str(out)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"cannot create output directory {str(out)!r}: {error.strerror or error}"
        ) from None
    # Writability is tested by writing: permission bits do not tell the whole story (a
    # read-only mount, an ACL, a full disk). The temporary file deletes itself. The
    # message is the system's reason, `strerror`, without the traceback (`from None`).
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(
            f"output directory {str(out)!r} is not writable: {error.strerror or error}"
        ) from None
    return path.resolve()


# ## Comparing optimizers
#
# Every optimizer, every seed, the same configuration otherwise. With the same seed,
# every optimizer starts from the same weights and sees the same training batches in
# the same order (see "Same data, same samples").
def compare(
    base: TrainConfig,
    optimizers: list[str] | tuple[str, ...] = OPTIMIZERS,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    *,
    corpus: Corpus | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[RunResult]:
    r"""Train `base` with each of `optimizers` and `seeds`; the results in that order.

    `overrides` maps an optimizer's name to fields of `TrainConfig` that differ for it,
    e.g. `{"adamw": {"lr": 3e-3}}`.
    """
    # The arguments are checked in full before the first run, for the same reason as
    # in `train`: a mistake in the list should not surface after an hour of runs.
    if not optimizers:
        raise ValueError("compare needs at least one optimizer")
    if not seeds:
        raise ValueError("compare needs at least one seed")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}"
            )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    overrides = overrides or {}
    for name in overrides:
        if name not in optimizers:
            raise ValueError(
                f"overrides for {name!r}, which is not among the optimizers {list(optimizers)}"
            )
    # One configuration per optimizer: the base with its name and its overrides.
    # `dataclasses.replace` builds a new `TrainConfig`, so `__post_init__` checks each
    # one now; the seed is set per run below.
    configs = {
        name: dataclasses.replace(base, optimizer=name, **overrides.get(name, {}))
        for name in optimizers
    }
    # The corpus is loaded once and shared by every run.
    if corpus is None:
        corpus = load_corpus(base.data, cache_dir=base.data_dir)
    results = []
    # Optimizer by optimizer, seed by seed, one after the other: the runs share the
    # machine, never run at the same time, and so time each other fairly.
    for name in optimizers:
        for seed in seeds:
            config = dataclasses.replace(configs[name], seed=seed)
            results.append(train(config, corpus=corpus))
    return results


# ### Steps to a target loss
#
# The first step at which the mean validation curve reaches `target`, interpolated
# linearly between the two evaluations around it (evaluations are `eval_interval`
# steps apart). `None` if it never does.
#
# This is how the paper's claim is measured: "Sophia reaches the validation loss of
# AdamW in half the steps" means, with $L^*$ AdamW's final validation loss, that
# the first step at which Sophia's validation loss is at or below $L^*$ is half of
# the number AdamW needs. A statement about steps: whether it is also a statement
# about time depends on the cost of a step, which the wall-clock columns measure.
#
# The validation loss is known only at evaluations, every `eval_interval` steps.
# Between the evaluation $(s_0, L_0)$ above the target and the first one $(s_1, L_1)$
# at or below it, the curve is taken to be a straight line, and the crossing is
# $$s^* = s_0 + \frac{L_0 - L^*}{L_0 - L_1}\,(s_1 - s_0).$$
# $L_0 > L^* \ge L_1$, so the denominator is positive and $s^*$ lies in
# $(s_0, s_1]$. The resolution is the evaluation interval; the interpolation keeps
# two curves that cross the target within one interval from getting the same count.
def steps_to_reach(
    steps: list[int], losses: list[float], target: float
) -> float | None:
    r"""The (interpolated) step at which `losses` first falls to `target`, or `None`."""
    for i, (s, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            # Already at or below the target at the first evaluation: nothing to
            # interpolate.
            if i == 0:
                return float(s)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (l0 - target) / (l0 - loss) * (s - s0)
    return None


# The mean over seeds of one curve, evaluation by evaluation: all runs of one
# optimizer share the evaluation schedule, so the $i$-th values line up. Steps to a
# target are read off this mean curve, not averaged over the seeds' own crossings,
# which would be undefined as soon as one seed never reaches the target.
def _mean_curve(runs: list[RunResult], attr: str) -> list[float]:
    return [
        statistics.fmean(values) for values in zip(*(getattr(r, attr) for r in runs))
    ]


# ### The summary
#
# One row per optimizer, over its seeds: the final validation loss (mean, standard
# deviation, min, max), its perplexity, the steps its mean curve takes to reach the
# baseline's final mean loss and their ratio to the baseline's (the paper's claim is
# a ratio of one half), the other way round the steps the baseline takes to reach
# this optimizer's final loss, the training wall-clock, the share of it spent in
# Hessian refreshes, and the mean clip win rate over all refreshes. The baseline is
# AdamW when it is in the comparison, else the first optimizer.
def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    r"""One row per optimizer (in the order first seen) summarizing its runs over seeds."""
    # The runs grouped by optimizer; a dictionary keeps the order of first sight.
    by_name: dict[str, list[RunResult]] = {}
    for r in results:
        by_name.setdefault(r.optimizer, []).append(r)
    # The target $L^*$: the baseline's final validation loss, averaged over its seeds.
    baseline = "adamw" if "adamw" in by_name else next(iter(by_name))
    target = statistics.fmean(r.final_val_loss for r in by_name[baseline])
    # The baseline's own steps to $L^*$, the denominator of the ratio. Its mean curve
    # ends at $L^*$ by construction, but may have touched it earlier (a curve that
    # flattens out, or dips and comes back up); the ratio compares like with like, a
    # first crossing with a first crossing, not with the length of the run.
    base_curve = _mean_curve(by_name[baseline], "val_losses")
    base_steps = steps_to_reach(by_name[baseline][0].eval_steps, base_curve, target)
    rows = []
    for name, runs in by_name.items():
        # This optimizer's final losses over seeds, its steps to $L^*$, and the other
        # way round, the steps the baseline's mean curve needs to reach this
        # optimizer's final mean loss. The second answers "how far behind is it?"
        # when the first is missing (it never reaches $L^*$): the step at which the
        # baseline was where this optimizer ended. It is missing in turn when this
        # optimizer ends below $L^*$, a loss the baseline never reaches.
        finals = [r.final_val_loss for r in runs]
        reach = steps_to_reach(
            runs[0].eval_steps, _mean_curve(runs, "val_losses"), target
        )
        match = steps_to_reach(
            by_name[baseline][0].eval_steps, base_curve, statistics.fmean(finals)
        )
        # Every win rate of every seed: the mean is over all refreshes of all runs.
        wins = [w for r in runs for w in r.win_rates]
        # The standard deviation over seeds is the sample one ($n - 1$ in the
        # denominator) and needs two seeds; with one it is reported as zero. The
        # perplexity of the mean loss is the geometric mean of the seeds'
        # perplexities, $e^{\bar L}$, not their arithmetic mean. `steps_ratio` is
        # `None` when either count is missing or the baseline's is zero.
        rows.append(
            dict(
                optimizer=name,
                impl=runs[0].impl,
                seeds=len(runs),
                steps=runs[0].steps,
                final_val_loss_mean=statistics.fmean(finals),
                final_val_loss_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                final_val_loss_min=min(finals),
                final_val_loss_max=max(finals),
                final_perplexity=math.exp(statistics.fmean(finals)),
                baseline=baseline,
                target_val_loss=target,
                steps_to_target=reach,
                steps_ratio=(reach / base_steps)
                if reach is not None and base_steps
                else None,
                baseline_steps_to_match=match,
                wall_seconds_mean=statistics.fmean(r.wall_seconds for r in runs),
                ms_per_step=statistics.fmean(r.ms_per_step for r in runs),
                hessian_overhead_pct=100.0
                * statistics.fmean(r.hessian_overhead for r in runs),
                win_rate_mean=statistics.fmean(wins) if wins else None,
            )
        )
    return rows


# ### Writing the summary
#
# The CSV file has every number of a row, unrounded, under the row's keys, for
# whoever wants to plot or test them; the Markdown table has the ones a reader
# compares, rounded, under readable headings. The two tuples fix the order of the
# columns.
CSV_COLUMNS = (
    "optimizer",
    "impl",
    "seeds",
    "steps",
    "final_val_loss_mean",
    "final_val_loss_std",
    "final_val_loss_min",
    "final_val_loss_max",
    "final_perplexity",
    "baseline",
    "target_val_loss",
    "steps_to_target",
    "steps_ratio",
    "baseline_steps_to_match",
    "wall_seconds_mean",
    "ms_per_step",
    "hessian_overhead_pct",
    "win_rate_mean",
)

MARKDOWN_HEADER = (
    "optimizer",
    "final val loss",
    "val ppl",
    "steps to target",
    "steps vs baseline",
    "baseline steps to this loss",
    "wall-clock (s)",
    "ms/step",
    "Hessian overhead",
    "mean win rate",
)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    r"""The summary rows as CSV, one column per key of `CSV_COLUMNS` (empty for "not applicable")."""
    # `newline=""` lets the `csv` module write its own line endings, as its
    # documentation asks (otherwise Windows gets blank lines between rows).
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS}
            )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    r"""The summary rows as a Markdown table, with a line saying what the target was."""

    # A number with its format and unit, or a dash for "not applicable" (a target
    # never reached, a win rate of AdamW).
    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        return "—" if value is None else f"{value:{spec}}{suffix}"

    # The header, and the alignment row: the optimizer's name left-aligned, every
    # number right-aligned so that digits line up.
    lines = [
        "| " + " | ".join(MARKDOWN_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(MARKDOWN_HEADER) - 1)) + "|",
    ]
    # One line per optimizer. The spread over seeds is shown only when there is one;
    # AdamW has no Hessian, and a dash says so better than "0.0 %".
    for r in rows:
        spread = f" ± {r['final_val_loss_std']:.3f}" if r["seeds"] > 1 else ""
        hessian = (
            "—"
            if r["optimizer"] == "adamw"
            else fmt(r["hessian_overhead_pct"], ".1f", " %")
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["optimizer"],
                    f"{r['final_val_loss_mean']:.3f}{spread}",
                    f"{r['final_perplexity']:.2f}",
                    fmt(r["steps_to_target"], ".0f"),
                    fmt(r["steps_ratio"], ".2f", "×"),
                    fmt(r["baseline_steps_to_match"], ".0f"),
                    f"{r['wall_seconds_mean']:.1f}",
                    f"{r['ms_per_step']:.1f}",
                    hessian,
                    fmt(r["win_rate_mean"], ".2f"),
                ]
            )
            + " |"
        )
    # Under the table, what its numbers mean: a table copied into a report without its
    # caption should still say what "steps to target" was measured against. The
    # shared facts (seeds, steps, baseline, target) are the same in every row, so the
    # first row gives them.
    first = rows[0]
    lines.append("")
    lines.append(
        f"Final validation loss in nats per byte, mean ± standard deviation over {first['seeds']} seed(s), after "
        f"{first['steps']} steps. Target: the {first['baseline']} final mean validation loss, "
        f"{first['target_val_loss']:.3f}; steps to reach it read off the mean validation curve (evaluations "
        'interpolated linearly); — where it is never reached. "Baseline steps to this loss": the steps the '
        f"{first['baseline']} mean curve takes to reach this row's final loss. Wall-clock excludes evaluation; the Hessian "
        "overhead is the share of it spent in refreshes; the win rate is the fraction of coordinates not clipped, "
        "averaged over all refreshes."
    )
    return "\n".join(lines) + "\n"


# ### The figure
#
# Two panels: the validation loss against optimizer steps, and against training
# wall-clock. One line per optimizer, the mean over seeds, with a band from the
# lowest to the highest seed. Drawn with matplotlib's object API on an Agg canvas, so
# that it never changes the backend of a notebook.
def plot(results: list[RunResult], path: Path, *, title: str = "") -> None:
    r"""Validation loss vs steps and vs wall-clock, mean over seeds with a min-max band, saved to `path`."""
    # A `Figure` made directly, not through `pyplot`: `pyplot` keeps global state (the
    # current figure, the backend), and a figure made here should neither appear in a
    # notebook's output nor stay in memory after it is saved.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_name: dict[str, list[RunResult]] = {}
    for r in results:
        by_name.setdefault(r.optimizer, []).append(r)
    # Attaching an Agg canvas gives the figure a renderer, so that `savefig` works
    # without `pyplot`. The two panels share the y-axis, so a loss reads the same
    # on both.
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_steps, ax_time = fig.subplots(1, 2, sharey=True)
    for name, runs in by_name.items():
        # The losses evaluation by evaluation, one tuple of seeds each: their mean is
        # the line, their min and max the band. The band is the whole range, not a
        # standard error: with a handful of seeds, the range is what was seen.
        losses = list(zip(*(r.val_losses for r in runs)))
        mean = [statistics.fmean(v) for v in losses]
        low, high = [min(v) for v in losses], [max(v) for v in losses]
        # The x-axes: steps, the same for every seed, and the training seconds at
        # each evaluation, which are not, and are averaged.
        steps = runs[0].eval_steps
        seconds = _mean_curve(runs, "eval_seconds")
        label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        # The band takes the colour of the line, so that each optimizer is one colour
        # on both panels.
        (line,) = ax_steps.plot(steps, mean, label=label)
        ax_steps.fill_between(
            steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0
        )
        ax_time.plot(seconds, mean, color=line.get_color(), label=label)
        ax_time.fill_between(
            seconds, low, high, color=line.get_color(), alpha=0.2, linewidth=0
        )
    # Labels with units: the loss is in nats per byte (tokens are bytes), and the
    # time is training only, as everywhere on this page.
    ax_steps.set_xlabel("optimizer steps")
    ax_steps.set_ylabel("validation loss (nats per byte)")
    ax_steps.set_title("Validation loss vs steps")
    ax_time.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax_time.set_title("Validation loss vs wall-clock")
    for ax in (ax_steps, ax_time):
        ax.grid(True, alpha=0.3)
        ax.legend()
    # The first evaluation is the untrained model, near $\ln V$; the interesting part
    # is below it, so the y-axis starts from the first evaluation after training began.
    trained = [v for r in results for v in r.val_losses[1:]]
    if trained:
        ax_steps.set_ylim(min(trained) - 0.05, max(trained) + 0.05)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)


def write_comparison(
    results: list[RunResult], out: Path, *, title: str = ""
) -> dict[str, Path]:
    r"""Write `compare.png`, `compare.csv`, `compare.md` and `runs.json` into `out`; return their paths."""
    # The figure, the summary in two forms, and every run in full (`runs.json`), from
    # which the other three can be made again, or other summaries computed, without
    # training anything.
    rows = summarize(results)
    paths = dict(
        png=out / "compare.png",
        csv=out / "compare.csv",
        md=out / "compare.md",
        json=out / "runs.json",
    )
    plot(results, paths["png"], title=title)
    write_csv(rows, paths["csv"])
    paths["md"].write_text((f"# {title}\n\n" if title else "") + markdown_table(rows))
    paths["json"].write_text(json.dumps([r.to_dict() for r in results], indent=1))
    return paths


# ## The command line
#
# `python -m sophia.train [options]` trains one model; `python -m sophia.train compare
# [options]` compares optimizers. Bad input ends the command with a non-zero exit
# status and a message on stderr, never a traceback: an unknown name or a malformed
# number is argparse's (usage, then the error line); a model that cannot be built, a
# context longer than the model's, a corpus too small for one sequence, an output
# folder that cannot be written are one line, status 2; a download that fails or a
# kernel that does not build, found later, are one line, status 1.
#
# On the CPU the command uses one thread unless told otherwise (`--threads`), for two
# reasons. The losses of a run then do not depend on how many cores the machine has: a
# matrix product split over more threads adds in another order and rounds
# differently, and the same seed gives other losses. And a second thread speeds this
# small model up on an idle two-core machine (about one and a half times) but slows
# it down badly on a busy one: threads that wait for each other while another program
# holds a core made our default comparison several times slower, where one thread
# merely shared the machine.
#
# `_add_common` adds the options both commands share. Their defaults are read from a
# default `TrainConfig`, so the help text and the dataclass cannot disagree. Where the
# default depends on another choice (the learning rate on the optimizer, the
# sequence length on the model) the option defaults to `None`, which `TrainConfig`
# resolves, and the help says what it resolves to.
def _add_common(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    # `--out` is required: a command-line run always leaves its results somewhere a
    # reader can find them, and labml's files with them.
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (created with its parents if missing); labml's files go here too",
    )
    parser.add_argument(
        "--impl",
        choices=IMPLEMENTATIONS,
        default=None,
        help="step implementation: reference (foreach=False), foreach, fused; default: the optimizer's choice",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help="optimizer steps (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="sequences per step (default %(default)s)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: the model's block size)",
    )
    # The model: one of the two presets of [`GPTConfig`](model.html), and any of its
    # sizes overridden one by one.
    parser.add_argument(
        "--model",
        choices=("cpu", "gpu"),
        default="cpu",
        help="model size: cpu (GPTConfig(), ~0.8M parameters) or gpu (GPTConfig.gpu(), ~10M)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="override the model's context length",
    )
    parser.add_argument(
        "--n-layer",
        type=int,
        default=None,
        help="override the model's number of blocks",
    )
    parser.add_argument(
        "--n-head", type=int, default=None, help="override the model's number of heads"
    )
    parser.add_argument(
        "--n-embd", type=int, default=None, help="override the model's width"
    )
    # The data, then the optimizer's and the schedule's settings.
    parser.add_argument(
        "--data",
        default=defaults.data,
        help="stdlib (shipped, offline), shakespeare (downloaded once), or a text file (default %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="download cache for --data shakespeare (default ~/.cache/sophia)",
    )
    parser.add_argument(
        "--rho", type=float, default=None, help="Sophia's rho (default: per optimizer)"
    )
    parser.add_argument(
        "--hess-interval",
        type=int,
        default=defaults.hess_interval,
        help="k, steps between Hessian refreshes (default %(default)s)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="warm-up steps (default: --steps // 10)",
    )
    parser.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=None,
        metavar=("BETA1", "BETA2"),
        help="the optimizer's betas (default: per optimizer)",
    )
    parser.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help="gradient clipping norm, 0 for none",
    )
    # Evaluation, the device and its threads, and how much to print.
    parser.add_argument(
        "--eval-interval",
        type=int,
        default=defaults.eval_interval,
        help="steps between evaluations",
    )
    parser.add_argument(
        "--eval-iters",
        type=int,
        default=defaults.eval_iters,
        help="validation batches per evaluation",
    )
    parser.add_argument(
        "--device",
        default=defaults.device,
        help="cpu, cuda, cuda:1, ... (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 on --device cpu, torch's choice otherwise)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    # Checkpoints (see "Checkpoints"): how often, and whether to start from one.
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write a checkpoint into --out every N steps and after the last (default: none)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="start from the run's checkpoint in --out, if there is one",
    )


# The single run takes one optimizer, its learning rate and weight decay, and one
# seed; the comparison takes lists of optimizers and seeds and one learning rate per
# optimizer (a single `--lr` for AdamW and Sophia at once would be wrong for one of
# them, their best values being an order of magnitude apart).
def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sophia.train",
        description="Train the small GPT with one optimizer. (`python -m sophia.train compare --help` for the comparison.)",
    )
    parser.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="sophiag", help="default %(default)s"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: per optimizer)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay (default: per optimizer)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of weights, batches and samples (default %(default)s)",
    )
    _add_common(parser)
    return parser


def _compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sophia.train compare",
        description="Train several optimizers with the same seeds and data order; write a figure, a CSV and a Markdown table.",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        default=list(OPTIMIZERS),
        help="default: %(default)s",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: %(default)s"
    )
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="OPTIMIZER=LR",
        help="peak learning rate of one optimizer, e.g. --lr adamw=3e-3 (repeatable; default: per optimizer)",
    )
    _add_common(parser)
    return parser


# `--lr adamw=3e-3 --lr sophiag=6e-4` becomes `{"adamw": {"lr": 0.003}, "sophiag": {"lr": 0.0006}}`.
# Each value is split at its first `=`; the name must be an optimizer of this
# comparison (an `--lr` for one that does not run is a typo, not a no-op), and the
# number a positive, finite float. `from None` drops `float`'s own traceback: the
# message already says which value was bad. A name given twice keeps its last value.
def _parse_lrs(values: list[str], optimizers: list[str]) -> dict[str, dict[str, float]]:
    overrides: dict[str, dict[str, float]] = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise ValueError(
                f"--lr takes OPTIMIZER=LR with OPTIMIZER one of {', '.join(OPTIMIZERS)}, got {value!r}"
            )
        if name not in optimizers:
            raise ValueError(
                f"--lr {value}: {name} is not among --optimizers {' '.join(optimizers)}"
            )
        try:
            lr = float(number)
        except ValueError:
            raise ValueError(f"--lr {value}: {number!r} is not a number") from None
        _check_float(f"--lr {name}", lr, positive=True)
        overrides[name] = {"lr": lr}
    return overrides


# The fused kernel's "cannot build here" error, if its module imports at all.
# Imported lazily, so that a machine where `sophia.fused` cannot even be imported can
# still train with the other implementations; then there is no such error to catch,
# and the tuple is empty.
def _fused_errors() -> tuple[type[Exception], ...]:
    try:
        from ..fused import FusedUnavailableError
    except Exception:
        return ()
    return (FusedUnavailableError,)


# The options as a `TrainConfig`. The model preset first, then its overridden sizes
# (checked again by `replace`), then the rest; `extra` carries what only one of the
# two commands has (the optimizer, its learning rate and weight decay, the seed).
# Building the configuration is what checks the values: a bad one raises a
# `ValueError` here, which `main` prints.
def _config_from_args(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    model = GPTConfig() if args.model == "cpu" else GPTConfig.gpu()
    overrides = {
        name: getattr(args, name)
        for name in ("block_size", "n_layer", "n_head", "n_embd")
        if getattr(args, name) is not None
    }
    if overrides:
        model = model.replace(**overrides)
    return TrainConfig(
        impl=args.impl,
        model=model,
        data=args.data,
        data_dir=args.data_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rho=args.rho,
        hess_interval=args.hess_interval,
        betas=tuple(args.betas) if args.betas is not None else None,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        device=args.device,
        out=args.out,
        verbose=not args.quiet,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        **extra,
    )


def main(argv: list[str] | None = None) -> int:
    r"""The command line: train one model, or `compare` several optimizers. Returns the exit status."""
    # The first word picks the command: `compare`, or `train` (the default, which may
    # also be left out). It is read by hand rather than with argparse's subparsers,
    # so that `python -m sophia.train --optimizer adamw ...` works with no command
    # word at all.
    argv = list(sys.argv[1:] if argv is None else argv)
    comparing = bool(argv) and argv[0] == "compare"
    if argv and argv[0] in ("compare", "train"):
        argv = argv[1:]
    parser = _compare_parser() if comparing else _train_parser()
    args = parser.parse_args(argv)

    # Arguments: every check that needs no data, before anything is written.
    try:
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        # One thread on the CPU unless told otherwise (see above); on a GPU the CPU
        # only launches kernels, and torch's choice stands.
        threads = (
            args.threads
            if args.threads is not None
            else (1 if args.device == "cpu" else None)
        )
        if threads is not None:
            torch.set_num_threads(threads)
        # A comparison: distinct seeds (a repeated seed would count one run twice in
        # the mean), the base configuration, and each optimizer's learning rate,
        # tried on a copy of the base so that a bad one is reported now.
        if comparing:
            if len(set(args.seeds)) != len(args.seeds):
                raise ValueError(f"--seeds must be distinct, got {args.seeds}")
            base = _config_from_args(args)
            overrides = _parse_lrs(args.lr, args.optimizers)
            for name, changes in overrides.items():
                dataclasses.replace(base, optimizer=name, **changes)
        else:
            base = _config_from_args(
                args,
                optimizer=args.optimizer,
                lr=args.lr,
                weight_decay=args.weight_decay,
                seed=args.seed,
            )
        # Then the checks that touch the machine: the output folder, the corpus (which
        # may download), its size against the context, the optional packages.
        out = check_out_dir(args.out)
        corpus = load_corpus(base.data, cache_dir=base.data_dir)
        corpus.check_fits(base.context)
        require("labml", "tracking a run")
        if comparing:
            require("matplotlib", "the figure of compare")
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except (DataUnavailableError, MissingDependencyError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1

    # The work. A comparison prints its table and the paths it wrote; a single run
    # prints its final loss, perplexity, timing and, for Sophia, its mean win rate.
    # Errors found during the work (a download, a kernel build) print their first
    # line: the rest of such a message can be long (a compiler's log), and the
    # exception still carries it for whoever calls `train` from Python.
    try:
        if comparing:
            start = time.perf_counter()
            results = compare(
                base, args.optimizers, args.seeds, corpus=corpus, overrides=overrides
            )
            title = (
                f"GPT ({results[0].n_params / 1e6:.2f}M parameters) on {corpus.name}, "
                f"{base.steps} steps of {base.batch_size}×{base.context} tokens"
            )
            paths = write_comparison(results, out, title=title)
            print()
            print(markdown_table(summarize(results)))
            print(
                f"total {time.perf_counter() - start:.0f}s; wrote "
                + ", ".join(str(p) for p in paths.values())
            )
        # A single run: the one line a user waits for. The overhead is the share of
        # the training wall-clock spent in Hessian refreshes (zero for AdamW).
        else:
            result = train(base, corpus=corpus)
            print()
            print(
                f"{base.optimizer}: final val loss {result.final_val_loss:.4f} (ppl {result.final_perplexity:.2f}), "
                f"{result.wall_seconds:.1f}s training, {result.ms_per_step:.1f} ms/step, "
                f"Hessian overhead {100 * result.hessian_overhead:.1f}%"
                + (
                    f", mean win rate {statistics.fmean(result.win_rates):.2f}"
                    if result.win_rates
                    else ""
                )
            )
    # A `FloatingPointError` is the optimizer refusing a step whose gradients hold a NaN or
    # an infinity (a diverged run): one line too, and the checkpoint, if any, is the last
    # good state.
    except (
        ValueError,
        FloatingPointError,
        DataUnavailableError,
        MissingDependencyError,
        *_fused_errors(),
    ) as error:
        message = str(error).strip().splitlines()
        print(
            f"{parser.prog}: error: {message[0] if message else type(error).__name__}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
