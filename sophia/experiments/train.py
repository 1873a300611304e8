r"""
---
title: Training a GPT with Sophia, AdamW as the baseline
summary: The reference training recipe (clipping, warm-up and cosine, Hessian refresh every k steps on a fresh batch), timed and tracked with labml.
---

This module trains the [small GPT](model.html) on the [offline corpus](data.html) with
one of four optimizers, following the recipe of the authors' `train_sophiag.py`, and
measures what the paper claims: how many steps Sophia needs to reach AdamW's
validation loss, and what the Hessian refreshes cost in wall-clock.

```
python -m sophia.train --optimizer sophiag --out runs/sophiag
python -m sophia.train compare --out runs/compare
```

The first trains one model and writes its result (and labml's run files) under
`--out`; the second [compares](compare.html) AdamW, Sophia-G and Sophia-H over seeds.
From a notebook, `train(TrainConfig(...))` returns a `RunResult`. Around this loop:
[the configuration](config.html), [the tracker](tracking.html),
[checkpoints](checkpoint.html), [the comparison](compare.html) and
[the command line](cli.html); how they are built is on
[how the training script is built](../../engineering/training.md).

## The recipe

Every step: a batch of `batch_size` sequences of `seq_len` tokens, the mean
cross-entropy over its $B$ = `batch_size` $\times$ `seq_len` predictions,
back-propagation, gradient clipping to norm `grad_clip`, the learning rate of the
schedule, one optimizer step. Then, for Sophia, every $k$ = `hess_interval` steps, *after* that step's update,
a refresh of the Hessian estimate on a fresh batch:

* **Sophia-G** ([`SophiaG`](../optimizer.html)): labels sampled from the model's own
  predictions ([`gnb_loss`](../hessian.html)), back-propagation, clipping (as the
  reference does), `update_hessian()`. Every step passes `bs` $= B$, so that the
  stored $\hat g \odot \hat g$ times $B$ is the Gauss-Newton-Bartlett estimate.
* **Sophia-H** (`SophiaH`): the true-label loss of the fresh batch, and
  `update_hessian(loss=...)`, Hutchinson's $u \odot (\nabla^2 L\, u)$ of the mean
  loss itself, so its steps use `bs` $= 1$.
* **AdamW** (`torch.optim.AdamW`): no refresh.
* **Sign momentum** (`signmomentum`, a baseline): `SophiaG` with Sophia-G's settings
  that never refreshes, so $h = 0$ and every step is
  $\eta_t \operatorname{sign}(m_t)$ after the decay.

Each run draws its randomness from one `torch.Generator` per purpose, all seeded from
`seed`, so AdamW and Sophia with the same seed see the same batches in the same order.
`wall_seconds` is the time spent training (steps and refreshes, not evaluation);
`hessian_seconds` is the part spent in refreshes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..hessian import gnb_loss
from ..optimizer import SophiaG, SophiaH
from .checkpoint import (
    checkpoint_path,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from .config import (
    EVAL_SEED,
    IMPLEMENTATIONS,
    OPTIMIZER_DEFAULTS,
    OPTIMIZERS,
    REFRESHING,
    TrainConfig,
    check_out_dir,
    lr_at,
    parse_device,
    run_name,
)
from .data import Corpus, load_corpus
from .model import GPT
from .tracking import MissingDependencyError, Tracker

# The comparison and the command line import this module, so their names are looked
# up on first use (PEP 562) rather than imported here.
_LAZY = {
    name: module
    for module, names in {
        "compare": (
            "compare",
            "steps_to_reach",
            "summarize",
            "write_csv",
            "markdown_table",
            "plot",
            "write_comparison",
            "CSV_COLUMNS",
            "MARKDOWN_HEADER",
        ),
        "cli": ("main",),
    }.items()
    for name in names
}


# What a notebook or a test may use, the lazy names included.
__all__ = [
    "TrainConfig",
    "RunResult",
    "train",
    "evaluate",
    "make_optimizer",
    "check_out_dir",
    "lr_at",
    "checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
    "MissingDependencyError",
    "OPTIMIZERS",
    "IMPLEMENTATIONS",
    "OPTIMIZER_DEFAULTS",
    *_LAZY,
]


# ## The result of a run
#
# Plain numbers and lists, so that a result is written as JSON and read back without
# pickling, and a comparison can be summarized again from its `runs.json`.
@dataclass
class RunResult:
    r"""What a run measured: the losses at each evaluation, the times, the win rates."""

    # Which run; `impl` is `"default"` when the optimizer chose.
    optimizer: str
    impl: str
    seed: int
    steps: int
    n_params: int
    tokens_per_step: int
    # At each evaluation (the first at step zero): steps taken, validation loss, and
    # training wall-clock so far.
    eval_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    # The training loss of every step, and for Sophia the step after which each
    # refresh ran and the clip win rate measured right after it.
    train_losses: list[float] = field(default_factory=list)
    refresh_steps: list[int] = field(default_factory=list)
    win_rates: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    hessian_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    # Set by [`compare`](compare.html): the median time of one step and of one
    # refresh (`None` for no refresh), timed with the other optimizers interleaved.
    step_ms: float | None = None
    refresh_ms: float | None = None

    @property
    def final_val_loss(self) -> float:
        r"""The validation loss at the end of training."""
        return self.val_losses[-1]

    @property
    def final_perplexity(self) -> float:
        r"""$e^{L}$ of the final validation loss."""
        return math.exp(self.final_val_loss)

    # The paper's cost claim: a Sophia-G refresh is one more forward and backward
    # every $k$ steps, so near $1/(k+1)$; Sophia-H's double backward costs more.
    @property
    def hessian_overhead(self) -> float:
        r"""The fraction of the training wall-clock spent in Hessian refreshes."""
        return (
            self.hessian_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        )

    @property
    def ms_per_step(self) -> float:
        r"""Training wall-clock per step, refreshes included, in milliseconds."""
        return 1000.0 * self.wall_seconds / self.steps

    def to_dict(self) -> dict[str, Any]:
        r"""A JSON-ready dictionary."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        r"""The inverse of `to_dict`."""
        return cls(**data)


# ## The optimizer
#
# Two parameter groups, as in the authors' `model.py`, for every optimizer: weight
# decay on the `nn.Linear` weights, none on embeddings, biases and LayerNorm gains
# ([`GPT.param_groups`](model.html)). The `lr` given is the peak; the loop overwrites
# it at every step with the schedule's.
def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer:
    r"""The optimizer of `config` over the model's parameter groups."""
    hyper = config.hyper()
    # The weight decay travels inside the groups (zero in the undecayed one), so the
    # constructor does not get it again.
    groups = model.param_groups(hyper["weight_decay"])
    flags = {
        None: {},
        "reference": dict(foreach=False),
        "foreach": dict(foreach=True),
        "fused": dict(fused=True),
    }[config.impl]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=hyper["lr"], betas=hyper["betas"], **flags)
    cls = SophiaH if config.optimizer == "sophiah" else SophiaG
    return cls(groups, lr=hyper["lr"], betas=hyper["betas"], rho=hyper["rho"], **flags)


# The fused kernel compiles on first use (about a minute): it is built (or fails)
# here, before the clock starts, not in the first step. AdamW's needs no build.
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
# `init` seeds the initial weights, `train` draws the training batches, `hessian` the
# fresh batches of the refreshes, `samples` the labels $\hat y$ or the probes $u$.
# Drawing from one never shifts another, so AdamW's `train` stream is Sophia's. The
# seed of stream $i$ of run seed $s$ is $s n + i$ ($n$ streams), distinct for every
# pair; `samples` lives on the model's device, where it is used.
STREAMS = ("init", "train", "hessian", "samples")


def _generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    gens = {}
    for i, name in enumerate(STREAMS):
        on = device if name == "samples" else torch.device("cpu")
        gens[name] = torch.Generator(device=on).manual_seed(seed * len(STREAMS) + i)
    return gens


# `nn.init` draws from the default generator only, so it is re-seeded from the `init`
# stream inside `fork_rng` (the caller's random state is kept). Built on the CPU and
# then moved, so a seed gives the same initial weights on every device.
def _build_model(config: TrainConfig, gens: dict, device: torch.device) -> GPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gens["init"])))
        model = GPT(config.model)
    model.to(device)
    model.train()
    return model


# `fn()` timed. CUDA runs asynchronously, so the clock waits for the device at both
# ends; on the CPU every operation has finished when it returns.
def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


# A training batch: `batch_size` sequences of `context` tokens, drawn from the
# training split with `generator` (the `train` stream for a step, `hessian` for a
# refresh).
def train_batch(
    corpus: Corpus,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    r"""One batch of the training split, drawn with `generator`."""
    return corpus.batch(
        "train", config.batch_size, config.context, generator=generator, device=device
    )


# ## Evaluation
#
# The mean loss over `eval_iters` validation batches, the same batches every time
# (a generator seeded with `EVAL_SEED` at each call), so that two evaluations differ
# by the model only. With bytes as tokens the loss is in nats per byte ($L/\ln 2$
# bits per byte); the perplexity is $e^{L}$.
@torch.no_grad()
def evaluate(
    model: GPT, corpus: Corpus, config: TrainConfig, device: torch.device
) -> float:
    r"""The mean validation loss over the fixed evaluation batches."""
    was_training = model.training
    model.eval()
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


# ## One step
#
# The mean cross-entropy over the $B$ predictions of the batch, its gradient clipped
# to global norm $c$ ($g \leftarrow g \min(1, c / \lVert g \rVert)$, one factor for
# every tensor, so the gradient is shortened, not turned), and the step: Algorithm 3,
# line 6 ($m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t$), line 11 (weight decay) and
# line 12 (the clipped update).
#
# Sophia-G's step gets $B$, the predictions behind its estimate: the stored average
# of $\hat g \odot \hat g$ times $B$ is the Gauss-Newton diagonal of the mean loss
# ([why](../hessian.html#bartletts-identities)); pass the wrong $B$ and $\rho$
# silently means something else. Sophia-H keeps `bs=1`; the sign-momentum baseline
# gets Sophia-G's $B$, so that it is Sophia-G's step exactly (with $h = 0$).
def train_step(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    batch: tuple[Tensor, Tensor],
    config: TrainConfig,
) -> float:
    r"""One optimizer step on `batch`; returns its training loss."""
    x, y = batch
    _, loss = model(x, y)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    if config.optimizer in ("sophiag", "signmomentum"):
        optimizer.step(bs=config.tokens_per_step)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # `item()` waits for the device; every optimizer pays it once per step.
    return loss.item()


# ## The Hessian refresh
#
# Algorithm 3, lines 7-10: every $k$ steps, $h_t = \beta_2 h_{t-k} + (1-\beta_2)
# \hat h_t$. It runs after the step (the reference's `iter_num % k == k - 1`), at the
# parameters the next $k$ steps start from; unlike the paper's $t = 1$, the first
# refresh comes after $k$ steps, which run with $h = 0$, all clipped, in the warm-up.
# The batch is a fresh one, so that the errors of $m$ and $h$ do not correlate.
def refresh_hessian(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    batch: tuple[Tensor, Tensor],
    config: TrainConfig,
    generator: torch.Generator,
) -> None:
    r"""Fold one estimate $\hat h$ from `batch` into the optimizer's $h$."""
    x, y = batch
    if config.optimizer == "sophiag":
        # Labels sampled from the logits `(batch_size, T, V)`, the gradient $\hat g$
        # of the loss against them, clipped as the reference does (which shrinks $h$
        # where it acts), then $h \leftarrow \beta_2 h + (1-\beta_2) \hat g \odot \hat g$.
        logits, _ = model(x)
        sampled_loss, _ = gnb_loss(logits, generator=generator)
        sampled_loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.update_hessian()
    else:
        # Hutchinson's $u \odot (\nabla^2 L\, u)$ of the true-label loss; its double
        # backward needs the plain ("math") attention
        # ([why](../hessian.html#kernels-with-no-second-derivative)).
        with sdpa_kernel(SDPBackend.MATH):
            _, true_loss = model(x, y)
        optimizer.update_hessian(loss=true_loss, generator=generator)
    # The refresh's gradients must not leak into the next step.
    optimizer.zero_grad(set_to_none=True)


# ## The training loop
#
# Everything that can fail fails first: the output folder, the corpus (a download),
# the sizes, the fused kernel's build. A comparison should not die in its third run
# for a reason known at the start.
def _prepare(
    config: TrainConfig, corpus: Corpus | None
) -> tuple[torch.device, Corpus, Path | None]:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(config).__name__}")
    device = parse_device(config.device)
    out = check_out_dir(config.out) if config.out is not None else None
    if corpus is None:
        corpus = load_corpus(config.data, cache_dir=config.data_dir)
    if corpus.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the corpus has {corpus.vocab_size} token values but the model's "
            f"vocab_size is {config.model.vocab_size}"
        )
    corpus.check_fits(config.context)
    _prepare_fused(config, device)
    return device, corpus, out


# The record of a run: empty, or the one of its checkpoint when it resumes, with the
# step to start from.
def _start(
    config: TrainConfig, model: GPT, opt: torch.optim.Optimizer, gens: dict
) -> tuple[RunResult, int]:
    ckpt = checkpoint_path(config) if config.out is not None else None
    if config.resume and ckpt.exists():
        saved = restore_checkpoint(ckpt, config, model, opt, gens)
        return RunResult.from_dict(saved["result"]), saved["step"]
    result = RunResult(
        optimizer=config.optimizer,
        impl=config.impl or "default",
        seed=config.seed,
        steps=config.steps,
        n_params=model.num_params(),
        tokens_per_step=config.tokens_per_step,
        config=config.to_dict(),
    )
    return result, 0


# Every `every` steps, and after the last one, so that every curve ends at the final
# model; `every=0` never.
def _due(done: int, every: int, total: int) -> bool:
    return every > 0 and (done % every == 0 or done == total)


def train(config: TrainConfig, *, corpus: Corpus | None = None) -> RunResult:
    r"""Train a GPT as `config` says and return what was measured.

    `corpus` may be given to reuse one already loaded; otherwise `config.data` is
    loaded. With `config.out`, the run is tracked with labml under that folder and its
    result is written to `out/<optimizer>-seed<seed>.json`.
    """
    device, corpus, out = _prepare(config, corpus)
    gens = _generators(config.seed, device)
    model = _build_model(config, gens, device)
    opt = make_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    result, start = _start(config, model, opt, gens)
    k = config.hess_interval

    def batch(stream: str) -> tuple[Tensor, Tensor]:
        return train_batch(corpus, config, gens[stream], device)

    # Evaluations run outside the timed regions: they cost every optimizer the same.
    def record_eval(step: int) -> None:
        val_loss = evaluate(model, corpus, config, device)
        result.eval_steps.append(step)
        result.val_losses.append(val_loss)
        result.eval_seconds.append(result.wall_seconds)
        tracker.evaluation(step, val_loss, result.wall_seconds)

    with Tracker(config, run_name(config)) as tracker:
        if start == 0:
            record_eval(0)
        for step in tracker.loop(start, config.steps):
            # Both optimizers read `group["lr"]` at every step: no scheduler object.
            lr = config.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, seconds = _timed(
                device, lambda: train_step(model, opt, params, batch("train"), config)
            )
            result.wall_seconds += seconds
            result.train_losses.append(loss)
            tracker.add(loss=loss, lr=lr)
            # Every $k$ steps, after the step: Algorithm 3, lines 7-10.
            if config.optimizer in REFRESHING and step % k == k - 1:
                _, seconds = _timed(
                    device,
                    lambda: refresh_hessian(
                        model, opt, params, batch("hessian"), config, gens["samples"]
                    ),
                )
                result.hessian_seconds += seconds
                result.wall_seconds += seconds
                # The clip win rate, $|m| < \rho B h$: a diagnostic, not timed.
                result.refresh_steps.append(step + 1)
                result.win_rates.append(opt.win_rate())
                tracker.add(win_rate=result.win_rates[-1])
            tracker.save()
            done = step + 1
            if _due(done, config.eval_interval, config.steps):
                record_eval(done)
            if _due(done, config.checkpoint_every, config.steps):
                save_checkpoint(
                    checkpoint_path(config),
                    step=done,
                    config=config,
                    model=model,
                    optimizer=opt,
                    generators=gens,
                    result=result,
                )
    if out is not None:
        path = out / f"{run_name(config)}.json"
        path.write_text(json.dumps(result.to_dict(), indent=1))
    return result


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __package__), name)


if __name__ == "__main__":
    from sophia.experiments.cli import main as _main

    sys.exit(_main())
