"""The model card (README.md) of an export, written from what the run recorded.

Sections: base model, training data (files + sha256), method and hyper-parameters,
results (loss at the first and last evaluation, plus an evaluation table when the run
folder holds ``eval/summary.json``), how to load it, how to serve it with vLLM (or why vLLM
would refuse it: export/vllm.py), and how to check it.

``eval/summary.json`` is the contract with the evaluation stage: ``{suite: {metric:
number}}`` (or ``{metric: number}``); every number becomes one table row.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.files import read_jsonl
from tunesmith.models.runs import Run

# Config keys that describe the training itself (bookkeeping keys such as save_steps,
# logging_steps or threads do not change the weights and are left out).
_HPARAMS = {
    "data": ("max_length", "train_on", "packing", "reasoning", "template_kwargs", "chat_template"),
    "lora": ("r", "alpha", "dropout", "target_modules", "rslora", "dora", "qlora", "modules_to_save"),
    "train": ("epochs", "max_steps", "batch_size", "grad_accum", "learning_rate", "lr_scheduler", "warmup_ratio",
              "warmup_steps", "weight_decay", "max_grad_norm", "seed", "dtype"),
    "preference": ("loss_type", "beta", "label_smoothing", "simpo_gamma", "sft_weight"),
}


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"`{c}`" if isinstance(c, (list, dict)) else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def hyperparameters(config: dict) -> list[tuple[str, str]]:
    rows = [("method", config.get("method"))]
    for section, keys in _HPARAMS.items():
        values = config.get(section) or {}
        rows += [(f"{section}.{k}", _fmt(values[k])) for k in keys if values.get(k) is not None]
    return rows


def _eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("eval_loss") is not None]


def results(run: Run) -> str:
    rows: list[tuple] = []
    evals = _eval_losses(run.dir)
    if evals:
        (s0, l0), (s1, l1) = evals[0], evals[-1]
        rows.append(("training", "eval_loss", f"{l0:.4f} (step {s0}) → {l1:.4f} (step {s1})"))
    final = run.manifest.get("final_metrics") or {}
    if final.get("loss") is not None:
        rows.append(("training", "train loss, last step", f"{final['loss']:.4f}"))
    summary = run.dir / "eval" / "summary.json"
    if summary.exists():
        for suite, metrics in json.loads(summary.read_text()).items():
            items = metrics.items() if isinstance(metrics, dict) else [("value", metrics)]
            rows += [(suite, name, _fmt(v)) for name, v in items]
    return _table(("suite", "metric", "value"), rows) if rows else "No evaluation was recorded for this run."


def _how_to_run_gguf(folder: str, manifest: dict) -> str:
    g = manifest["gguf"]
    return (f"One file, `{g['file']}` ({g['quant']}), with the tokenizer and the chat template training used.\n\n"
            f"- llama.cpp: `llama-cli -m {folder}/{g['file']} -cnv`\n"
            f"- Ollama: `cd {folder} && ollama create NAME -f Modelfile && ollama run NAME` (the Modelfile names "
            "the stop tokens and the training system prompt)\n"
            f"- llama-cpp-python: `Llama(model_path=\"{folder}/{g['file']}\").create_chat_completion(messages=[...])`\n"
            f"- transformers: `AutoModelForCausalLM.from_pretrained(\"{folder}\", gguf_file=\"{g['file']}\")`")


def _how_to_load(fmt: str, folder: str, base: str, remote: bool = False) -> str:
    trust = ", trust_remote_code=True" if remote else ""  # the model class is code in the model folder
    if fmt == "adapter":
        code = (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{base}\"{trust})  # the base named in tunesmith.json\n"
                f"model = PeftModel.from_pretrained(base, \"{folder}\")")
    else:
        code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{folder}\"{trust})")
    code += ("\n\nmessages = [{\"role\": \"user\", \"content\": \"Hello!\"}]\n"
             "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
             "                                    return_dict=True)[\"input_ids\"]\n"
             "out = model.generate(ids, max_new_tokens=64)\n"
             "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))")
    return f"```python\n{code}\n```\n\nOr with tunesmith: `tunesmith chat {folder}`."


def _vllm_section(v: dict) -> str:
    """What export/vllm.py found (the manifest's "vllm")."""
    if v.get("ok"):
        notes = "".join(f"\n- {n}" for n in v.get("notes") or [])
        return f"```\n{v['serve']}\n```\n\nChecked against {v['checked_against']}'s loader rules." + (
            f"\n{notes}" if notes else "")
    if v.get("ok") is None:
        return "Not checked: " + "; ".join(v.get("notes") or []) + "."
    return (f"vLLM's LoRA loader ({v['checked_against']}'s rules) will not load this adapter:\n\n"
            + "\n".join(f"- {r}" for r in v["reasons"]))


def _base_line(manifest: dict) -> str:
    from tunesmith.models.load import EMBEDDED

    name = manifest["base_model"]
    emb = EMBEDDED.get(str(name).lower())
    about = f" — {emb.description}" if emb else ""
    return (f"`{name}`{about}\n\n- local folder: `{manifest['base_model_path']}`\n"
            f"- weights sha256: `{manifest['base_model_weights_sha256']}`")


def model_card(run: Run, fmt: str, manifest: dict, folder: str) -> str:
    """README.md for an export of ``run`` in ``fmt``; ``manifest`` is the export's
    tunesmith.json (without files), ``folder`` the name users will load it by."""
    name = manifest["base_model"]
    hub = f"base_model: {name}\n" if "/" in str(name) and not str(name).startswith((".", "/")) else ""
    library = {"adapter": "peft", "gguf": "gguf"}.get(fmt, "transformers")
    tags = ["tunesmith", run.config.get("method") or run.manifest.get("method"),
            "lora" if run.is_adapter else "full-fine-tuning"]
    what = {"adapter": "a PEFT LoRA adapter (load it on the base model below)",
            "merged": "full weights: " + ("the adapter merged into the base (`merge_and_unload`)"
                                          if run.is_adapter else "a full fine-tuning run"),
            "gguf": "one GGUF file for llama.cpp, Ollama and LM Studio"
                    + (" (the adapter merged into the base first)" if run.is_adapter else "")}[fmt]
    parts = [
        f"---\nlibrary_name: {library}\n{hub}tags:\n" + "".join(f"- {t}\n" for t in tags) + "---",
        f"# {Path(folder).name}",
        f"Fine-tuned with tunesmith ({manifest['method']}) from run `{run.dir.name}`. This folder holds {what}.",
        "## Base model\n\n" + _base_line(manifest),
    ]
    chain = manifest.get("merged_adapters") or []
    if manifest.get("init_from"):
        parts.append(f"The run started from `{manifest['init_from']}`"
                     + (f"; merged in order: {', '.join(f'`{c}`' for c in chain)}." if chain else "."))
    if manifest.get("dequantized_base"):
        parts.append("The adapter was trained on a 4-bit (QLoRA) base; it was merged into the full-precision "
                     "base weights, so outputs differ slightly from the 4-bit model used in training.")
    data = run.manifest.get("data") or {}
    parts.append("## Training data\n\n" + _table(("file", "sha256"), [(f, f"`{h}`") for f, h in data.items()]))
    parts.append(f"Chat template: `{manifest.get('chat_template_source')}` (saved with the tokenizer).")
    parts.append("## Hyper-parameters\n\n" + _table(("setting", "value"), hyperparameters(run.config)))
    parts.append("## Results\n\n" + results(run))
    how = _how_to_run_gguf(folder, manifest) if fmt == "gguf" else \
        _how_to_load(fmt, folder, manifest.get("adapter_base_path", ""), bool(manifest.get("trust_remote_code")))
    if manifest.get("task") == "score":  # a reward model: a one-scalar classification head
        how = (how.replace("AutoModelForCausalLM", "AutoModelForSequenceClassification")
               .replace('.from_pretrained(\"' + folder + '\")', '.from_pretrained(\"' + folder + '\", num_labels=1)')
               .split("\n\nmessages =")[0] + "\n```\n\nScore a conversation: "
               "`tunesmith score " + folder + " --data FILE -o scores.jsonl`.")
    parts.append("## How to load\n\n" + how)
    if manifest.get("vllm"):
        parts.append("## Serving with vLLM\n\n" + _vllm_section(manifest["vllm"]))
    if fmt == "gguf":
        parts.append("## Checking it\n\n`tunesmith.json` lists every file's sha256; "
                     f"`tunesmith verify {folder}` reads the file back in a fresh process with transformers' GGUF "
                     f"reader (logits within {manifest['reference']['rtol']:g}·max|logit| of the merged fp32 model) "
                     "and with llama.cpp through llama-cpp-python when installed (same prompt tokens, same rendered "
                     "chat template, same greedy tokens).")
        return "\n\n".join(parts) + "\n"
    parts.append("## Checking it\n\n`tunesmith.json` lists every file's sha256 and the library versions used; "
                 f"`tunesmith verify {folder}` reloads this folder with plain transformers"
                 + (" + peft" if fmt == "adapter" else "")
                 + f" in a fresh process and compares the logits of a fixed prompt with "
                 f"`{manifest['reference']['file']}` (max abs difference ≤ {manifest['reference']['atol']:g}"
                 + ("; and with the unmerged adapter's" if "merge_atol" in manifest["reference"] else "") + ").")
    return "\n\n".join(parts) + "\n"
