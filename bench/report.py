"""Ratios, targets and the rich tables of a benchmark run (pure functions of the results)."""

from __future__ import annotations

from rich.table import Table

TRL_BEST = ("trl-best", "trl-best-fp32")
TUNESMITH = ("tunesmith", "tunesmith-fp32", "tunesmith-compile")


def _rate(rows: list[dict], workload: str, dataset: str, runners: tuple[str, ...], key="trained_tokens_per_s"):
    """(best rate, runner) among ``runners`` for one workload x dataset, or (None, None)."""
    found = [(r[key], r["runner"]) for r in rows
             if r["workload"] == workload and r["dataset"] == dataset and r["runner"] in runners
             and r.get("ok") and r.get(key)]
    return max(found) if found else (None, None)


def add_ratios_and_mfu(rows: list[dict], peaks: dict | None) -> None:
    """Per row: mfu (vs the peak of its compute dtype) and x_trl_default / x_trl_best / x_plain
    (its trained tokens/s over theirs; a precompute row is set against trl-best-precompute when
    that ran, else against TRL best)."""
    for r in rows:
        if not r.get("ok"):
            continue
        if peaks and r.get("flops"):
            peak = peaks.get("bf16" if r.get("dtype") == "bfloat16" else "fp32")
            r["achieved_tflops"] = round(r["flops"] / r["measured_s"] / 1e12, 4)
            r["mfu"] = round(r["flops"] / r["measured_s"] / peak, 4) if peak else None
            r["mfu_vs_fp32_peak"] = round(r["flops"] / r["measured_s"] / peaks["fp32"], 4) if peaks.get("fp32") else None
        w, d, x = r["workload"], r["dataset"], r["trained_tokens_per_s"]
        best = TRL_BEST
        if r["runner"].endswith("precompute") and _rate(rows, w, d, ("trl-best-precompute",))[0]:
            best = ("trl-best-precompute",)  # like for like when TRL's precompute ran too
        for col, runners in (("x_trl_default", ("trl-default",)), ("x_trl_best", best), ("x_plain", ("plain",))):
            base, _ = _rate(rows, w, d, runners)
            r[col] = round(x / base, 3) if base else None


def _gen(gen: dict | None, decoder: str, batch: int, dtypes=("float32", "bfloat16")) -> tuple[float | None, str]:
    """(best tokens/s, "decoder dtype") of ``decoder`` at ``batch`` among ``dtypes``."""
    found = [(g["tokens_per_s"], f"{decoder} {_dtype(g)}") for g in (gen or {}).get("rows", [])
             if g["decoder"] == decoder and g["batch"] == batch and g["dtype"] in dtypes]
    return max(found) if found else (None, "")


def _speed_targets(rows: list[dict], gen: dict | None, grpo: list[dict] | None) -> list[dict]:
    """The "speed close to the hardware" targets: training ratios, generation, GRPO."""
    out = []

    def add(name, goal, a, b, detail, limit):
        value = a / b if a and b else None
        out.append({"target": name, "goal": f">= {limit}x" if goal is None else goal, "value": value,
                    "detail": detail if value is not None else "—", "pass": None if value is None else value >= limit})

    for wl, goal in (("sft-lora", 3.0), ("dpo-lora", 2.0), ("sft-full", 2.0)):
        (a, who), (b, whom) = _rate(rows, wl, "uniform", TUNESMITH), _rate(rows, wl, "uniform", TRL_BEST)
        add(f"{wl} uniform vs TRL best (speed)", None, a, b, f"{who} vs {whom}", goal)
    bf16 = [r for r in rows if r.get("ok") and r.get("mfu") is not None and r["workload"] == "sft-lora"
            and r["dataset"] == "uniform" and r["runner"] in TUNESMITH and r.get("dtype") == "bfloat16"]
    m, who = max(((r["mfu"], r["runner"]) for r in bf16), default=(None, None))
    out.append({"target": "sft-lora uniform MFU vs the bf16 peak", "goal": ">= 50%", "value": m,
                "detail": f"{who} (bf16)" if m is not None else "—", "pass": None if m is None else m >= 0.5,
                "percent": True})
    ours, who = _gen(gen, "tunesmith", 1)
    cpp = ((gen or {}).get("gguf_f16") or {}).get("tokens_per_s")
    add("generation batch 1 vs llama.cpp f16 GGUF", None, ours, cpp, f"{who} vs llama.cpp f16 (same weights)", 0.5)
    ours, who = _gen(gen, "tunesmith", 16)
    before, whom = _gen(gen, "transformers", 16, ("float32",))
    add("generation batch 16 vs before (transformers fp32)", None, ours, before, f"{who} vs {whom}", 3.0)
    by = {g.get("variant"): g.get("step_s") for g in grpo or [] if g.get("ok")}
    add("GRPO step (4x4, 64 new) vs before", None, by.get("transformers"), by.get("tunesmith"),
        "sampling by tunesmith's engine vs transformers' generate", 2.0)
    return out


def targets(rows: list[dict], startup: dict | None, gen: dict | None = None, grpo: list[dict] | None = None
            ) -> list[dict]:
    """The issues' targets; tunesmith is taken at its faster dtype (auto or fp32)."""
    out = []

    def ratio(name, workload, dataset, ours, theirs, goal):
        a, who = _rate(rows, workload, dataset, ours)
        b, whom = _rate(rows, workload, dataset, theirs)
        value = a / b if a and b else None
        out.append({"target": name, "goal": f">= {goal}x", "value": value,
                    "detail": f"{who} vs {whom}" if value is not None else "—",
                    "pass": None if value is None else value >= goal})

    for wl in ("sft-lora", "dpo-lora"):
        ratio(f"{wl} uniform vs TRL default", wl, "uniform", TUNESMITH, ("trl-default",), 10.0)
        ratio(f"{wl} uniform vs TRL best", wl, "uniform", TUNESMITH, TRL_BEST, 1.0)
        ratio(f"{wl} uniform vs plain loop", wl, "uniform", TUNESMITH, ("plain",), 0.95)
    ratio("sft-lora real (Alpaca) vs TRL best", "sft-lora", "real", TUNESMITH, TRL_BEST, 1.5)
    # MFU of each tunesmith variant against the matmul peak of the dtype it computes in (bf16
    # autocast vs the bf16 peak, fp32 vs the fp32 peak: the issue's own framing); the best one
    mfu, who = max(((r["mfu"], r["runner"]) for r in rows if r.get("ok") and r.get("mfu") is not None
                    and r["workload"] == "sft-lora" and r["dataset"] == "uniform" and r["runner"] in TUNESMITH),
                   default=(None, None))
    out.append({"target": "sft-lora uniform MFU", "goal": ">= 50%", "value": mfu, "detail": who or "—",
                "pass": None if mfu is None else mfu >= 0.5, "percent": True})
    for ds in ("uniform", "real"):
        ratio(f"dpo-lora {ds}: precompute_ref vs on-line reference", "dpo-lora", ds,
              ("tunesmith-precompute",), ("tunesmith",), 1.25)
    s = (startup or {}).get("to_first_step_s")
    out.append({"target": "start-up to first step", "goal": "< 15 s", "value": s, "detail": "tunesmith train",
                "pass": None if s is None else s < 15, "seconds": True})
    return out + _speed_targets(rows, gen, grpo)


def _f(x, fmt="{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _x(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _dtype(r: dict) -> str:
    return (r.get("dtype") or "").replace("bfloat16", "bf16").replace("float32", "fp32")


def _shown(target: dict) -> str:
    """A target's measured value: a percentage, seconds or a ratio."""
    v = target["value"]
    return ("—" if v is None else f"{100 * v:.1f}%" if target.get("percent") else f"{v:.1f} s"
            if target.get("seconds") else f"{v:.2f}x")


def training_table(rows: list[dict]) -> Table:
    t = Table(title="training throughput (measured steps only; ratios = trained tokens/s over the baseline's)")
    for col in ("workload", "data", "runner", "dtype", "ckpt", "steps", "tok/s", "trained tok/s", "pairs/s",
                "step s", "pre-train s", "peak RSS GiB", "MFU", "x TRL def", "x TRL best", "x plain"):
        t.add_column(col, justify="left" if col in ("workload", "data", "runner", "dtype") else "right")
    for r in rows:
        if not r.get("ok"):
            status = "pending" if r.get("pending") else "failed"
            t.add_row(r["workload"], r["dataset"], r["runner"], f"[yellow]{status}[/yellow]", *[""] * 12)
            continue
        t.add_row(r["workload"], r["dataset"], r["runner"], _dtype(r), "on" if r.get("gradient_checkpointing") is True else "off",
                  str(r["measured_steps"]), _f(r["tokens_per_s"]), _f(r["trained_tokens_per_s"]),
                  _f(r.get("pairs_per_s"), "{:.2f}"), _f(r["step_s_median"], "{:.2f}"), _f(r["pre_train_s"]),
                  _f(r.get("peak_rss_gib"), "{:.2f}"), _f(100 * r["mfu"] if r.get("mfu") is not None else None,
                                                         "{:.1f}%"),
                  _x(r.get("x_trl_default")), _x(r.get("x_trl_best")), _x(r.get("x_plain")))
    return t


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['workload']}/{r['dataset']}/{r['runner']}: {'pending' if r.get('pending') else 'failed'}: "
            f"{r.get('error')}" for r in rows if not r.get("ok")]


def targets_table(items: list[dict]) -> Table:
    t = Table(title="targets")
    for col in ("target", "goal", "measured", "runners", "result"):
        t.add_column(col)
    for it in items:
        res = "[dim]n/a[/dim]" if it["pass"] is None else "[green]PASS[/green]" if it["pass"] else "[red]FAIL[/red]"
        t.add_row(it["target"], it["goal"], _shown(it), it["detail"], res)
    return t


def generation_line(gen: dict) -> str:
    """One console line per generation job: every decoder at every batch, llama.cpp beside them."""
    if not gen.get("ok"):
        return f"generation: [yellow]FAILED[/yellow] {gen.get('error')}"
    parts = [f"{g['decoder']} {_dtype(g)} b{g['batch']} {g['tokens_per_s']:.1f}" for g in gen["rows"]]
    cpp = gen.get("gguf_f16") or {}
    parts.append(f"llama.cpp f16 b1 {cpp['tokens_per_s']:.1f}" if cpp.get("status") == "ok"
                 else f"llama.cpp: {cpp.get('status')}")
    return "generation (new tok/s): " + ", ".join(parts)


def grpo_line(grpo: list[dict]) -> str:
    return "GRPO step: " + ", ".join(
        f"{g['variant']} {g['step_s']:.2f} s (completions {g['completion_length_mean']} tokens)" if g.get("ok")
        else f"{g.get('variant', '?')} FAILED {g.get('error')}" for g in grpo)


def extras_table(peaks: dict | None, gen: dict | None, startup: dict | None, compare: dict | None,
                 grpo: list[dict] | None = None) -> Table:
    t = Table(title="matmul peak, generation, GRPO, start-up, compare")
    t.add_column("row")
    t.add_column("value", justify="right")
    t.add_column("note")
    if peaks:
        for k in ("fp32", "bf16"):
            if peaks.get(k):
                t.add_row(f"matmul peak {k}", f"{peaks[k] / 1e9:.0f} GFLOP/s", "best of 5 torch.mm 2048^3")
    for g in (gen or {}).get("rows", []):
        t.add_row(f"generate batch {g['batch']}: {g['decoder']} {_dtype(g)}", f"{g['tokens_per_s']:.1f} tok/s",
                  f"{g['new_tokens']} new tokens greedy, {g['seconds']:.2f} s")
    cpp = (gen or {}).get("gguf_f16")
    if cpp:
        t.add_row("generate batch 1: llama.cpp f16 GGUF", _f(cpp.get("tokens_per_s"), "{:.1f} tok/s"),
                  cpp.get("status") if cpp.get("status") != "ok" else f"{cpp['new_tokens']} new tokens greedy")
    if gen and not gen.get("ok", True):
        t.add_row("generate", "failed", (gen.get("error") or "")[:80])
    for g in grpo or []:
        t.add_row(f"GRPO step, sampling by {g.get('variant')}", _f(g.get("step_s"), "{:.2f} s") if g.get("ok")
                  else "failed", f"completions {g.get('completion_length_mean')} tokens" if g.get("ok")
                  else (g.get("error") or "")[:80])
    if startup:
        t.add_row("start-up: data report line", _f(startup.get("to_train_start_s"), "{:.1f} s"), startup["command"])
        t.add_row("start-up: first metrics line", _f(startup.get("to_first_step_s"), "{:.1f} s"),
                  f"exit {startup['returncode']}")
    if compare:
        t.add_row("compare 3 models x 60 prompts", _f(compare.get("seconds"), "{:.1f} s"), compare["status"])
    return t


def markdown(result: dict) -> str:
    """The README's "Latest figures" tables from a results JSON (``python -m bench.report FILE``)."""
    peaks = result.get("matmul_peak_flops") or {}
    lines = ["| workload | data | runner | dtype | trained tok/s | tok/s | step s | peak RSS GiB "
             "| MFU (own dtype / fp32 peak) | x TRL default | x TRL best | x plain |", "|" + "---|" * 12]
    for r in result["training"]:
        if not r.get("ok"):
            lines.append(f"| {r['workload']} | {r['dataset']} | {r['runner']} | failed |" + " |" * 8)
            continue
        mfu = (f"{100 * r['mfu']:.1f}% / {100 * r['mfu_vs_fp32_peak']:.0f}%"
               if r.get("mfu") is not None and r.get("mfu_vs_fp32_peak") is not None else "—")
        lines.append(f"| {r['workload']} | {r['dataset']} | {r['runner']} | "
                     f"{_dtype(r)} | "
                     f"{r['trained_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['step_s_median']:.2f} | "
                     f"{_f(r.get('peak_rss_gib'), '{:.2f}')} | {mfu} | {_x(r.get('x_trl_default'))} | "
                     f"{_x(r.get('x_trl_best'))} | {_x(r.get('x_plain'))} |")
    lines += ["", "| extra | value |", "|---|---|"]
    if peaks.get("fp32"):
        lines.append(f"| matmul peak fp32 / bf16 (2048² torch.mm, best of 5) | {peaks['fp32'] / 1e9:.0f} / "
                     f"{peaks.get('bf16', 0) / 1e9:.0f} GFLOP/s |")
    gen = result.get("generation") or {}
    for g in gen.get("rows", []):
        lines.append(f"| generation batch {g['batch']}, {g['new_tokens']} new tokens: {g['decoder']} {_dtype(g)} | "
                     f"{g['tokens_per_s']:.1f} tok/s |")
    cpp = gen.get("gguf_f16") or {}
    if cpp.get("status") == "ok":
        lines.append(f"| generation batch 1, {cpp['new_tokens']} new tokens: llama.cpp, tunesmith's f16 GGUF | "
                     f"{cpp['tokens_per_s']:.1f} tok/s |")
    for g in result.get("grpo") or []:
        if g.get("ok"):
            lines.append(f"| GRPO step (4 prompts x 4 samples, 64 new), sampling by {g['variant']} | "
                         f"{g['step_s']:.2f} s |")
    s = result.get("startup") or {}
    if s.get("to_first_step_s") is not None:
        lines.append(f"| start-up to the first step (cached model) | {s['to_first_step_s']:.1f} s "
                     f"({_f(s.get('to_train_start_s'))} s to the data report line) |")
    c = result.get("compare") or {}
    if c.get("seconds") is not None:
        lines.append(f"| compare {c.get('models', 3)} models x {c.get('prompts')} prompts x {c.get('new_tokens')} "
                     f"new tokens, batch {c.get('batch')} | {c['seconds']:.1f} s |")
    lines += ["", "| target | goal | measured | runners | result |", "|---|---|---|---|---|"]
    for it in result.get("targets", []):
        res = "n/a" if it["pass"] is None else "PASS" if it["pass"] else "FAIL"
        lines.append(f"| {it['target']} | {it['goal']} | {_shown(it)} | {it['detail']} | {res} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
