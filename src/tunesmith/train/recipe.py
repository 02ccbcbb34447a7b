"""The training recipe: validate → build model, tokenizer and data → report → train → save.

    tunesmith train examples/sft-lora.yaml

Reads top to bottom. Methods differ only in which records they accept, how they
tokenize, and the object that collates and computes the loss (``build_method``).
"""

from __future__ import annotations

import contextlib
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
                "orpo": {"preference"}, "kto": {"unpaired", "preference"}, "reward": {"preference"},
                "grpo": {"prompt", "sft"}}
PAIRWISE = ("dpo", "ipo", "simpo", "orpo")
PAIRED_DATA = PAIRWISE + ("reward",)  # items are (chosen, rejected) pairs
TWO_ROWS = PAIRED_DATA + ("kto",)  # methods whose items are two sequences (a micro-batch of B is 2B rows)


def uses_reference(cfg: RunConfig) -> bool:
    from tunesmith.train.methods.losses import REFERENCE_FREE

    return cfg.method == "kto" or (cfg.method in PAIRWISE and cfg.method not in REFERENCE_FREE)


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
    from tunesmith.data.schema import unpair
    from tunesmith.data.tokenize import tokenize_preference, tokenize_record, tokenize_unpaired

    if cfg.method == "kto":  # paired data trains KTO as two unpaired examples
        records = [u for r in records for u in unpair(r)]
    out, dropped, truncated = [], 0, 0
    for i, r in enumerate(records):
        if cfg.method in PAIRED_DATA:
            ex = tokenize_preference(r, tokenizer, max_length=cfg.data.max_length, on_overflow="drop")
        elif cfg.method == "kto":
            ex = tokenize_unpaired(r, tokenizer, max_length=cfg.data.max_length, on_overflow="drop")
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
        seqs = [ex.chosen, ex.rejected] if cfg.method in PAIRED_DATA else [ex.completion] if cfg.method == "kto" else [ex]
        truncated += any(x.truncated for x in seqs)
        out.append(ex)
    if cfg.method == "kto" and out:
        from tunesmith.train.methods.kto import kl_pairs

        out = kl_pairs(out, cfg.data.max_length, cfg.train.seed)
    return out, dropped, truncated


def prompt_items(records: list[dict], tokenizer, cfg: RunConfig) -> list:
    """GRPO prompts, left-truncated so that prompt + max_new_tokens fits data.max_length.
    An SFT record serves as a prompt too: its last assistant message becomes the
    ``answer`` column that reward functions receive."""
    from tunesmith.data.tokenize import tokenize_record
    from tunesmith.train.methods.grpo import PromptItem

    room = cfg.data.max_length - cfg.grpo.max_new_tokens
    if room < 8:
        raise TunesmithError(f"data.max_length {cfg.data.max_length} leaves {room} prompt tokens after "
                             f"grpo.max_new_tokens {cfg.grpo.max_new_tokens}; raise max_length or lower max_new_tokens")
    items = []
    for r in records:
        meta = dict(r.get("meta") or {})
        if "messages" in r:
            last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
            meta.setdefault("answer", r["messages"][last]["content"])
            r = {"prompt": r["messages"][:last], **({"tools": r["tools"]} if r.get("tools") else {})}
        ex = tokenize_record({k: v for k, v in r.items() if k != "meta"}, tokenizer, max_length=room)
        items.append(PromptItem(ex.input_ids, r["prompt"], meta))
    return items


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
    if cfg.method == "grpo":
        train, evals = prompt_items(train_recs, tokenizer, cfg), prompt_items(eval_recs, tokenizer, cfg)
        return Prepared(train, evals, [len(p.input_ids) for p in train], 0, 0, 0)
    train, dropped, truncated = tokenize_all(train_recs, tokenizer, cfg, "training")
    evals, _, _ = tokenize_all(eval_recs, tokenizer, cfg, "eval")
    if cfg.method in TWO_ROWS:
        if cfg.data.packing:
            raise TunesmithError("data.packing applies to sft only; remove it for preference methods")
        pairs = [(p.chosen, p.rejected) if cfg.method in PAIRED_DATA else (p.example.completion, p.kl) for p in train]
        lengths = [len(a.input_ids) + len(b.input_ids) for a, b in pairs]
        # KTO trains on the example only (its KL row runs without gradients).
        trained = sum(a.n_trained + (b.n_trained if cfg.method in PAIRED_DATA else 0) for a, b in pairs)
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
    from tunesmith.train.methods.kto import KTO
    from tunesmith.train.methods.preference import Preference
    from tunesmith.train.methods.sft import SFT

    if cfg.method == "sft":
        return SFT(tokenizer.pad_token_id, packing=cfg.data.packing)
    if cfg.method == "kto":
        p = cfg.preference
        if cfg.train.batch_size < 2:
            raise TunesmithError("method kto needs train.batch_size >= 2 (its KL estimate averages over the "
                                 "micro-batch; at 1 it would equal the example's own reward); raise it")
        return KTO(tokenizer.pad_token_id, beta=p.beta, desirable_weight=p.desirable_weight,
                   undesirable_weight=p.undesirable_weight, ref_model=ref_model)
    if cfg.method in PAIRWISE:
        p = cfg.preference
        loss_type = p.loss_type if cfg.method == "dpo" else cfg.method
        if cfg.method == "dpo" and loss_type not in ("sigmoid", "hinge", "ipo", "robust"):
            raise TunesmithError(f"preference.loss_type = {loss_type!r} is not a DPO variant; use sigmoid, hinge, "
                                 f"ipo or robust (or method: simpo / orpo)")
        return Preference(tokenizer.pad_token_id, loss_type=loss_type, beta=p.beta,
                          label_smoothing=p.label_smoothing, simpo_gamma=p.simpo_gamma, sft_weight=p.sft_weight,
                          ref_model=ref_model)
    if cfg.method == "reward":
        from tunesmith.train.methods.reward import Reward

        return Reward(tokenizer.pad_token_id, margin=cfg.reward.margin,
                      center_coefficient=cfg.reward.center_coefficient)
    raise TunesmithError(f"method {cfg.method!r} is not available yet in this version")


def build_grpo(cfg: RunConfig, tokenizer, model, ref_model, autocast, out: Path):
    from tunesmith.train.methods.grpo import GRPO
    from tunesmith.train.methods.rewards import Rewards

    g = cfg.grpo
    method = GRPO(tokenizer, model, Rewards(g.reward_funcs, g.reward_weights, cfg.data.max_length),
                  num_generations=g.num_generations, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                  top_p=g.top_p, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high, loss_type=g.loss_type,
                  scale_rewards=g.scale_rewards, autocast=autocast, log_path=out / "completions.jsonl",
                  log_completions=g.log_completions, logging_steps=cfg.train.logging_steps)
    method.reference.model = ref_model
    return method


def load_init(model, init_from: str, task: str = "causal"):
    """Start from an earlier run's final/: an adapter is merged into the base (the new
    adapter then trains on top, and disabling it gives the SFT model as reference); a
    full-weights folder replaces the base. A reward model (``task="score"``) takes the
    SFT run's transformer the same way, with a new score head."""
    from peft import PeftModel

    from tunesmith.models import load_model

    from tunesmith.models.runs import run_of, trained_base

    p = Path(init_from)
    if (p / "adapter_config.json").exists():
        parent = run_of(p)
        if parent is not None and parent.init_from is not None and task == "causal":
            model = trained_base(parent)  # that adapter itself sat on an earlier merge (SFT → DPO → DPO)
        return PeftModel.from_pretrained(model, p).merge_and_unload()
    if (p / "config.json").exists():
        return load_model(str(p), task=task)
    raise TunesmithError(f"init_from: {p} holds neither an adapter (adapter_config.json) nor model weights "
                         f"(config.json); point it at an earlier run's final/ folder")


def build_reference(cfg: RunConfig, model, device):
    """The frozen reference model (a ``SequenceLogProbs``), or None when the policy's own
    adapter-disabled pass is the reference (LoRA), the method is reference-free, or a
    full fine-tuning run precomputes from its own starting weights."""
    import copy

    from tunesmith.models import load_model
    from tunesmith.train.forward import SequenceLogProbs

    p = cfg.preference
    if cfg.method == "grpo":  # KL to the starting policy: adapter disabled, or a frozen copy
        from tunesmith.train.forward import TokenLogProbs

        if cfg.grpo.beta == 0 or cfg.lora is not None:
            return None
        return TokenLogProbs(copy.deepcopy(model).requires_grad_(False).eval().to(device))
    if not uses_reference(cfg):
        if p is not None and (p.precompute_ref or p.ref_model):
            raise TunesmithError(f"method {cfg.method} is reference-free; remove preference.precompute_ref and "
                                 f"preference.ref_model")
        return None
    if p.ref_model:
        where = Path(p.ref_model)
        if (where / "adapter_config.json").exists():  # an adapter run's final/: base + adapter, merged
            ref = load_init(load_model(cfg.model, trust_remote_code=cfg.trust_remote_code), str(where))
        else:
            ref = load_model(p.ref_model, trust_remote_code=cfg.trust_remote_code)
    elif cfg.lora is None and not p.precompute_ref:
        ref = copy.deepcopy(model)  # full fine-tuning: a frozen copy of the starting weights
    else:
        return None
    return SequenceLogProbs(ref.requires_grad_(False).eval().to(device))


def precompute_reference(cfg: RunConfig, method, model, ref_model, data: Prepared, out: Path, accelerator, dtype,
                         model_dir: Path, autocast) -> str:
    """Compute the reference log-probs of every train/eval item once (or reuse the ones
    stored in the run folder for the same model and tokens), attach them to the items,
    and say what that saves."""
    from tunesmith.models import weights_hash
    from tunesmith.train.forward import SequenceLogProbs
    from tunesmith.train.methods import reference as refs

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
        saved = count_params_bytes(ref_model)
        gain = f"the reference model is not kept in memory (saves {saved / 2**30:.2f} GiB)"
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
    task = "score" if cfg.method == "reward" else "causal"
    model = load_model(cfg.model, dtype=torch.float32 if not quantized else dtype,
                       trust_remote_code=cfg.trust_remote_code, task=task, **kwargs)
    if task == "score":
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.init_from:
        model = load_init(model, cfg.init_from, task)
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
                            modules_to_save=cfg.lora.modules_to_save, quantized=quantized,
                            task_type="SEQ_CLS" if task == "score" else "CAUSAL_LM")
    ref_model = build_reference(cfg, model, accelerator.device)
    trainable, total = count_parameters(model)
    act_bytes = 2 if dtype != torch.float32 else 4
    est_args = dict(total_params=total, trainable_params=trainable, weight_bytes=0.55 if quantized else 4,
                    act_bytes=act_bytes, layers=mc.num_hidden_layers, hidden=mc.hidden_size,
                    heads=mc.num_attention_heads, vocab=mc.vocab_size,
                    batch=cfg.train.batch_size * (2 if cfg.method in TWO_ROWS else cfg.grpo.num_generations
                                                  if cfg.method == "grpo" else 1), seq=cfg.data.max_length,
                    ref_params=count_parameters(ref_model)[1] if ref_model is not None else 0)
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

    autocast = (lambda: torch.autocast(accelerator.device.type, dtype=dtype)) \
        if dtype != torch.float32 else contextlib.nullcontext
    method = (build_grpo(cfg, tokenizer, model, ref_model, autocast, out) if cfg.method == "grpo"
              else build_method(cfg, tokenizer, ref_model))
    if uses_reference(cfg) and cfg.preference.precompute_ref:
        from tunesmith.train.methods.reference import Reference

        note = precompute_reference(cfg, method, model, ref_model, data, out, accelerator, dtype, model_dir,
                                    autocast)
        if is_main:
            console.info(note)
        method.reference, ref_model = Reference(None), None  # the items carry the values; the frozen model is freed

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
    result = fit(model, method, data.train, data.eval, data.lengths, args,
                 accelerator=accelerator, save_final=save_final, resume=resume, processed_tokens=processed_tokens)

    manifest = {
        "method": cfg.method, "base_model": cfg.model, "base_model_path": str(model_dir),
        "base_model_weights_sha256": weights_hash(model_dir),
        "adapter": cfg.lora is not None, "chat_template_source": template_source,
        # An adapter run started from another run's adapter trains on base + that adapter merged.
        "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None,
        "data": {f: ckpt.sha256_file(f) for f in _as_list(cfg.data.train) + _as_list(cfg.data.eval)},
        "versions": hardware.library_versions(), "seed": cfg.train.seed,
        "hardware": {"device": hw.device, "name": hw.device_name, "threads": threads, "processes": world},
        "dtype": str(dtype).removeprefix("torch."),
        "trainable_parameters": trainable, "total_parameters": total, "memory_estimate": est.to_dict(),
        "gradient_checkpointing": gc_needed,
        "peak_memory_bytes": result.peak_memory_bytes, "peak_memory_kind": result.peak_memory_kind,
        "step_memory_bytes": result.step_memory_bytes,
        "start_time": started, "end_time": time.time(), "steps": result.step,
        "skipped_nonfinite_steps": result.skipped_steps, "padding_efficiency": round(result.efficiency, 4),
        "final_metrics": result.metrics, "stopped_by_signal": result.stopped_by_signal,
        "final": str(out / "final") if not result.stopped_by_signal else None,
    }
    if is_main:
        (out / "run.json").write_text(json.dumps(manifest, indent=2))
        if not result.stopped_by_signal:
            console.info(f"done: {result.step} steps; real/processed tokens {result.efficiency:.1%}; "
                         f"{result.peak_memory_kind} during training {result.peak_memory_bytes / 2**30:.2f} GiB "
                         f"(+{result.step_memory_bytes / 2**30:.2f} GiB over the loaded model); "
                         f"final weights in {out / 'final'}")
    accelerator.wait_for_everyone()
    return manifest
