"""eval / compare / report on tiny in-process runs: the suite registry, one base in memory
for adapters on it, loss and preference accuracy that recompute training's own eval
numbers, multiple choice by log-likelihood, per-item diffs, and the three commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_data_check import run_cli
from test_export import train_tiny
from test_train_preference import write_pairs
from tiny import save_tiny_model
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.compare import as_suites, compare_models, item_diffs
from tunesmith.infer.generate import generate
from tunesmith.infer.load import load_for_inference
from tunesmith.infer.pool import ModelPool
from tunesmith.evaluate.runner import (
    SUITES, EvalSettings, SuiteSpec, evaluate_models, register_suite, resolve_suites, suite_for, summary,
)
from tunesmith.evaluate.stats import rate_summary
from tunesmith.train.recipe import run as train

FAST = EvalSettings(max_new_tokens=6, batch_size=4)


def _pref_run(root: Path, base: Path, pairs: Path, name: str, method: str, **extra) -> Path:
    raw = {"model": str(base), "method": method, "data": {"train": str(pairs), "eval": str(pairs), "max_length": 256},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "preference": {"beta": 0.1},
           "train": {"max_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "eval_steps": 8, "save_steps": 0,
                     "dtype": "fp32", "threads": 1},
           "output_dir": str(root / name), **extra}
    train(load_config(None, raw=raw))
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base; an SFT LoRA run with a held-out split; DPO on top of that SFT adapter;
    a reward model — all on the same pairs file."""
    root = tmp_path_factory.mktemp("evaluate")
    base = save_tiny_model(root / "base")
    sft = train_tiny(root, base, "sft", data__eval_split=0.25, train__eval_steps=6)
    pairs = write_pairs(root / "pairs.jsonl", n=16)
    dpo = _pref_run(root, base, pairs, "dpo", "dpo", init_from=str(sft / "final"))
    reward = _pref_run(root, base, pairs, "reward", "reward")
    return {"root": root, "base": base, "sft": sft, "dpo": dpo, "reward": reward, "pairs": pairs}


def final_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["final_metrics"]


# --- registry --------------------------------------------------------------------------------


def test_registry_has_the_issue_suites_and_names_them_on_a_typo(tmp_path):
    assert {"instruction_following", "refusal_harmful", "refusal_benign", "accuracy", "loss", "preference"} <= set(SUITES)
    with pytest.raises(TunesmithError, match="unknown suite 'instruction_folowing'; use one of instruction_following"):
        suite_for("instruction_folowing")
    with pytest.raises(TunesmithError, match="given twice"):
        resolve_suites(["loss", "loss"])
    with pytest.raises(TunesmithError, match="--data is for the accuracy, loss, preference suites"):
        resolve_suites(["instruction_following"], data="x.jsonl")
    # A user file is typed by its first record; plain prompts become an unscored suite.
    (tmp_path / "mine.jsonl").write_text(json.dumps({"prompt": "Say hi.", "constraints": [
        {"type": "max_words", "value": 3}]}) + "\n")
    (tmp_path / "plain.jsonl").write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    assert suite_for(tmp_path / "mine.jsonl").metric == "prompt_accuracy"
    assert suite_for(tmp_path / "plain.jsonl").metric is None
    assert [s.name for s in as_suites(["hello there", "how are you"])] == ["prompts"]
    assert as_suites(["loss", f"accuracy={tmp_path / 'qa.jsonl'}"]) == ["loss", f"accuracy={tmp_path / 'qa.jsonl'}"]


def test_a_registered_generation_suite_runs_like_a_built_in(runs):
    def score_short(records, responses):
        items = [{"id": r["id"], "passed": len(t) < 1000} for r, t in zip(records, responses)]
        return {"items": items, "aggregate": {"n": len(items), "format_rate": rate_summary([i["passed"] for i in items])}}

    records = [{"id": "q1", "prompt": "Repeat: sea"}, {"id": "q2", "prompt": [{"role": "user", "content": "hi"}]}]
    register_suite(SuiteSpec("house_format", "test suite", lambda inp: records, "format_rate", score=score_short))
    try:
        result = evaluate_models([str(runs["base"])], ["house_format"], FAST)
    finally:
        SUITES.pop("house_format")
    out = result["results"]["house_format"][str(runs["base"])]
    assert [i["passed"] for i in out["items"]] == [True, True]
    assert result["metrics"]["house_format"][str(runs["base"])]["value"] == 1.0
    assert len(result["outputs"]["house_format"][str(runs["base"])]) == 2
    with pytest.raises(ValueError, match="exactly one of score"):
        register_suite(SuiteSpec("broken", "", lambda inp: [], None))


# --- one base in memory ------------------------------------------------------------------------


def test_adapters_on_one_base_share_one_copy_and_equal_separate_loads(runs):
    specs = [str(runs["base"]), str(runs["sft"]), str(runs["sft"] / "final"), str(runs["dpo"])]
    pool = ModelPool(specs)
    # DPO was trained on base + SFT merged: another model, so its own copy.
    assert pool.groups() == [specs[:3], [specs[3]]]
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11]])
    for member in pool.load_order():
        with pool.use(member) as model, torch.inference_mode():
            shared = model(input_ids=ids).logits
        alone, _, _ = load_for_inference(member.spec)
        with torch.inference_mode():
            torch.testing.assert_close(shared, alone(input_ids=ids).logits, atol=1e-5, rtol=0, msg=member.label)
    assert pool.loads == 2


def test_compare_outputs_equal_plain_generation_and_diffs_match_verdicts(runs):
    specs = [str(runs["base"]), str(runs["sft"])]
    result = compare_models(specs, "instruction_following", max_new_tokens=6, batch_size=4, limit=5)
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in result["prompts"]["instruction_following"]]
    for spec in specs:
        model, tok, _ = load_for_inference(spec)
        assert result["outputs"]["instruction_following"][spec] == generate(model, tok, prompts, max_new_tokens=6)
    verdicts = {s: [i["passed"] for i in result["results"]["instruction_following"][s]["items"]] for s in specs}
    d = result["diffs"]["instruction_following"][specs[1]]
    ids = [p["id"] for p in result["prompts"]["instruction_following"]]
    assert d["regressed"] == [i for i, a, b in zip(ids, verdicts[specs[0]], verdicts[specs[1]]) if a and not b]
    assert d["improved"] == [i for i, a, b in zip(ids, verdicts[specs[0]], verdicts[specs[1]]) if b and not a]
    assert result["groups"] == [specs] and result["suites"]["instruction_following"]["n"] == 5


def test_item_diffs_on_known_verdicts():
    def outcome(flags):
        return {"items": [{"id": f"i{k}", "passed": f} for k, f in enumerate(flags)],
                "aggregate": {"n": len(flags), "acc": rate_summary(flags)}}

    result = {"models": [{"label": "a"}, {"label": "b"}],
              "suites": {"s": {"metric": "acc"}, "loss": {"metric": "loss"}},
              "results": {"s": {"a": outcome([True, True, False, False]), "b": outcome([True, False, True, True])},
                          "loss": {"a": {"items": [{"id": 1, "passed": None}], "aggregate": {}},
                                   "b": {"items": [{"id": 1, "passed": None}], "aggregate": {}}}}}
    d = item_diffs(result)
    assert set(d) == {"s"}  # no verdicts, no diff
    assert d["s"]["b"]["regressed"] == ["i1"] and d["s"]["b"]["improved"] == ["i2", "i3"]
    assert d["s"]["b"]["delta"] == pytest.approx(0.25) and d["s"]["b"]["p_value"] == 1.0


# --- likelihood suites ---------------------------------------------------------------------------


def test_loss_suite_recomputes_the_runs_eval_loss(runs):
    result = evaluate_models([str(runs["sft"])], ["loss"], FAST)
    agg = result["results"]["loss"][str(runs["sft"])]["aggregate"]
    assert agg["n"] == 12 and agg["dropped"] == 0  # the 25% eval split of 48 records, as training chose it
    assert agg["loss"]["value"] == pytest.approx(final_metrics(runs["sft"])["eval_loss"], abs=1e-5)
    assert agg["loss"]["low"] < agg["loss"]["value"] < agg["loss"]["high"]
    assert agg["perplexity"]["value"] == pytest.approx(math.exp(agg["loss"]["value"]))


def test_preference_accuracy_by_implicit_reward_matches_training(runs):
    result = evaluate_models([str(runs["dpo"])], ["preference"], FAST)  # the run's data.eval pairs
    agg = result["results"]["preference"][str(runs["dpo"])]["aggregate"]
    final = final_metrics(runs["dpo"])
    assert "implicit reward" in agg["rule"] and agg["n"] == 16
    assert agg["accuracy"]["rate"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert agg["margin"]["value"] == pytest.approx(final["eval_rewards/margins"], abs=1e-4)


def test_both_spellings_of_ipo_are_scored_as_ipo_trained(runs):
    """`method: ipo` and `method: dpo` + `loss_type: ipo` train the same loss, so the
    preference suite scores both by IPO's per-token implicit reward (from the facts each
    run.json records) and recomputes training's own held-out accuracy and margin."""
    root, base, pairs = runs["root"], runs["base"], runs["pairs"]
    ipo = _pref_run(root, base, pairs, "ipo", "ipo")
    dpo_ipo = _pref_run(root, base, pairs, "dpo-ipo", "dpo", preference={"beta": 0.1, "loss_type": "ipo"})
    result = evaluate_models([str(ipo), str(dpo_ipo)], ["preference"], FAST)
    aggs = {r: result["results"]["preference"][str(r)]["aggregate"] for r in (ipo, dpo_ipo)}
    assert aggs[ipo]["rule"] == aggs[dpo_ipo]["rule"]
    assert "implicit reward" in aggs[ipo]["rule"] and "per token" in aggs[ipo]["rule"]
    for r in (ipo, dpo_ipo):
        final = final_metrics(r)
        assert aggs[r]["accuracy"]["rate"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
        assert aggs[r]["margin"]["value"] == pytest.approx(final["eval_rewards/margins"], abs=1e-4)
    facts = [json.loads((r / "run.json").read_text())["scoring"] for r in (ipo, dpo_ipo)]
    assert facts[0] == facts[1] == {"rule": "implicit", "loss_type": "ipo", "beta": 0.1, "per_token": True,
                                    "reference": True}


def test_preference_accuracy_by_reward_model(runs):
    from tunesmith.models.load import load_scorer
    from tunesmith.infer.score import score_conversations

    result = evaluate_models([str(runs["reward"])], ["preference"], FAST, data=runs["pairs"])
    items = result["results"]["preference"][str(runs["reward"])]["items"]
    pairs = [json.loads(x) for x in runs["pairs"].read_text().splitlines()]
    model, tok = load_scorer(runs["reward"] / "final")
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
    chosen = score_conversations(model, tok, prompts, [p["chosen"] for p in pairs])
    assert [i["chosen"] for i in items] == pytest.approx(chosen, abs=1e-5)
    assert result["results"]["preference"][str(runs["reward"])]["aggregate"]["rule"] == "reward model score"
    with pytest.raises(TunesmithError, match="reward model: it scores text but cannot generate"):
        evaluate_models([str(runs["reward"])], ["instruction_following"], FAST)


def test_multiple_choice_by_loglik_picks_the_most_likely_option(runs, tmp_path):
    from tunesmith.data.tokenize import tokenize_unpaired

    qa = tmp_path / "qa.jsonl"
    rows = [{"id": "mc1", "prompt": "Capital of France? A) Lyon B) Paris", "options": ["Lyon", "Paris"],
             "reference": "B", "method": "multiple_choice"},
            {"id": "mc2", "prompt": "Pick: A) sea B) sky C) wind", "options": ["sea", "sky", "wind"], "reference": 0,
             "method": "multiple_choice"},
            {"id": "n1", "prompt": "What is 2 + 3?", "reference": 5, "method": "numeric"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = EvalSettings(max_new_tokens=6, mc="loglik")
    result = evaluate_models([str(runs["sft"])], [f"accuracy={qa}"], settings)
    outputs = result["outputs"]["accuracy"][str(runs["sft"])]
    model, tok, _ = load_for_inference(str(runs["sft"]))
    for row, said in zip(rows[:2], outputs):
        means = []
        for option in row["options"]:  # independent reference: a plain forward and log_softmax
            ex = tokenize_unpaired({"prompt": [{"role": "user", "content": row["prompt"]}], "label": True,
                                    "completion": [{"role": "assistant", "content": option}]}, tok).completion
            with torch.inference_mode():
                logp = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].log_softmax(-1)
            pos = [t for t in range(1, len(ex.labels)) if ex.labels[t] != -100]
            means.append(sum(float(logp[t - 1, ex.labels[t]]) for t in pos) / len(pos))
        best = max(range(len(means)), key=lambda i: means[i])
        assert said == f"{'ABC'[best]}) {row['options'][best]}"
    items = result["results"]["accuracy"][str(runs["sft"])]["items"]
    assert [i["method"] for i in items] == ["multiple_choice", "multiple_choice", "numeric"]
    assert items[0]["passed"] == outputs[0].startswith("B)")


def test_refusal_suites_rate_and_an_optional_classifier(runs):
    settings = EvalSettings(max_new_tokens=6, limit=3, classifier=str(runs["reward"]), classifier_threshold=0.0)
    result = evaluate_models([str(runs["base"])], ["refusal_benign"], settings)
    out = result["results"]["refusal_benign"][str(runs["base"])]
    assert all(isinstance(i["classifier_score"], float) for i in out["items"])
    assert all(i["passed"] is (not i["refused"]) for i in out["items"])  # benign: answering passes
    assert {"refusal_rate", "classifier_refusal_rate", "classifier_agreement"} <= set(out["aggregate"])
    assert result["refusal_patterns"] and summary(result, str(runs["base"]))["refusal_benign"]["n"] == 3


# --- commands --------------------------------------------------------------------------------------


def test_eval_command_writes_results_and_the_run_summary_the_card_reads(runs, capsys):
    from tunesmith.export.card import results
    from tunesmith.models.runs import read_run

    sft = runs["sft"]
    code, out, err = run_cli(["eval", sft, "--suite", "instruction_following", "--limit", "3",
                              "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    ev = json.loads((sft / "eval" / "eval.json").read_text())
    assert ev["suites"]["instruction_following"]["n"] == 3 and "metric per model" in out
    lines = (sft / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"model", "suite", "id", "prompt", "completion", "passed"} <= set(json.loads(lines[0]))
    code, _, err = run_cli(["eval", sft, "--suite", "loss"], capsys)
    assert code == 0, err
    written = json.loads((sft / "eval" / "summary.json").read_text())
    assert set(written) == {"instruction_following", "loss"}  # merged across two evals
    assert all(isinstance(v, (int, float)) for metrics in written.values() for v in metrics.values())
    card = results(read_run(sft))
    assert "| instruction_following | prompt_accuracy |" in card and "| loss | perplexity |" in card


def test_eval_of_a_base_plus_adapter_equals_the_run(runs, tmp_path, capsys):
    code, _, err = run_cli(["eval", runs["base"], "--adapter", runs["sft"] / "final", "--suite", "instruction_following",
                            "--limit", "2", "--max-new-tokens", "4", "-o", tmp_path / "pair"], capsys)
    assert code == 0, err
    pair = json.loads((tmp_path / "pair" / "eval.json").read_text())
    label = f"{runs['base']}+{runs['sft'] / 'final'}"
    assert pair["models"][0]["label"] == label and pair["models"][0]["kind"] == "adapter"
    ran = evaluate_models([str(runs["sft"])], ["instruction_following"], EvalSettings(max_new_tokens=4, limit=2))
    assert pair["outputs"]["instruction_following"][label] == ran["outputs"]["instruction_following"][str(runs["sft"])]


@pytest.mark.parametrize("argv,expected", [
    (["eval", "BASE", "--suite", "nope"], "unknown suite 'nope'; use one of instruction_following"),
    (["eval", "BASE", "--suite", "accuracy"], "the accuracy suite needs your records"),
    (["eval", "BASE", "--suite", "loss"], "the loss suite needs held-out records"),
    (["eval", "/no/such/model", "--suite", "loss"], "model '/no/such/model' is neither a local folder"),
    (["eval", "BASE", "--suite", "accuracy", "--data", "/no/such.jsonl"], "no/such.jsonl"),
    (["eval", "BASE", "--suite", "loss", "--mc", "vote"], "--mc 'vote' is not a multiple-choice mode"),
    (["compare", "BASE", "--prompts", "loss"], "compare needs at least two models"),
    (["eval", "BASE", "BASE", "--adapter", "BASE", "--suite", "loss"], "--adapter goes on one base model"),
    (["report", "BASE"], "is not a run folder"),
])
def test_user_mistakes_are_one_sentence_errors(runs, capsys, argv, expected):
    code, out, err = run_cli([str(runs["base"]) if a == "BASE" else a for a in argv], capsys)
    assert code == 1 and expected in " ".join(err.split()), err


def test_compare_command_prints_regressions_and_writes_html_and_md(runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "hello", "prompt": "Say hi."}) + "\n")
    html, md, out_dir = tmp_path / "cmp.html", tmp_path / "cmp.md", tmp_path / "cmp"
    code, out, err = run_cli(["compare", runs["base"], runs["sft"], "--prompts", "instruction_following",
                              "--prompts", prompts, "--limit", "4", "--max-new-tokens", "4", "--html", html,
                              "--md", md, "-o", out_dir], capsys)
    assert code == 0, err
    assert "per-item changes against" in out and "outputs side by side" in out and "metric per model" in out
    result = json.loads((out_dir / "eval.json").read_text())
    assert set(result["diffs"]) == {"instruction_following"} and set(result["outputs"]) == {
        "instruction_following", str(prompts)}
    page = html.read_text()
    assert 'id="generations"' in page and "http://" not in page and "https://" not in page
    assert "Per-item changes against" in md.read_text()


def test_report_command_and_the_reusable_api(runs, tmp_path, capsys):
    from tunesmith.evaluate.report import build_report

    code, out, err = run_cli(["report", runs["dpo"]], capsys)
    assert code == 0, err
    page = (runs["dpo"] / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # loss + lr, and the preference metrics
    assert "| run | method |" in out and "dpo" in out
    unfinished = tmp_path / "running"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "learning_rate": 1e-4}) + "\n")
    md = build_report([runs["sft"], unfinished], None, tmp_path / "r.html", tmp_path / "r.md",
                      extra_sections=[("Before → after", "<p id='before-after'>format 0% → 95%</p>")])
    page = (tmp_path / "r.html").read_text()
    assert "<p id='before-after'>format 0% → 95%</p>" in page and "unfinished" in page
    assert (tmp_path / "r.md").read_text() == md and "(unfinished)" in md
