"""The inference core: load whatever a user points at, and generate from chat prompts.

    model, tokenizer, info = load_for_inference("runs/sft-demo")
    texts = generate(model, tokenizer, [[{"role": "user", "content": "Say hi."}]], max_new_tokens=64)

``load_for_inference`` understands four kinds of ``spec`` (see its docstring); the
export, chat, generate and evaluation commands all load through it, so a model behaves
the same wherever it is used. A run's adapter stays a ``PeftModel`` so that callers can
compare against the model it was trained on with ``model.disable_adapter()``.

What a run trained on (the ``init_from`` chain) is rebuilt by ``models.runs.trained_base``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tunesmith import console
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import GENERATION_BATCH

from tunesmith.models.adapters import merged_adapter
from tunesmith.models.runs import Run, adapter_chain, base_folder, read_run, run_of, run_task, trained_base

EXPORT_MANIFEST = "tunesmith.json"  # written by tunesmith.export; marks an exported folder


def run_tokenizer(folder: Path):
    """The tokenizer saved beside a run's (or an export's) weights, with the chat template
    used in training (``tunesmith_template.json`` wins over what the tokenizer files say)."""
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(str(folder))
    recorded = folder / "tunesmith_template.json"
    if recorded.exists():
        tok.chat_template = json.loads(recorded.read_text())["chat_template"]
    return tok


def load_run_model(run: Run, tokenizer, dtype=torch.float32):
    """A run's final model: ``trained_base`` + its adapter as a ``PeftModel``, or its full weights."""
    from peft import PeftModel

    from tunesmith.models import load_model

    if not run.is_adapter:
        return load_model(str(run.final), dtype=dtype, task=run_task(run)).eval()
    model = trained_base(run, dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The recipe grew the vocabulary for added ChatML tokens (see data.templates).
        model.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(model, run.final).eval()


# ---------------------------------------------------------------- load_for_inference


@dataclass
class InferenceInfo:
    """What ``load_for_inference`` loaded, for reports: ``kind`` is one of "export",
    "run", "adapter" or "base"; ``describe`` is one line for the console."""

    kind: str
    base: str
    adapter: str | None
    chat_template_source: str | None
    describe: str


def _peft_on(base_spec: str, adapter: Path, dtype):
    from peft import PeftModel

    from tunesmith.models import load_model

    return PeftModel.from_pretrained(load_model(base_spec, dtype=dtype), adapter).eval()


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
    from tunesmith.models import resolve_model

    return str(resolve_model(manifest["base_model"]))


def _load_export(folder: Path, dtype):
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    tok = run_tokenizer(folder)
    if manifest["format"] == "merged":
        from tunesmith.models import load_model

        model = load_model(str(folder), dtype=dtype).eval()
        return model, tok, InferenceInfo("export", str(folder), None, manifest.get("chat_template_source"),
                                         f"exported merged model {folder}")
    base = export_adapter_base(folder, manifest)
    model = _peft_on(base, folder, dtype)
    return model, tok, InferenceInfo("export", str(base), str(folder), manifest.get("chat_template_source"),
                                     f"exported adapter {folder} on {base}")


def _load_run(run: Run, dtype):
    tok = run_tokenizer(run.final)
    model = load_run_model(run, tok, dtype)
    chain = adapter_chain(run)
    base = str(base_folder(run))
    what = "adapter" if run.is_adapter else "full weights"
    extra = f" (on top of merged {', '.join(map(str, chain))})" if chain else ""
    return model, tok, InferenceInfo("run", base, str(run.final) if run.is_adapter else None,
                                     run.manifest.get("chat_template_source"),
                                     f"run {run.dir}: {what} of {run.manifest.get('method')} on {base}{extra}")


def _load_adapter(base: str | None, adapter: Path, dtype):
    """A PEFT folder on ``base`` (default: the folder's own base_model_name_or_path)."""
    run = run_of(adapter)
    if run is not None and run.init_is_adapter:
        console.warn(f"{adapter} was trained on top of the merged adapter {run.init_from}; loading it on a plain "
                     f"base gives a different model: pass the run folder {run.dir} instead")
    if base is None:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = _peft_on(str(base), adapter, dtype)
    has_tok = (adapter / "tokenizer_config.json").exists()
    from tunesmith.models import load_tokenizer

    tok = run_tokenizer(adapter) if has_tok else load_tokenizer(str(base))
    return model, tok, InferenceInfo("adapter", str(base), str(adapter), None, f"adapter {adapter} on {base}")


def load_for_inference(spec: str | Path, adapter: str | Path | None = None, dtype=torch.float32):
    """Load ``(model, tokenizer, info)`` for generation, in eval mode, on CPU, in ``dtype``.

    ``spec`` may be:
      - an exported folder (``tunesmith export``; holds tunesmith.json): merged weights,
        or the adapter on its recorded base;
      - a run folder (holds run.json), or its ``final/``: the run's base with any
        ``init_from`` adapters merged (see ``trained_base``) plus its adapter, kept as a
        ``PeftModel``; a full fine-tuning run's own weights;
      - a PEFT adapter folder: on the base named in its adapter_config.json;
      - a base model name or folder (``resolve_model``), optionally with ``adapter``.
    The tokenizer carries the chat template the model was trained with, and a pad token.
    """
    p = Path(spec)
    if adapter is not None:
        return _load_adapter(str(spec), Path(adapter), dtype)
    if (p / EXPORT_MANIFEST).is_file():
        return _load_export(p, dtype)
    if (p / "run.json").is_file():
        return _load_run(read_run(p), dtype)
    run = run_of(p)
    if run is not None:
        return _load_run(run, dtype)
    if (p / "adapter_config.json").is_file():
        return _load_adapter(None, p, dtype)
    from tunesmith.models import load_model, load_tokenizer

    model = load_model(str(spec), dtype=dtype).eval()
    return model, load_tokenizer(str(spec)), InferenceInfo("base", str(spec), None, None, f"base model {spec}")


# ---------------------------------------------------------------- generation


def _settings(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """A complete GenerationConfig from our flags alone: a model's shipped sampling defaults
    (top_k, repetition_penalty, ...) would otherwise change results behind the user's back.
    Generation stops at the tokenizer's EOS and at any EOS the model's own config names."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = list(dict.fromkeys([tokenizer.eos_token_id, *eos]))
    sample = temperature > 0
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                            temperature=temperature if sample else None, top_p=top_p if sample else None,
                            top_k=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt's last token sits at the same position and new tokens
    are appended right after it. Returns (input_ids, attention_mask), both [B, T] int64."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


class _Bar:
    """A rich progress bar on stderr (through the console), or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=console.console)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = GENERATION_BATCH,
             progress: bool = False) -> list[str]:
    """One completion per prompt (a message list ending with a user turn), in input order.

    Prompts are rendered with the chat template and its generation prompt
    (``data.tokenize.tokenize_prompt``), sorted by length so a batch pads little, left
    padded, and decoded with the KV cache (``model.generate``) until EOS or
    ``max_new_tokens``. ``temperature`` 0 is greedy and deterministic; otherwise
    sampling with ``top_p`` draws from a torch generator seeded with ``seed`` (the
    caller's global RNG state is left as it was).
    """
    from tunesmith.data.tokenize import tokenize_prompt

    config = _settings(model, tokenizer, max_new_tokens, temperature, top_p)
    ids = [tokenize_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    bar = _Bar(progress, len(ids), "generate")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                input_ids, mask = _left_pad([ids[i] for i in batch], tokenizer.pad_token_id)
                with merged_adapter(model):
                    new = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
                texts = tokenizer.batch_decode(new[:, input_ids.shape[1]:], skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    out[i] = text
                bar.advance(len(batch))
    finally:
        bar.close()
    return out


def stream(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
    """The reply to one conversation as text pieces, as they are decoded (for chat).

    ``model.generate`` runs in a thread feeding a ``TextIteratorStreamer``; the pieces
    joined equal ``generate(...)`` for the same settings.
    """
    import threading

    from transformers import TextIteratorStreamer

    from tunesmith.data.tokenize import tokenize_prompt

    config = _settings(model, tokenizer, max_new_tokens, temperature, top_p)
    input_ids = torch.tensor([tokenize_prompt(messages, tokenizer)], dtype=torch.long)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=[]), merged_adapter(model):
                torch.manual_seed(seed)
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               generation_config=config, streamer=streamer)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- prompt files


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records through the data layer: ``prompt`` (a string) or ``messages`` ending
    with a user turn, one format per file. Returns canonical prompt records
    ``{"prompt": [Message], "meta": {...}}`` (an ``id`` column lands in ``meta``)."""
    from tunesmith.data.validate import load_records

    return load_records([path], expect={"prompt"}, purpose="generation")


def completion_record(record: dict, completion: str) -> dict:
    """An output line: id (when the input had one), the prompt as given, the completion.
    A lone user message is written back as a plain string, anything else as messages."""
    out = {"id": record["meta"]["id"]} if "id" in (record.get("meta") or {}) else {}
    p = record["prompt"]
    out["prompt"] = p[0]["content"] if len(p) == 1 and p[0]["role"] == "user" else p
    out["completion"] = completion
    return out
