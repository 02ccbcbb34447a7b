"""Load whatever a user points at: the one resolver behind chat, generate, eval, compare
and export.

    model, tokenizer, info = load_for_inference("runs/sft-demo")

A ``spec`` is one of four kinds (``resolve``):

- an exported folder (``tunesmith export``; holds tunesmith.json): merged weights, or the
  adapter on its recorded base;
- a run folder (holds run.json), or its ``final/``: the run's trained base (the base with
  any ``init_from`` adapters merged, ``models.runs.trained_base``) plus its adapter, kept
  as a ``PeftModel`` so callers can compare with ``model.disable_adapter()``; a full
  fine-tuning run's own weights; a reward model with its score head;
- a PEFT adapter folder: on the base named in its adapter_config.json;
- a base model name or folder (``models.resolve_model``), optionally with an adapter.

A run trained with ``trust_remote_code: true`` (its config.yaml) is loaded with it — its
weights, its rebuilt base, its reward model — and an export records it in tunesmith.json.

``resolve`` reads manifests and tokenizers but no weights, so a wrong spec fails before
anything heavy loads; what it returns says which weights the model runs on (``key``), so
that ``infer.pool`` can keep one copy of a base shared by several adapters. The tokenizer
carries the chat template the model was trained with, and a pad token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from tunesmith import console
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model, load_tokenizer, resolve_model
from tunesmith.models.load import load_scorer
from tunesmith.models.runs import (EXPORT_MANIFEST, Run, adapter_chain, base_folder, read_export, read_run,
                                   run_dir_of, run_of, run_task, trained_base)


def run_tokenizer(folder: Path):
    """The tokenizer saved beside a run's (or an export's) weights, with the chat template
    used in training (``tunesmith_template.json`` wins over what the tokenizer files say)."""
    tok = load_tokenizer(str(folder))
    recorded = folder / "tunesmith_template.json"
    if recorded.exists():
        tok.chat_template = json.loads(recorded.read_text())["chat_template"]
    return tok


def _grow_vocab(model, tokenizer) -> None:
    """Training grew the vocabulary for added ChatML tokens (``models.templates``)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def remote_code(run: Run) -> bool:
    """Whether the run trained with ``trust_remote_code: true`` (its config.yaml): its model
    class is code in the model folder, so every later load needs the same permission."""
    return bool(run.config.get("trust_remote_code"))


def load_run_model(run: Run, tokenizer, dtype=torch.float32):
    """A run's final model as it was trained: ``trained_base`` + its adapter as a
    ``PeftModel`` (a reward run's too: export writes the adapter and reference logits of
    exactly this model), or its full weights."""
    from peft import PeftModel

    if not run.is_adapter:
        return load_model(str(run.final), dtype=dtype, task=run_task(run), trust_remote_code=remote_code(run)).eval()
    model = trained_base(run, dtype)  # with the run's trust_remote_code
    _grow_vocab(model, tokenizer)
    return PeftModel.from_pretrained(model, run.final).eval()


def export_adapter_base(folder: Path, manifest: dict) -> str:
    """The base an exported adapter goes on: the recorded folder, or the base model again
    when only its cache is gone (an embedded model is converted anew); refused when the
    recorded base was an earlier run's full weights, which nothing can rebuild."""
    base = manifest["adapter_base_path"]
    if (Path(base) / "config.json").exists():
        return base
    if base != manifest["base_model_path"]:
        raise TunesmithError(f"the base of the adapter in {folder} is gone ({base}); pass it explicitly: "
                             f"`BASE_FOLDER --adapter {folder}`")
    return str(resolve_model(manifest["base_model"]))


# ---------------------------------------------------------------- resolving a spec


@dataclass
class Resolved:
    """One model, resolved but not loaded: what to call it, how to tokenize for it, the
    weights it runs on (``key``; equal keys share one copy) and the adapter switched on
    over them."""

    label: str  # the name tables use: the spec as given (made unique by the pool)
    spec: str
    kind: str  # "base", "run", "export" or "adapter"
    describe: str  # one line for the console
    tokenizer: Any
    key: tuple
    build: Callable[..., Any]  # build(dtype) → those weights, eval mode
    adapter: Path | None = None
    run: Run | None = None
    method: str | None = None  # training method when known: sft, dpo, reward, ...
    chat_template_source: str | None = None
    scoring: dict | None = None  # how the method's outputs are scored (models.runs.Run.scoring)
    chat_settings: dict | None = None  # an export's recorded data.reasoning / data.template_kwargs

    @property
    def chat(self):
        """The template switches the run trained with (``data.template_kwargs``, e.g. Qwen3's
        ``enable_thinking``), so prompts at inference render as in training."""
        from tunesmith.data.render import ChatOptions

        data = (self.run.config.get("data") or {}) if self.run is not None else (self.chat_settings or {})
        return ChatOptions(data.get("reasoning") or "train", dict(data.get("template_kwargs") or {}))

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


def load_weights(path: str | Path, dtype=torch.float32, trust_remote_code: bool = False):
    """A plain model folder in eval mode (``trust_remote_code``: its model class is code in the folder)."""
    return load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code).eval()


def _load_scorer(path: Path, dtype=torch.float32, trust_remote_code: bool = False):
    # merged onto its base, fp32: scores are compared across models
    return load_scorer(path, trust_remote_code=trust_remote_code)[0]


def trained_key(run: Run) -> tuple[str, ...]:
    """``trained_base(run)`` as a key: base folder (or init weights), then merged adapters."""
    if run.init_from is not None and not run.init_is_adapter:
        return (_folder_key(run.init_from),)
    parent = run_of(run.init_from) if run.init_is_adapter else None
    key = trained_key(parent) if parent is not None else (_folder_key(base_folder(run)),)
    return key + ((_folder_key(run.init_from),) if run.init_is_adapter else ())


def _from_run(run: Run) -> dict:
    method = run.method
    common = dict(kind="run", tokenizer=run_tokenizer(run.final), run=run, method=method, scoring=run.scoring,
                  chat_template_source=run.manifest.get("chat_template_source"))
    if not run.is_adapter and method != "reward":
        return dict(common, describe=f"run {run.dir}: full weights of {method}", key=(_folder_key(run.final),),
                    build=partial(load_weights, run.final, trust_remote_code=remote_code(run)))
    if method == "reward":
        return dict(common, describe=f"reward model {run.dir}", key=("scorer", _folder_key(run.final)),
                    build=partial(_load_scorer, run.final, trust_remote_code=remote_code(run)))
    chain = adapter_chain(run)
    extra = f" (on top of merged {', '.join(map(str, chain))})" if chain else ""
    return dict(common, describe=f"run {run.dir}: {method} adapter on {base_folder(run)}{extra}",
                key=trained_key(run), build=partial(trained_base, run), adapter=run.final)


def _from_export(folder: Path) -> dict:
    manifest = read_export(folder)
    common = dict(kind="export", tokenizer=run_tokenizer(folder), method=manifest.get("method"),
                  scoring=manifest.get("scoring"), chat_template_source=manifest.get("chat_template_source"),
                  chat_settings=manifest.get("chat"))
    remote = bool(manifest.get("trust_remote_code"))  # the run's setting, recorded at export
    if manifest["format"] == "merged":
        return dict(common, describe=f"exported merged model {folder}", key=(_folder_key(folder),),
                    build=partial(load_weights, folder, trust_remote_code=remote))
    base = export_adapter_base(folder, manifest)
    return dict(common, describe=f"exported adapter {folder} on {base}", key=(_folder_key(base),),
                build=partial(load_weights, base, trust_remote_code=remote), adapter=folder)


def _from_adapter(folder: Path, base: str | None = None) -> dict:
    if not (folder / "adapter_config.json").is_file():
        raise TunesmithError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    run = run_of(folder)
    if run is not None and run.init_is_adapter:
        console.warn(f"{folder} was trained on top of the merged adapter {run.init_from}; loading it on a plain "
                     f"base gives a different model: pass the run folder {run.dir} instead")
    base = str(resolve_model(base or json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]))
    tok = run_tokenizer(folder) if (folder / "tokenizer_config.json").exists() else load_tokenizer(base)
    return dict(kind="adapter", describe=f"adapter {folder} on {base}", tokenizer=tok, key=(_folder_key(base),),
                build=partial(load_weights, base), adapter=folder)


def _from_base(spec: str) -> dict:
    folder = resolve_model(spec)
    return dict(kind="base", describe=f"base model {spec}", tokenizer=load_tokenizer(spec),
                key=(_folder_key(folder),), build=partial(load_weights, folder))


def resolve(spec: str | Path | tuple, label: str | None = None) -> Resolved:
    """A ``Resolved`` for ``spec`` (export, run, run/final, adapter folder, base model, or a
    ``(base, adapter folder)`` pair), no weights loaded."""
    if isinstance(spec, tuple):
        fields = _from_adapter(Path(spec[1]), str(spec[0]))
        spec = f"{spec[0]}+{spec[1]}"
    else:
        p, spec = Path(spec), str(spec)
        run_dir = run_dir_of(p)
        if (p / EXPORT_MANIFEST).is_file():
            fields = _from_export(p)
        elif run_dir is not None:
            fields = _from_run(read_run(run_dir))
        elif (p / "adapter_config.json").is_file():
            fields = _from_adapter(p)
        else:
            fields = _from_base(spec)
    # A run that added tokens needs resized embeddings: another copy of the weights.
    fields["key"] = fields["key"] + (len(fields["tokenizer"]),)
    return Resolved(label=label or spec, spec=spec, **fields)


def build_weights(resolved: Resolved, dtype=torch.float32):
    """The weights ``resolved`` runs on, in ``dtype``, with the vocabulary its tokenizer needs."""
    model = resolved.build(dtype)
    if not resolved.is_scorer:
        _grow_vocab(model, resolved.tokenizer)
    return model


def load_for_inference(spec: str | Path, adapter: str | Path | None = None, dtype=torch.float32):
    """``(model, tokenizer, resolved)`` for generation, in eval mode, on CPU, in ``dtype``;
    ``adapter`` puts a PEFT folder on ``spec`` (a base). ``resolved.kind`` and
    ``resolved.describe`` say what was loaded."""
    from peft import PeftModel

    resolved = resolve((str(spec), str(adapter)) if adapter is not None else spec)
    model = build_weights(resolved, dtype)
    if resolved.adapter is not None:
        model = PeftModel.from_pretrained(model, resolved.adapter)
    return model.eval(), resolved.tokenizer, resolved
