"""The training recipe: validate → build model, tokenizer and data → report → train → save.

    tunesmith train examples/sft-lora.yaml

Reads top to bottom (``run``). What differs between methods — which records they accept,
how they are prepared, the reference, the object that collates and computes the loss,
how the result is scored afterwards — is one row of ``train/methods/registry.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch

from tunesmith import console, hardware
from tunesmith.config import RunConfig, TrainConfig, dump_yaml
from tunesmith.data import mix
from tunesmith.errors import TunesmithError
from tunesmith.files import FolderLock, atomic_dir, dumps, folder_hash, sha256_file, weights_hash, write_text_atomic
from tunesmith.models import load_model, load_tokenizer, resolve_model
from tunesmith.models.load import tokenizer_files
from tunesmith.models import compile as compiling
from tunesmith.models.adapters import attach_lora, check_qlora_supported, count_parameters, quantization_config
from tunesmith.models.forward import SequenceLogProbs, TokenLogProbs
from tunesmith.models.runs import finished_run, run_of, trained_base
from tunesmith.models.templates import ensure_chat_template
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed
from tunesmith.train import memory
from tunesmith.train import trackers
from tunesmith.train.engine import LoopArgs, fit
from tunesmith.train.methods import reference as refs
from tunesmith.train.methods.registry import BuildContext, MethodRow, row

# Keys that may change between a run and its --resume without altering training.
RESUME_IGNORE = frozenset({"resume", "output_dir", "report_to", "train.save_steps", "train.save_total_limit",
                           "train.eval_steps", "train.logging_steps", "train.threads", "train.compile",
                           "train.distributed", "data.eval"})


def _count(n: int) -> str:
    """2_400_000 → '2.4M', 134_515_008 → '134.5M', 7_424 → '7.4K'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.{1 if n >= 10 * div else 2}f}{unit}"
    return str(n)


def _qlora(cfg: RunConfig) -> bool:
    """A LoRA run on a 4-bit base."""
    return cfg.lora is not None and cfg.lora.qlora


def _as_list(x) -> list[str]:
    return [] if x is None else [x] if isinstance(x, str) else list(x)


# ---------------------------------------------------------------- data


@dataclass
class Prepared:
    train: list
    eval: list
    lengths: list[int]
    dropped: int
    truncated: int
    trained_tokens: int
    formatting: Any = None  # data.tokenize.Formatting of the SFT train split (append or per-turn)


def prepare_data(cfg: RunConfig, tokenizer, method: MethodRow | None = None) -> Prepared:
    """Read, validate and prepare the train and eval splits for the run's method."""
    from tunesmith.data.validate import load_records, load_training

    method = method or row(cfg)
    # with the tokenizer, a special token inside a record's text is refused at file:line:field
    read = dict(format=cfg.data.format, columns=cfg.data.columns, expect=set(method.kinds), tokenizer=tokenizer,
                special_tokens_in_content=cfg.data.special_tokens_in_content)
    train_recs, eval_recs = load_training(cfg.data.train, 0.0 if cfg.data.eval else cfg.data.eval_split,
                                          cfg.train.seed, **read)
    if cfg.data.eval:
        eval_recs = load_records(_as_list(cfg.data.eval), **read)
    elif eval_recs:
        _split_overlap(train_recs, eval_recs)
    train = method.prepare(train_recs, tokenizer, cfg, "training")
    evals = method.prepare(eval_recs, tokenizer, cfg, "eval")
    if eval_recs and not evals.items:
        raise TunesmithError(f"every one of the {len(eval_recs)} eval records would lose all its trained tokens at "
                             f"data.max_length={cfg.data.max_length}, so the run would have no eval; raise "
                             f"data.max_length or shorten the eval records")
    return Prepared(train.items, evals.items, train.lengths, train.dropped, train.truncated, train.trained,
                    train.formatting)


def _split_overlap(train_recs: list, eval_recs: list) -> None:
    """``data.eval_split`` checked as ``data curate`` checks its split: train records sharing
    a 13-word span with a held-out one make the eval loss look better than it is (said, not
    changed: the run trains on what it was given)."""
    from tunesmith.data.curate import split_overlap

    unique = list({id(r): r for r in train_recs}.values())  # a mix's copies count once
    n, example = split_overlap(unique, eval_recs)
    if n:
        console.warn(f"data.eval_split: {n} of {len(unique)} train records share a 13-word span with a held-out "
                     f"record (e.g. \"{example}\"), so the eval loss flatters the model; curate the data first "
                     f"(tunesmith data curate FILE --split {len(eval_recs) / (len(unique) + len(eval_recs)):.2g}) "
                     f"and train on its OUT-train.jsonl with data.eval: OUT-eval.jsonl")


# ---------------------------------------------------------------- model and reference


def load_init(model, init_from: str, task: str = "causal", trust_remote_code: bool = False):
    """Start from an earlier run's final/: an adapter is merged into the base (the new
    adapter then trains on top, and disabling it gives the SFT model as reference); a
    full-weights folder replaces the base. A reward model (``task="score"``) takes the
    SFT run's transformer the same way, with a new score head."""
    from peft import PeftModel

    p = Path(init_from)
    if (p / "adapter_config.json").exists():
        parent = run_of(p)
        if parent is not None and parent.init_from is not None and task == "causal":
            model = trained_base(parent)  # that adapter itself sat on an earlier merge (SFT → DPO → DPO)
        return PeftModel.from_pretrained(model, p).merge_and_unload()
    if (p / "config.json").exists():
        return load_model(str(p), task=task, trust_remote_code=trust_remote_code)
    raise TunesmithError(f"init_from: {p} holds neither an adapter (adapter_config.json) nor model weights "
                         f"(config.json); point it at an earlier run's final/ folder")


def build_model(cfg: RunConfig, method: MethodRow, tokenizer, template_source: str, dtype, is_main: bool):
    """The policy: the base (4-bit for QLoRA), started from ``init_from``, the vocabulary
    grown for added template tokens, and the adapter attached."""
    quantized = _qlora(cfg)
    kwargs = {"quantization_config": quantization_config(dtype)} if quantized else {}
    model = load_model(cfg.model, dtype=torch.float32 if not quantized else dtype,
                       trust_remote_code=cfg.trust_remote_code, task=method.task, **kwargs)
    if method.task == "score":
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.init_from:
        model = load_init(model, cfg.init_from, method.task, cfg.trust_remote_code)
    model.config.use_cache = False
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # ensure_chat_template added ChatML tokens to a template-less tokenizer (as TRL's
        # setup_chat_format does): their embeddings start untrained.
        model.resize_token_embeddings(len(tokenizer))
        if is_main:
            console.warn(f"added {template_source} control tokens: embeddings resized to {len(tokenizer)}; "
                         f"with LoRA set `lora.modules_to_save: [embed_tokens, lm_head]` so they train")
    if cfg.lora is not None:
        lo = cfg.lora
        model = attach_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules,
                            rslora=lo.rslora, dora=lo.dora, modules_to_save=lo.modules_to_save, quantized=quantized,
                            task_type="SEQ_CLS" if method.task == "score" else "CAUSAL_LM")
    return model


def build_reference(cfg: RunConfig, kind: str | None, model, device):
    """The frozen reference (a ``SequenceLogProbs``, or ``TokenLogProbs`` for GRPO's KL), or
    None when the policy's own adapter-disabled pass is the reference (LoRA), the method
    has none, or a full fine-tuning run precomputes from its own starting weights."""
    p = cfg.preference
    if kind is None:
        if p is not None and (p.precompute_ref or p.ref_model):
            raise TunesmithError(f"method {cfg.method} is reference-free; remove preference.precompute_ref and "
                                 f"preference.ref_model")
        return None
    wrap = TokenLogProbs if kind == "token" else SequenceLogProbs
    if p is not None and p.ref_model:
        where = Path(p.ref_model)
        if (where / "adapter_config.json").exists():  # an adapter run's final/: base + adapter, merged
            ref = load_init(load_model(cfg.model, trust_remote_code=cfg.trust_remote_code), str(where),
                            trust_remote_code=cfg.trust_remote_code)
        else:
            ref = load_model(p.ref_model, trust_remote_code=cfg.trust_remote_code)
    elif cfg.lora is None and not (p is not None and p.precompute_ref):
        ref = copy.deepcopy(model)  # full fine-tuning: a frozen copy of the starting weights
    else:
        return None
    return wrap(ref.requires_grad_(False).eval().to(device))


def precompute_reference(cfg: RunConfig, method, model, ref_model, data: Prepared, out: Path, accelerator, dtype,
                         model_dir: Path, autocast) -> str:
    """Compute the reference log-probs of every train/eval item once (or reuse the ones
    stored in the run folder for the same model and tokens), attach them to the items,
    and say what that saves."""
    p = cfg.preference
    parts = {"model": str(model_dir), "weights": weights_hash(model_dir), "init_from": cfg.init_from,
             "ref_model": p.ref_model, "adapter": cfg.lora is not None, "dtype": str(dtype)}
    key = refs.items_key(parts, {"train": data.train, "eval": data.eval})
    values = refs.load(out, key)
    reused = values is not None
    started = time.time()
    if values is None:
        if accelerator.is_main_process:
            model.to(accelerator.device).eval()
            policy = SequenceLogProbs(model)
            # No ref model: LoRA disables its adapter; full fine-tuning uses its own starting weights.
            source = ref_model if ref_model is not None else None if cfg.lora is not None else policy
            from rich.progress import Progress

            with Progress(*Progress.get_default_columns(), console=console.console) as bar:
                task = bar.add_task("reference log-probs", total=len(data.train) + len(data.eval))
                values = {name: refs.compute(method, refs.Reference(source), policy, items, cfg.train.batch_size,
                                             autocast, progress=lambda n: bar.advance(task, n))
                          for name, items in (("train", data.train), ("eval", data.eval))}
            refs.save(out, key, values)
            model.train()
        accelerator.wait_for_everyone()
        values = refs.load(out, key)
    data.train = refs.attach(data.train, values["train"])
    data.eval = refs.attach(data.eval, values["eval"])
    how = (f"reused from {out / refs.REF_FILE}" if reused
           else f"computed in {time.time() - started:.0f} s and stored in {out / refs.REF_FILE}")
    if ref_model is not None:
        gain = f"the reference model is not kept in memory (saves {count_params_bytes(ref_model) / 2**30:.2f} GiB)"
    elif cfg.lora is None:
        gain = f"no frozen copy of the model is kept (saves {count_params_bytes(model) / 2**30:.2f} GiB)"
    else:
        gain = "no adapter-disabled reference forward runs during training"
    return f"precompute_ref: reference log-probs of {len(data.train)} + {len(data.eval)} items {how}; {gain}"


def count_params_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


def processed_tokens(batch: dict) -> tuple[int, int]:
    """(real tokens, processed tokens) of a batch: padding counts as processed only."""
    ids = batch["input_ids"]
    if "real_tokens" in batch:
        return int(batch["real_tokens"]), ids.numel()
    mask = batch.get("attention_mask")
    real = int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()
    return real, ids.numel()


# ---------------------------------------------------------------- the steps of run()


def _validate(cfg: RunConfig, out: Path, resume: bool) -> MethodRow:
    """Every refusal that needs no weights: the method's own, files, trackers, a finished run."""
    method = row(cfg)
    if _qlora(cfg):
        check_qlora_supported()
    for f in mix.paths(cfg.data.train) + _as_list(cfg.data.eval):
        if not Path(f).is_file():
            raise TunesmithError(f"data file {f} does not exist" + (" (it is a folder)" if Path(f).is_dir() else "")
                                 + "; check data.train / data.eval")
    trackers.check_installed(cfg.report_to)
    distributed.check(cfg.train.distributed, cfg.method, _qlora(cfg))
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output_dir {out} is a file; give output_dir a folder path")
    if not resume and (out / "final").exists():
        raise TunesmithError(f"{out} already holds a finished run (final/); choose another output_dir, "
                             f"delete it, or pass --resume")
    return method


def inputs_of(cfg: RunConfig, data_hashes: dict[str, str], model_dir: Path, tokenizer) -> dict:
    """{name: sha256} of what training reads besides the config: the training data files,
    the tokenizer's files and the chat template in use, taken when the run starts.
    Recorded in every checkpoint, so that ``--resume`` notices a replaced file (eval files
    may change: they do not train)."""
    out = {f"data file {f}": data_hashes[f] for f in mix.paths(cfg.data.train)}
    out["tokenizer"] = folder_hash(model_dir, tokenizer_files(model_dir))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(
        tokenizer.chat_template, sort_keys=True)
    out["chat template"] = hashlib.sha256((template or "").encode()).hexdigest()
    return out


def _plan_memory(cfg: RunConfig, method: MethodRow, model, ref_model, dtype, hw, world: int):
    """(memory estimate, trainable, total) with gradient checkpointing switched on when the
    config asks or the step would not fit otherwise; refused when nothing fits."""
    trainable, total = count_parameters(model)
    mc = model.config
    quantized = _qlora(cfg)
    sizes = dict(total_params=total, trainable_params=trainable, weight_bytes=0.55 if quantized else 4,
                 act_bytes=2 if dtype != torch.float32 else 4, layers=mc.num_hidden_layers, hidden=mc.hidden_size,
                 heads=mc.num_attention_heads, vocab=mc.vocab_size, seq=cfg.data.max_length,
                 batch=cfg.train.batch_size * method.rows_per_item(cfg),
                 ref_params=count_parameters(ref_model)[1] if ref_model is not None else 0,
                 shards=world if cfg.train.distributed == "fsdp2" else 1)
    limit = memory.budget(cfg.train.memory_limit_gib, hw.device, world)
    est, checkpointing = memory.plan(checkpointing=cfg.train.gradient_checkpointing, limit=limit,
                                     full=cfg.lora is None, **sizes)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return est, checkpointing, limit, trainable, total


def _report(cfg: RunConfig, data: Prepared, model_dir: Path, plan, dtype, dtype_why: str, threads: int, world: int,
            template_source: str) -> None:
    est, checkpointing, limit, trainable, total = plan
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    mean_len = sum(data.lengths) / max(1, len(data.lengths))
    lo = cfg.lora
    console.info(f"model {cfg.model} ({model_dir}), method {cfg.method}, "
                 f"{'LoRA r=' + str(lo.r) if lo else 'full fine-tuning'}"
                 f"{' + DoRA' if lo and lo.dora else ''}{' (QLoRA 4-bit base)' if lo and lo.qlora else ''}")
    console.info(f"trainable {_count(trainable)} of {_count(total)} parameters, {100 * trainable / total:.2f}%")
    console.info("estimated memory: " + ", ".join(est.lines()) + f" (available {limit / 2**30:.1f} GiB)"
                 + (" — gradient checkpointing on" if checkpointing else "")
                 + (f", LM head in chunks of {est.head_chunk} tokens" if est.head_chunk else ""))
    console.info(f"dtype {str(dtype).removeprefix('torch.')}: {dtype_why}; threads {threads}; processes {world}")
    strategy = cfg.train.distributed if world > 1 or cfg.train.distributed == "fsdp2" else None
    if strategy is not None:
        quantized = _qlora(cfg)
        console.info(memory.per_process(total, trainable, 0.55 if quantized else 4, world, strategy))
    per_turn = data.formatting is not None and data.formatting.per_turn
    unit = "packs" if cfg.data.packing else "sequences" if per_turn else "records"
    console.info(f"data: {len(data.train)} {unit} train, "
                 f"{len(data.eval)} eval; {data.truncated} truncated; {per_step} per step x ~{mean_len:.0f} tokens "
                 f"= ~{per_step * mean_len:.0f} tokens/step; {len(data.train) // per_step} steps/epoch; "
                 f"template {template_source}")
    if data.formatting is not None and data.formatting.records:
        console.info(f"chat template mode: {data.formatting.summary()}")


def _compile(cfg: RunConfig, model, n_items: int, device: str, dtype, world: int, is_main: bool) -> dict:
    """``train.compile``: decide (and say why), compile the decoder layers in place; run.json's record."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    planned = max(1, math.ceil(cfg.train.epochs * (n_items // per_step)))  # as the engine plans them
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else planned
    lo = cfg.lora
    plain_lora = lo is not None and lo.dropout == 0 and not lo.dora and not lo.qlora and not cfg.data.packing
    on, why = compiling.choose(cfg.train.compile, model=model, method=cfg.method, plain_lora=plain_lora,
                               device=device, dtype=dtype, steps=steps, world=world,
                               sharded=cfg.train.distributed == "fsdp2")
    layers = compiling.compile_layers(model) if on else 0
    if is_main:
        console.info(f"compile: {layers} decoder layers by torch.compile ({why}); the first step compiles them "
                     f"(about 40 s on 2 cores the first time, seconds once cached in "
                     f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')})" if on else f"compile: {why}")
    return {"layers": layers, "why": why}


def loop_args(cfg: RunConfig, dtype, force_resume: bool, inputs: dict, head_chunk: int | None = None) -> LoopArgs:
    """The engine's settings: every field it shares with the ``train:`` section, by name,
    plus what comes from elsewhere in the config."""
    shared = {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(LoopArgs)
              if f.name in TrainConfig.model_fields}
    return LoopArgs(**shared, output_dir=Path(cfg.output_dir), autocast_dtype=dtype, head_chunk=head_chunk,
                    group_by_length=cfg.data.group_by_length, config=cfg.to_dict(), inputs=inputs,
                    resume_ignore=RESUME_IGNORE, force_resume=force_resume)


def _final_writer(model, tokenizer, template_source: str):
    def save_final(final: Path, state_dict: dict | None = None) -> None:
        """``state_dict``: the whole weights, gathered, when training sharded them."""
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
            tokenizer.save_pretrained(tmp)
            (tmp / "tunesmith_template.json").write_text(json.dumps(
                {"chat_template_source": template_source, "chat_template": tokenizer.chat_template}))
    return save_final


def _manifest(cfg: RunConfig, method: MethodRow, model_dir: Path, template_source: str, plan, result, hw,
              threads: int, world: int, dtype, started: float, data_hashes: dict, inputs: dict, compiled: dict,
              data_mode: dict | None = None) -> dict:
    """run.json: what was trained, on what, how, and how its outputs are to be scored."""
    est, checkpointing, _, trainable, total = plan
    out = Path(cfg.output_dir)
    return {
        "method": cfg.method, "base_model": cfg.model, "base_model_path": str(model_dir),
        "base_model_weights_sha256": weights_hash(model_dir),
        "adapter": cfg.lora is not None, "chat_template_source": template_source,
        "chat_template_mode": data_mode,  # append or per-turn, and its cost (data/render.py)
        # An adapter run started from another run's adapter trains on base + that adapter merged.
        "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None,
        "scoring": method.scoring(cfg),
        "data": data_hashes,  # taken when the run started
        "versions": hardware.library_versions(), "seed": cfg.train.seed,
        "hardware": {"device": hw.device, "name": hw.device_name, "threads": threads, "processes": world},
        "dtype": str(dtype).removeprefix("torch."),
        "trainable_parameters": trainable, "total_parameters": total, "memory_estimate": est.to_dict(),
        "gradient_checkpointing": checkpointing, "compile": compiled,  # train.compile: layers compiled, why
        # what was actually sharded, and what each process held and peaked at (by rank)
        "distributed": {"strategy": ("fsdp2" if result.sharded_units else "ddp" if world > 1 else "none"),
                        "processes": world, "sharded_units": result.sharded_units,
                        "state_bytes_per_process": result.state_bytes_per_process,
                        "peak_memory_bytes_per_process": result.peak_memory_per_process},
        "peak_memory_bytes": result.peak_memory_bytes, "peak_memory_kind": result.peak_memory_kind,
        "step_memory_bytes": result.step_memory_bytes,
        "start_time": started, "end_time": time.time(), "steps": result.step,
        "skipped_nonfinite_steps": result.skipped_steps, "padding_efficiency": round(result.efficiency, 4),
        "final_metrics": result.metrics, "stopped_by_signal": result.stopped_by_signal, "signal": result.signal,
        "final": str(out / "final") if not result.stopped_by_signal else None,
        "inputs": inputs, **({"force_resumed": result.forced} if result.forced else {}),
    }


# ---------------------------------------------------------------- the recipe


def run(cfg: RunConfig, *, resume: bool = False, force_resume: bool = False) -> dict:
    """Train one run; returns the run manifest (also written to OUTPUT_DIR/run.json).
    One writer per run folder: the main process holds its lock (``files.FolderLock``)."""
    from accelerate import Accelerator

    out = Path(cfg.output_dir)
    resume = resume or cfg.resume is True or (cfg.resume == "auto" and ckpt.latest_checkpoint(out) is not None)
    method = _validate(cfg, out, resume)  # --- before any weights load
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with FolderLock(out, "run folder") if accelerator.is_main_process else contextlib.nullcontext():
        # what rank 0 sees in the run folder decides, on every node: resume, or already finished
        agreed = [resume, finished_run(out) if resume and accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(agreed, src=0)
        resume, done = agreed
        if done is not None:
            if accelerator.is_main_process:
                console.info(f"{out} already finished ({done.get('steps')} steps, final/ written): nothing to "
                             f"resume; it is left as it is")
            return done
        return _train(cfg, method, accelerator, resume, force_resume)


def _train(cfg: RunConfig, method: MethodRow, accelerator, resume: bool, force_resume: bool) -> dict:
    started = time.time()
    out = Path(cfg.output_dir)
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    hw = hardware.detect()
    threads = hardware.set_threads(cfg.train.threads or max(1, hardware.cpu_cores() // world))
    dtype, dtype_why = hardware.choose_dtype(cfg.train.dtype, hw)
    torch.manual_seed(cfg.train.seed)

    # --- tokenizer and data (the data layer refuses malformed records here)
    model_dir = resolve_model(cfg.model)  # converts the embedded model once, if needed
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    template_source = ensure_chat_template(tokenizer, cfg.data.chat_template)
    data_hashes = {f: sha256_file(f) for f in mix.paths(cfg.data.train) + _as_list(cfg.data.eval)}
    data = prepare_data(cfg, tokenizer, method)
    inputs = inputs_of(cfg, data_hashes, model_dir, tokenizer)
    if data.dropped and is_main:
        console.warn(f"dropped {data.dropped} training records whose trained tokens would all be truncated "
                     f"at max_length {cfg.data.max_length}")

    # --- model, reference, memory
    model = build_model(cfg, method, tokenizer, template_source, dtype, is_main)
    ref_kind = method.reference(cfg)
    ref_model = build_reference(cfg, ref_kind, model, accelerator.device)
    plan = _plan_memory(cfg, method, model, ref_model, dtype, hw, world)
    if ref_model is not None:  # its no-grad pass runs beside the step's memory: the same chunks
        ref_model.head_chunk = plan[0].head_chunk
    if is_main:
        _report(cfg, data, model_dir, plan, dtype, dtype_why, threads, world, template_source)
    compiled = _compile(cfg, model, len(data.train), accelerator.device.type, dtype, world, is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_yaml(cfg))

    # --- the trackers' runs start (continue, on --resume) when fit can begin (its resume checks passed);
    # anything that raises after that marks them failed, anything before leaves them as they were
    with trackers.Trackers(cfg.report_to if is_main else (), out, cfg.to_dict(), resume) as tracked:
        # --- the method, with its reference (precomputed values ride on the items)
        autocast = (lambda: torch.autocast(accelerator.device.type, dtype=dtype)) \
            if dtype != torch.float32 else contextlib.nullcontext
        precompute = ref_kind == "sequence" and cfg.preference.precompute_ref
        ctx = BuildContext(cfg, tokenizer, model, refs.Reference(None if precompute else ref_model), autocast, out,
                           dtype)
        trainer = method.build(ctx)
        if precompute:
            note = precompute_reference(cfg, trainer, model, ref_model, data, out, accelerator, dtype, model_dir,
                                        autocast)
            if is_main:
                console.info(note)
            ref_model = None  # the frozen model is freed

        # --- train, save, record
        args = loop_args(cfg, dtype, force_resume, inputs, head_chunk=plan[0].head_chunk)
        result = fit(model, trainer, data.train, data.eval, data.lengths, args,
                     accelerator=accelerator, save_final=_final_writer(model, tokenizer, template_source),
                     resume=resume, processed_tokens=processed_tokens, on_start=tracked.start, log_to=tracked.log)
        manifest = _manifest(cfg, method, model_dir, template_source, plan, result, hw, threads, world, dtype,
                             started, data_hashes, inputs, compiled,
                             data.formatting.to_dict() if data.formatting is not None else None)
        if tracked.ids:
            manifest["trackers"] = tracked.ids  # also in OUTPUT_DIR/trackers.json
        if is_main:
            write_text_atomic(out / "run.json", dumps(manifest, indent=2))
            tracked.finish(trackers.STOPPED if result.stopped_by_signal else trackers.FINISHED, manifest,
                           result.signal)
            if not result.stopped_by_signal:
                console.info(f"done: {result.step} steps; real/processed tokens {result.efficiency:.1%}; "
                             f"{result.peak_memory_kind} during training {result.peak_memory_bytes / 2**30:.2f} GiB "
                             f"(+{result.step_memory_bytes / 2**30:.2f} GiB over the loaded model); "
                             f"final weights in {out / 'final'}")
    accelerator.wait_for_everyone()
    return manifest
