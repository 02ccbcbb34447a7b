"""The non-training rows: matmul peak, generation speed, start-up time, compare.

- peak: ``bench.mfu.matmul_peak`` in fp32 and bf16 (run in a worker, same threads).
- generation: greedy, left padding, exactly N new tokens, batch 1 (128 new) and 16 (64 new):
  transformers' ``generate`` (what tunesmith ran before its own engine) with fp32 and bf16
  weights, tunesmith's engine (``infer.decode``) in fp32 and bf16, and llama.cpp on tunesmith's
  f16 GGUF export of the same weights (batch 1); prompts are Alpaca instructions through the
  chat template. tokens/s = new tokens of the batch / wall seconds of the call, prompt
  included (best of 2 after a 2-token warm-up).
- grpo: one GRPO step (4 prompts x 4 samples, 64 new tokens, LoRA, SmolLM2) with the sampling
  through transformers' ``generate`` (before) and through tunesmith's engine (now).
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


def _prompt_rows(tok, n: int) -> list[list[int]]:
    """n Alpaca instructions through the chat template, as tunesmith generate renders them."""
    from bench.workloads import REAL_FILES
    from tunesmith.data.tokenize import tokenize_prompt
    from tunesmith.data.validate import load_records

    return [tokenize_prompt(r["messages"][:-1], tok) for r in load_records(REAL_FILES["sft"])[:n]]


def _timed(fn) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def _decoders(model_name: str):
    """(label, dtype, run(input_ids, mask, n) -> new tokens [B, n]) for every decoder measured:
    transformers' generate as tunesmith ran it before its own engine (fp32 weights, and bf16
    weights), then tunesmith's engine (infer.decode) in fp32 and bf16. Exactly n new tokens (no stop)."""
    import torch
    from transformers import GenerationConfig

    from tunesmith.infer.decode import Decoder, Greedy
    from tunesmith.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(model_name, dtype=dtype).to(device).eval()

        def hf(ids, mask, n, model=model):
            cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, top_k=None, top_p=None,
                                   temperature=None, pad_token_id=0, use_cache=True)
            with torch.inference_mode():
                return model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=cfg)[:, ids.shape[1]:]
        yield "transformers", dtype, hf
        del model
    model = load_model(model_name, dtype=torch.float32).eval()
    for dtype in (torch.float32, torch.bfloat16):
        engine = Decoder.build(model, dtype)
        if engine is None:
            continue
        yield "tunesmith", dtype, (lambda ids, mask, n, e=engine: e.run(ids, mask, max_new_tokens=n, pick=Greedy(),
                                                                         stop_ids=[], pad_id=0))


def generation(model_name: str, new_tokens: dict[int, int], llama_cpp: bool = True) -> dict:
    """tokens/s of every decoder at each batch (``new_tokens``: batch -> new tokens per row), the
    whole call timed (prompt included) after a 2-token warm-up; plus llama.cpp on tunesmith's f16
    GGUF export of the same weights at batch 1 (``gguf_f16``)."""
    from tunesmith.infer.generate import left_pad  # tunesmith generate's own padding
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(model_name)
    prompts = _prompt_rows(tok, max(new_tokens))
    rows = []
    for label, dtype, run in _decoders(model_name):
        for b, n in new_tokens.items():
            ids, mask = left_pad(prompts[:b], tok.pad_token_id)
            run(ids, mask, 2)
            seconds = min(_timed(lambda: run(ids, mask, n)) for _ in range(2))
            rows.append({"decoder": label, "dtype": str(dtype).removeprefix("torch."), "batch": b, "new_tokens": n,
                         "prompt_tokens_max": int(ids.shape[1]), "seconds": round(seconds, 3),
                         "tokens_per_s": round(b * n / seconds, 2)})
    out = {"rows": rows}
    if llama_cpp and 1 in new_tokens:
        out["gguf_f16"] = _llama_cpp(model_name, prompts[0], new_tokens[1])
    return out


def _llama_cpp(model_name: str, prompt: list[int], n: int) -> dict:
    """llama.cpp (llama-cpp-python) greedy on tunesmith's own f16 GGUF of the same weights: n new
    tokens for the same prompt ids, the whole call timed (prompt included), best of two."""
    import tempfile

    import torch

    try:
        from llama_cpp import Llama
    except ImportError:
        return {"status": "not installed (pip install '.[gguf]')"}
    from tunesmith.export.gguf import write_gguf
    from tunesmith.models import load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model-f16.gguf"
        write_gguf(load_model(model_name, dtype=torch.float32), load_tokenizer(model_name), path, quant="f16")
        llm = Llama(path, n_threads=torch.get_num_threads(), n_ctx=len(prompt) + n + 8, verbose=False)

        def once():
            llm.reset()
            for made, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0), 1):
                if made == n:
                    break

        once()
        seconds = min(_timed(once) for _ in range(2))
        del llm
    return {"status": "ok", "quant": "f16", "batch": 1, "new_tokens": n, "prompt_tokens": len(prompt),
            "seconds": round(seconds, 3), "tokens_per_s": round(n / seconds, 2)}


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


GRPO_REWARD = '''
def brevity(completions, **kw):
    return [1.0 - min(len(c), 200) / 200 for c in completions]
'''


def grpo_step(model_name: str, work: Path, variant: str, steps: int = 3, new_tokens: int = 64) -> dict:
    """Seconds per GRPO step (4 prompts x 4 samples, ``new_tokens`` new tokens, LoRA r=8, the
    recipe's dtype auto) through ``tunesmith.train.recipe.run``: ``variant`` "transformers" samples
    with transformers' generate (tunesmith's path before its engine: the engine's build is made
    to decline), "tunesmith" with tunesmith's engine. Median of the steps after the first."""
    import json as _json
    import statistics

    from bench.measure import Recorder
    from bench.workloads import REAL_FILES
    from tunesmith.config import load_config
    from tunesmith.data.validate import load_records
    from tunesmith.train.recipe import run

    if variant == "transformers":
        from tunesmith.infer.decode import Decoder

        Decoder.build = classmethod(lambda cls, model, dtype: None)
    folder = work / f"grpo-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reward.py").write_text(GRPO_REWARD)
    prompts = folder / "prompts.jsonl"
    records = load_records(REAL_FILES["sft"])[:4 * steps]
    prompts.write_text("".join(_json.dumps({"prompt": r["messages"][0]["content"]}) + "\n" for r in records))
    cfg = load_config(None, raw={
        "model": model_name, "method": "grpo", "data": {"train": str(prompts), "max_length": 512},
        "lora": {"r": 8, "alpha": 16},
        "grpo": {"num_generations": 4, "max_new_tokens": new_tokens, "temperature": 1.0,
                 "reward_funcs": [f"{folder / 'reward.py'}:brevity"]},
        "train": {"max_steps": steps, "batch_size": 4, "save_steps": 0, "eval_steps": 0, "logging_steps": 1},
        "output_dir": str(folder / "run")})
    rec = Recorder().install()
    rec.begin = time.perf_counter()
    run(cfg)
    stamps = [rec.begin] + rec.stamps
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    logged = [_json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    lengths = [m["completion_length"] for m in logged if "completion_length" in m]
    return {"variant": variant, "steps": len(step_s), "step_seconds": [round(x, 2) for x in step_s],
            "step_s": round(statistics.median(step_s[1:] or step_s), 2),
            "completion_length_mean": round(sum(lengths) / len(lengths), 1) if lengths else None}
