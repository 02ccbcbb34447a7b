"""Read a GGUF export back with two independent readers and check it; prints one JSON line.

    python -I gguf_check.py EXPORT_DIR

Run by ``tunesmith verify`` in a fresh interpreter, importing nothing from tunesmith (the
file and logit helpers are reload_check.py's, beside this file). Checks, after every file
against tunesmith.json's sha256:
- transformers' own GGUF reader (``from_pretrained(dir, gguf_file=…)``): the tokenizer it
  builds from the file renders the reference prompt to the recorded ids, and the model's
  logits match the merged fp32 model's within the tolerance of the file's type
  (``reference.rtol`` · max|logit|);
- llama.cpp itself, through llama-cpp-python when it is installed: it tokenizes the prompt
  text to the same ids, renders the same prompt from the chat template embedded in the file,
  gives the prompt's logits within the same tolerance of transformers' on the same file, and
  greedy-decodes the same tokens — up to the first near-tie, where transformers' top two
  logits are closer than that tolerance and either reader may rightly pick the other (bf16
  activations in llama.cpp vs fp32 in transformers flip such ties). Not installed: the check
  says "skipped", never "ok".
"""

import argparse
import json
import os
import sys
from pathlib import Path



def _reload_check():
    """reload_check.py beside this file, loaded by path: putting this folder on sys.path would
    let tunesmith's export/gguf.py shadow the gguf package the readers need."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reload_check", Path(__file__).with_name("reload_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_rc = _reload_check()
Checks, check_files, check_logits = _rc.Checks, _rc.check_files, _rc.check_logits

GREEDY_TOKENS = 16


def load_reference(folder: Path, manifest: dict):
    from safetensors.torch import load_file

    return True, manifest["reference"]["file"], load_file(str(folder / manifest["reference"]["file"]))


def hf_tokenizer(folder: Path, name: str, manifest: dict, ref: dict):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = tok.apply_chat_template(manifest["reference"]["messages"], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = ref["input_ids"][0].tolist()
    return ids == want, f"the file's tokenizer renders the reference prompt to {len(ids)} ids" + (
        "" if ids == want else f", not the recorded {len(want)}"), (tok, text)


def hf_model(folder: Path, name: str):
    from transformers import AutoModelForCausalLM

    return True, "transformers read the GGUF", AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()


def hf_greedy(model, ids, eos: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens (to EOS or GREEDY_TOKENS) and, per step, the top-1 minus top-2 logit."""
    import torch

    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=next(iter(eos), 0),
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    n = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
    return new[:n], margins[:n]


def same_greedy(got: list[int], want: list[int], margins: list[float], tie: float) -> tuple[bool, str]:
    """Equal tokens up to the first step where transformers' top two logits were closer than the
    two readers' measured logit tolerance: past such a near-tie either choice is right, and the
    rest of the sequence follows from it."""
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b and margins[k] < tie:
            return True, f"{k} greedy tokens equal transformers' on the same file, then they split at a near-tie " \
                         f"(top-2 margin {margins[k]:.3g} < {tie:.3g})"
        if a != b:
            return False, f"greedy tokens differ at step {k} (top-2 margin {margins[k]:.3g}): {got} vs transformers " \
                          f"{want}"
    ok = len(got) == len(want)
    return ok, f"{len(got)} greedy tokens equal transformers' on the same file" if ok else \
        f"llama.cpp stopped after {len(got)} tokens, transformers after {len(want)}"


def llama_cpp_checks(checks: Checks, path: Path, text: str, want_ids: list[int], messages: list, hf, rtol: float):
    """hf: (transformers' logits on the prompt, its greedy tokens, their top-2 margins) on the same file."""
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        checks.rows.append({"name": "llama.cpp", "ok": True, "skipped": True,
                            "detail": "skipped: llama-cpp-python is not installed (pip install 'tunesmith[gguf]')"})
        return
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(256, len(want_ids) + 2 * GREEDY_TOKENS), verbose=False,
                          n_threads=max(1, os.cpu_count() or 1), logits_all=True)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    checks.add("llama.cpp tokens", ids == want_ids, f"llama.cpp tokenizes the prompt to {len(ids)} ids"
               + ("" if ids == want_ids else f", transformers to {len(want_ids)}: {ids[:8]} vs {want_ids[:8]}"))
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template", "")
    vocab = [llm.detokenize([i], special=True).decode("utf-8", "replace") for i in (llm.token_bos(), llm.token_eos())]
    rendered = Jinja2ChatFormatter(template=template, bos_token=vocab[0], eos_token=vocab[1],
                                   add_generation_prompt=True)(messages=messages).prompt
    checks.add("llama.cpp template", rendered == text, "the embedded chat template renders the same prompt"
               if rendered == text else f"it renders {rendered[-60:]!r}, transformers {text[-60:]!r}")
    import numpy as np
    import torch

    hf_logits, hf_tokens, margins = hf
    llm.eval(want_ids)
    logits = torch.from_numpy(np.array(llm.scores[:len(want_ids)], dtype=np.float32)).unsqueeze(0)
    ok, detail, diff = check_logits(logits, hf_logits, 0.0, rtol)  # rtol: reference.llama_cpp_rtol
    checks.add("llama.cpp logits", ok, detail + " (llama.cpp vs transformers on the same file)")
    tie = rtol * float(hf_logits.abs().max())
    llm.reset()
    eos = {llm.token_eos()}
    got = []
    for t in llm.generate(want_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(t)
        if t in eos or len(got) == GREEDY_TOKENS:
            break
    checks.add("llama.cpp greedy", *same_greedy(got, hf_tokens, margins, tie))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--base", default=None)  # accepted for tunesmith verify's one calling convention
    folder = Path(ap.parse_args().folder)
    checks = Checks()
    manifest = checks.run("manifest", lambda: (True, "tunesmith.json read",
                                               json.loads((folder / "tunesmith.json").read_text())))
    if manifest is not None and checks.run("files", lambda: check_files(folder, manifest)):
        name = manifest["gguf"]["file"]
        ref = checks.run("reference", lambda: load_reference(folder, manifest))
        tok = checks.run("tokenizer", lambda: hf_tokenizer(folder, name, manifest, ref)) if ref else None
        model = checks.run("load", lambda: hf_model(folder, name)) if tok else None
        if model is not None:
            import torch

            with torch.inference_mode():
                logits = model(input_ids=ref["input_ids"]).logits.float()
            checks.run("logits", lambda: check_logits(logits, ref["logits"], 0.0, manifest["reference"]["rtol"]))
            tokenizer, text = tok
            eos = {t for t in (tokenizer.eos_token_id,) if t is not None}
            hf = (logits, *hf_greedy(model, ref["input_ids"], eos))
            try:
                llama_cpp_checks(checks, folder / name, text, ref["input_ids"][0].tolist(),
                                 manifest["reference"]["messages"], hf, manifest["reference"]["llama_cpp_rtol"])
            except Exception as e:  # noqa: BLE001 — a reader that fails is a failed check, not a crash
                checks.add("llama.cpp", False, f"{type(e).__name__}: {e}"[:500])
    leaked = sorted(m for m in sys.modules if m == "tunesmith" or m.startswith("tunesmith."))
    checks.add("isolation", not leaked, f"tunesmith modules imported: {leaked}" if leaked else "no tunesmith code loaded")
    compared = any(r["name"] == "logits" for r in checks.rows)
    print(json.dumps({"ok": compared and all(r["ok"] for r in checks.rows), "checks": checks.rows}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
