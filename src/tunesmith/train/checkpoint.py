"""Atomic, pickle-free checkpoints with a sha256 manifest, for bit-exact resume.

Layout of ``output_dir/checkpoint-STEP/`` (Hugging Face naming)::

    NAME.safetensors              one per state dict the caller gives ("model", "adapter")
    optimizer.safetensors + .json tensors + JSON skeleton (see ``flatten_state``)
    scheduler.safetensors + .json
    rng.safetensors + .json       python, numpy, torch CPU/CUDA and named torch.Generators
    cursor.json                   epoch, sampler seed, samples consumed, global step
    trainer_state.json            metrics so far, counters (e.g. skipped non-finite steps)
    config.json                   the resolved run config, compared on resume (config_diff)
    inputs.json                   sha256 of the training data, tokenizer and chat template
    manifest.json                 format version, step, layout, sha256 + size of every file

Crash safety: everything is written into ``.tmp-checkpoint-STEP-<random>`` beside the
final folder, fsynced, then moved into place by one ``os.rename``, so a name
``checkpoint-STEP`` only ever points at a complete folder. Deleting (``keep_last``) also
renames first. Nothing is pickled: tensors go to safetensors, everything else to JSON,
and ``torch.load`` is never called. One process saves into an ``output_dir`` at a time.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch as st
import torch

from tunesmith.errors import TunesmithError
from tunesmith.files import (MANIFEST, atomic_dir, manifest_problem, read_json, recover, remove_dir, verify_manifest,
                             write_json, write_manifest)

_STATES = ("optimizer", "scheduler", "rng")  # flattened: NAME.safetensors + NAME.json
_DOCS = ("cursor", "trainer_state", "config")  # plain JSON
_RESERVED = {*_STATES, *_DOCS, "manifest"}
_STEP_NAME = r"checkpoint-\d+"
_RESUME_FIX = "delete it to resume from the previous checkpoint, or start again without --resume"


@dataclass
class Checkpoint:
    """Everything ``load_checkpoint`` read back, on CPU, already sha256-verified."""

    path: Path
    step: int
    state_dicts: dict[str, dict[str, torch.Tensor]]  # {"model": sd} or {"adapter": sd}
    optimizer_state: Any  # ready for optimizer.load_state_dict
    scheduler_state: Any  # ready for scheduler.load_state_dict
    rng_state: dict  # ready for restore_rng
    cursor: dict
    trainer_state: dict
    config: dict
    manifest: dict
    inputs: dict | None = None  # absent in checkpoints written before it was recorded


# ---------------------------------------------------------------- flatten / unflatten
# The skeleton is JSON in which every object is a one-key tag, so no user value can be
# mistaken for a tag: {"__tensor__": name}, {"__ndarray__": name}, {"__float__": "nan"},
# {"__tuple__": [...]}, {"__dict__": {str: ...}} (all keys str) or {"__items__": [[k, v]]}
# (keys of other types, e.g. the int parameter ids in an optimizer's "state").
# Finite floats are plain JSON numbers: json writes repr(), which round-trips exactly.


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into ``(tensors, skeleton)``: tensors for safetensors, skeleton for JSON.

    Handles nested dict (any hashable supported key type, kept), list, tuple, Tensor,
    numpy array, int, float (incl. inf/nan), bool, str and None; anything else raises
    TypeError naming where it sits. Tensor names are dotted paths ("state.0.exp_avg").
    """
    tensors: dict[str, torch.Tensor] = {}

    def put(path: str, t: torch.Tensor) -> str:
        name, n = path or "tensor", 0
        while name in tensors:  # paths collide only for odd keys, e.g. 1 and "1" side by side
            n += 1
            name = f"{path}#{n}"
        tensors[name] = t
        return name

    def enc(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, torch.Tensor):
            return {"__tensor__": put(path, x)}
        if isinstance(x, np.ndarray):  # numpy's RNG key: uint32[624]
            return {"__ndarray__": put(path, torch.tensor(x))}
        sub = f"{path}." if path else ""
        if isinstance(x, list):
            return [enc(v, f"{sub}{i}") for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{sub}{i}") for i, v in enumerate(x)]}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: enc(v, f"{sub}{k}") for k, v in x.items()}}
            return {"__items__": [[enc(k, f"{sub}key"), enc(v, f"{sub}{k}")] for k, v in x.items()]}
        raise TypeError(f"flatten_state cannot store a {type(x).__name__} (at {path or 'the top'})")

    return tensors, enc(obj, "")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of ``flatten_state``: the same types, key types, dtypes and shapes."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        ((tag, val),) = x.items()
        if tag == "__tensor__":
            return tensors[val]
        if tag == "__ndarray__":
            return tensors[val].numpy()
        if tag == "__float__":
            return float(val)
        if tag == "__tuple__":
            return tuple(dec(v) for v in val)
        if tag == "__dict__":
            return {k: dec(v) for k, v in val.items()}
        if tag == "__items__":
            return {dec(k): dec(v) for k, v in val}
        raise ValueError(f"unknown tag {tag!r} in a state skeleton")

    return dec(skeleton)


# ---------------------------------------------------------------- RNG


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG a training step can draw from: dropout (torch), shuffling (generators),
    augmentation or sampling code (python ``random``, numpy) and CUDA kernels."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one uint8 tensor per device
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what ``capture_rng`` took; ``generators`` are the caller's fresh ones."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            have = sorted(state["generators"])
            raise TunesmithError(f"the checkpoint has no state for generator {name!r} (only {have}); start again")
        gen.set_state(state["generators"][name])


# ---------------------------------------------------------------- tensors


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors sharing memory, e.g. tied embeddings
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    st.save_file(out, str(path), metadata={"format": "pt"})  # "pt": transformers expects it


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    state_dicts: dict[str, dict[str, torch.Tensor]],
    optimizer_state: Any,
    scheduler_state: Any,
    rng_state: dict,
    cursor: dict,
    trainer_state: dict,
    config: dict,
    inputs: dict | None = None,
    keep_last: int | None = None,
    protect: Path | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-STEP`` atomically and return its path. ``keep_last=K``
    then deletes the lowest-step complete checkpoints beyond K, never the one just written
    nor ``protect`` (the newest good one, ``engine``), and incomplete ones below this step
    (nothing can resume from them)."""
    names = list(state_dicts)
    if clash := (_RESERVED & set(names)) | {n for n in names if names.count(n) > 1}:
        raise ValueError(f"checkpoint part names {sorted(clash)} are reserved or repeated")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    recover(root, _STEP_NAME)
    final = root / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        for name, sd in state_dicts.items():
            _save_tensors(sd, tmp / f"{name}.safetensors")
        for name, state in zip(_STATES, (optimizer_state, scheduler_state, rng_state)):
            tensors, skeleton = flatten_state(state)
            _save_tensors(tensors, tmp / f"{name}.safetensors")
            write_json(tmp / f"{name}.json", skeleton, allow_nan=False)  # floats are tagged
        for name, doc in zip(_DOCS, (cursor, trainer_state, config)):
            # default=str: a Path in the config is stored as its text, as config_diff compares it
            write_json(tmp / f"{name}.json", doc, indent=1, default=str)
        if inputs is not None:
            write_json(tmp / "inputs.json", inputs, indent=1)
        write_manifest(tmp, {"kind": "checkpoint", "step": step, "state_dicts": sorted(state_dicts)})
    if keep_last is not None:
        complete, incomplete = find_checkpoints(root)
        others = [p for p in complete if p != final]
        for p in others[: max(0, len(others) + 1 - keep_last)]:
            if protect is None or p.resolve() != Path(protect).resolve():
                remove_dir(p)
        for p, _ in incomplete:
            if step_of(p) < step:
                remove_dir(p)
    return final


def step_of(path: Path) -> int:
    """The step of a ``checkpoint-N`` folder (or of the ``.old-checkpoint-N-…`` a crash left)."""
    return int(re.search(r"checkpoint-(\d+)", path.name)[1])


def set_aside(output_dir: str | os.PathLike, after: int) -> list[Path]:
    """Rename the complete checkpoints above step ``after`` to ``diverged-checkpoint-N``
    (kept, but no longer what ``--resume`` picks); returns their new paths."""
    moved = []
    for p in find_checkpoints(output_dir)[0]:
        if step_of(p) > after:
            target = p.with_name(f"diverged-checkpoint-{step_of(p)}")
            if target.exists():
                target = p.with_name(f"diverged-checkpoint-{step_of(p)}-{secrets.token_hex(2)}")
            os.rename(p, target)
            moved.append(target)
    return moved


def find_checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(complete, incomplete)`` checkpoints under ``output_dir``, oldest step first.

    Complete = manifest present and every listed file there with its size (sha256 is
    checked by ``load_checkpoint``). ``incomplete`` pairs each skipped folder with why.
    ``.tmp-`` folders are ignored; an ``.old-checkpoint-N-*`` left by a crash while
    re-saving step N counts as checkpoint N when ``checkpoint-N`` itself is absent.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return [], []
    found: list[tuple[int, Path]] = []
    for p in root.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)|\.old-checkpoint-(\d+)-[a-z0-9_]+", p.name)
        if not m or not p.is_dir():
            continue
        if m[2] and (root / f"checkpoint-{m[2]}").exists():
            continue  # an .old- copy whose replacement did arrive: leftover garbage
        found.append((int(m[1] or m[2]), p))
    complete, incomplete = [], []
    for _, p in sorted(found):
        _, problem = manifest_problem(p, full=False)
        if problem:
            incomplete.append((p, problem))
        else:
            complete.append(p)
    return complete, incomplete


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest-step complete checkpoint, or None; see ``find_checkpoints``."""
    complete, _ = find_checkpoints(output_dir)
    return complete[-1] if complete else None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Verify every file's sha256, then read the checkpoint back (all tensors on CPU)."""
    folder = Path(path)
    manifest = verify_manifest(folder, kind="checkpoint", fix=_RESUME_FIX)
    if manifest.get("kind") != "checkpoint":
        raise TunesmithError(f"{folder} is not a tunesmith checkpoint; point --resume at a checkpoint-STEP folder")
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("state_dicts"), list):
        raise TunesmithError(f"checkpoint {folder}: {MANIFEST} is malformed (step or state_dicts); {_RESUME_FIX}")
    expected = [f"{n}.safetensors" for n in (*manifest["state_dicts"], *_STATES)]
    expected += [f"{n}.json" for n in (*_STATES, *_DOCS)]
    for name in expected:
        if name not in manifest["files"]:
            raise TunesmithError(f"checkpoint {folder}: {name} is missing; {_RESUME_FIX}")

    def state(name: str) -> Any:
        return unflatten_state(st.load_file(folder / f"{name}.safetensors"), read_json(folder / f"{name}.json"))

    return Checkpoint(
        path=folder,
        step=int(manifest["step"]),
        state_dicts={n: st.load_file(folder / f"{n}.safetensors") for n in manifest["state_dicts"]},
        optimizer_state=state("optimizer"),
        scheduler_state=state("scheduler"),
        rng_state=state("rng"),
        cursor=read_json(folder / "cursor.json"),
        trainer_state=read_json(folder / "trainer_state.json"),
        config=read_json(folder / "config.json"),
        manifest=manifest,
        inputs=read_json(folder / "inputs.json") if "inputs.json" in manifest["files"] else None,
    )


_MISSING = object()


def config_diff(old: dict, new: dict, ignore: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Dotted keys whose values differ between two configs, sorted. A key in ``ignore``
    skips its whole subtree ("train.output_dir", or "eval" for all of eval). Both sides go
    through the same JSON encoding first, so tuples equal lists and Paths equal strings."""
    old, new = (json.loads(json.dumps(c, default=str)) for c in (old, new))
    out: list[str] = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            dotted = prefix + key
            if dotted in ignore:
                continue
            va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, dotted + ".")
            elif va != vb or type(va) is not type(vb):
                out.append(dotted)

    walk(old, new, "")
    return out
