"""``tunesmith export RUN --format adapter|merged``: a run's final weights as a folder that
plain transformers/peft load, written atomically and verified in a fresh process.

    tunesmith export runs/sft-demo --format merged -o exports/sft-demo

Reads top to bottom: refuse what cannot be exported → load the run's model exactly as it
was trained (fp32) → record reference logits for a fixed prompt → write weights,
tokenizer, generation config, card and manifest into a temporary folder → verify it →
rename it into place (``files.atomic_dir``), so a half-written or failing
export never appears under the final name.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tunesmith import console
from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_dir, file_table, weights_hash
from tunesmith.infer.load import load_run_model, remote_code, run_tokenizer
from tunesmith.models.runs import EXPORT_MANIFEST, Run, adapter_chain, base_folder, read_run, run_task
from tunesmith.models.templates import stop_token_ids

FORMATS = ("adapter", "merged", "gguf")
# GGUF: max |Δlogit| ≤ rtol·max|logit| between transformers reading the file and the fp32
# merged model. Measured on SmolLM2-135M (max|logit| 37.7): f16 0.053 (0.14%), bf16 0.251
# (0.67%), q8_0 1.69 (4.5%), q4_0 20.8 (55%: 4 bits are lossy on a model this small — the
# same-file comparison with llama.cpp below is what proves the q4_0 file is read right).
GGUF_RTOL = {"f16": 5e-3, "bf16": 2e-2, "q8_0": 0.1, "q4_0": 0.75}
# llama.cpp vs transformers on the same file: the weights are the same, but llama.cpp also
# rounds activations (to f16/bf16, and to 8 bits for quantized matrices), so it is looser.
# Measured on SmolLM2: f16 0.078 (0.21%), bf16 0.324 (0.86%), q8_0 2.58 (6.8%), q4_0 2.55 (7%).
LLAMA_CPP_RTOL = {"f16": 1e-2, "bf16": 3e-2, "q8_0": 0.15, "q4_0": 0.2}
FORMAT_VERSION = 1
REFERENCE_FILE = "tunesmith_reference.safetensors"
REFERENCE_PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
# Reloading an export must give the logits it was exported with: fp32 on the same
# machine reproduces them bit for bit (measured: 0), so 1e-4 only absorbs other kernels.
ATOL = 1e-4
# Merged vs adapter is a different sum (x·(W + s·BA) vs x·W + s·(x·A)·B), so the two
# differ by fp32 rounding, which grows with the logits' size. On SmolLM2-135M (|logit|
# up to 38) the fp32 adapter model itself is 7.5e-5 away from an fp64 forward and the
# merged one 8.4e-5 from the adapter; a check of max |Δ| ≤ 1e-4 would fail bigger models
# on rounding alone — a 2-step SmolLM2 run in CI measured 1.58e-4, at a logit far smaller
# than the largest. Rounding error scales with the size of the sums, so the limit does too:
# max |Δ| ≤ 1e-4 + 1e-5·max|logit| (4.8e-4 on SmolLM2; 1e-5 ≈ 80 fp32 ulps accumulated over
# 30 layers); a real error (wrong scale, missing layer) moves logits by > 1e-2.
MERGE_ATOL, MERGE_RTOL = 1e-4, 1e-5
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ---------------------------------------------------------------- refusals


def _check_output(out: Path, run: Run, overwrite: bool) -> None:
    """Refuse an output folder whose replacement would destroy something: the run's own files,
    the current directory, a home directory or a folder above either; with --overwrite,
    anything but an earlier tunesmith export (a model, a run, any other folder)."""
    o, rd = out.resolve(), run.dir.resolve()
    if rd == o or o in rd.parents or o == run.final.resolve() or run.final.resolve() in o.parents:
        raise TunesmithError(f"output folder {out} would replace or sit inside the run's own files; "
                             f"choose a folder outside {run.final}, e.g. {run.dir / 'export'}")
    cwd = Path.cwd().resolve()
    if o == cwd or o in cwd.parents:
        raise TunesmithError(f"output folder {out} is the current directory or a folder above it, which the export "
                             f"would replace; name a new folder for it, e.g. -o {Path(out) / 'export'}")
    if o in _home_folders():
        raise TunesmithError(f"output folder {out} is a home directory, which the export would replace; name a new "
                             f"folder inside it, e.g. -o {Path(out) / 'export'}")
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output {out} is a file; choose a folder name with -o")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise TunesmithError(f"output folder {out} exists and is not empty; choose another -o or pass --overwrite")
    if (out / "run.json").is_file():
        raise TunesmithError(f"output folder {out} is a training run (it holds run.json) and --overwrite only replaces "
                             f"an earlier tunesmith export; choose another -o")
    if not (out / EXPORT_MANIFEST).is_file():
        what = ("holds a model that is not a tunesmith export (config.json or adapter_config.json, no "
                f"{EXPORT_MANIFEST})" if (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
                else f"is not an earlier tunesmith export (no {EXPORT_MANIFEST})")
        raise TunesmithError(f"output folder {out} {what}, and --overwrite only replaces an earlier export; choose "
                             f"another -o, or empty the folder yourself")


def _home_folders() -> set[Path]:
    """This user's home and the usual homes of others (no passwd enumeration: it can be a network lookup)."""
    homes = {Path.home().resolve(), Path("/root")}
    top = Path("/home")
    if top.is_dir():
        with contextlib.suppress(OSError):
            homes |= {p.resolve() for p in top.iterdir() if p.is_dir()}
    return homes


def _check_format(run: Run, fmt: str, quant: str | None = None) -> None:
    if fmt not in FORMATS:
        raise TunesmithError(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    if quant is not None and fmt != "gguf":
        raise TunesmithError(f"--quant applies to --format gguf only, not {fmt}; drop it")
    if fmt == "gguf":
        from tunesmith.export.gguf import QUANTS

        if (quant or "f16") not in QUANTS:
            raise TunesmithError(f"--quant {quant!r} is not known; use one of {', '.join(QUANTS)}")
        if run_task(run) != "causal":
            raise TunesmithError("a reward model scores, it does not generate: GGUF is for chat models; export it "
                                 "--format merged or adapter")
    if fmt == "adapter" and not run.is_adapter:
        raise TunesmithError(f"run {run.dir} is a full fine-tuning run and has no adapter; export it with "
                             f"--format merged")
    if fmt == "adapter" and run.init_is_adapter:
        raise TunesmithError(f"run {run.dir}'s adapter was trained on top of the merged adapter {run.init_from}, "
                             f"so on the plain base it is a different model; export it with --format merged")


def adapter_base(run: Run) -> Path:
    """The folder an exported adapter loads onto: the base, or the full weights it started from."""
    return run.init_from if run.init_from is not None and not run.init_is_adapter else base_folder(run)


def _check_base(run: Run, base: Path) -> str:
    """The base's weights hash, refused when it differs from the one the run trained on."""
    got, want = weights_hash(base), run.manifest.get("base_model_weights_sha256")
    if want and got != want:
        raise TunesmithError(f"the base model at {base} is not the one run {run.dir} trained on (weights sha256 "
                             f"{got[:12]}… ≠ {want[:12]}…); restore that base or retrain on this one")
    return got


def _check_adapter(run: Run, tokenizer, base: Path) -> None:
    """Refuse an adapter that would not be the trained model on the plain base. (Whether vLLM
    serves it is said after writing, by export/vllm.py, and recorded in the manifest.)"""
    cfg = json.loads((run.final / "adapter_config.json").read_text())
    vocab = json.loads((base / "config.json").read_text()).get("vocab_size", len(tokenizer))
    saves_embeddings = any("embed" in m for m in cfg.get("modules_to_save") or [])
    if len(tokenizer) > vocab and not saves_embeddings:
        raise TunesmithError(f"run {run.dir} added {len(tokenizer) - vocab} chat-template tokens to the vocabulary "
                             f"but its adapter does not save their embeddings (lora.modules_to_save), so it cannot "
                             f"be reloaded exactly; export it with --format merged")


# ---------------------------------------------------------------- writers


def _generation_config(model, tokenizer):
    """The model's generation config, stopping at the chat template's end-of-turn token:
    the tokenizer's EOS (e.g. <|im_end|> for ChatML) first, then any the base named."""
    import copy

    gen = copy.deepcopy(model.generation_config)
    eos = stop_token_ids(tokenizer, gen)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return gen


def _write_adapter(run: Run, model, folder: Path, max_shard_size: str) -> None:
    """The adapter files byte for byte as training saved them (no re-serialisation)."""
    import shutil

    for name in ADAPTER_FILES:
        shutil.copyfile(run.final / name, folder / name)


def _write_merged(run: Run, model, folder: Path, max_shard_size: str) -> None:
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)


WRITERS = {"adapter": _write_adapter, "merged": _write_merged}


@torch.inference_mode()
def reference_logits(model, tokenizer) -> dict[str, torch.Tensor]:
    """The fixed prompt's ids [1, T] and fp32 logits at every position [1, T, V]."""
    from tunesmith.data.tokenize import tokenize_prompt

    ids = torch.tensor([tokenize_prompt(REFERENCE_PROMPT, tokenizer)], dtype=torch.long)
    # (a reward model's "logits" are its one score: the same check holds)
    return {"input_ids": ids, "logits": model(input_ids=ids).logits.float().contiguous()}


def merge(model, tokenizer, ref: dict[str, torch.Tensor]):
    """``merge_and_unload`` the adapter; ``ref`` gains the merged logits as "logits" and keeps
    the adapter's as "adapter_logits", so verify can compare the two in a fresh process."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    ref["adapter_logits"] = ref["logits"]
    model = model.merge_and_unload()
    ref["logits"] = reference_logits(model, tokenizer)["logits"]
    diff = (ref["logits"] - ref["adapter_logits"]).abs().max().item()
    console.info(f"merged the adapter into the base weights: merged vs adapter logits, max abs difference "
                 f"{diff:.3g}")
    return model


def file_hashes(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file; also makes them world-readable (0644):
    safetensors writes 0600, and an export is meant to be shared."""
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    return file_table(folder, skip=[EXPORT_MANIFEST], size_key="bytes")


def _manifest(run: Run, fmt: str, base: Path, base_hash: str, adapter_base_path: Path, quant: str = "f16") -> dict:
    from tunesmith.hardware import library_versions

    m = {**({"quant": quant} if fmt == "gguf" else {}),
        "format_version": FORMAT_VERSION, "format": fmt, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(run.dir.resolve()), "method": run.manifest.get("method"), "task": run_task(run),
        "base_model": run.manifest.get("base_model"), "base_model_path": str(base),
        "base_model_weights_sha256": base_hash, "init_from": run.manifest.get("init_from"),
        "chat_template_source": run.manifest.get("chat_template_source"), "scoring": run.scoring,
        # the template switches and reasoning policy training used, so chat/eval of the export render alike
        "chat": {k: (run.config.get("data") or {}).get(k) for k in ("reasoning", "template_kwargs")},
        "dequantized_base": bool(fmt == "merged" and (run.config.get("lora") or {}).get("qlora")),
        # the model class is code in the model folder: loading the export needs trust_remote_code too
        "trust_remote_code": remote_code(run),
        "versions": library_versions(),
        "reference": {"file": REFERENCE_FILE, "messages": REFERENCE_PROMPT, "dtype": "float32", "atol": ATOL,
                      "logits": "this folder's model, in the exporting process"},
    }
    if fmt == "gguf":
        m["reference"].update(logits="the merged fp32 model, in the exporting process",
                              rtol=GGUF_RTOL[m.get("quant", "f16")], llama_cpp_rtol=LLAMA_CPP_RTOL[m.get("quant", "f16")])
    if fmt in ("merged", "gguf") and run.is_adapter:
        m["reference"].update(adapter_logits="the run's model with its adapter unmerged", merge_atol=MERGE_ATOL,
                              merge_rtol=MERGE_RTOL)
    if fmt == "adapter":
        m["adapter_base_path"] = str(adapter_base_path)
        m["adapter_base_weights_sha256"] = (base_hash if adapter_base_path == base
                                            else weights_hash(adapter_base_path))
    elif run.is_adapter:
        m["merged_adapters"] = [str(p) for p in adapter_chain(run)] + [str(run.final.resolve())]
    return m


# ---------------------------------------------------------------- the recipe


def _write_gguf(run: Run, model, tokenizer, folder: Path, quant: str) -> dict:
    """model-QUANT.gguf and an Ollama Modelfile beside it (export/gguf.py)."""
    from tunesmith.export.gguf import modelfile, write_gguf

    name = f"model-{quant}.gguf"
    info = write_gguf(model, tokenizer, folder / name, quant=quant, name=run.dir.name)
    if info["f16_for_shape"]:
        console.info(f"GGUF: {len(info['f16_for_shape'])} tensor(s) written F16 (rows not a multiple of the "
                     f"{quant} block): {', '.join(info['f16_for_shape'][:4])}")
    stops = [tokenizer.decode([t]) for t in stop_token_ids(tokenizer, model.generation_config)]
    (folder / "Modelfile").write_text(modelfile(name, stops, training_system_prompt(run)), encoding="utf-8")
    return {"file": name, **info}


def training_system_prompt(run: Run) -> str | None:
    """The system prompt every training record that has one shares (None when none or several)."""
    from tunesmith.data.validate import load_records

    files = (run.config.get("data") or {}).get("train")
    try:
        records = load_records([files] if isinstance(files, str) else list(files or []))
    except TunesmithError:
        return None  # the data moved since training: the Modelfile goes without one
    found = {m["content"] for r in records for k in ("messages", "prompt") for m in (r.get(k) or [])[:1]
             if isinstance(r.get(k), list) and m.get("role") == "system"}
    return found.pop() if len(found) == 1 else None


def _vllm_check(run: Run, fmt: str, folder: Path, out: Path, on: Path, tokenizer, manifest: dict) -> dict | None:
    """Whether vLLM serves the export (export/vllm.py): the value recorded as the manifest's "vllm"
    (None: nothing to record, e.g. GGUF). Never raises: the export does not depend on it."""
    from tunesmith.export.vllm import check_export

    return check_export(folder, fmt, base=on, task=run_task(run), tokenizer=tokenizer, serve_as=out.resolve(),
                        trust_remote_code=bool(manifest.get("trust_remote_code")),
                        template_kwargs=(manifest.get("chat") or {}).get("template_kwargs"))


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False,
               verify: bool = True, max_shard_size: str = "2GB", quant: str | None = None) -> Path:
    """Export run ``run_dir`` in ``fmt`` to ``out`` (default RUN/export/FMT); returns ``out``.

    Refuses a run without final weights, a non-empty ``out`` (unless ``overwrite``, which
    replaces an earlier export only; see ``_check_output``), a base model that cannot be
    found or has changed, and an adapter that would not be the trained model on the plain
    base. With ``verify`` the folder is reloaded in a fresh process before it is moved into
    place; a failure leaves nothing behind.
    """
    started = time.time()
    run = read_run(run_dir)
    out = Path(out) if out is not None else run.dir / "export" / fmt
    _check_format(run, fmt, quant)
    _check_output(out, run, overwrite)
    base = base_folder(run)
    base_hash = _check_base(run, base)
    tokenizer = run_tokenizer(run.final)
    on = adapter_base(run)
    if fmt == "adapter":
        _check_adapter(run, tokenizer, on)
    if fmt == "merged" and (run.config.get("lora") or {}).get("qlora"):
        console.info("the run trained on a 4-bit (QLoRA) base; merging into the full-precision base weights "
                     "instead (merging into 4-bit weights is lossy)")

    console.info(f"loading run {run.dir} ({run.manifest.get('method')}, "
                 f"{'adapter' if run.is_adapter else 'full weights'}) on {base} in fp32 …")
    if fmt == "gguf":
        from transformers import AutoConfig

        from tunesmith.export.gguf import check_exportable

        check_exportable(AutoConfig.from_pretrained(base), tokenizer)  # refused before any weights load
    model = load_run_model(run, tokenizer)
    ref = reference_logits(model, tokenizer)
    if fmt in ("merged", "gguf"):
        model = merge(model, tokenizer, ref)
    manifest = _manifest(run, fmt, base, base_hash, on, quant or "f16")
    with atomic_dir(out) as tmp:
        if fmt == "gguf":
            manifest["gguf"] = _write_gguf(run, model, tokenizer, tmp, quant or "f16")
        else:
            WRITERS[fmt](run, model, tmp, max_shard_size)
            tokenizer.save_pretrained(tmp)
        if run_task(run) == "causal" and fmt != "gguf":  # a reward model scores, it does not generate
            _generation_config(model, tokenizer).save_pretrained(tmp)
        save_file(ref, str(tmp / REFERENCE_FILE))
        from tunesmith.export.card import model_card

        vllm = _vllm_check(run, fmt, tmp, out, on, tokenizer, manifest)
        if vllm is not None:
            manifest["vllm"] = vllm
        (tmp / "README.md").write_text(model_card(run, fmt, manifest, str(out)), encoding="utf-8")
        manifest["files"] = file_hashes(tmp)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
        if verify:
            from tunesmith.export.verify import report, verify_export

            result = verify_export(tmp)
            report(result)
            if not result.ok:
                raise TunesmithError(f"the export of {run.dir} failed verification (see above) and was not written; "
                                     f"rerun with --no-verify to keep it and inspect it with `tunesmith verify`")
            # what the fresh process proved, kept with the export (tunesmith.json is not among its own hashes)
            manifest["verified"] = {"ok": True, "seconds": round(result.seconds, 1), "checks": result.checks}
            (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    if vllm is not None:
        from tunesmith.export.vllm import line

        (console.info if vllm["ok"] else console.warn)(line(vllm))
    size = sum(f["bytes"] for f in manifest["files"].values())
    console.info(f"exported {fmt} to {out}: {len(manifest['files']) + 1} files, {size / 2**20:.1f} MiB, "
                 f"in {time.time() - started:.1f} s")
    return out
