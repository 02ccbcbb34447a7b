"""The TRL runners: ``SFTTrainer`` / ``DPOTrainer`` (TRL 1.16) on the same records.

Both variants get the model as its folder path (TRL loads it in fp32), tunesmith's
tokenizer (the same chat template), the same LoRA config, batch, max length, steps and
seed, ``report_to="none"``, ``save_strategy="no"`` and no progress bar — none of which
changes the work. Records become TRL's conversational formats: prompt-completion for SFT
(loss on the completion: TRL's default for that format, the same tokens tunesmith
trains), prompt/chosen/rejected for DPO.

``trl-default``: everything else as TRL ships it, plus ``use_cpu=True`` on a machine
without CUDA (without it TRL's default bf16 refuses to start there). On a CPU that means
  bf16=True (``_BaseConfig``: bf16 defaults to ``not fp16``) → bf16 autocast,
  gradient_checkpointing=True (TRL's override of transformers' False),
  optim adamw_torch_fused, random sampling, logging every 10 steps,
  learning rate 2e-5 (SFT) / 1e-6 (DPO).
``trl-best``: what runs fastest here —
  bf16 autocast only where the CPU has a native bf16 path (AMX / AVX512-BF16; the same
  rule as tunesmith's dtype auto), ``trl-best-fp32`` forces fp32;
  activation/gradient checkpointing off (nothing here needs the memory);
  SFT: ``train_sampling_strategy="group_by_length"`` (less padding on real data; the
  DPO dataset has no ``input_ids`` column to group by, so DPO keeps random sampling);
  no packing / padding_free: on CPU there is no varlen attention kernel, so a flattened
  padding-free row goes through SDPA with a dense (B*T)^2 block mask — more work, not
  less; dataloader_num_workers=0 and no pinned memory (2 cores: a worker process would
  take compute from the step); logging only at the end.
``trl-best-precompute`` (DPO): trl-best + ``precompute_ref_log_probs=True``.
"""

from __future__ import annotations

from pathlib import Path

from bench.measure import Recorder
from bench.workloads import DPO_BETA, LEARNING_RATE, LORA, Spec, read_jsonl


def datasets_for(spec: Spec):
    from datasets import Dataset

    records = read_jsonl(spec.data_file)
    if spec.method == "sft":
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    else:
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]
    return Dataset.from_list(rows)


def settings(spec: Spec, bf16_fast: bool, cuda: bool = False) -> dict:
    """The SFTConfig/DPOConfig keyword arguments of a runner (JSON-friendly)."""
    common = {"output_dir": str(Path(spec.work_dir) / "trl"), "per_device_train_batch_size": spec.batch,
              "gradient_accumulation_steps": 1, "max_steps": spec.steps, "max_length": spec.max_length,
              "seed": spec.seed, "data_seed": spec.seed, "report_to": "none", "save_strategy": "no",
              "disable_tqdm": True}
    if not cuda:
        # TRL's default bf16=True refuses to start on a CPU-only machine ("Your setup doesn't
        # support bf16/gpu. You need to assign use_cpu ...") until use_cpu=True is given.
        common["use_cpu"] = True
    if spec.runner == "trl-default":
        return common
    best = {**common, "bf16": bf16_fast and spec.runner != "trl-best-fp32",
            "activation_checkpointing": False, "dataloader_num_workers": 0, "dataloader_pin_memory": False,
            "logging_steps": spec.steps, "learning_rate": LEARNING_RATE[spec.workload]}
    if spec.method == "sft":
        best.update(train_sampling_strategy="group_by_length", packing=False, padding_free=False)
    if spec.runner == "trl-best-precompute":
        best["precompute_ref_log_probs"] = True
    if spec.runner == "trl-liger":  # bench/gpu_check.py: TRL's best with Liger's fused kernels
        best["use_liger_kernel"] = True
    return best


def run(spec: Spec, rec: Recorder) -> dict:
    from peft import LoraConfig

    from tunesmith import hardware
    from tunesmith.models import load_tokenizer, resolve_model

    bf16_fast = hardware.detect().bf16_fast
    import torch

    kwargs = settings(spec, bf16_fast, torch.cuda.is_available())
    tokenizer = load_tokenizer(spec.model)
    path = str(resolve_model(spec.model))
    peft_config = None if spec.full else LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    dataset = datasets_for(spec)
    if spec.method == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**kwargs)
        trainer = SFTTrainer(model=path, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=DPO_BETA, **kwargs)
        trainer = DPOTrainer(model=path, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
    model = trainer.model
    rec.hook_causal_lm(model.get_base_model() if hasattr(model, "get_base_model") else model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "dtype": "bfloat16" if args.bf16 else "float32",
        "gradient_checkpointing": bool(args.activation_checkpointing),
        "config": {**kwargs, "resolved": {"bf16": args.bf16, "activation_checkpointing": args.activation_checkpointing,
                                          "optim": str(args.optim), "learning_rate": args.learning_rate,
                                          "logging_steps": args.logging_steps,
                                          "train_sampling_strategy": args.train_sampling_strategy}},
        "reported": {"final_loss": losses[-1] if losses else None, "records": len(dataset)},
    }
