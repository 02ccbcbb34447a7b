"""The training recipe: validate → build model, tokenizer and data → report → train → save.

    tunesmith train examples/sft-lora.yaml

Reads top to bottom. Methods differ only in which records they accept, how they
tokenize, and the object that collates and computes the loss (``build_method``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith import console, hardware
from tunesmith.config import RunConfig, save_config
from tunesmith.errors import TunesmithError

# Keys that may change between a run and its --resume without altering training.
RESUME_IGNORE = frozenset({"resume", "output_dir", "report_to", "train.save_steps", "train.save_total_limit",
                           "train.eval_steps", "train.logging_steps", "train.threads", "data.eval"})

METHOD_KINDS = {"sft": {"sft", "text"}, "dpo": {"preference"}, "ipo": {"preference"}, "simpo": {"preference"},
                "orpo": {"preference"}}
PAIRWISE = ("dpo", "ipo", "simpo", "orpo")


def _count(n: int) -> str:
    """2_400_000 → '2.4M', 134_515_008 → '134.5M', 7_424 → '7.4K'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.{1 if n >= 10 * div else 2}f}{unit}"
    return str(n)


def _as_list(x) -> list[str]:
    return [] if x is None else [x] if isinstance(x, str) else list(x)


@dataclass
class Prepared:
    train: list
    eval: list
    lengths: list[int]
    dropped: int
    truncated: int
    trained_tokens: int


def tokenize_all(records: list[dict], tokenizer, cfg: RunConfig, what: str) -> tuple[list, int, int]:
    """Tokenize with the data layer's masking contract; pairs for preference methods."""
    from tunesmith.data.tokenize import tokenize_preference, tokenize_record

    out, dropped, truncated = [], 0, 0
    for i, r in enumerate(records):
        if cfg.method in PAIRWISE:
            ex = tokenize_preference(r, tokenizer, max_length=cfg.data.max_length, on_overflow="drop")
        else:
            ex = tokenize_record(r, tokenizer, max_length=cfg.data.max_length, train_on=cfg.data.train_on,
                                 on_overflow="drop")
        if ex is None:
            if cfg.data.on_overflow == "error":
                raise TunesmithError(
                    f"{what} record {i} would lose every trained token at data.max_length={cfg.data.max_length}; "
                    f"raise data.max_length or set data.on_overflow: drop (`tunesmith data check` lists them all)")
            dropped += 1
            continue
        truncated += ex.chosen.truncated or ex.rejected.truncated if cfg.method in PAIRWISE else ex.truncated
        out.append(ex)
    return out, dropped, truncated


def prepare_data(cfg: RunConfig, tokenizer) -> Prepared:
    from tunesmith.data.batches import pack_examples
    from tunesmith.data.validate import load_records, split_records

    kinds = METHOD_KINDS[cfg.method]
    train_recs = load_records(_as_list(cfg.data.train), format=cfg.data.format, columns=cfg.data.columns, expect=kinds)
    if cfg.data.eval:
        eval_recs = load_records(_as_list(cfg.data.eval), format=cfg.data.format, columns=cfg.data.columns, expect=kinds)
    elif cfg.data.eval_split > 0:
        train_recs, eval_recs = split_records(train_recs, cfg.data.eval_split, cfg.train.seed)
    else:
        eval_recs = []
    train, dropped, truncated = tokenize_all(train_recs, tokenizer, cfg, "training")
    evals, _, _ = tokenize_all(eval_recs, tokenizer, cfg, "eval")
    if cfg.method in PAIRWISE:
        if cfg.data.packing:
            raise TunesmithError("data.packing applies to sft only; remove it for preference methods")
        lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in train]
        trained = sum(p.chosen.n_trained + p.rejected.n_trained for p in train)
        return Prepared(train, evals, lengths, dropped, truncated, trained)
    if cfg.data.packing:
        train = pack_examples(train, cfg.data.max_length)
        evals = pack_examples(evals, cfg.data.max_length) if evals else []
        lengths = [sum(len(e.input_ids) for e in p) for p in train]
    else:
        lengths = [len(e.input_ids) for e in train]
    trained = sum(e.n_trained for e in (x for p in train for x in (p if cfg.data.packing else [p])))
    return Prepared(train, evals, lengths, dropped, truncated, trained)


def build_method(cfg: RunConfig, tokenizer, ref_model=None):
    from tunesmith.train.methods.preference import Preference
    from tunesmith.train.methods.sft import SFT

    if cfg.method == "sft":
        return SFT(tokenizer.pad_token_id, packing=cfg.data.packing)
    if cfg.method in PAIRWISE:
        p = cfg.preference
        loss_type = p.loss_type if cfg.method == "dpo" else cfg.method
        if cfg.method == "dpo" and loss_type not in ("sigmoid", "hinge", "ipo", "robust"):
            raise TunesmithError(f"preference.loss_type = {loss_type!r} is not a DPO variant; use sigmoid, hinge, "
                                 f"ipo or robust (or method: simpo / orpo)")
        return Preference(tokenizer.pad_token_id, loss_type=loss_type, beta=p.beta,
                          label_smoothing=p.label_smoothing, simpo_gamma=p.simpo_gamma, sft_weight=p.sft_weight,
                          ref_model=ref_model)
    raise TunesmithError(f"method {cfg.method!r} is not available yet in this version; "
                         f"use sft, dpo, ipo, simpo or orpo")


def load_init(model, init_from: str):
    """Start from an earlier run's final/: an adapter is merged into the base (the new
    adapter then trains on top, and disabling it gives the SFT model as reference); a
    full-weights folder replaces the base."""
    from peft import PeftModel

    from tunesmith.models import load_model

    p = Path(init_from)
    if (p / "adapter_config.json").exists():
        return PeftModel.from_pretrained(model, p).merge_and_unload()
    if (p / "config.json").exists():
        return load_model(str(p))
    raise TunesmithError(f"init_from: {p} holds neither an adapter (adapter_config.json) nor model weights "
                         f"(config.json); point it at an earlier run's final/ folder")


def processed_tokens(batch: dict) -> tuple[int, int]:
    """(real tokens, processed tokens) of a batch: padding counts as processed only."""
    ids = batch["input_ids"]
    if "real_tokens" in batch:
        return int(batch["real_tokens"]), ids.numel()
    mask = batch.get("attention_mask")
    real = int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()
    return real, ids.numel()


def run(cfg: RunConfig, *, resume: bool = False, force_resume: bool = False) -> dict:
    """Train one run; returns the run manifest (also written to OUTPUT_DIR/run.json)."""
    from accelerate import Accelerator

    from tunesmith.models import load_model, load_tokenizer, resolve_model, weights_hash
    from tunesmith.models.adapters import attach_lora, check_qlora_supported, count_parameters
    from tunesmith.train import checkpoint as ckpt
    from tunesmith.train import memory
    from tunesmith.train.engine import LoopArgs, fit

    started = time.time()
    out = Path(cfg.output_dir)
    resume = resume or cfg.resume is True or (cfg.resume == "auto" and ckpt.latest_checkpoint(out) is not None)
    # --- validate before any weights load
    if cfg.lora is not None and cfg.lora.qlora:
        check_qlora_supported()
    for f in _as_list(cfg.data.train) + _as_list(cfg.data.eval):
        if not Path(f).is_file():
            raise TunesmithError(f"data file {f} does not exist" + (" (it is a folder)" if Path(f).is_dir() else "")
                                 + "; check data.train / data.eval")
    if "tensorboard" in cfg.report_to:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise TunesmithError("report_to: tensorboard needs the tensorboard package; "
                                 "`pip install tensorboard`, or remove it from report_to")
    if not resume and (out / "final").exists():
        raise TunesmithError(f"{out} already holds a finished run (final/); choose another output_dir, "
                             f"delete it, or pass --resume")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    hw = hardware.detect()
    threads = hardware.set_threads(cfg.train.threads or max(1, hardware.cpu_cores() // world))
    dtype, dtype_why = hardware.choose_dtype(cfg.train.dtype, hw)
    torch.manual_seed(cfg.train.seed)

    # --- tokenizer and data (the data layer refuses malformed records here)
    model_dir = resolve_model(cfg.model)  # converts the embedded model once, if needed
    tokenizer = load_tokenizer(cfg.model)
    from tunesmith.data.templates import ensure_chat_template

    template_source = ensure_chat_template(tokenizer)
    data = prepare_data(cfg, tokenizer)
    if data.dropped and is_main:
        console.warn(f"dropped {data.dropped} training records whose trained tokens would all be truncated "
                     f"at max_length {cfg.data.max_length}")

    # --- model (+ adapter)
    quantized = cfg.lora is not None and cfg.lora.qlora
    kwargs = {}
    if quantized:
        from tunesmith.models.adapters import quantization_config

        kwargs["quantization_config"] = quantization_config(dtype)
    model = load_model(cfg.model, dtype=torch.float32 if not quantized else dtype,
                       trust_remote_code=cfg.trust_remote_code, **kwargs)
    if cfg.init_from:
        model = load_init(model, cfg.init_from)
    model.config.use_cache = False
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # ensure_chat_template added ChatML tokens to a template-less tokenizer (as TRL's
        # setup_chat_format does): their embeddings start untrained.
        model.resize_token_embeddings(len(tokenizer))
        if is_main:
            console.warn(f"added {template_source} special tokens: embeddings resized to {len(tokenizer)}; "
                         f"with LoRA set `lora.modules_to_save: [embed_tokens, lm_head]` so they train")
    mc = model.config
    gc_needed = False
    if cfg.lora is not None:
        model = attach_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                            target_modules=cfg.lora.target_modules, rslora=cfg.lora.rslora, dora=cfg.lora.dora,
                            modules_to_save=cfg.lora.modules_to_save, quantized=quantized)
    ref_model = None
    from tunesmith.train.methods.losses import REFERENCE_FREE

    if cfg.method in PAIRWISE and cfg.lora is None and cfg.method not in REFERENCE_FREE:
        import copy

        from tunesmith.train.forward import SequenceLogProbs

        # Full fine-tuning: a frozen copy is the reference (an adapter run disables its adapter instead).
        ref_model = SequenceLogProbs(copy.deepcopy(model).requires_grad_(False).eval())
    trainable, total = count_parameters(model)
    act_bytes = 2 if dtype != torch.float32 else 4
    est_args = dict(total_params=total, trainable_params=trainable, weight_bytes=0.55 if quantized else 4,
                    act_bytes=act_bytes, layers=mc.num_hidden_layers, hidden=mc.hidden_size,
                    heads=mc.num_attention_heads, vocab=mc.vocab_size, batch=cfg.train.batch_size,
                    seq=cfg.data.max_length)
    est = memory.estimate(**est_args, checkpointing=False)
    limit = int(cfg.train.memory_limit_gib * 2**30) if cfg.train.memory_limit_gib else memory.available_bytes(hw.device)
    limit //= (world if hw.device == "cpu" else 1)  # CPU processes share the host's RAM
    if cfg.train.gradient_checkpointing is True:
        gc_needed = True
    elif cfg.train.gradient_checkpointing == "auto" and est.total > limit:
        gc_needed = memory.estimate(**est_args, checkpointing=True).total <= limit
    if gc_needed:
        est = memory.estimate(**est_args, checkpointing=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if est.total > limit:
        gib = lambda x: f"{x / 2**30:.1f} GiB"  # noqa: E731
        hint = ("use LoRA instead (remove `full: true`; a rank-8 adapter trains ~1% of the weights)"
                if cfg.lora is None else "lower train.batch_size or data.max_length")
        raise TunesmithError(f"the estimated memory of a training step, {gib(est.total)}, exceeds the "
                             f"{gib(limit)} available; {hint}")

    # --- report what will happen
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    steps_per_epoch = len(data.train) // per_step
    mean_len = sum(data.lengths) / max(1, len(data.lengths))
    if is_main:
        console.info(f"model {cfg.model} ({model_dir}), method {cfg.method}, "
                     f"{'LoRA r=' + str(cfg.lora.r) if cfg.lora else 'full fine-tuning'}"
                     f"{' + DoRA' if cfg.lora and cfg.lora.dora else ''}{' (QLoRA 4-bit base)' if quantized else ''}")
        console.info(f"trainable {_count(trainable)} of {_count(total)} parameters, {100 * trainable / total:.2f}%")
        console.info("estimated memory: " + ", ".join(est.lines()) + f" (available {limit / 2**30:.1f} GiB)"
                     + (" — gradient checkpointing on" if gc_needed else ""))
        console.info(f"dtype {str(dtype).removeprefix('torch.')}: {dtype_why}; threads {threads}; processes {world}")
        console.info(f"data: {len(data.train)} {'packs' if cfg.data.packing else 'records'} train, "
                     f"{len(data.eval)} eval; {data.truncated} truncated; {per_step} per step x ~{mean_len:.0f} tokens "
                     f"= ~{per_step * mean_len:.0f} tokens/step; {steps_per_epoch} steps/epoch; "
                     f"template {template_source}")
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    def save_final(final: Path) -> None:
        with ckpt.atomic_dir(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "tunesmith_template.json").write_text(json.dumps(
                {"chat_template_source": template_source, "chat_template": tokenizer.chat_template}))

    args = LoopArgs(
        output_dir=out, epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, batch_size=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum, learning_rate=cfg.train.learning_rate, lr_scheduler=cfg.train.lr_scheduler,
        warmup_ratio=cfg.train.warmup_ratio, warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_epsilon, max_grad_norm=cfg.train.max_grad_norm, seed=cfg.train.seed,
        save_steps=cfg.train.save_steps, save_total_limit=cfg.train.save_total_limit,
        eval_steps=cfg.train.eval_steps, logging_steps=cfg.train.logging_steps,
        max_nonfinite=cfg.train.max_nonfinite, autocast_dtype=dtype, group_by_length=cfg.data.group_by_length,
        config=cfg.to_dict(), resume_ignore=RESUME_IGNORE, force_resume=force_resume,
        report_to=tuple(cfg.report_to))
    result = fit(model, build_method(cfg, tokenizer, ref_model), data.train, data.eval, data.lengths, args,
                 accelerator=accelerator, save_final=save_final, resume=resume, processed_tokens=processed_tokens)

    manifest = {
        "method": cfg.method, "base_model": cfg.model, "base_model_path": str(model_dir),
        "base_model_weights_sha256": weights_hash(model_dir),
        "adapter": cfg.lora is not None, "chat_template_source": template_source,
        "data": {f: ckpt.sha256_file(f) for f in _as_list(cfg.data.train) + _as_list(cfg.data.eval)},
        "versions": hardware.library_versions(), "seed": cfg.train.seed,
        "hardware": {"device": hw.device, "name": hw.device_name, "threads": threads, "processes": world},
        "dtype": str(dtype).removeprefix("torch."),
        "trainable_parameters": trainable, "total_parameters": total, "memory_estimate": est.to_dict(),
        "start_time": started, "end_time": time.time(), "steps": result.step,
        "skipped_nonfinite_steps": result.skipped_steps, "padding_efficiency": round(result.efficiency, 4),
        "final_metrics": result.metrics, "stopped_by_signal": result.stopped_by_signal,
        "final": str(out / "final") if not result.stopped_by_signal else None,
    }
    if is_main:
        (out / "run.json").write_text(json.dumps(manifest, indent=2))
        if not result.stopped_by_signal:
            console.info(f"done: {result.step} steps; real/processed tokens {result.efficiency:.1%}; "
                         f"final weights in {out / 'final'}")
    accelerator.wait_for_everyone()
    return manifest
