r"""
---
title: python -m sophia.gpucheck
summary: The command that verifies the CUDA path on a first GPU; the code is in sophia.experiments.
---

`python -m sophia.gpucheck --out DIR` runs every check the CUDA path needs on one GPU
and writes `report.md` and `report.json` into `DIR` (see `--help`). The code is an
experiment that *uses* the optimizer, so it lives in
[`sophia.experiments.gpucheck`](experiments/gpucheck.html) and
[`sophia.experiments.cuda_checks`](experiments/cuda_checks.html); this module only
runs the command, so that `import sophia` never loads it.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("sophia.experiments.gpucheck", run_name="__main__", alter_sys=True)
