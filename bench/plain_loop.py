"""The floor: a plain PyTorch + PEFT loop over exactly tunesmith's batches.

Records are tokenized by tunesmith's data layer and ordered by its epoch order (same
seed), so every step sees the same rows as the tunesmith runner; each batch is padded to
its longest row. Per step: ``model(input_ids, attention_mask, labels).loss`` (SFT: the
logits at every position, transformers' own loss) or, for DPO, full-vocabulary
log-softmax of policy and adapter-disabled reference logits, then backward, clip to 1.0,
AdamW (torch defaults), zero_grad. Autocast follows tunesmith's ``train.dtype: auto``
(bf16 where the CPU has a native bf16 path), so the floor computes in the same dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bench.measure import Recorder
from bench.workloads import DPO_BETA, LEARNING_RATE, LORA, Spec, read_jsonl


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) unshifted with -100 → (B,) summed log p of labels."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def run(spec: Spec, rec: Recorder) -> dict:
    from peft import LoraConfig, get_peft_model

    from tunesmith import hardware
    from tunesmith.data.batches import pad_batch
    from tunesmith.data.tokenize import tokenize_preference, tokenize_record
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.train.engine import epoch_order

    dtype, _ = hardware.choose_dtype("auto", hardware.detect())
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model)
    records = read_jsonl(spec.data_file)
    if spec.method == "sft":
        items = [tokenize_record(r, tokenizer, max_length=spec.max_length, on_overflow="drop") for r in records]
        lengths = [len(x.input_ids) for x in items]
    else:
        items = [tokenize_preference(r, tokenizer, max_length=spec.max_length, on_overflow="drop") for r in records]
        lengths = [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in items]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(spec.model).to(device)
    model.config.use_cache = False
    if not spec.full:
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[spec.workload])
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    per_epoch = len(items) // spec.batch
    pad = tokenizer.pad_token_id
    model.train()
    losses = []
    for step in range(spec.steps):
        epoch, k = divmod(step, per_epoch)
        order = epoch_order(lengths, epoch, spec.seed, spec.batch, True)  # tunesmith's order of that epoch
        chunk = [items[i] for i in order[k * spec.batch:(k + 1) * spec.batch]]
        if spec.method == "sft":
            batch = {k: v.to(device) for k, v in pad_batch(chunk, pad).items()}
            rec.record(batch["input_ids"], batch["labels"], batch["attention_mask"])
            with autocast():
                loss = model(**batch).loss
        else:
            batch = {k: v.to(device) for k, v in pad_batch([p.chosen for p in chunk] + [p.rejected for p in chunk],
                                                            pad).items()}
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            n = len(chunk)
            rec.record(ids, labels, mask)
            with autocast():
                logps = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
                with torch.no_grad(), model.disable_adapter():
                    rec.record(ids, labels, mask)
                    ref = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
            margin = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
            loss = -F.logsigmoid(DPO_BETA * margin).mean()  # DPO, Rafailov et al. 2023, eq. 7
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"dtype": str(dtype).removeprefix("torch."), "gradient_checkpointing": False,
            "config": {"lr": LEARNING_RATE[spec.workload], "order": "tunesmith epoch_order (length-grouped)"},
            "reported": {"final_loss": losses[-1]}}
