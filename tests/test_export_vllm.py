"""Will vLLM serve an export (export/vllm.py)? Tiny PEFT adapters built in-process on tiny Llama
and Qwen2 bases, each breaking one rule of vLLM 0.33.0's LoRA loader; one real export through
the CLI shows the value in tunesmith.json and the printed line; bench/vllm_check.py's logic runs
on the CPU with a stand-in for vLLM (the real comparison needs a CUDA GPU and vLLM)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import make_tokenizer, save_tiny_model
from tunesmith.export.vllm import check_adapter, check_export, check_merged, line, needed_max_lora_rank


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def llama(root) -> Path:
    return save_tiny_model(root / "llama")


@pytest.fixture(scope="module")
def qwen2(root) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer("qwen2")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "qwen2")
    tok.save_pretrained(root / "qwen2")
    return root / "qwen2"


def make_adapter(folder: Path, base: Path, *, tokenizer=None, new_tokens=(), resize_to=None, **lora) -> Path:
    """A PEFT LoRA of ``base`` saved with a tokenizer (the base's unless given), as an export holds it;
    ``new_tokens`` grow tokenizer and embeddings, ``resize_to`` only the embeddings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tok = tokenizer or AutoTokenizer.from_pretrained(base)
    if new_tokens:
        tok.add_tokens(list(new_tokens))
        model.resize_token_embeddings(len(tok))
    if resize_to:
        model.resize_token_embeddings(resize_to)
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora})) \
        .save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def edited(adapter: Path, folder: Path, **config) -> Path:
    """A copy of ``adapter`` with adapter_config.json fields replaced."""
    shutil.copytree(adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return folder


@pytest.fixture(scope="module")
def plain(root, llama) -> Path:
    return make_adapter(root / "plain", llama)


# ---------------------------------------------------------------- the rules


def test_a_plain_lora_is_ok_and_gets_its_serve_command(plain, llama, tmp_path):
    got = check_adapter(plain, llama, serve_as=tmp_path / "exp")
    assert got.ok is True and got.reasons == [] and got.notes == [] and got.max_lora_rank == 8
    assert got.serve == f"vllm serve {llama} --enable-lora --lora-modules exp={tmp_path / 'exp'}"
    rec = check_export(plain, "adapter", base=llama, serve_as=tmp_path / "exp")
    assert rec == {"ok": True, "checked_against": "vLLM 0.33.0", "reasons": [], "notes": [], "max_lora_rank": 8,
                   "serve": got.serve}
    assert line(rec) == f"vllm: ok — serve with: {got.serve}"
    # a path with a comma would be read as JSON by vLLM's --lora-modules parser: the JSON form is used
    odd = check_adapter(plain, llama, serve_as=tmp_path / "a,b").serve
    assert '{"name": "a,b", "path": ' in odd


def test_dora_is_refused_with_the_fix(root, llama):
    got = check_adapter(make_adapter(root / "dora", llama, target_modules=["q_proj"], use_dora=True), llama)
    assert got.ok is False and got.serve is None
    assert len(got.reasons) == 1, got.reasons  # DoRA's magnitude tensors are not a second, separate complaint
    assert "DoRA" in got.reasons[0] and "--format merged" in got.reasons[0] and "lora.dora: false" in got.reasons[0]
    assert line(got.to_json()).startswith("vllm: not loadable — DoRA adapters")


@pytest.mark.parametrize("lora, ok, need, flag", [
    ({"r": 16}, True, 16, None),                             # vLLM's default max_lora_rank: no flag
    ({"r": 24}, True, 32, "--max-lora-rank 32"),             # not one of the choices: the next one up
    ({"r": 64}, True, 64, "--max-lora-rank 64"),
    ({"r": 8, "rank_pattern": {"v_proj": 48}}, True, 64, "--max-lora-rank 64"),  # the largest rank counts
    ({"r": 600}, False, None, None),                         # above 512, the largest choice
])
def test_rank_limits_and_the_flag_they_need(root, llama, lora, ok, need, flag):
    name = "rank-" + "-".join(f"{k}{v}" for k, v in lora.items()).replace(" ", "")
    got = check_adapter(make_adapter(root / name, llama, target_modules=["q_proj", "v_proj"], **lora), llama)
    assert got.ok is ok, got.reasons
    if not ok:
        assert "Rank 600 is above vLLM's largest --max-lora-rank 512" in got.reasons[0]
        assert "lora.r ≤ 512" in got.reasons[0]
        return
    assert got.max_lora_rank == need
    if flag is None:
        assert "--max-lora-rank" not in got.serve and got.notes == []
    else:
        assert flag in got.serve and any(flag in n for n in got.notes), got.notes


def test_target_modules_vllm_cannot_take_depend_on_the_architecture(root, llama, qwen2):
    # vLLM's Llama class lists embed_tokens and lm_head in embedding_modules; its Qwen2 class does not
    targets = ["q_proj", "embed_tokens", "lm_head"]
    assert check_adapter(make_adapter(root / "llama-emb", llama, target_modules=targets), llama).ok is True
    got = check_adapter(make_adapter(root / "qwen2-emb", qwen2, target_modules=targets), qwen2)
    assert got.ok is False and len(got.reasons) == 1
    r = got.reasons[0]
    assert "embed_tokens, lm_head on Qwen2ForCausalLM" in r and "lora.target_modules: [q_proj]" in r
    assert check_adapter(make_adapter(root / "qwen2-lin", qwen2), qwen2).ok is True  # all-linear is fine


def test_an_architecture_the_check_does_not_know_is_a_note_not_a_verdict(plain, llama, tmp_path):
    other = shutil.copytree(llama, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"]}))
    got = check_adapter(plain, other)
    assert got.ok is True and "FooForCausalLM is not among the architectures" in got.notes[0]


def test_modules_to_save_is_refused(root, llama):
    got = check_adapter(make_adapter(root / "mts", llama, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        llama)
    assert got.ok is False and len(got.reasons) == 1
    assert "modules_to_save: lm_head" in got.reasons[0] and "--format merged" in got.reasons[0]


def test_resized_embeddings_are_refused(root, llama):
    # tunesmith's way: new tokens, the embeddings saved whole
    a = make_adapter(root / "resized-mts", llama, new_tokens=["<x1>", "<x2>"], target_modules=["q_proj"],
                     modules_to_save=["embed_tokens", "lm_head"])
    vocab = json.loads((llama / "config.json").read_text())["vocab_size"]
    got = check_adapter(a, llama)
    assert got.ok is False and len(got.reasons) == 2
    assert f"resized vocabulary ({vocab + 2} tokens; the base has {vocab})" in got.reasons[1]
    # embeddings resized with the tokenizer unchanged (e.g. padded rows): the tensors' shapes tell
    b = make_adapter(root / "resized-rows", llama, resize_to=vocab + 5, target_modules=["q_proj"],
                     modules_to_save=["embed_tokens"])
    got = check_adapter(b, llama)
    assert got.ok is False and len(got.reasons) == 2 and f"({vocab + 5} tokens; the base has {vocab})" in got.reasons[1]
    # LoRA on a resized embedding: vLLM wants lora_embedding_A of the base's vocabulary
    c = make_adapter(root / "resized-lora", llama, resize_to=vocab + 3, target_modules=["q_proj", "embed_tokens"])
    got = check_adapter(c, llama)
    assert got.ok is False and len(got.reasons) == 1 and f"({vocab + 3} tokens; the base has {vocab})" in got.reasons[0]
    # PEFT's trainable tokens: a tensor vLLM cannot read
    d = make_adapter(root / "tokens", llama, target_modules=["q_proj"], trainable_token_indices=[3, 4])
    got = check_adapter(d, llama)
    assert got.ok is False and "trainable_token_indices" in got.reasons[0]


def test_a_tokenizer_that_differs_from_the_bases_is_served_with_tokenizer(root, llama, tmp_path):
    tok = make_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    a = make_adapter(root / "template", llama, tokenizer=tok, target_modules=["q_proj"])
    got = check_adapter(a, llama, serve_as=tmp_path / "t")
    assert got.ok is True and "chat template" in got.notes[0]
    assert f"--tokenizer {tmp_path / 't'}" in got.serve


@pytest.mark.parametrize("config, words", [
    ({"bias": "all"}, "bias: all"),
    ({"lora_bias": True}, "lora_bias: true"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
    ({"init_lora_weights": "lora_ga"}, "'lora_ga' subtracted the initial adapter from the base weights"),
    ({"use_qalora": True}, "QA-LoRA"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"alora_invocation_tokens": [5]}, "aLoRA"),
    ({"peft_type": "IA3"}, "peft_type is IA3"),
    # PEFT 0.21's layer.py: these only set the first adapter weights (eva: B = 0; mica: A = 0,
    # B from the base's SVD; orthogonal: random), the base is left alone: a plain LoRA once saved
    ({"init_lora_weights": "gaussian"}, None),
    ({"init_lora_weights": "eva"}, None),
    ({"init_lora_weights": "orthogonal"}, None),
    ({"init_lora_weights": "mica"}, None),
])
def test_peft_features_vllm_refuses(plain, llama, tmp_path, config, words):
    got = check_adapter(edited(plain, tmp_path / "a", **config), llama)
    if words is None:
        assert got.ok is True, got.reasons
        return
    assert got.ok is False and len(got.reasons) == 1 and words in got.reasons[0], got.reasons


def test_a_real_lora_ga_adapter_is_another_model_on_the_plain_base(root, llama):
    """PEFT's lora_ga init subtracts the first B·A from the base weights; the saved adapter does
    not carry that, and loading it (PEFT here; vLLM the same) starts from the plain base."""
    from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model, preprocess_loraga
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(scale="weight_svd"))
    torch.manual_seed(0)
    preprocess_loraga(model, cfg, lambda: model(input_ids=ids, labels=ids).loss.backward())
    trained = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    trained.save_pretrained(root / "lora-ga")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), root / "lora-ga").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - want).abs().max() > 1.0  # not the model that was trained
    got = check_adapter(root / "lora-ga", llama)
    assert got.ok is False and len(got.reasons) == 1 and "lora_ga" in got.reasons[0], got.reasons
    assert "--format merged" in got.reasons[0]


def test_a_real_non_lora_adapter_gets_the_one_reason(root, llama):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(llama),
                   IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])) \
        .save_pretrained(root / "ia3")
    got = check_adapter(root / "ia3", llama)
    assert got.ok is False and got.reasons == [
        "The adapter's peft_type is IA3 and vLLM loads LoRA adapters only; export it with --format merged to serve "
        "it with vLLM."]  # no second reason about its ia3_l tensors: they are not LoRA's to begin with


def test_a_tensor_that_is_not_a_lora_weight_is_refused(plain, llama, tmp_path):
    a = shutil.copytree(plain, tmp_path / "a")
    tensors = load_file(a / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(tensors, str(a / "adapter_model.safetensors"))
    got = check_adapter(a, llama)
    assert got.ok is False and "base_model.model.model.norm.weight" in got.reasons[0]
    assert "unsupported LoRA weight" in got.reasons[0]


def test_merged_gguf_reward_and_a_broken_folder(plain, llama, tmp_path):
    assert check_merged(llama, serve_as=tmp_path / "m").to_json()["serve"] == f"vllm serve {tmp_path / 'm'}"
    merged = check_export(llama, "merged", serve_as=tmp_path / "m", trust_remote_code=True, tokenizer=object(),
                          template_kwargs={"enable_thinking": False})
    assert merged["ok"] is True
    assert merged["serve"] == (f"vllm serve {tmp_path / 'm'} --trust-remote-code --default-chat-template-kwargs "
                               "'{\"enable_thinking\": false}'")
    assert check_export(llama, "gguf") is None
    assert check_export(plain, "adapter", base=llama, task="score") is None
    broken = shutil.copytree(plain, tmp_path / "broken")
    (broken / "adapter_model.safetensors").unlink()
    rec = check_export(broken, "adapter", base=llama)  # never raises: the export must not fail on it
    assert rec["ok"] is None and "could not run" in rec["notes"][0]
    assert line(rec).startswith("vllm: not checked — the vLLM check could not run")


def test_needed_max_lora_rank():
    assert [needed_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 320, 321, 512, 513)] == \
        [1, 8, 8, 16, 16, 32, 320, 320, 512, 512, None]


# ---------------------------------------------------------------- through the real export


def test_export_records_the_check_and_prints_it(root, llama, capsys):
    """One tiny LoRA run at rank 24 (2 steps), exported as an adapter through the CLI (no verify)."""
    from test_export import train_tiny
    from tunesmith.cli import main

    run_dir = train_tiny(root / "runs", llama, lora__r=24, lora__alpha=24, train__max_steps=2)
    out = root / "exp-adapter"
    main(["export", str(run_dir), "--format", "adapter", "-o", str(out), "--no-verify"])
    err = capsys.readouterr().err
    m = json.loads((out / "tunesmith.json").read_text())
    v = m["vllm"]
    assert v["ok"] is True and v["max_lora_rank"] == 32 and v["reasons"] == []
    want = f"vllm serve {m['adapter_base_path']} --enable-lora --max-lora-rank 32 --lora-modules exp-adapter={out}"
    assert v["serve"].startswith(want), v["serve"]
    assert f"vllm: ok — serve with: {v['serve']}" in " ".join(err.split())  # one line (rich may wrap it)
    assert "tunesmith.json" not in m["files"] and "## Serving with vLLM" in (out / "README.md").read_text()
    assert v["serve"] in (out / "README.md").read_text()


# ---------------------------------------------------------------- bench/vllm_check.py, without a GPU


def test_compare_tokens_verdicts():
    from bench.vllm_check import compare_tokens

    rows = [torch.tensor([10.0, 9.99, 0.0]), torch.tensor([0.0, 5.0, 1.0])]
    assert compare_tokens([0, 1], rows, [0, 1], 1e-3)["verdict"] == "identical"
    tie = compare_tokens([0, 1], rows, [1, 2], 3e-3)  # 0.01 apart at step 0, limit 0.03: a near-tie, ends there
    assert tie["ok"] and tie["verdict"] == "near-tie" and tie["first_diff"] == 0
    bad = compare_tokens([0, 1], rows, [0, 2], 3e-2)  # 4.0 apart at step 1: far beyond 0.15
    assert not bad["ok"] and bad["verdict"] == "MISMATCH" and bad["same"] == 1
    assert not compare_tokens([0, 1], rows, [0], 1e-3)["ok"]


def test_vllm_check_says_why_it_does_not_run(plain, llama, capsys):
    import importlib.util

    from bench import vllm_check

    with pytest.raises(SystemExit) as e:
        vllm_check.main(["--help"])
    assert e.value.code == 0
    capsys.readouterr()
    assert vllm_check.main([str(plain.parent / "nowhere")]) == 2
    assert "not run — " in capsys.readouterr().out
    if importlib.util.find_spec("vllm") is None:
        assert vllm_check.main([str(plain), "--base", str(llama)]) == 2
        assert "vLLM is not installed here" in capsys.readouterr().out


def stand_in_vllm(monkeypatch, answers: dict) -> list:
    """A stand-in for vllm in sys.modules: ``LLM.chat`` renders each chat with the tokenizer the
    engine was given (else the model's), as vLLM does, and answers from ``answers`` (prompt ids ->
    tokens; "base" -> the answer without the adapter). Returns the list of calls it saw."""
    from transformers import AutoTokenizer

    from bench import vllm_check

    made = []

    class LLM:
        def __init__(self, **kw):
            made.append(kw)
            self.tokenizer = AutoTokenizer.from_pretrained(kw.get("tokenizer", kw["model"]))

        def chat(self, messages, params, lora_request=None, chat_template_kwargs=None, use_tqdm=True):
            made.append({"params": params, "lora": lora_request, "switches": chat_template_kwargs})
            out = []
            for ids in vllm_check.render(self.tokenizer, messages, chat_template_kwargs):
                toks = answers.get(tuple(ids), [0] * params["max_tokens"]) if lora_request else answers["base"]
                out.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[types.SimpleNamespace(token_ids=toks)]))
            return out

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams, fake.__version__ = LLM, lambda **kw: kw, "0.33.0-standin"
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, id, path: {"name": name, "id": id, "path": path}
    for name, mod in (("vllm", fake), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(vllm_check, "DEVICE", "cpu")
    monkeypatch.setattr(vllm_check, "environment_problem", lambda: None)
    return made


def transformers_side(folder: Path, base: Path, n: int):
    """The bench's transformers half: the prompt ids (export's tokenizer) and greedy tokens + rows."""
    from transformers import AutoTokenizer

    from bench import vllm_check

    ids = vllm_check.render(AutoTokenizer.from_pretrained(folder), vllm_check.PROMPTS, None)
    return ids, *vllm_check.transformers_greedy(vllm_check.read_export(folder, base), ids, n, False)


def test_vllm_check_logic_on_cpu_with_a_stand_in_vllm(root, llama, monkeypatch, capsys, tmp_path):
    """The whole script on the CPU: transformers' greedy loop (checked against generate), the
    vLLM calls it makes (recorded by a stand-in that answers with given tokens), the verdicts:
    identical, a real near-tie (another token within rtol) that passes, a difference that fails."""
    from bench import vllm_check

    a = make_adapter(root / "bench-adapter", llama, r=24, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)  # random B: the adapter changes the tokens
    answers = {"base": [0] * 6}
    made = stand_in_vllm(monkeypatch, answers)
    ids, ref, rows = transformers_side(a, llama, 6)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), a).eval()
    gen = model.generate(torch.tensor([ids[0]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen[0, len(ids[0]):].tolist() == ref[0]  # the KV-cache loop is greedy decoding

    answers.update({tuple(p): list(t) for p, t in zip(ids, ref)})
    args = [str(a), "--base", str(llama), "--max-new-tokens", "6"]
    assert vllm_check.main(args) == 0
    out = capsys.readouterr().out
    assert "PASS — 8 identical, 0 near-tie, 0 mismatch" in out
    engine = made[0]
    # as the prediction (no tunesmith.json: tunesmith.export.vllm run now) serves it: rank 24 needs
    # --max-lora-rank 32, and the export's tokenizer is the base's, so no --tokenizer
    assert engine["model"] == str(llama) and "tokenizer" not in engine and engine["enable_lora"] is True
    assert engine["max_lora_rank"] == 32 and engine["dtype"] == "bfloat16" and engine["trust_remote_code"] is False
    assert made[1]["params"] == {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
    assert made[1]["lora"] == {"name": "export", "id": 1, "path": str(a.resolve())} and made[2]["lora"] is None

    # a real near-tie: the step where transformers' two best tokens are closest; vLLM takes the
    # second there, which passes with a tolerance just above that gap
    def ratio(row):
        top = row.topk(2).values
        return float(top[0] - top[1]) / float(row.abs().max())

    p, k = min(((p, k) for p in range(8) for k in range(6)), key=lambda pk: ratio(rows[pk[0]][pk[1]]))
    second = int(rows[p][k].topk(2).indices[1])
    assert second != ref[p][k] and ratio(rows[p][k]) > 0
    rtol = 1.5 * ratio(rows[p][k])
    answers[tuple(ids[p])] = ref[p][:k] + [second] + ref[p][k + 1:]
    result = tmp_path / "r.json"
    assert vllm_check.main([*args, "--rtol", str(rtol), "--out", str(result)]) == 0
    assert "PASS — 7 identical, 1 near-tie, 0 mismatch" in capsys.readouterr().out
    tie = json.loads(result.read_text())["prompts"][p]
    assert tie["verdict"] == "near-tie" and tie["first_diff"] == k and 0 < tie["gap"] <= tie["limit"]

    # and at another prompt vLLM's first token is transformers' least likely one: far beyond rtol
    q = (p + 1) % 8
    worst = int(rows[q][0].argmin())
    assert float(rows[q][0][ref[q][0]] - rows[q][0][worst]) > rtol * float(rows[q][0].abs().max())
    answers[tuple(ids[q])] = [worst] + ref[q][1:]
    assert vllm_check.main([*args, "--rtol", str(rtol), "--out", str(result)]) == 1
    assert "FAIL — 6 identical, 1 near-tie, 1 mismatch" in capsys.readouterr().out
    bad = json.loads(result.read_text())["prompts"][q]
    assert bad["verdict"] == "MISMATCH" and bad["first_diff"] == 0 and bad["gap"] > bad["limit"]


def test_vllm_check_follows_the_predicted_tokenizer_flag(root, llama, monkeypatch, capsys):
    """An export whose chat template differs from the base's: the prediction serves it with
    --tokenizer, and so does the bench (pass); a stale prediction without the flag has vLLM
    render the chats with the base's template, and every prompt is a mismatch."""
    from bench import vllm_check

    tok = make_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}<|im_start|>"
    a = make_adapter(root / "bench-template", llama, tokenizer=tok, target_modules=["q_proj"])
    answers = {"base": [0] * 4}
    made = stand_in_vllm(monkeypatch, answers)
    ids, ref, _ = transformers_side(a, llama, 4)
    answers.update({tuple(p): list(t) for p, t in zip(ids, ref)})
    args = [str(a), "--base", str(llama), "--max-new-tokens", "4"]
    assert vllm_check.main(args) == 0
    assert "PASS — 8 identical" in capsys.readouterr().out
    assert made[0]["tokenizer"] == str(a) and "max_lora_rank" in made[0]

    predicted = check_export(a, "adapter", base=llama)
    assert "--tokenizer" in predicted["serve"]
    stale = {**predicted, "serve": predicted["serve"].replace(f"--tokenizer {a} ", "")}
    (a / "tunesmith.json").write_text(json.dumps({"vllm": stale}))
    made.clear()
    assert vllm_check.main(args) == 1
    out = capsys.readouterr().out
    assert "tokenizer" not in made[0] and "FAIL — 0 identical, 0 near-tie, 8 mismatch" in out
    assert "vLLM's prompt ids differ from token 1" in out  # both templates open with <|im_start|>


def test_engine_args_follow_the_serve_command(llama, tmp_path):
    from bench.vllm_check import engine_args

    what = {"mode": "adapter", "model": llama, "adapter": tmp_path / "exp", "manifest": {}}
    serve = (f"vllm serve {llama} --enable-lora --max-lora-rank 64 --tokenizer /elsewhere/exp --lora-modules "
             "exp=/elsewhere/exp --trust-remote-code --default-chat-template-kwargs '{\"enable_thinking\": false}'")
    kw, switches = engine_args(what, {"ok": True, "serve": serve, "max_lora_rank": 64})
    assert kw == {"model": str(llama), "enable_lora": True, "max_loras": 1, "max_lora_rank": 64,
                  "tokenizer": str(tmp_path / "exp"), "trust_remote_code": True}
    assert switches == {"enable_thinking": False}
    # refused (no serve command): vLLM gets the export's own tokenizer and switches, to see it refuse
    what["manifest"] = {"chat": {"template_kwargs": {"enable_thinking": True}}}
    kw, switches = engine_args(what, {"ok": False, "max_lora_rank": 16})
    assert kw["max_lora_rank"] == 16 and kw["tokenizer"] == str(tmp_path / "exp")
    assert switches == {"enable_thinking": True}
    assert engine_args(what, {"ok": False})[0]["max_lora_rank"] == 512  # a rank above vLLM's largest choice
