r"""
---
title: python -m sophia.benchmark
summary: The command that times the optimizer step; the code is in sophia.experiments.
---

`python -m sophia.benchmark` times one optimizer step of Sophia against AdamW (see
`--help`). The code is an experiment that *uses* the optimizer, so it lives in
[`sophia.experiments.benchmark`](experiments/benchmark.html) and
[`sophia.experiments.measure`](experiments/measure.html); this module only keeps the
command, and for one release the old import path `sophia.benchmark.X`, which warns
and names the new one.
"""

import importlib
import runpy
import warnings

_NEW = "sophia.experiments.benchmark"
# Where the old names live now: the benchmark first, then the module it was split into.
_HOMES = (_NEW, "sophia.experiments.measure")


def __getattr__(name: str):
    for home in _HOMES:
        module = importlib.import_module(home)
        if hasattr(module, name):
            break
    else:
        raise AttributeError(f"module 'sophia.benchmark' has no attribute {name!r}")
    warnings.warn(
        f"sophia.benchmark.{name} moved to {home}.{name}; the old path goes in the "
        "next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


if __name__ == "__main__":
    runpy.run_module(_NEW, run_name="__main__", alter_sys=True)
