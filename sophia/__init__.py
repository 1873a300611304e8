r"""
---
title: sophia
summary: The Sophia optimizer, literate - a reference, a torch._foreach version, and both Hessian estimators.
---

# sophia

The Sophia optimizer of [Liu et al.](https://arxiv.org/abs/2305.14342), written to be read.

* [`SophiaG`](optimizer.html) and `SophiaH`: the optimizers (`torch.optim` classes).
* [`sophia.reference`](reference.html): the step, one tensor at a time, one line per line of the paper.
* [`sophia.foreach`](foreach.html): the same step with `torch._foreach_*` ops.
* [`sophia.checks`](checks.html): what the optimizer checks and chooses before it writes
  anything (hyperparameters, non-finite values, FSDP shards).
* [`sophia.nonfinite`](nonfinite.html): the one-read search for NaN and infinity in
  gradients and estimates, and the steps skipped on the device.
* [`sophia.loading`](loading.html): the checks of a loaded state, and another
  optimizer's (AdamW's) state adopted.
* [`sophia.hessian`](hessian.html): the estimators of the Hessian diagonal
  (Gauss-Newton-Bartlett, Hutchinson, and the exact diagonal for small problems).
* [`sophia.fused`](fused.html) and `sophia/csrc/`: the fused kernel, CUDA C++ that also
  runs on the CPU.

That is the whole library, and all that `import sophia` loads. The experiments that *use*
it (a small GPT, an offline corpus, the training loop that compares Sophia with AdamW,
the benchmark and the demo) are the subpackage [`sophia.experiments`](experiments/__init__.html).
"""

from .hessian import exact_hessian_diagonal, gnb_loss, hutchinson
from .optimizer import SophiaG, SophiaH

__all__ = ["SophiaG", "SophiaH", "gnb_loss", "hutchinson", "exact_hessian_diagonal"]
__version__ = "0.1.0"
