"""The inference core on tiny models: every kind of MODEL loads the same model, batched
greedy generation matches a naive loop, sampling is seeded, and the chat/generate commands."""

from __future__ import annotations

import io
import json

import pytest
import torch

from test_export import tiny  # noqa: F401 — the module fixture: a tiny run and its two exports
from tunesmith.infer.generate import generate, stream
from tunesmith.infer.load import load_for_inference

PROMPTS = [
    [{"role": "user", "content": "Repeat: sea sky"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Repeat: Paris France poem tool"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Repeat: add print call wind sea sky France"}],
]


@pytest.fixture(scope="module")
def run_model(tiny):  # noqa: F811
    return load_for_inference(tiny["run"])


def greedy_reference(model, tokenizer, messages, eos: set[int], n: int) -> list[int]:
    """Greedy decoding the slow, obvious way: one prompt, no padding, no KV cache."""
    from tunesmith.data.tokenize import tokenize_prompt

    x = torch.tensor([tokenize_prompt(messages, tokenizer)])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def test_every_kind_of_model_spec_loads_the_same_model(tiny, tmp_path):  # noqa: F811
    import shutil

    from peft import PeftModel

    lone = shutil.copytree(tiny["run"] / "final", tmp_path / "adapter")  # no run.json beside it

    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11]])
    loaded = {
        "run": load_for_inference(tiny["run"]),
        "final": load_for_inference(tiny["run"] / "final"),
        "export-adapter": load_for_inference(tiny["adapter"]),
        "export-merged": load_for_inference(tiny["merged"]),
        "base+adapter": load_for_inference(str(tiny["base"]), adapter=tiny["run"] / "final"),
        "adapter-folder": load_for_inference(lone),
    }
    base_model, base_tok, base_info = load_for_inference(str(tiny["base"]))
    assert base_info.kind == "base"
    assert {k: v[2].kind for k, v in loaded.items()} == {
        "run": "run", "final": "run", "export-adapter": "export", "export-merged": "export",
        "base+adapter": "adapter", "adapter-folder": "adapter"}
    with torch.inference_mode():
        logits = {k: m(input_ids=ids).logits for k, (m, _, _) in loaded.items()}
        base = base_model(input_ids=ids).logits
        run_model_, _, _ = loaded["run"]
        assert isinstance(run_model_, PeftModel)
        with run_model_.disable_adapter():  # callers compare against the base this way
            torch.testing.assert_close(run_model_(input_ids=ids).logits, base, atol=1e-6, rtol=0)
    for k, v in logits.items():
        torch.testing.assert_close(v, logits["run"], atol=1e-4, rtol=0, msg=k)
    assert (logits["run"] - base).abs().max() > 1e-3
    templates = {tok.chat_template for _, tok, _ in loaded.values()}
    assert len(templates) == 1 and all(tok.pad_token_id is not None for _, tok, _ in loaded.values())


def test_batched_greedy_matches_a_naive_loop_and_stops_at_eos(run_model):
    model, tok, _ = run_model
    first = greedy_reference(model, tok, PROMPTS[0], {tok.eos_token_id}, 12)
    # A token prompt 0 emits becomes a second EOS: prompts now stop at different steps,
    # which exercises left padding and per-row stopping in one batch.
    extra = first[3]
    stop = {tok.eos_token_id, extra}
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    try:
        want_ids = [greedy_reference(model, tok, p, stop, 12) for p in PROMPTS]
        got = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
        assert got == generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1)
    finally:
        model.generation_config.eos_token_id = saved
    assert got == [tok.decode(ids, skip_special_tokens=True) for ids in want_ids]
    assert want_ids[0] == first[:first.index(extra) + 1]  # stopped at the first EOS it emitted
    assert len({len(ids) for ids in want_ids}) > 1


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(run_model):
    model, tok, _ = run_model
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=1)
    assert a != generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=2)


def test_stream_pieces_join_to_the_generated_text(run_model):
    model, tok, _ = run_model
    pieces = list(stream(model, tok, PROMPTS[1], max_new_tokens=12))
    assert "".join(pieces) == generate(model, tok, [PROMPTS[1]], max_new_tokens=12)[0]


def test_cli_generate_writes_id_prompt_completion(tiny, run_model, tmp_path):  # noqa: F811
    from tunesmith.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n"
                               for i, t in enumerate(["Repeat: sea", "Repeat: wind sky poem"])))
    out = tmp_path / "out.jsonl"
    main(["generate", str(tiny["merged"]), "--prompts", str(prompts), "-o", str(out), "--max-new-tokens", "8"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    model, tok, _ = run_model
    want = generate(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in rows], max_new_tokens=8)
    assert [r["id"] for r in rows] == ["p0", "p1"] and [r["completion"] for r in rows] == want

    chats = tmp_path / "messages.jsonl"
    chats.write_text(json.dumps({"messages": PROMPTS[1]}) + "\n")
    main(["generate", str(tiny["run"]), "--prompts", str(chats), "-o", str(out), "--max-new-tokens", "8"])
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["prompt"] == PROMPTS[1] and "id" not in row
    assert row["completion"] == generate(model, tok, [PROMPTS[1]], max_new_tokens=8)[0]


def test_cli_generate_refuses_bad_input(tiny, tmp_path):  # noqa: F811
    from tunesmith.cli import main

    pairs = tmp_path / "pairs.jsonl"  # preference pairs are no prompts (SFT records are: their last turn is cut)
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    answered = tmp_path / "answered.jsonl"
    answered.write_text(json.dumps({"messages": PROMPTS[2] + [{"role": "assistant", "content": "x"}]}) + "\n")
    for extra in (["--prompts", str(pairs)], ["--prompts", str(answered), "--top-p", "0"],
                  ["--prompts", str(answered), "--dtype", "fp8"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", str(tiny["merged"]), "-o", str(tmp_path / "o.jsonl"), *extra])
        assert e.value.code == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_dtype_fp32_is_transformers_fp32_and_bf16_is_recorded(tiny, run_model, tmp_path, capsys):  # noqa: F811
    """--dtype reaches the decoder: fp32 gives exactly transformers' fp32 greedy text; eval records
    the precision it decoded with; a wrong --dtype in eval is one sentence."""
    from tunesmith.cli import main

    model, tok, _ = run_model
    ids = [greedy_reference(model, tok, p, {tok.eos_token_id}, 10) for p in PROMPTS]
    assert generate(model, tok, PROMPTS, max_new_tokens=10, dtype="fp32") == \
        [tok.decode(i, skip_special_tokens=True) for i in ids]
    assert len(generate(model, tok, PROMPTS, max_new_tokens=10, dtype="bf16")) == len(PROMPTS)
    out = tmp_path / "ev"
    main(["eval", str(tiny["run"]), "--suite", "instruction_following", "--limit", "2", "--max-new-tokens", "4",
          "--dtype", "bf16", "-o", str(out)])
    settings = json.loads((out / "eval.json").read_text())["settings"]
    assert settings["dtype"] == "bf16" and settings["decoded_in"] == "bf16"
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny["run"]), "--suite", "instruction_following", "--dtype", "half"])
    assert e.value.code == 1 and "--dtype 'half' is not a decoding precision" in capsys.readouterr().err


def test_chat_loop_commands():
    from tunesmith.cli.package import chat_loop

    lines = iter(["hello", "", "/system Be brief.", "again", "/reset", "/bogus", "third", "/exit", "never read"])
    seen = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        return f"reply {len(seen)}"

    final = chat_loop(reply, lambda: next(lines), system="Start.")
    assert seen[0] == [{"role": "system", "content": "Start."}, {"role": "user", "content": "hello"}]
    assert seen[1][0] == {"role": "system", "content": "Be brief."} and len(seen[1]) == 4
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "third"}]
    assert final[-1] == {"role": "assistant", "content": "reply 3"} and next(lines) == "never read"


def test_cli_chat_streams_replies_until_eof(tiny, run_model, monkeypatch, capsys):  # noqa: F811
    from tunesmith.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Repeat: sea sky\n/reset\n"))
    main(["chat", str(tiny["adapter"]), "--temperature", "0", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    model, tok, _ = run_model
    want = generate(model, tok, [[{"role": "user", "content": "Repeat: sea sky"}]], max_new_tokens=8)[0]
    assert want in out and "(conversation reset)" in err


def test_eval_results_are_replaced_whole_never_rewritten_in_place(tiny, tmp_path):  # noqa: F811
    """eval.json, generations.jsonl and summary.json arrive by rename: a reader (or a crash
    mid-write) sees the previous file whole or the new one, never a truncated mix."""
    import os
    import shutil

    from tunesmith.evaluate.runner import EvalSettings, run_eval

    run_dir = shutil.copytree(tiny["run"], tmp_path / "run")
    settings = EvalSettings(limit=2, max_new_tokens=4, batch_size=2)
    run_eval([str(run_dir)], ["instruction_following"], settings)
    files = [run_dir / "eval" / name for name in ("eval.json", "generations.jsonl", "summary.json")]
    readers = {f: open(f, encoding="utf-8") for f in files}
    inodes = {f: os.stat(f).st_ino for f in files}
    first = {f: f.read_text(encoding="utf-8") for f in files}
    run_eval([str(run_dir)], ["instruction_following"], settings)
    for f, reader in readers.items():
        old = reader.read()
        reader.close()
        assert os.stat(f).st_ino != inodes[f], f.name
        assert old == first[f], f.name  # the reader kept the whole previous file
    lines = (run_dir / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines == first[files[1]].splitlines()  # greedy: the same generations again
    assert json.loads((run_dir / "eval" / "summary.json").read_text()) == json.loads(first[files[2]])
    assert not [p.name for p in (run_dir / "eval").iterdir() if p.name.startswith(".tmp-")]
