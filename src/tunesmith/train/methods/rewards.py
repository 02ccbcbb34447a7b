"""Rewards for online RL: Python functions and trained reward models behind one call.

A reward is named in the config as
- ``module:function`` (``my_rewards:format_reward``, importable from the working
  directory) or ``path/to/file.py:function``; it is called as
  ``fn(prompts=[str], completions=[str], messages=[[message]], **columns)`` — ``prompts``
  holds each prompt's last user message, ``messages`` the whole prompt conversation and
  ``columns`` every extra field of the prompt records (e.g. ``answer``), one value per
  completion — and returns one float per completion (``None`` = not applicable, counted
  as 0 in the weighted sum, as TRL's nansum);
- a folder holding a reward model (``method: reward`` run's ``final/`` or an exported
  reward model): the completion is scored after the prompt with the model's own chat
  template.
The weighted sum (``reward_weights``, default 1 each) is the reward; each part is logged
as ``rewards/NAME``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tunesmith.errors import TunesmithError


@dataclass
class Scores:
    total: torch.Tensor                 # (N,) weighted sum
    parts: dict[str, torch.Tensor]      # name → (N,) raw values (nan where not applicable)


def load_function(spec: str) -> Callable:
    """``module:function`` or ``file.py:function`` → the callable; one sentence when it is not there."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise TunesmithError(f"reward {spec!r} is neither `module:function` nor a reward model folder; "
                             f"write e.g. `my_rewards:format_reward`")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise TunesmithError(f"reward {spec!r}: file {path} does not exist")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise TunesmithError(f"reward {spec!r}: cannot import {mod_name} ({e}); run from the folder that holds "
                             f"it or give a path `path/to/file.py:{fn_name}`") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise TunesmithError(f"reward {spec!r}: {mod_name} has no function {fn_name}")
    return fn


class RewardModel:
    """A trained reward model as a reward function (scores prompt + completion)."""

    def __init__(self, folder: str, max_length: int, batch_size: int = 8):
        from tunesmith.models.load import load_scorer

        self.model, self.tok = load_scorer(folder)
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, *, completions: list[str], messages: list[list[dict]], **_) -> list[float]:
        from tunesmith.infer.score import score_conversations

        return score_conversations(self.model, self.tok, messages, completions, max_length=self.max_length,
                                   batch_size=self.batch_size)


class Rewards:
    def __init__(self, specs: list[str], weights: list[float] | None, max_length: int):
        self.funcs: list[tuple[str, Callable]] = []
        for spec in specs:
            if Path(spec).is_dir():
                self.funcs.append((Path(spec).parent.name if Path(spec).name == "final" else Path(spec).name,
                                   RewardModel(spec, max_length)))
            else:
                self.funcs.append((spec.rpartition(":")[2], load_function(spec)))
        self.weights = weights or [1.0] * len(specs)

    def __call__(self, prompts: list[list[dict]], completions: list[str], metas: list[dict]) -> Scores:
        last_user = [next((m["content"] for m in reversed(p) if m["role"] == "user"), "") for p in prompts]
        keys = set.intersection(*(set(m) for m in metas)) if metas else set()
        columns = {k: [m[k] for m in metas] for k in keys if k not in ("prompts", "completions", "messages")}
        parts, total = {}, torch.zeros(len(completions), dtype=torch.float32)
        for (name, fn), w in zip(self.funcs, self.weights):
            values = fn(prompts=last_user, completions=completions, messages=prompts, **columns)
            values = _check(name, fn, values, len(completions))
            parts[name] = values
            total += w * torch.nan_to_num(values, nan=0.0)
        return Scores(total, parts)


def _check(name: str, fn, values, n: int) -> torch.Tensor:
    where = getattr(inspect.getmodule(fn), "__name__", "?")
    if values is None or not hasattr(values, "__len__") or len(values) != n:
        raise TunesmithError(f"reward {where}:{name} returned {type(values).__name__} "
                             f"{'of length ' + str(len(values)) if hasattr(values, '__len__') else ''}; "
                             f"it must return one float per completion ({n})")
    try:
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise TunesmithError(f"reward {where}:{name} returned non-numbers ({values[:3]!r}…); return floats") from None
