r"""
---
title: python -m sophia.train
summary: The command that trains the small GPT; the code is in sophia.experiments.
---

`python -m sophia.train` trains the small GPT with one optimizer, and
`python -m sophia.train compare` compares AdamW with Sophia. The code is an experiment
that *uses* the optimizer, so it lives in [`sophia.experiments`](experiments/train.html);
this module only runs [its command line](experiments/cli.html), and for one release
keeps the old import path `sophia.train.X`, which warns and names the new one.
"""

import importlib
import runpy
import warnings

# The module that now holds each public name of the old `sophia.train`; the names of
# the comparison and the command line are in the loop's own table of lazy names.
_HOMES = {
    name: f"sophia.experiments.{module}"
    for module, names in {
        "config": (
            "TrainConfig",
            "lr_at",
            "check_out_dir",
            "OPTIMIZERS",
            "IMPLEMENTATIONS",
            "OPTIMIZER_DEFAULTS",
            "EVAL_SEED",
        ),
        "train": (
            "train",
            "RunResult",
            "evaluate",
            "make_optimizer",
            "STREAMS",
        ),
        "tracking": ("MissingDependencyError", "require"),
        "checkpoint": ("checkpoint_path", "save_checkpoint", "load_checkpoint"),
    }.items()
    for name in names
}

_LOOP = "sophia.experiments.train"
_CLI = "sophia.experiments.cli"


def __getattr__(name: str):
    lazy = importlib.import_module(_LOOP)._LAZY
    if name in lazy:
        home = f"sophia.experiments.{lazy[name]}"
    elif name in _HOMES:
        home = _HOMES[name]
    else:
        raise AttributeError(f"module 'sophia.train' has no attribute {name!r}")
    warnings.warn(
        f"sophia.train.{name} moved to {home}.{name}; "
        "the old path goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)


if __name__ == "__main__":
    runpy.run_module(_CLI, run_name="__main__", alter_sys=True)
