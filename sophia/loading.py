r"""
---
title: Loading a state
summary: Every entry of a loaded state checked before any is loaded; another optimizer's state adopted.
---

`torch.optim.Optimizer.load_state_dict` replaces the optimizer's state and groups first
and looks at the entries afterwards, and it casts what it takes: a `hessian` of
another shape would reach the parameters at the next step, a complex one would lose its
imaginary part, a bad step counter would fail after the state was replaced. So
[the optimizer](optimizer.html)'s `load_state_dict` hands the state dict here first:
every entry is checked against the parameter it will belong to, and a refused load
changes nothing. A state of another optimizer (AdamW's) is turned into one of ours,
and the warning says which value came from the checkpoint and which from the
constructor. The rules, and why, are on
[how the optimizer is built](../engineering/optimizer.md#loading-a-state).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .checks import _local, _number, _show


# ## The checks
#
# `torch.optim.Optimizer.load_state_dict` takes the state as it comes and replaces the
# old one before it looks at the entries, so every entry is checked here first, against
# the parameters it will belong to: a refused load changes nothing. Where the groups do
# not line up, the refusal is PyTorch's own (it names the groups and their sizes).
# Returns how many parameters have `exp_avg` and no `hessian` (another optimizer's
# checkpoint), for the warning; the rules are in
# [the docs](../engineering/optimizer.md#loading-a-state).
def _check_state_dict(state_dict: Any, param_groups: list[dict]) -> int:
    _check_layout(state_dict)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups) or not all(
        len(s["params"]) == len(g["params"]) for s, g in zip(saved_groups, param_groups)
    ):
        return 0
    missing_hessian = 0
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        for pi, (key, p) in enumerate(zip(saved["params"], group["params"])):
            state = state_dict["state"].get(key)
            if state is None:
                continue
            where = f"param_groups[{gi}]['params'][{pi}]"
            if not isinstance(state, dict):
                raise ValueError(
                    f"loaded state of {where} must be a dict ('step', 'exp_avg', "
                    f"'hessian'), got {type(state).__name__}; nothing was loaded"
                )
            if "step" in state:
                _check_loaded_step(where, state["step"])
            for name in ("exp_avg", "hessian"):
                if name in state:
                    _check_loaded(where, name, state[name], p)
            missing_hessian += "exp_avg" in state and "hessian" not in state
    return missing_hessian


# What `state_dict()` returns: a dict with a dict `state` and a list `param_groups` of
# dicts, each with its `params`.
def _check_layout(state_dict: Any) -> None:
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(
        state_dict
    ):
        got = sorted(state_dict) if isinstance(state_dict, dict) else None
        raise ValueError(
            "state_dict must be a dict with 'state' and 'param_groups', as "
            f"state_dict() returns, got {type(state_dict).__name__}"
            + (f" with keys {got}" if got is not None else "")
        )
    if not isinstance(state_dict["state"], dict):
        raise ValueError(
            f"state_dict['state'] must be a dict, got "
            f"{type(state_dict['state']).__name__}"
        )
    groups = state_dict["param_groups"]
    if not isinstance(groups, (list, tuple)):
        raise ValueError(
            f"state_dict['param_groups'] must be a list, got {type(groups).__name__}"
        )
    for gi, group in enumerate(groups):
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)):
            raise ValueError(
                f"state_dict['param_groups'][{gi}] must be a dict with a list 'params'"
            )


# A step counter: a number or a one-element real tensor, finite and not negative.
def _check_loaded_step(where: str, step: Any) -> None:
    value = step
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex():
        value = step.detach().cpu().reshape(())
    number = None if isinstance(step, bool) else _number(value)
    if number is None or not (math.isfinite(number) and number >= 0):
        shown = _show(step) if number is not None else type(step).__name__
        raise ValueError(
            f"loaded state of {where}: 'step' must be a finite number >= 0 or a "
            f"one-element tensor of one, got {shown}; nothing was loaded"
        )


# A checkpoint of another optimizer (AdamW's: groups without `rho`) keeps its state's
# `step` and `exp_avg` (the same $m$) and its `maximize`, which means the same thing;
# every other setting is this optimizer's, from the constructor, since AdamW's `lr`,
# `betas`, `eps` and `weight_decay` are tuned for another update. Its other keys
# (`exp_avg_sq`, `amsgrad`, ...) are dropped. Returns the state dict to load and the
# warning that says which value came from where (`None` for one of ours).
def _adopt_foreign(state_dict: dict, param_groups: list[dict]) -> tuple[dict, str]:
    saved = state_dict["param_groups"]
    foreign = [gi for gi, g in enumerate(saved) if "rho" not in g]
    if not foreign or len(saved) != len(param_groups):
        return state_dict, None
    groups, ignored, ours, n_params = list(saved), set(), [], 0
    state = dict(state_dict["state"])
    for gi in foreign:
        group = {k: v for k, v in param_groups[gi].items() if k != "params"}
        group["maximize"] = saved[gi].get("maximize", group["maximize"])
        ignored |= set(saved[gi]) - set(group) - {"params"}
        groups[gi] = {**group, "params": saved[gi]["params"]}
        settings = ", ".join(f"{k}={v!r}" for k, v in group.items() if k != "maximize")
        ours.append(f"param_groups[{gi}]: {settings}")
        for key in saved[gi]["params"]:
            if isinstance(state.get(key), dict):
                n_params += 1
                ignored |= set(state[key]) - {"step", "exp_avg", "hessian"}
                state[key] = {
                    k: v for k, v in state[key].items() if k in ("step", "exp_avg")
                }
    maximize = ", ".join(f"maximize={groups[gi]['maximize']!r}" for gi in foreign)
    note = (
        f"loading the state of another optimizer (param_groups {foreign} have no "
        f"'rho'): kept from the checkpoint: 'step' and 'exp_avg' of {n_params} "
        f"parameter(s), {maximize}; from the constructor: {'; '.join(ours)}; "
        f"ignored: {', '.join(sorted(map(str, ignored))) or 'nothing'}. h starts at "
        "zero, and the steps are sign steps of size lr until the next "
        "update_hessian()"
    )
    return {**state_dict, "state": state, "param_groups": groups}, note


# One entry (`exp_avg` or `hessian`) against its parameter. Under FSDP both may be
# `DTensor`s: `shape` is the whole parameter's, and the values are this process's
# shard. An infinite `hessian` is allowed: the optimizer reaches one itself.
def _check_loaded(where: str, name: str, value: Any, p: Tensor) -> None:
    prefix = f"loaded state of {where}: '{name}'"
    if not isinstance(value, Tensor):
        raise ValueError(f"{prefix} must be a tensor, got {type(value).__name__}")
    if not (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"{prefix} has dtype {value.dtype}, not a floating-point type")
    if value.is_complex() != p.is_complex():
        raise ValueError(
            f"{prefix} has dtype {value.dtype} but the parameter has dtype {p.dtype}: "
            "complex and real do not mix (loading would drop an imaginary part)"
        )
    if value.shape != p.shape:
        raise ValueError(
            f"{prefix} has shape {tuple(value.shape)} but the parameter has shape "
            f"{tuple(p.shape)} (a checkpoint of another model, "
            "or parameters in another order?)"
        )
    local = _local(value)
    if name == "hessian":
        if bool(torch.isnan(local).any()):
            raise ValueError(f"{prefix} holds NaN")
    elif not bool(torch.isfinite(local).all()):
        raise ValueError(f"{prefix} holds non-finite values (NaN or inf)")
