"""The non-training rows: matmul peak, generation speed, start-up time, compare.

- peak: ``bench.mfu.matmul_peak`` in fp32 and bf16 (run in a worker, same threads).
- generation: ``model.generate`` greedy, left padding, exactly ``new_tokens`` new tokens
  (``min_new_tokens`` = ``max_new_tokens``), batch 1 and batch 8, in fp32 and with bf16
  weights; prompts are Alpaca instructions through the chat template. tokens/s = new
  tokens of the batch / wall seconds of the generate call (after one short warm-up).
- start-up: ``tunesmith train CFG`` as a subprocess (LoRA SFT, 1 step of 2 x 64-token
  records, the embedded model already cached); the seconds until the run's ``data:``
  report line (just before the loop starts) and until the first metrics.jsonl line
  (the end of step 1) appear.
- compare: ``compare_models`` on base + 2 LoRA adapters (one base in memory), 60 prompts, 64 new tokens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml


def peak() -> dict:
    from bench.mfu import matmul_peak

    return {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}


def generation(model_name: str, new_tokens: int, batches: tuple[int, ...]) -> dict:
    import torch

    from bench.workloads import REAL_FILES
    from tunesmith.data.validate import load_records
    from tunesmith.models import load_model, load_tokenizer

    tok = load_tokenizer(model_name)
    tok.padding_side = "left"
    records = load_records(REAL_FILES["sft"])[: max(batches)]
    texts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in records]
    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(model_name, dtype=dtype).to(device).eval()
        for b in batches:
            enc = tok(texts[:b], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
                sync()
                t = time.perf_counter()
                out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                sync()
                seconds = time.perf_counter() - t
            made = (out.shape[1] - enc["input_ids"].shape[1]) * b
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": b, "new_tokens": new_tokens,
                         "prompt_tokens_max": int(enc["input_ids"].shape[1]), "seconds": round(seconds, 3),
                         "tokens_per_s": round(made / seconds, 2)})
        del model
    return {"rows": rows}


def tunesmith_command() -> list[str]:
    exe = Path(sys.executable).parent / "tunesmith"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tunesmith"]


def startup(model_name: str, data_file: str, work: Path, threads: int, timeout: float = 300) -> dict:
    """Seconds from launching ``tunesmith train`` to its data: line and first metrics line."""
    out = work / "startup-run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"model": model_name, "method": "sft", "data": {"train": data_file, "max_length": 64},
           "train": {"max_steps": 1, "batch_size": 2, "save_steps": 0, "eval_steps": 0, "threads": threads},
           "output_dir": str(out)}
    path = work / "startup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    metrics = out / "metrics.jsonl"
    seen: dict[str, float] = {}
    log: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(tunesmith_command() + ["train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})

    def read():
        for line in proc.stderr:
            log.append(line.rstrip())
            if re.match(r"data: \d", line) and "data_line" not in seen:  # not the config's `data:` key
                seen["data_line"] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        if "first_metrics" not in seen and metrics.exists() and metrics.stat().st_size > 0:
            seen["first_metrics"] = time.perf_counter() - t0
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(timeout=5)
    if "first_metrics" not in seen and metrics.exists() and metrics.stat().st_size > 0:
        seen["first_metrics"] = time.perf_counter() - t0  # step 1 was also the last: finished within a poll
    total = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"command": " ".join(tunesmith_command() + ["train", "CFG"]), "returncode": proc.returncode,
            "to_train_start_s": round(seen["data_line"], 2) if "data_line" in seen else None,
            "to_first_step_s": round(seen["first_metrics"], 2) if "first_metrics" in seen else None,
            "total_s": round(total, 2), "log_tail": log[-5:] if proc.returncode else []}


def _random_adapters(model_name: str, work: Path, n: int) -> list[str]:
    """n LoRA adapter folders (r=8, all linear layers, random B so each changes the model)
    on the base: the stand-ins for "an SFT and a DPO run" — their outputs differ from the
    base's, which is all the timing needs, and they cost seconds instead of a training run."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import load_model

    folders = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(load_model(model_name), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                   init_lora_weights=False, task_type="CAUSAL_LM"))
        folder = work / f"adapter-{i}"
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def compare_row(model_name: str, work: Path, prompts: int = 60, new_tokens: int = 64, batch: int | None = None) -> dict:
    """``compare_models`` on base + 2 adapters (one base in memory), ``prompts`` prompts of the
    built-in instruction-following suite, ``new_tokens`` new tokens, greedy, batch ``batch``
    (default: the CLI's)."""
    from tunesmith.infer import GENERATION_BATCH
    from tunesmith.evaluate.compare import compare_models

    batch = batch or GENERATION_BATCH

    specs = [model_name] + _random_adapters(model_name, work, 2)
    started = time.time()
    result = compare_models(specs, "instruction_following", max_new_tokens=new_tokens, batch_size=batch,
                            limit=prompts, labels=["base", "adapter-a", "adapter-b"])
    seconds = time.time() - started
    return {"status": "ok", "seconds": round(seconds, 1), "models": 3, "prompts": prompts, "new_tokens": new_tokens,
            "batch": batch, "per_model_s": {m["label"]: m.get("seconds") for m in result["models"]},
            "loads": len(result.get("groups") or [])}
