"""Serve an export with vLLM and compare its greedy tokens with transformers' (CUDA + vLLM only).

    .venv/bin/python -m bench.vllm_check EXPORT_DIR                  # 8 built-in chat prompts, 32 new tokens
    .venv/bin/python -m bench.vllm_check EXPORT_DIR --max-new-tokens 64 --dtype float32 --out result.json
    .venv/bin/python -m bench.vllm_check EXPORT_DIR --prompts prompts.jsonl   # {"messages": [...]} or {"prompt": "..."}

EXPORT_DIR is a ``tunesmith export`` folder, ``--format adapter`` (loaded on its base with
``LLM(model=BASE, enable_lora=True, max_lora_rank=…)`` and a ``LoRARequest``) or ``--format
merged`` (``LLM(model=EXPORT_DIR)``). The base is ``--base``, else tunesmith.json's
``adapter_base_path``, else adapter_config.json's ``base_model_name_or_path``.

vLLM is started as tunesmith's prediction says to serve the export (tunesmith.json ``"vllm"``,
else ``tunesmith.export.vllm`` run now): ``--max-lora-rank`` its ``max_lora_rank``, the export's
tokenizer only where its serve command has ``--tokenizer``, ``--trust-remote-code`` and
``--default-chat-template-kwargs`` as the command has them. vLLM renders the chats itself, as a
server does, so a wrong rule there shows up as a prompt mismatch.

1. transformers: the prompts rendered with the export's tokenizer and chat template (plus the
   template switches training used, tunesmith.json ``chat.template_kwargs``) — what training
   saw; base + ``PeftModel`` (or the merged folder) in **float32** on the GPU (TF32 off),
   greedy, ``N`` new tokens, EOS ignored, keeping every step's logits.
2. The transformers model is freed; vLLM: ``LLM.chat`` with ``SamplingParams(temperature=0,
   max_tokens=N, ignore_eos=True)`` in ``--dtype`` (default bfloat16), the adapter as
   ``LoRARequest``; for an adapter also once without it, to show the adapter changes the tokens.
3. Per prompt: a **MISMATCH** if vLLM's prompt ids are not transformers' (its tokenizer or
   template is not the one training used). Else identical, or the first position where the
   tokens differ. There the gap ``logit[hf token] - logit[vLLM token]`` in transformers' fp32
   logits (same prefix up to that point) decides: a **near-tie** when gap ≤ ``rtol · max|logit|``
   of that row (defaults: float32 1e-3, float16 1e-2, bfloat16 3e-2 — the bf16 figure is the
   llama.cpp tolerance export.py measured for rounded activations), the comparison ends there
   (the continuations are no longer the same text); otherwise a **MISMATCH**.

Exit 0: every prompt identical or diverging at a near-tie. Exit 1: a mismatch, or vLLM refused
to load what it was given. Exit 2: not run (no CUDA GPU, no vLLM, not an export), with one
sentence saying which. The prediction is printed beside vLLM's verdict, so a stale rule shows up.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shlex
import sys
from pathlib import Path

PROMPTS = [
    "Write one sentence about the sea.",
    "What is the capital of France? Answer in one word.",
    "List three colours of the rainbow.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that adds two numbers.",
    "Give me a short title for a story about a lighthouse keeper.",
    "What is 12 times 7?",
]
RTOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}
DEVICE = "cuda"  # where transformers runs (tests run the script's logic on "cpu" with a stand-in vLLM)


class NotRun(Exception):
    """The check cannot run here: exit 2 with this sentence."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vllm_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="a tunesmith export folder (adapter or merged)")
    p.add_argument("--base", type=Path, default=None, help="the adapter's base folder (default: from tunesmith.json)")
    p.add_argument("--prompts", type=Path, default=None,
                   help='JSONL of {"messages": [...]} or {"prompt": "..."} (default: 8 built-in prompts)')
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--dtype", choices=sorted(RTOL), default="bfloat16", help="vLLM's dtype (default bfloat16)")
    p.add_argument("--rtol", type=float, default=None, help="near-tie tolerance, relative to max|logit| of the row")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of GPU memory")
    p.add_argument("--out", type=Path, default=None, help="write the per-prompt results here as JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------- pure parts (tested on CPU)


def compare_tokens(ref: list[int], rows, got: list[int], rtol: float) -> dict:
    """``ref``: transformers' greedy tokens, ``rows[i]``: its logits at step i (a 1-D tensor),
    ``got``: vLLM's tokens. The verdict for one prompt (see the module docstring)."""
    n = min(len(ref), len(got))
    for i in range(n):
        if ref[i] != got[i]:
            row = rows[i]
            gap = float(row[ref[i]] - row[got[i]])
            scale = float(row.abs().max())
            tie = gap <= rtol * scale
            return {"same": i, "first_diff": i, "gap": gap, "limit": rtol * scale, "ok": tie,
                    "verdict": "near-tie" if tie else "MISMATCH"}
    if len(ref) != len(got):
        return {"same": n, "first_diff": n, "gap": None, "limit": None, "ok": False,
                "verdict": f"MISMATCH (lengths {len(ref)} vs {len(got)})"}
    return {"same": n, "first_diff": None, "gap": None, "limit": None, "ok": True, "verdict": "identical"}


def read_export(folder: Path, base: Path | None) -> dict:
    """What to load: {"mode": "adapter"|"merged", "model": path, "adapter": path|None, "manifest": {...}}."""
    if not folder.is_dir():
        raise NotRun(f"{folder} is not a folder; give a tunesmith export folder")
    manifest_path = folder / "tunesmith.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if (folder / "adapter_config.json").is_file():
        cfg = json.loads((folder / "adapter_config.json").read_text())
        named = base or manifest.get("adapter_base_path") or cfg.get("base_model_name_or_path")
        base = Path(named) if named else None
        if base is None or not (base / "config.json").is_file():
            raise NotRun(f"the adapter's base ({named or 'not named'}) is not a model folder here; pass --base")
        return {"mode": "adapter", "model": base, "adapter": folder, "manifest": manifest}
    if (folder / "config.json").is_file():
        return {"mode": "merged", "model": folder, "adapter": None, "manifest": manifest}
    raise NotRun(f"{folder} holds neither adapter_config.json nor config.json; give an adapter or merged export")


def prediction(what: dict) -> dict:
    """tunesmith's prediction for the export: tunesmith.json's ``"vllm"``, else (none recorded, or
    the check could not run then) ``tunesmith.export.vllm`` run now; ``{}`` where it says nothing."""
    recorded = what["manifest"].get("vllm")
    if recorded and recorded.get("ok") is not None:
        return recorded
    from tunesmith.export.vllm import check_export

    manifest = what["manifest"]
    return check_export(what["adapter"] or what["model"], what["mode"],
                        base=what["model"] if what["adapter"] is not None else None,
                        trust_remote_code=bool(manifest.get("trust_remote_code")),
                        template_kwargs=(manifest.get("chat") or {}).get("template_kwargs")) or {}


def engine_args(what: dict, predicted: dict) -> tuple[dict, dict | None]:
    """``LLM(...)``'s arguments and the chat template switches, as the predicted serve command
    has them. Without one (refused, or not checked) the export's own tokenizer and switches."""
    manifest = what["manifest"]
    serve = shlex.split(predicted.get("serve") or "")
    kw = {"model": str(what["model"])}
    if what["adapter"] is not None:
        from tunesmith.export.vllm import MAX_LORA_RANKS

        kw.update(enable_lora=True, max_loras=1, max_lora_rank=predicted.get("max_lora_rank") or MAX_LORA_RANKS[-1])
    if not serve:
        switches = (manifest.get("chat") or {}).get("template_kwargs")
        return {**kw, "tokenizer": str(what["adapter"] or what["model"]),
                "trust_remote_code": bool(manifest.get("trust_remote_code"))}, switches
    if "--tokenizer" in serve:  # the command names the export folder where it was written: this one
        kw["tokenizer"] = str(what["adapter"] or what["model"])
    kw["trust_remote_code"] = "--trust-remote-code" in serve
    flag = "--default-chat-template-kwargs"
    return kw, json.loads(serve[serve.index(flag) + 1]) if flag in serve else None


def conversation(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def render(tokenizer, prompts: list, template_kwargs: dict | None) -> list[list[int]]:
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(conversation(p), tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def read_prompts(path: Path | None) -> list:
    if path is None:
        return list(PROMPTS)
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["messages"] if "messages" in r else r["prompt"] for r in rows]


def environment_problem() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here (pip install vllm, on a machine with a CUDA GPU); nothing was compared."
    import torch

    if not torch.cuda.is_available():
        return "this check needs a CUDA GPU and torch sees none here; nothing was compared."
    return None


# ---------------------------------------------------------------- the two engines


def transformers_greedy(what: dict, ids: list[list[int]], n: int, trust: bool) -> tuple[list, list]:
    """Greedy tokens and the fp32 logits row of every step, one prompt at a time (no padding)."""
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(str(what["model"]), dtype=torch.float32, trust_remote_code=trust)
    if what["adapter"] is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(what["adapter"]))
    model = model.to(DEVICE).eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.x names the cache argument `cache` (`past_key_values` is deprecated, going in 5.40)
    key = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    tokens, rows = [], []
    with torch.inference_mode():
        for prompt in ids:
            cache = DynamicCache(config=inner.config)  # filled in place, step by step
            out = model(input_ids=torch.tensor([prompt], device=DEVICE), use_cache=True, **{key: cache})
            toks, logits = [], []
            for step in range(n):
                row = out.logits[0, -1].float()
                tok = int(row.argmax())
                toks.append(tok)
                logits.append(row.cpu())
                if step + 1 < n:
                    out = model(input_ids=torch.tensor([[tok]], device=DEVICE), use_cache=True, **{key: cache})
            tokens.append(toks)
            rows.append(logits)
    del model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return tokens, rows


def vllm_greedy(what: dict, prompts: list, longest: int, n: int, args, engine: tuple[dict, dict | None]) -> dict:
    """vLLM's greedy tokens for the chats ``prompts``, rendered by vLLM as its server would, with
    the adapter (and, for an adapter, without it): {"prompt_ids", "tokens", "base", "version"}."""
    import vllm
    from vllm import LLM, SamplingParams

    kw, switches = engine
    # room for prompts vLLM renders longer than transformers' (a tokenizer or template of its own)
    llm = LLM(**kw, dtype=args.dtype, seed=0, enforce_eager=True, gpu_memory_utilization=args.gpu_memory_utilization,
              max_model_len=2 * longest + n + 16)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    chats = [conversation(p) for p in prompts]
    request = None
    if what["adapter"] is not None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest("export", 1, str(Path(what["adapter"]).resolve()))
    out = llm.chat(chats, params, lora_request=request, chat_template_kwargs=switches, use_tqdm=False)
    base = (llm.chat(chats, params, chat_template_kwargs=switches, use_tqdm=False) if request is not None else None)
    tokens = [list(o.outputs[0].token_ids) for o in out]
    return {"prompt_ids": [list(o.prompt_token_ids) for o in out], "tokens": tokens,
            "base": None if base is None else [list(o.outputs[0].token_ids) for o in base], "version": vllm.__version__}


def prompt_mismatch(ref: list[int], got: list[int]) -> dict:
    """The verdict for a prompt vLLM rendered to other ids than transformers (training)."""
    at = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return {"same": 0, "first_diff": None, "gap": None, "limit": None, "ok": False, "prompt_diff": at,
            "verdict": f"MISMATCH (vLLM's prompt ids differ from token {at}: not training's tokenizer/template)"}


# ---------------------------------------------------------------- the run


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        what = read_export(args.export, args.base)
        problem = environment_problem()
        if problem:
            raise NotRun(problem)
    except NotRun as e:
        print(f"vllm_check: not run — {e}")
        return 2
    from transformers import AutoTokenizer

    manifest = what["manifest"]
    predicted = prediction(what)
    if predicted:
        from tunesmith.export.vllm import line

        print(f"tunesmith predicted ({predicted.get('checked_against')}): {line(predicted)}")
    engine = engine_args(what, predicted)
    print(f"vLLM: LLM({', '.join(f'{k}={v!r}' for k, v in engine[0].items())}), chat_template_kwargs={engine[1]!r}")
    trust = bool(manifest.get("trust_remote_code"))
    tokenizer = AutoTokenizer.from_pretrained(str(args.export), trust_remote_code=trust)
    prompts = read_prompts(args.prompts)
    ids = render(tokenizer, prompts, (manifest.get("chat") or {}).get("template_kwargs"))
    n = args.max_new_tokens
    ref, rows = transformers_greedy(what, ids, n, trust)
    try:
        served = vllm_greedy(what, prompts, max(map(len, ids)), n, args, engine)
    except Exception as e:  # noqa: BLE001 — vLLM refusing the adapter is a result, not a crash
        as_predicted = predicted.get("ok") is False
        print(f"vLLM refused it{' (as tunesmith predicted)' if as_predicted else ''}: {type(e).__name__}: {e}"[:2000])
        if predicted.get("ok"):
            print("tunesmith's check said it would load: its rules (src/tunesmith/export/vllm.py) need updating")
        return 1
    got, base, version = served["tokens"], served["base"], served["version"]
    rtol = args.rtol if args.rtol is not None else RTOL[args.dtype]
    results = []
    print(f"\nvLLM {version}, dtype {args.dtype}, {what['mode']}, {n} new tokens, near-tie ≤ {rtol:g}·max|logit|")
    print(f"{'#':>3}  {'prompt':<44} {'same':>5}  {'gap':>9}  {'limit':>8}  {'adapter moved':>13}  verdict")
    for i, (prompt, r, g) in enumerate(zip(prompts, ref, got)):
        c = (compare_tokens(r, rows[i], g, rtol) if served["prompt_ids"][i] == ids[i]
             else prompt_mismatch(ids[i], served["prompt_ids"][i]))
        moved = None if base is None else base[i] != g
        c.update(prompt=prompt if isinstance(prompt, str) else prompt[-1]["content"], hf=r, vllm=g,
                 adapter_moved=moved)
        results.append(c)
        gap = "" if c["gap"] is None else f"{c['gap']:.4f}"
        limit = "" if c["limit"] is None else f"{c['limit']:.4f}"
        text = c["prompt"][:44]
        print(f"{i:>3}  {text:<44} {c['same']:>5}  {gap:>9}  {limit:>8}  {'' if moved is None else moved!s:>13}  "
              f"{c['verdict']}")
    ok = all(c["ok"] for c in results)
    if base is not None and not any(c["adapter_moved"] for c in results):
        print("note: the adapter changed no greedy token against the base in vLLM; the comparison cannot tell "
              "whether vLLM applied it (train longer, or give prompts from the training data)")
    if predicted.get("ok") is False:
        print("vLLM loaded an adapter tunesmith's check refused: unless its reason is one vLLM does not test (a "
              "lora_ga init, served as another model), its rules (src/tunesmith/export/vllm.py) need updating")
    if args.out:
        args.out.write_text(json.dumps({"vllm": version, "dtype": args.dtype, "rtol": rtol, "mode": what["mode"],
                                        "ok": ok, "prompts": results}, indent=1))
    print(f"vllm_check: {'PASS' if ok else 'FAIL'} — {sum(c['verdict'] == 'identical' for c in results)} identical, "
          f"{sum(c['verdict'] == 'near-tie' for c in results)} near-tie, {sum(not c['ok'] for c in results)} mismatch")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
