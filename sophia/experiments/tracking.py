r"""
---
title: Tracking a run with labml
summary: The tracker of the training loop - labml under --out, or plain prints - and the code that keeps labml's files inside --out.
---

With `--out DIR`, a [training run](train.html) is a
[labml](https://github.com/labmlai/labml) experiment: `monit.loop` shows the progress,
`tracker` records the loss, learning rate, validation loss and clip win rate, and
labml's screen writer prints them. Nothing is sent anywhere (only the `screen` writer
is on), and every file labml writes goes under `DIR`. Without `--out`, the tracker
prints one line per evaluation, so the loop reads the same either way.

labml and IPython are imported inside the functions that use them, so that importing
the training loop needs neither. How labml is kept inside `--out`, and why each step
is needed: [how the training script is built](../../engineering/training.md#tracking-with-labml).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import TrainConfig


# A missing optional package has its own error type, so that the command line can
# report it in one line, with the `pip` command that fixes it.
class MissingDependencyError(RuntimeError):
    r"""An optional package (labml to track a run, matplotlib to draw) is missing."""


# Checked before any training, without importing the package (`find_spec`): a
# comparison of several minutes should not fail at the end, when it draws its figure.
def require(module: str, purpose: str) -> None:
    r"""Raise `MissingDependencyError` unless `module` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{purpose} needs the {module} package: pip install {module}"
        )


# labml's notebook output imports `display` from `IPython.core.display`, which IPython
# 9 removed; inside Jupyter (IPython already imported) we put the name back there.
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


# The stand-in for labml's `get_git_status`: the commit of this package's checkout
# (the code that trained), without remotes or diff, so that neither lands in `--out`.
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


# In a notebook, whose outputs are published, labml's header would show the checkout's
# last commit message and `[clean]`/`[dirty]`: there it shows the run's name and id
# only (the run still records the commit). A command line keeps labml's header.
def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _header_without_git(run: Any) -> None:
    from labml import logger
    from labml.logger import Text

    logger.log()
    logger.log([(run.name, Text.title), ": ", (str(run.uuid), Text.meta)])


# ## Keeping labml inside `out`
#
# labml's lab and computer are process-wide singletons, so every run points them at
# its own `out` again: two runs one after the other in one process each write into
# their own folder.
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
    # The first `.labml.yaml` labml's upward search finds; one that exists is left
    # alone, since a user may have edited it.
    labml_yaml = out / ".labml.yaml"
    if not labml_yaml.exists():
        labml_yaml.write_text(
            "# labml's settings for the runs in this folder (written by sophia.train)\n"
            "check_repo_dirty: false\n"
        )
    # A lab rooted at `out`, with explicit settings that win over any `.labml.yaml`
    # further up: runs go to `out/logs/`, labml's data to `out/data/`.
    lab_internal._internal = lab_internal.Lab(out)
    lab.configure(
        dict(
            path=str(out),
            experiments_path="logs",
            data_path="data",
            check_repo_dirty=False,
        )
    )
    # The computer's files, which labml keeps in `~/.labml/`, go to `out/.labml/`.
    home = out / ".labml"
    home.mkdir(exist_ok=True)
    computer_yaml = home / "configs.yaml"
    if not computer_yaml.exists():
        computer_yaml.write_text(f"uuid: {uuid.uuid4().hex}\n")
    # `HOME` is changed only while the computer is built, and restored whatever
    # happens, because every other library in the process reads it too.
    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = str(out)
    try:
        computer_configs._internal = computer_configs.Computer()
    finally:
        if saved_home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = saved_home


# ## The tracker
#
# A context manager because a labml run is one: `experiment.start()` must be closed
# when training ends, normally or by an exception. The `ExitStack` holds that context
# when there is one, and nothing otherwise.
class Tracker:
    r"""labml under `config.out`, or one printed line per evaluation."""

    def __init__(self, config: TrainConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.labml = config.out is not None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Tracker:
        if self.labml:
            self._start_labml(Path(self.config.out).expanduser().resolve())
        return self

    # `experiment.create` reads the git state through `get_git_status`, swapped for
    # `_git_info` during the call; inside Jupyter labml roots the lab at the working
    # directory, so the run is created from inside `out`.
    def _start_labml(self, out: Path) -> None:
        _confine_labml(out)
        from labml import experiment
        from labml.internal import experiment as experiment_internal

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
        # The run records the training loop as its script, which is what ran.
        from . import train

        current = experiment_internal.experiment_singleton()
        current.run.python_file = train.__file__
        # labml prints its header through a private method, replaced on this run only.
        if _in_notebook():
            current._Experiment__print_info = lambda: _header_without_git(current.run)
        experiment.configs(_flatten(self.config.to_dict()))
        self._stack.enter_context(experiment.start())

    # The exception, if any, is passed on: labml marks the run failed or interrupted.
    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    # labml's `monit.loop` also advances labml's global step, the x-axis of
    # everything `tracker` records, and draws the progress line.
    def loop(self, start: int, steps: int) -> Iterator[int]:
        r"""The steps `start..steps-1`, with labml's progress line when tracking."""
        if self.labml:
            from labml import monit

            return iter(monit.loop(range(start, steps)))
        return iter(range(start, steps))

    def add(self, **values: float) -> None:
        r"""Values of the current step, written at the next `save`."""
        if self.labml:
            from labml import tracker

            tracker.add(values)

    def save(self) -> None:
        r"""The end of a step: the values added since the last `save` are written."""
        if self.labml:
            from labml import tracker

            tracker.save()

    # With labml, `new_line` keeps the screen line of an evaluation (labml otherwise
    # overwrites the progress line in place).
    def evaluation(self, step: int, val_loss: float, seconds: float) -> None:
        r"""One evaluation: its step, validation loss and training time so far."""
        if self.labml:
            from labml import tracker

            tracker.add(val_loss=val_loss)
            tracker.save()
            tracker.new_line()
        elif self.config.verbose:
            print(
                f"{self.name} step {step:5d}  val loss {val_loss:.4f}  "
                f"ppl {math.exp(val_loss):7.2f}  "
                f"train time {seconds:6.1f}s",
                flush=True,
            )


# `{"model": {"n_layer": 4}}` becomes `{"model.n_layer": 4}` (labml's form for nested
# settings), and tuples (the betas) become lists.
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat
