r"""
---
title: python -m sophia.benchmark
summary: The command that times the optimizer step; the code is in sophia.experiments.
---

`python -m sophia.benchmark` times one optimizer step of Sophia against AdamW (see
`--help`). The code is an experiment
that *uses* the optimizer, so it lives in [`sophia.experiments`](experiments/benchmark.html);
this module only keeps the command, and for one release the old import path
`sophia.benchmark.X`, which warns and names the new one.
"""

import importlib
import runpy
import warnings

_NEW = "sophia.experiments.benchmark"


def __getattr__(name: str):
    module = importlib.import_module(_NEW)
    if not hasattr(module, name):
        raise AttributeError(f"module 'sophia.benchmark' has no attribute {name!r}")
    warnings.warn(
        f"sophia.benchmark.{name} moved to {_NEW}.{name}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


if __name__ == "__main__":
    runpy.run_module(_NEW, run_name="__main__", alter_sys=True)
