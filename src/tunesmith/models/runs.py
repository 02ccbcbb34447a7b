"""Reading what a training run wrote (``run.json``, ``config.yaml``, ``final/``) or an
export holds (``tunesmith.json``), and rebuilding the model a run's weights were trained on.

An adapter run whose ``init_from`` is another run's adapter was trained on base + that
adapter *merged* (``train.recipe.load_init``), so its adapter is only meaningful on top
of that merge. ``trained_base`` rebuilds it, following the chain of ``init_from``
adapters through each run's ``run.json``. Training, export and inference all use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tunesmith.errors import TunesmithError

EXPORT_MANIFEST = "tunesmith.json"  # written by tunesmith.export; marks an exported folder


@dataclass
class Run:
    """What a training run wrote: its folder, ``run.json``, ``config.yaml`` and ``final/``."""

    dir: Path
    manifest: dict  # run.json
    config: dict  # config.yaml as plain data (old runs must stay readable as the schema grows)

    @property
    def final(self) -> Path:
        return self.dir / "final"

    @property
    def is_adapter(self) -> bool:
        return (self.final / "adapter_config.json").exists()

    @property
    def init_from(self) -> Path | None:
        """The earlier run's final/ this run started from (runs written before lineage: None)."""
        p = self.manifest.get("init_from")
        return Path(p) if p else None

    @property
    def init_is_adapter(self) -> bool:
        return self.init_from is not None and (self.init_from / "adapter_config.json").exists()

    @property
    def method(self) -> str | None:
        return self.manifest.get("method") or self.config.get("method")

    @property
    def scoring(self) -> dict:
        """How the method's outputs are scored afterwards (``train.methods.registry``
        records it): ``{"rule", "loss_type", "beta", "per_token", "reference"}``."""
        return self.manifest.get("scoring") or {}


def read_run(run_dir: str | Path) -> Run:
    """A finished run folder, refused with the fix when it has no manifest or no final weights."""
    d = Path(run_dir)
    if not (d / "run.json").is_file():
        raise TunesmithError(f"{d} is not a tunesmith run folder (no run.json); point at the output_dir of "
                             f"`tunesmith train`")
    final = d / "final"
    weights = list(final.glob("*.safetensors")) if final.is_dir() else []
    if not weights or not ((final / "adapter_config.json").exists() or (final / "config.json").exists()):
        raise TunesmithError(f"run {d} has no final weights ({final} is missing or incomplete): the run did not "
                             f"finish; resume it with `tunesmith train CONFIG --resume`")
    cfg_path = d / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    return Run(d, json.loads((d / "run.json").read_text()), config or {})


def finished_run(folder: str | Path) -> dict | None:
    """``run.json`` of a run that finished in ``folder`` (``final/`` written, not stopped by a
    signal), else None — also when run.json is absent or cut short by a kill."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("stopped_by_signal") or not manifest.get("final"):
        return None
    return manifest if (folder / "final").is_dir() else None


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder ``path`` names — the folder itself or its ``final/`` — if it is one."""
    p = Path(path)
    if (p / "run.json").is_file():
        return p
    return p.parent if p.name == "final" and (p.parent / "run.json").is_file() else None


def run_of(folder: Path) -> Run | None:
    """The run a ``final/`` folder belongs to, if it sits inside one."""
    if folder.name == "final" and (folder.parent / "run.json").is_file():
        return read_run(folder.parent)
    return None


def weights_folder(path: str | Path) -> Path:
    """The folder holding a model's weights: a run folder means its ``final/``, any other
    folder is taken as it is (an export, a ``final/``, a Hugging Face folder)."""
    p = Path(path)
    if (p / "run.json").is_file() and (p / "final").is_dir():
        return p / "final"
    if not p.is_dir():
        raise TunesmithError(f"model folder {p} does not exist; give a run folder, its final/ or an export")
    return p


def read_export(folder: str | Path) -> dict:
    """An exported folder's ``tunesmith.json``."""
    return json.loads((Path(folder) / EXPORT_MANIFEST).read_text())


def base_folder(run: Run) -> Path:
    """The local folder of the run's base model, refused when it can no longer be found."""
    from tunesmith.models import resolve_model

    recorded = run.manifest.get("base_model_path")
    if recorded and (Path(recorded) / "config.json").exists():
        return Path(recorded)
    name = run.manifest.get("base_model") or run.config.get("model")
    try:
        return resolve_model(str(name))  # an embedded model is converted again when its cache is gone
    except TunesmithError as e:
        raise TunesmithError(f"the base model of run {run.dir} cannot be found ({name}, recorded at {recorded}): "
                             f"{e}") from None


def adapter_chain(run: Run) -> list[Path]:
    """The ``init_from`` adapters this run's weights sit on, oldest first (empty for most runs)."""
    chain: list[Path] = []
    while run.init_is_adapter:
        chain.insert(0, run.init_from)
        parent = run_of(run.init_from)
        if parent is None:  # an adapter from elsewhere: nothing further to follow
            break
        run = parent
    return chain


def run_task(run: Run) -> str:
    """"score" for a reward model (a sequence-classification head), else "causal"."""
    return "score" if run.manifest.get("method") == "reward" else "causal"


def trained_base(run: Run, dtype=torch.float32):
    """The model the run's final weights were trained on top of, in ``dtype``.

    No ``init_from``: the base. ``init_from`` full weights: those weights. ``init_from``
    an adapter: that run's own trained base with its adapter merged in, recursively. A run
    trained with ``trust_remote_code: true`` loads its base with it again.
    """
    from peft import PeftModel

    from tunesmith.models import load_model

    task = run_task(run)
    remote = bool(run.config.get("trust_remote_code"))
    if run.init_from is not None and not run.init_is_adapter:
        return load_model(str(run.init_from), dtype=dtype, task=task, trust_remote_code=remote)
    parent = run_of(run.init_from) if run.init_is_adapter and task == "causal" else None
    model = (trained_base(parent, dtype) if parent is not None
             else load_model(str(base_folder(run)), dtype=dtype, task=task, trust_remote_code=remote))
    if run.init_is_adapter:
        model = PeftModel.from_pretrained(model, run.init_from).merge_and_unload()
    return model
