r"""
---
title: python -m sophia.train
summary: The command that trains the small GPT; the code is in sophia.experiments.
---

`python -m sophia.train` trains the small GPT with one optimizer, and
`python -m sophia.train compare` compares AdamW with Sophia. The code is an experiment
that *uses* the optimizer, so it lives in [`sophia.experiments`](experiments/train.html);
this module only keeps the command, and for one release the old import path
`sophia.train.X`, which warns and names the new one.
"""

import importlib
import runpy
import warnings

_NEW = "sophia.experiments.train"


def __getattr__(name: str):
    module = importlib.import_module(_NEW)
    if not hasattr(module, name):
        raise AttributeError(f"module 'sophia.train' has no attribute {name!r}")
    warnings.warn(
        f"sophia.train.{name} moved to {_NEW}.{name}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


if __name__ == "__main__":
    runpy.run_module(_NEW, run_name="__main__", alter_sys=True)
