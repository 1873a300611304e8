r"""
---
title: The command line of the training script
summary: python -m sophia.train (one run) and python -m sophia.train compare (several optimizers) - options, checks and one-line errors.
---

`python -m sophia.train [options]` trains one model with the
[training loop](train.html); `python -m sophia.train compare [options]`
[compares](compare.html) optimizers (`python -m sophia.experiments.train` and
`python -m sophia.experiments.cli` are the same command). Bad input ends the command
with a non-zero exit status and one line on stderr, never a traceback: an unknown
name or a malformed number is argparse's (usage, then the error line); a model that
cannot be built, a context longer than the model's, a corpus too small for one
sequence, an output folder that is empty or cannot be written are status 2; a download
that fails, a kernel that does not build, a checkpoint that cannot be read or written,
found later, are status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any

import torch

from .compare import compare, markdown_table, summarize, write_comparison
from .config import (
    COMPARED,
    IMPLEMENTATIONS,
    OPTIMIZERS,
    TrainConfig,
    _check_float,
    check_out_dir,
)
from .data import DataUnavailableError, load_corpus
from .model import GPTConfig
from .tracking import MissingDependencyError, require
from .train import train


# ## The options
#
# `_add_common` adds the options both commands share, with defaults read from a
# default `TrainConfig`, so the help and the dataclass cannot disagree. Where a default
# depends on another choice (the learning rate on the optimizer) the option defaults
# to `None`, which `TrainConfig` resolves.
def _add_common(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    _add_run_options(parser, defaults)
    _add_model_options(parser)
    _add_optimizer_options(parser, defaults)
    _add_eval_options(parser, defaults)


def _add_run_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    # Required: a command-line run always leaves its results where a reader finds them.
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (created with its parents if missing); "
        "labml's files go here too",
    )
    parser.add_argument(
        "--impl",
        choices=IMPLEMENTATIONS,
        default=None,
        help="step implementation: reference (foreach=False), foreach, fused; "
        "default: the optimizer's choice",
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


# One of the two presets of [`GPTConfig`](model.html), its sizes overridable.
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=("cpu", "gpu"),
        default="cpu",
        help="model size: cpu (GPTConfig(), ~0.8M parameters) "
        "or gpu (GPTConfig.gpu(), ~10M)",
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
def _add_optimizer_options(
    parser: argparse.ArgumentParser, defaults: TrainConfig
) -> None:
    parser.add_argument(
        "--data",
        default=defaults.data,
        help="stdlib (shipped, offline), shakespeare (downloaded once), "
        "or a text file (default %(default)s)",
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


# Evaluation, the device and its threads, how much to print, and checkpoints.
def _add_eval_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
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
        help="CPU threads for torch "
        "(default: 1 on --device cpu, torch's choice otherwise)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write a checkpoint into --out every N steps and after the last "
        "(default: none)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="start from the run's checkpoint in --out, if there is one",
    )


# The comparison takes one learning rate per optimizer: AdamW's and Sophia's best
# values are an order of magnitude apart, so one `--lr` would be wrong for one of them.
def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sophia.train",
        description="Train the small GPT with one optimizer. "
        "(`python -m sophia.train compare --help` for the comparison.)",
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
        description="Train several optimizers with the same seeds and data order; "
        "write a figure, a CSV and a Markdown table.",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        default=list(COMPARED),
        help="default: %(default)s; signmomentum is Sophia-G that never refreshes "
        "its Hessian (h = 0): sign momentum, the baseline that shows what the "
        "Hessian adds",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: %(default)s"
    )
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="OPTIMIZER=LR",
        help="peak learning rate of one optimizer, e.g. --lr adamw=3e-3 "
        "(repeatable; default: per optimizer)",
    )
    _add_common(parser)
    return parser


# `--lr adamw=3e-3` becomes `{"adamw": {"lr": 0.003}}`. An `--lr` for an optimizer
# that does not run is a typo, not a no-op; a name given twice keeps its last value.
def _parse_lrs(values: list[str], optimizers: list[str]) -> dict[str, dict[str, float]]:
    overrides: dict[str, dict[str, float]] = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise ValueError(
                f"--lr takes OPTIMIZER=LR with OPTIMIZER one of {', '.join(OPTIMIZERS)}, "
                f"got {value!r}"
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


# The fused kernel's "cannot build here" error, imported lazily: where `sophia.fused`
# cannot even be imported, there is no such error to catch.
def _fused_errors() -> tuple[type[Exception], ...]:
    try:
        from ..fused import FusedUnavailableError
    except Exception:
        return ()
    return (FusedUnavailableError,)


# The options as a `TrainConfig`, which checks them; `extra` carries what only one of
# the two commands has (the optimizer, its learning rate and weight decay, the seed).
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


# ## Running a command
#
# Every check that needs no data first, then those that touch the machine (the output
# folder, the corpus, which may download, the optional packages), all before any
# training. On the CPU one thread unless `--threads` says otherwise: the losses then do
# not depend on the number of cores, and a second thread slows this small model down
# badly on a busy machine ([details](../../engineering/training.md#one-thread-on-the-cpu)).
def _prepare(args: argparse.Namespace, comparing: bool) -> tuple[TrainConfig, dict]:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads
    if threads is None and args.device == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    overrides: dict[str, dict[str, float]] = {}
    if comparing:
        # A repeated seed would count one run twice in the mean.
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
    return base, overrides


# A comparison prints its table and the paths it wrote; a single run, its final loss,
# perplexity, timing and, for Sophia, its mean win rate.
def _run(
    args, base: TrainConfig, overrides: dict, corpus, out, comparing: bool
) -> None:
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
        return
    result = train(base, corpus=corpus)
    win = (
        f", mean win rate {statistics.fmean(result.win_rates):.2f}"
        if result.win_rates
        else ""
    )
    print()
    print(
        f"{base.optimizer}: final val loss {result.final_val_loss:.4f} "
        f"(ppl {result.final_perplexity:.2f}), "
        f"{result.wall_seconds:.1f}s training, {result.ms_per_step:.1f} ms/step, "
        f"Hessian overhead {100 * result.hessian_overhead:.1f}%" + win
    )


def _error(prog: str, error: Exception) -> None:
    message = str(error).strip().splitlines()
    text = message[0] if message else type(error).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    r"""Train one model, or `compare` several optimizers; return the exit status."""
    # The first word is read by hand, not by subparsers, so that `python -m
    # sophia.train --optimizer adamw ...` works with no command word at all.
    argv = list(sys.argv[1:] if argv is None else argv)
    comparing = bool(argv) and argv[0] == "compare"
    if argv and argv[0] in ("compare", "train"):
        argv = argv[1:]
    parser = _compare_parser() if comparing else _train_parser()
    args = parser.parse_args(argv)
    try:
        base, overrides = _prepare(args, comparing)
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
    # Errors found during the work print their first line (a compiler's log can be
    # long); a `FloatingPointError` is the optimizer refusing a non-finite gradient, an
    # `OSError` a checkpoint that could not be written (the previous one is kept).
    try:
        _run(args, base, overrides, corpus, out, comparing)
    except (
        ValueError,
        OSError,
        FloatingPointError,
        DataUnavailableError,
        MissingDependencyError,
        *_fused_errors(),
    ) as error:
        _error(parser.prog, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
