r"""
---
title: Checkpoints of a training run
summary: Write a run's whole state atomically every N steps, and resume from it exactly, refusing a checkpoint of another configuration.
---

With `--checkpoint-every N` (`TrainConfig(checkpoint_every=N)`), every $N$ steps and
after the last one the [training loop](train.html) writes everything it needs to go
on into `out/<name>-seed<seed>.ckpt.pt`:

* the number of steps taken (the learning rate is a function of it, so the schedule
  has no state of its own);
* the model's parameters and the optimizer's `state_dict()` (for Sophia, `step`,
  `exp_avg` $m$ and `hessian` $h$ per parameter, checked when loaded by
  [the optimizer](../optimizer.html));
* the state of every stream of randomness: the training batches, the refresh
  batches, the sampled labels $\hat y$ (or Hutchinson's probes), and PyTorch's global
  generator (dropout); without the labels' stream a resumed run would estimate
  another $h$;
* the record so far (`RunResult`), so that the curves of a resumed run are whole;
* a SHA-256 checksum of all of the above, checked when resuming, so that a checkpoint
  whose bytes were damaged but still decode is refused instead of resuming another run.

With `--resume`, a run whose checkpoint exists continues *exactly* as the
uninterrupted run would have (bit for bit, on the same machine with the same number
of threads); without one it starts from the beginning, so a job script can always
pass `--resume`. Why the write is atomic and what a kill leaves behind is on
[how the training script is built](../../engineering/training.md#checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import TrainConfig, run_name

if TYPE_CHECKING:
    from .train import RunResult

# A run resumes only from a checkpoint of the same configuration, apart from where it
# writes and how often: another learning rate would silently make a third run.
_NOT_COMPARED = ("out", "verbose", "checkpoint_every", "resume")


def checkpoint_path(config: TrainConfig) -> Path:
    r"""Where the run of `config` writes its checkpoint: `out/<name>.ckpt.pt`."""
    if config.out is None:
        raise ValueError("a run without out has no checkpoint")
    return Path(config.out).expanduser().resolve() / f"{run_name(config)}.ckpt.pt"


# The configuration as stored and compared: JSON's view of it (tuples become lists).
def _comparable(config: TrainConfig) -> dict[str, Any]:
    data = {k: v for k, v in config.to_dict().items() if k not in _NOT_COMPARED}
    return json.loads(json.dumps(data))


# ## The checksum
#
# Over every value of the payload, in order: each tensor's dtype, shape and bytes, and
# the `repr` of everything else, with the keys that lead to it. A few garbled bytes
# that still decode to finite numbers change it.
def _digest(value: Any, sha: Any = None) -> str:
    sha = hashlib.sha256() if sha is None else sha
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        sha.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key, item in value.items():
            sha.update(f"key {key!r}".encode())
            _digest(item, sha)
    elif isinstance(value, (list, tuple)):
        sha.update(f"{type(value).__name__} {len(value)}".encode())
        for item in value:
            _digest(item, sha)
    else:
        sha.update(f"value {value!r}".encode())
    return sha.hexdigest()


# ## Writing one, atomically
#
# To a temporary file in the same folder, `fsync`ed, then renamed over the old one
# (`os.replace` is atomic), so that a kill at any moment leaves a whole checkpoint. A
# failed write (a full disk) removes the temporary file and keeps the old checkpoint.
def save_checkpoint(
    path: Path,
    *,
    step: int,
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    result: RunResult,
) -> None:
    r"""Write the checkpoint of a run after `step` steps to `path`, atomically."""
    device = next(model.parameters()).device
    payload = dict(
        format=2,
        step=step,
        config=_comparable(config),
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        generators={stream: gen.get_state() for stream, gen in generators.items()},
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        result=result.to_dict(),
    )
    payload["checksum"] = _digest(payload)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(
            f"cannot write the checkpoint {str(path)!r}: "
            f"{error.strerror or error}; the previous checkpoint is kept"
        ) from error
    finally:
        if tmp.exists():
            tmp.unlink()
    # On POSIX the folder is synced too, so that the rename itself is on the disk.
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ## Reading one back
#
# `weights_only=True`: a checkpoint holds tensors, numbers, strings and containers of
# them, and unpickling anything else could run arbitrary code. Onto the CPU first:
# `load_state_dict` moves each tensor to its parameter's device. A file that does not
# read, or reads as something else, is "not a checkpoint written by sophia.train", with
# the reason; PyTorch's own advice to load with `weights_only=False` is never passed on.
_FIELDS = dict(
    step=int,
    config=dict,
    model=dict,
    optimizer=dict,
    generators=dict,
    torch_rng=torch.Tensor,
    result=dict,
    checksum=str,
)


def _not_ours(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"not a checkpoint written by sophia.train: {str(path)!r} ({reason})"
    )


def _read(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ValueError(
            f"cannot read the checkpoint {str(path)!r}: {error.strerror or error}"
        ) from None
    if size == 0:
        raise _not_ours(path, "the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise _not_ours(
                path, "the file is truncated, corrupt, or not a PyTorch file"
            ) from None
        raise _not_ours(
            path, "it holds Python objects other than tensors, numbers and strings"
        ) from None
    except Exception:
        raise _not_ours(
            path, "the file is truncated, corrupt, or not a PyTorch file"
        ) from None


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    r"""Read the checkpoint at `path` and check that it belongs to a run of `config`."""
    saved = _read(path)
    if not isinstance(saved, dict) or saved.get("format") != 2:
        if isinstance(saved, dict) and saved.get("format") == 1:
            raise _not_ours(
                path, "format 1, written before checksums: start the run again"
            )
        raise _not_ours(path, "no format 2 in it")
    for field, kind in _FIELDS.items():
        if not isinstance(saved.get(field), kind) or isinstance(saved[field], bool):
            raise _not_ours(path, f"its {field!r} is missing or not a {kind.__name__}")
    checksum = saved.pop("checksum")
    if _digest(saved) != checksum:
        raise ValueError(
            f"the checkpoint {str(path)!r} is damaged: its contents do not match the "
            "checksum written with them; it was not loaded"
        )
    # Every field that differs is named in the error.
    now = _comparable(config)
    differ = sorted(
        k
        for k in set(now) | set(saved["config"])
        if now.get(k) != saved["config"].get(k)
    )
    if differ:
        details = ", ".join(
            f"{k}: {saved['config'].get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in differ
        )
        raise ValueError(
            f"the checkpoint {str(path)!r} is of another configuration ({details})"
        )
    if not 0 < saved["step"] <= config.steps:
        raise ValueError(
            f"the checkpoint {str(path)!r} is at step {saved['step']}, "
            f"outside 1..{config.steps}"
        )
    return saved


# ## Resuming
#
# The model, the optimizer and every stream of randomness are set to the checkpoint's;
# the caller takes the record (`saved["result"]`) and the step to start from.
def restore_checkpoint(
    path: Path,
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> dict[str, Any]:
    r"""Load the checkpoint into `model`, `optimizer` and `generators`; return it."""
    device = next(model.parameters()).device
    saved = load_checkpoint(path, config)
    # A checkpoint that passed its checksum but was written by hand (another model, a
    # bad random state) is refused with the reason, in one line.
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        for stream, gen in generators.items():
            gen.set_state(saved["generators"][stream])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(
            f"the checkpoint {str(path)!r} does not fit this run: {reason[:300]}"
        ) from None
    return saved
