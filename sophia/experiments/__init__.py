r"""
---
title: sophia.experiments
summary: What uses the optimizer - a small GPT, an offline corpus, training, comparison, benchmark, demo.
---

The library ends at [`sophia`](../__init__.html): the optimizers, the three
implementations of the step and the estimators. This subpackage holds the experiments
that *use* it, and nothing in the library imports it.

* [`model`](model.html): a small GPT, nanoGPT's shape.
* [`data`](data.html): the offline corpus it trains on (`corpora/`), and batches of it.
* The training script, `python -m sophia.train`, in six chapters:
  [`config`](config.html) (what a run is), [`train`](train.html) (the loop),
  [`tracking`](tracking.html) (labml), [`checkpoint`](checkpoint.html) (save and resume),
  [`compare`](compare.html) (AdamW against Sophia-G and Sophia-H, its table and plot,
  `python -m sophia.train compare`) and [`cli`](cli.html) (the command line).
* [`benchmark`](benchmark.html): one optimizer step timed against AdamW,
  `python -m sophia.benchmark`, and [`measure`](measure.html): the parameter set it
  times, its clock and the memory bandwidth it compares with.
* [`gpucheck`](gpucheck.html): one command that verifies the CUDA path on a first GPU,
  `python -m sophia.gpucheck`, and [`cuda_checks`](cuda_checks.html): its checks.
* [`demo`](demo.html): the one-minute tour, `python -m sophia`.

labml and matplotlib are needed here only (`pip install "literate-sophia[train]"`).
"""
