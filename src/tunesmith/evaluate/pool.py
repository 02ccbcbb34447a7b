"""Several models for one evaluation, with each set of base weights in memory once.

    pool = ModelPool(["smollm2-135m-instruct", "runs/sft-a", "runs/sft-b", "runs/dpo-on-sft-a"])
    for member in pool.load_order():
        with pool.use(member) as model:
            generate(model, member.tokenizer, prompts)

Why: comparing a base with three LoRA runs on it would otherwise hold four copies of the
base (SmolLM2-135M in fp32: 4 x 540 MB, and four loads). Members are grouped by ``key``,
the weights their adapter sits on, spelled the way ``models.runs.trained_base`` builds them:

- a base model, a plain adapter run, an adapter folder or an adapter export: the base folder;
- a run started from another run's adapter (DPO on top of SFT): the base + that chain of
  merged adapters — numerically another model, so it gets its own copy;
- a full fine-tuning run or a merged export: its own folder;
- a reward model (``method: reward``): its own folder, loaded with ``load_scorer``;

plus the tokenizer's length (a run that added tokens needs resized embeddings). In a
group, the first adapter is attached with ``PeftModel.from_pretrained``, the others with
``load_adapter``, each under its own name, and ``set_adapter`` picks one; the plain base
runs under ``disable_adapter()``. Groups load one at a time; the previous one is dropped.

Every spec is resolved (manifest, tokenizer with the chat template recorded at training)
when the pool is built, so a wrong spec fails before any weights load. Specs mean what
they mean for ``generation.load_for_inference``.
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tunesmith.errors import TunesmithError
from tunesmith.evaluate.generation import EXPORT_MANIFEST, export_adapter_base, run_tokenizer
from tunesmith.models.runs import Run, adapter_chain, base_folder, read_run, run_of, trained_base


@dataclass
class Member:
    """One model of an evaluation: what to call it, how to tokenize for it, what it runs on."""

    label: str  # the name tables use: the spec as given (made unique)
    spec: str
    kind: str  # "base", "run", "export" or "adapter", as generation.InferenceInfo.kind
    describe: str
    tokenizer: Any
    key: tuple  # the weights it runs on (module docstring); members with equal keys share them
    build: Callable[[], Any]  # loads those weights (fp32, eval mode)
    adapter: Path | None = None  # switched on over the shared weights
    run: Run | None = None
    method: str | None = None  # training method when known: sft, dpo, reward, ...
    chat_template_source: str | None = None

    @property
    def is_scorer(self) -> bool:
        """A reward model scores conversations; it cannot generate."""
        return self.method == "reward"

    def info(self) -> dict:
        return {"label": self.label, "spec": self.spec, "kind": self.kind, "describe": self.describe,
                "method": self.method, "adapter": str(self.adapter) if self.adapter else None,
                "chat_template_source": self.chat_template_source}


def _folder_key(path: str | Path) -> str:
    return str(Path(path).resolve())


def _load(path: str | Path):
    from tunesmith.models import load_model

    return load_model(str(path), dtype=torch.float32).eval()


def _load_scorer(path: Path):
    from tunesmith.models.load import load_scorer

    return load_scorer(path)[0]


def trained_key(run: Run) -> tuple[str, ...]:
    """``trained_base(run)`` as a key: base folder (or init weights), then merged adapters."""
    if run.init_from is not None and not run.init_is_adapter:
        return (_folder_key(run.init_from),)
    parent = run_of(run.init_from) if run.init_is_adapter else None
    key = trained_key(parent) if parent is not None else (_folder_key(base_folder(run)),)
    return key + ((_folder_key(run.init_from),) if run.init_is_adapter else ())


def _from_run(run: Run) -> dict:
    tok = run_tokenizer(run.final)
    method = run.manifest.get("method") or run.config.get("method")
    common = dict(kind="run", tokenizer=tok, run=run, method=method,
                  chat_template_source=run.manifest.get("chat_template_source"))
    if method == "reward":
        return dict(common, describe=f"reward model {run.dir}", key=("scorer", _folder_key(run.final)),
                    build=partial(_load_scorer, run.final))
    if not run.is_adapter:
        return dict(common, describe=f"run {run.dir}: full weights of {method}", key=(_folder_key(run.final),),
                    build=partial(_load, run.final))
    chain = adapter_chain(run)
    extra = f" (on top of merged {', '.join(map(str, chain))})" if chain else ""
    return dict(common, describe=f"run {run.dir}: {method} adapter on {base_folder(run)}{extra}",
                key=trained_key(run), build=partial(trained_base, run, torch.float32), adapter=run.final)


def _from_export(folder: Path) -> dict:
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    common = dict(kind="export", tokenizer=run_tokenizer(folder), method=manifest.get("method"),
                  chat_template_source=manifest.get("chat_template_source"))
    if manifest["format"] == "merged":
        return dict(common, describe=f"exported merged model {folder}", key=(_folder_key(folder),),
                    build=partial(_load, folder))
    base = export_adapter_base(folder, manifest)
    return dict(common, describe=f"exported adapter {folder} on {base}", key=(_folder_key(base),),
                build=partial(_load, base), adapter=folder)


def _from_adapter(folder: Path, base: str | None = None) -> dict:
    from tunesmith.models import load_tokenizer, resolve_model

    if not (folder / "adapter_config.json").is_file():
        raise TunesmithError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    base = str(resolve_model(base or json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]))
    tok = run_tokenizer(folder) if (folder / "tokenizer_config.json").exists() else load_tokenizer(base)
    return dict(kind="adapter", describe=f"adapter {folder} on {base}", tokenizer=tok, key=(_folder_key(base),),
                build=partial(_load, base), adapter=folder)


def _from_base(spec: str) -> dict:
    from tunesmith.models import load_tokenizer, resolve_model

    folder = resolve_model(spec)
    return dict(kind="base", describe=f"base model {spec}", tokenizer=load_tokenizer(spec),
                key=(_folder_key(folder),), build=partial(_load, folder))


def resolve(spec: str | tuple[str, str], label: str | None = None) -> Member:
    """A ``Member`` for ``spec`` (export, run, run/final, adapter folder, base model, or a
    ``(base, adapter folder)`` pair), no weights loaded."""
    if isinstance(spec, tuple):
        fields = _from_adapter(Path(spec[1]), str(spec[0]))
        spec = f"{spec[0]}+{spec[1]}"
        fields["key"] = fields["key"] + (len(fields["tokenizer"]),)
        return Member(label=label or spec, spec=spec, **fields)
    p = Path(spec)
    if (p / EXPORT_MANIFEST).is_file():
        fields = _from_export(p)
    elif (p / "run.json").is_file() or run_of(p) is not None:
        fields = _from_run(read_run(p) if (p / "run.json").is_file() else run_of(p))
    elif (p / "adapter_config.json").is_file():
        fields = _from_adapter(p)
    else:
        fields = _from_base(spec)
    fields["key"] = fields["key"] + (len(fields["tokenizer"]),)
    return Member(label=label or spec, spec=spec, **fields)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    labels = []
    for s in names:
        seen[s] = seen.get(s, 0) + 1
        labels.append(s if seen[s] == 1 else f"{s} ({seen[s]})")
    return labels


@dataclass
class ModelPool:
    """The members of one evaluation and the one group of weights currently in memory."""

    specs: list  # str specs, or (base, adapter folder) pairs
    labels: list[str] | None = None  # names for tables; default: the specs as given ("BASE+ADAPTER" for pairs)
    members: list[Member] = field(init=False)
    loads: int = field(init=False, default=0)  # groups loaded so far (tests check the sharing)

    def __post_init__(self):
        if not self.specs:
            raise TunesmithError("no model to evaluate; give at least one run folder, export or base model")
        if self.labels is not None and len(self.labels) != len(self.specs):
            raise TunesmithError(f"{len(self.labels)} labels for {len(self.specs)} models; give one label per model")
        labels = _unique([x if isinstance(x, str) else "+".join(map(str, x)) for x in (self.labels or self.specs)])
        self.members = [resolve(s, label) for s, label in zip(self.specs, labels)]
        self._key: tuple | None = None
        self._model = None
        self._names: dict[str, str] = {}

    def load_order(self) -> list[Member]:
        """Members grouped by key (in order of first appearance), so each group loads once."""
        first = {}
        for i, m in enumerate(self.members):
            first.setdefault(m.key, i)
        return sorted(self.members, key=lambda m: first[m.key])

    def groups(self) -> list[list[str]]:
        """Labels that share weights, one list per group."""
        out: dict[tuple, list[str]] = {}
        for m in self.load_order():
            out.setdefault(m.key, []).append(m.label)
        return list(out.values())

    def _activate(self, key: tuple):
        if self._key == key:
            return self._model
        self._model, self._key, self._names = None, None, {}
        gc.collect()
        group = [m for m in self.members if m.key == key]
        model = group[0].build()
        self.loads += 1
        vocab = len(group[0].tokenizer)
        if not group[0].is_scorer and vocab > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab)  # the run grew the vocabulary (data.templates)
        for m in (m for m in group if m.adapter is not None):
            name = self._names[m.label] = f"m{len(self._names)}"  # PEFT names are module keys: no dots
            if len(self._names) == 1:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, m.adapter, adapter_name=name)
            else:
                model.load_adapter(m.adapter, adapter_name=name)
        self._model, self._key = model.eval(), key
        return self._model

    @contextmanager
    def use(self, member: Member) -> Iterator[Any]:
        """The member's model: its group's weights with its own adapter on (or none)."""
        from peft import PeftModel

        model = self._activate(member.key)
        if member.adapter is not None:
            model.set_adapter(self._names[member.label])
            yield model
        elif isinstance(model, PeftModel):  # the plain base of a group that holds adapters
            with model.disable_adapter():
                yield model
        else:
            yield model

    @staticmethod
    def has_reference(member: Member) -> bool:
        """Whether ``reference`` can give the model this one was trained from."""
        return member.adapter is not None or member.run is not None

    @contextmanager
    def reference(self, member: Member) -> Iterator[Any]:
        """The model ``member`` was trained from, as DPO's reference: ``preference.ref_model``
        when the run named one; else the adapter switched off (the run's trained base, no
        second copy); else, for full fine-tuning, ``trained_base`` loaded beside it."""
        ref_name = ((member.run.config.get("preference") or {}).get("ref_model")) if member.run else None
        if ref_name:
            yield _load(ref_name)
        elif member.adapter is not None:
            model = self._activate(member.key)
            with model.disable_adapter():
                yield model
        elif member.run is not None:
            yield trained_base(member.run, torch.float32).eval()
        else:
            raise TunesmithError(f"{member.label} records no model it was trained from; evaluate the run folder")


@dataclass
class Subject:
    """The model under evaluation as a suite sees it: the loaded model with the member's
    adapter on, the member's tokenizer, and the way to the model it was trained from."""

    member: Member
    model: Any
    pool: ModelPool

    @property
    def tokenizer(self):
        return self.member.tokenizer

    def has_reference(self) -> bool:
        return self.pool.has_reference(self.member)

    def reference(self):
        return self.pool.reference(self.member)
