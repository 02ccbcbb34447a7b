"""The bench harness's own arithmetic: step window, token counts, model FLOPs, targets.

The benchmark itself (``python -m bench``) prints figures and is not a test; these check
that what it divides and compares is computed right, on tiny real tensors and models.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from bench import mfu, report
from bench.measure import Recorder


def test_window_counts_only_the_measured_steps():
    rec = Recorder()
    rec.begin = 0.0
    ids = torch.ones(2, 6, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    labels = torch.full((2, 6), -100)
    labels[:, 4:] = 7                                  # 2 trained positions per row
    for step, t in enumerate((10.0, 12.0, 15.0, 17.0)):  # stamps after steps 1..4
        rec.record(ids, labels, mask)                  # policy pass of step `step`
        with torch.no_grad():
            rec.record(ids, labels, mask)              # reference pass
        rec.stamps.append(t)
    w = rec.window(1)
    assert w["measured_steps"] == 3 and w["measured_s"] == 7.0 and w["step_s_median"] == 2.0
    assert w["tokens"] == 3 * 10 and w["trained_tokens"] == 3 * 4 and w["rows"] == 6
    assert w["ref_tokens"] == 30 and w["sq_lengths"] == 3 * (36 + 16)
    assert w["step_seconds"] == [10.0, 2.0, 3.0, 2.0]
    assert w["pre_train_s"] == 8.0                     # first stamp minus one median step


def test_param_counts_and_flops_match_smollm2_shapes():
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)
    c = mfu.param_counts(cfg, 8)
    assert round(c["body"] / 1e6, 1) == 106.2 and round(c["head"] / 1e6, 1) == 28.3
    assert round(c["lora"] / 1e6, 2) == 2.44              # tunesmith's report: "trainable 2.44M"
    w = {"tokens": 100, "trained_tokens": 60, "sq_lengths": 2 * 50 * 50,
         "ref_tokens": 0, "ref_sq_lengths": 0, "ref_trained_tokens": 0}
    full = mfu.window_flops(mfu.param_counts(cfg), w, lora=False)
    assert full == 100 * 6 * c["body"] + 12 * 30 * 576 * 5000 + 60 * 6 * c["head"]
    lora = mfu.window_flops(c, {**w, "ref_tokens": 100, "ref_sq_lengths": 5000, "ref_trained_tokens": 60},
                            lora=True)
    assert lora == (100 * (4 * c["body"] + 6 * c["lora"]) + 12 * 30 * 576 * 5000 + 60 * 4 * c["head"]
                    + 100 * 2 * c["body"] + 4 * 30 * 576 * 5000 + 60 * 2 * c["head"])


def _row(runner, rate, workload="sft-lora", dataset="uniform", dtype="bfloat16", flops=1e12, seconds=10.0):
    return {"ok": True, "workload": workload, "dataset": dataset, "runner": runner, "dtype": dtype,
            "trained_tokens_per_s": rate, "tokens_per_s": 1.5 * rate, "step_s_median": 1.0, "flops": flops,
            "measured_s": seconds}


def test_ratios_and_targets():
    rows = [_row("tunesmith", 200.0, flops=2e12), _row("tunesmith-fp32", 150.0, dtype="float32", flops=1.5e12),
            _row("trl-default", 100.0), _row("trl-best", 120.0), _row("trl-best-fp32", 130.0, dtype="float32"),
            _row("plain", 190.0),
            _row("tunesmith", 50.0, "dpo-lora"), _row("tunesmith-precompute", 65.0, "dpo-lora"),
            _row("trl-best", 40.0, "dpo-lora")]
    report.add_ratios_and_mfu(rows, {"fp32": 1e12, "bf16": 4e12})
    ts = rows[0]
    assert ts["x_trl_default"] == 2.0 and ts["x_trl_best"] == round(200 / 130, 3) and ts["x_plain"] == round(200 / 190, 3)
    assert ts["mfu"] == 0.05 and ts["mfu_vs_fp32_peak"] == 0.2       # bf16 row against the bf16 peak
    assert rows[1]["mfu"] == 0.15                                     # fp32 row against the fp32 peak
    assert rows[7]["x_trl_best"] == round(65 / 40, 3)                 # no trl-best-precompute: against TRL best
    goals = {g["target"]: g for g in report.targets(rows, {"to_first_step_s": 5.0})}
    assert goals["sft-lora uniform vs TRL best"]["pass"] is True
    assert goals["sft-lora uniform vs TRL default"]["pass"] is False
    mfu_goal = goals["sft-lora uniform MFU"]
    assert mfu_goal["value"] == 0.15 and mfu_goal["detail"] == "tunesmith-fp32" and mfu_goal["pass"] is False
    assert goals["dpo-lora uniform: precompute_ref vs on-line reference"]["value"] == 1.3
    assert goals["start-up to first step"]["pass"] is True
    assert "| sft-lora | uniform | tunesmith | bf16 | 200.0 |" in report.markdown(
        {"training": rows, "targets": list(goals.values())})


def test_speed_targets_from_generation_and_grpo_rows():
    rows = [_row("tunesmith", 300.0), _row("trl-best", 100.0), _row("tunesmith", 150.0, "sft-full"),
            _row("trl-best", 100.0, "sft-full"), _row("tunesmith", 90.0, "dpo-lora"), _row("trl-best", 50.0, "dpo-lora")]
    report.add_ratios_and_mfu(rows, {"fp32": 1e12, "bf16": 4e12})

    def g(decoder, dtype, batch, rate):
        return {"decoder": decoder, "dtype": dtype, "batch": batch, "new_tokens": 64, "seconds": 1.0,
                "tokens_per_s": rate, "prompt_tokens_max": 40}

    gen = {"ok": True, "rows": [g("transformers", "float32", 1, 15.0), g("transformers", "float32", 16, 100.0),
                                g("transformers", "bfloat16", 16, 140.0), g("tunesmith", "float32", 1, 25.0),
                                g("tunesmith", "bfloat16", 1, 36.0), g("tunesmith", "bfloat16", 16, 290.0)],
           "gguf_f16": {"status": "ok", "tokens_per_s": 70.0, "new_tokens": 128}}
    grpo = [{"ok": True, "variant": "transformers", "step_s": 20.0, "completion_length_mean": 60},
            {"ok": True, "variant": "tunesmith", "step_s": 9.0, "completion_length_mean": 61}]
    goals = {t["target"]: t for t in report.targets(rows, None, gen, grpo)}
    assert goals["sft-lora uniform vs TRL best (speed)"]["value"] == 3.0
    assert goals["sft-lora uniform vs TRL best (speed)"]["pass"] is True
    assert goals["dpo-lora uniform vs TRL best (speed)"]["value"] == 1.8
    assert goals["dpo-lora uniform vs TRL best (speed)"]["pass"] is False
    assert goals["sft-full uniform vs TRL best (speed)"]["value"] == 1.5
    one = goals["generation batch 1 vs llama.cpp f16 GGUF"]
    assert abs(one["value"] - 36 / 70) < 1e-9 and one["pass"] is True and "tunesmith bf16" in one["detail"]
    sixteen = goals["generation batch 16 vs before (transformers fp32)"]  # against fp32, never the bf16 row
    assert sixteen["value"] == 2.9 and sixteen["pass"] is False
    assert goals["GRPO step (4x4, 64 new) vs before"]["value"] == 20 / 9
    assert goals["sft-lora uniform MFU vs the bf16 peak"]["value"] == 0.025  # 1e12 FLOPs / 10 s / 4e12
    text = report.markdown({"training": rows, "generation": gen, "grpo": grpo, "targets": list(goals.values())})
    assert "llama.cpp, tunesmith's f16 GGUF | 70.0 tok/s" in text and "sampling by tunesmith | 9.00 s" in text
    missing = {t["target"]: t for t in report.targets(rows, None, None, None)}
    assert missing["generation batch 1 vs llama.cpp f16 GGUF"]["pass"] is None


def test_gpu_check_dry_run_runs_every_row_on_this_cpu():
    """The GPU check's script as a GPU machine would run it, on a tiny model: every row that can
    run on a CPU trains for real; the CUDA-only ones say why they were skipped."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--dry-run"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in proc.stdout.splitlines()]  # stdout: JSON lines only
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, summary = {r["row"]: r for r in lines[:-1]}, lines[-1]["summary"]
    assert len(rows) == 8 and summary["failed"] == [] and summary["dry_run"]
    if not torch.cuda.is_available():
        assert set(summary["skipped"]) == {"tunesmith sft-qlora", "trl-liger sft-lora"}
        assert rows["tunesmith sft-qlora"]["skipped"] == "needs a CUDA GPU"
    for name, r in rows.items():
        if not r.get("skipped"):
            assert r["ok"] and r["tokens_per_s"] > 0 and r["peak_gib"] > 0, (name, r)
    assert rows["tunesmith sft-full fsdp2"]["distributed"] == "fsdp2"
    assert rows["tunesmith sft-full"]["distributed"] == "none"
    # a GPU run on a machine without one is one sentence, exit 2
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], cwd=root, capture_output=True, text=True,
                          timeout=120)
    if not torch.cuda.is_available():
        assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr and proc.stdout == ""
