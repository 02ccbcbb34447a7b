"""Reload an exported folder with plain transformers/peft and check it; prints one JSON line.

    python -I reload_check.py EXPORT_DIR [--base BASE_DIR]

Run by ``tunesmith verify`` as a script in a fresh interpreter: it imports nothing from
tunesmith (the last check proves it), so it tests what a user without tunesmith gets.
Checks: every file against tunesmith.json's sha256 (a mismatch stops here: nothing is
loaded); tokenizer chat template, EOS and pad; generation_config.json's EOS/pad; the fixed
prompt renders to the recorded ids; the adapter's base is the recorded one; the model loads
(with trust_remote_code when tunesmith.json says the run trained with it); its logits match
the recorded ones, and for a merged adapter also the unmerged adapter's logits recorded at
export.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(folder: Path) -> str:
    # Same definition as tunesmith.files.weights_hash (names + bytes of the weight
    # files), repeated here because this script must not import tunesmith.
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


class Checks:
    def __init__(self):
        self.rows = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    def run(self, name: str, fn):
        """fn() -> (ok, detail, value); an exception is a failed check, not a crash."""
        try:
            ok, detail, value = fn()
        except Exception as e:  # noqa: BLE001 — every failure becomes a reported check
            self.add(name, False, f"{type(e).__name__}: {e}"[:500])
            return None
        self.add(name, ok, detail)
        if isinstance(value, float):
            self.rows[-1]["value"] = value
        return value if ok else None


def check_files(folder: Path, manifest: dict):
    listed = manifest["files"]
    bad = [n for n, f in listed.items() if not (folder / n).is_file() or sha256(folder / n) != f["sha256"]]
    extra = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.name != "tunesmith.json" and p.relative_to(folder).as_posix() not in listed]
    detail = f"{len(listed)} files" + (f"; missing or changed: {bad}" if bad else "") + (
        f"; not in the manifest: {extra}" if extra else "")
    return not bad and not extra, detail, True


def check_tokenizer(folder: Path, generates: bool = True, remote: bool = False):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    problems = [what for what, bad in (("no chat template", not tok.chat_template),
                                       ("no EOS token", tok.eos_token_id is None),
                                       ("no pad token", tok.pad_token_id is None)) if bad]
    if not generates:  # a reward model has no generation config to agree with
        return not problems, "; ".join(problems) or f"eos {tok.eos_token!r}, pad {tok.pad_token!r}, chat template", tok
    gen = GenerationConfig.from_pretrained(folder)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if tok.eos_token_id not in eos:
        problems.append(f"generation_config eos {gen.eos_token_id} lacks the tokenizer's {tok.eos_token_id}")
    if gen.pad_token_id != tok.pad_token_id:
        problems.append(f"generation_config pad {gen.pad_token_id} ≠ tokenizer's {tok.pad_token_id}")
    detail = "; ".join(problems) or f"eos {tok.eos_token!r}, pad {tok.pad_token!r}, chat template present"
    return not problems, detail, tok


def check_prompt(tok, manifest: dict, ref: dict):
    text = tok.apply_chat_template(manifest["reference"]["messages"], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = ref["input_ids"][0].tolist()
    return ids == want, f"{len(ids)} tokens" + ("" if ids == want else f", recorded {len(want)}"), True


def check_base(manifest: dict, base: str | None):
    path = Path(base or manifest["adapter_base_path"])
    if not (path / "config.json").exists():
        return False, f"base model folder {path} not found; pass --base", None
    got, want = weights_hash(path), manifest["adapter_base_weights_sha256"]
    return got == want, f"{path}" + ("" if got == want else f": weights sha256 {got[:12]}… ≠ {want[:12]}…"), path


def load_model(folder: Path, manifest: dict, base_path: Path | None, tok):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    score = manifest.get("task") == "score"  # a reward model: one scalar head
    cls, kw = (AutoModelForSequenceClassification, {"num_labels": 1}) if score else (AutoModelForCausalLM, {})
    # A run trained with trust_remote_code: its model class is code shipped in the folder.
    kw["trust_remote_code"] = bool(manifest.get("trust_remote_code"))
    if manifest["format"] == "merged":
        model = cls.from_pretrained(folder, dtype=torch.float32, **kw)
        what = f"transformers {cls.__name__}"
    else:
        from peft import PeftModel

        model = cls.from_pretrained(base_path, dtype=torch.float32, **kw)
        if len(tok) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tok))  # rows come from the adapter's saved embeddings
        model = PeftModel.from_pretrained(model, folder)
        what = "transformers base + peft PeftModel"
    return True, what, model.eval()


def check_logits(logits, want, atol: float, rtol: float = 0.0):
    """max |logits - want| ≤ atol + rtol·max|want|: rounding error scales with the size of
    the numbers the forward pass adds up, not with each output element."""
    if logits.shape != want.shape:
        return False, f"logits shape {tuple(logits.shape)} ≠ recorded {tuple(want.shape)}", None
    diff = (logits - want).abs().max().item()
    scale = want.abs().max().item()
    limit = atol + rtol * scale
    shown = f"{atol:g}" + (f" + {rtol:g}·max|logit| ({scale:.3g}) = {limit:.3g}" if rtol else "")
    return diff <= limit, f"max abs difference {diff:.3g} (limit {shown})", diff


def forward(model, ref: dict):
    import torch

    with torch.inference_mode():
        return model(input_ids=ref["input_ids"]).logits.float()


def check_model(checks: Checks, folder: Path, manifest: dict, base_arg: str | None) -> None:
    """Everything after the file check: reference, tokenizer, prompt, base, load, logits."""
    from safetensors.torch import load_file

    ref = checks.run("reference", lambda: (True, manifest["reference"]["file"],
                                           load_file(str(folder / manifest["reference"]["file"]))))
    tok = checks.run("tokenizer", lambda: check_tokenizer(folder, manifest.get("task") != "score",
                                                          bool(manifest.get("trust_remote_code"))))
    if tok is not None and ref is not None:
        checks.run("prompt", lambda: check_prompt(tok, manifest, ref))
    base = None
    if manifest["format"] == "adapter":
        base = checks.run("base", lambda: check_base(manifest, base_arg))
    loadable = tok is not None and (manifest["format"] == "merged" or base is not None)
    model = checks.run("load", lambda: load_model(folder, manifest, base, tok)) if loadable else None
    if model is not None and ref is not None:
        r = manifest["reference"]
        logits = forward(model, ref)
        checks.run("logits", lambda: check_logits(logits, ref["logits"], r["atol"]))
        if "adapter_logits" in ref:  # a merged export: the merge must not change the model
            checks.run("merge", lambda: check_logits(logits, ref["adapter_logits"], r["merge_atol"],
                                                     r["merge_rtol"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--base", default=None)
    args = ap.parse_args()
    folder = Path(args.folder)
    checks = Checks()
    manifest = checks.run("manifest", lambda: (True, "tunesmith.json read",
                                               json.loads((folder / "tunesmith.json").read_text())))
    # Files that differ from the manifest are not what was exported: loading them would run
    # (or, with trust_remote_code, execute) unverified bytes, and any later result means nothing.
    if manifest is not None and checks.run("files", lambda: check_files(folder, manifest)):
        check_model(checks, folder, manifest, args.base)
    leaked = sorted(m for m in sys.modules if m == "tunesmith" or m.startswith("tunesmith."))
    checks.add("isolation", not leaked,
               f"tunesmith modules imported: {leaked}" if leaked else "no tunesmith code loaded")
    compared = any(r["name"] == "logits" for r in checks.rows)
    print(json.dumps({"ok": compared and all(r["ok"] for r in checks.rows), "checks": checks.rows}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
