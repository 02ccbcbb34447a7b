"""`tunesmith data curate` on the shared demos with planted faults of known answers: each rule's
precision and recall on the labelled sample, nothing lost, the report in a real browser, and
bad input as one sentence."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.data.curate import CurateConfig, curate, normalise_text, pii_in, repetition
from tunesmith.errors import TunesmithError

DEMO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "llamafactory-demo"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def alpaca(rec: dict) -> dict:
    return {"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"]}


def _edit(rec: dict, rnd: random.Random) -> dict:
    """A near duplicate: one word of the output replaced, the instruction re-cased and re-spaced."""
    words = rec["output"].split()
    words[rnd.randrange(len(words))] = rnd.choice(["indeed", "really", "quite"])
    return {"instruction": "  " + rec["instruction"].lower() + " ", "input": rec["input"],
            "output": " ".join(words)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(folder, labels by output line) — a clean base drawn from the Alpaca demo, then near
    duplicates, exact duplicates (after normalisation), contaminated records, empty, repetitive
    and refusal responses planted at known places; an eval file drawn from the same demo."""
    tmp = tmp_path_factory.mktemp("curate")
    raw = json.loads((DEMO / "alpaca_en_demo.json").read_text())
    evals = raw[600:640]
    (tmp / "eval.jsonl").write_text("".join(json.dumps({"prompt": r["instruction"] + " " + r["input"],
                                                        "reference": r["output"]}) + "\n" for r in evals))
    (tmp / "base.json").write_text(json.dumps(raw[:400]))
    # the demo's own duplicates and overlaps with the eval items out first: a clean base
    clean = curate([str(tmp / "base.json")], tmp / "base-clean.jsonl", eval_files=[str(tmp / "eval.jsonl")])
    base = [raw[int(e.where.rsplit(":", 1)[1])] for e in clean.kept]
    rnd = random.Random(0)
    rows, labels = [alpaca(r) for r in base], {}
    vocab = sorted({w.strip(".,;:!?").lower() for r in base for w in r["output"].split() if w.isalpha()})

    def phrase(n: int) -> str:  # distinct random words: no two planted records near each other
        return " ".join(rnd.sample(vocab, n))

    origin: dict[int, str] = {}  # planted near duplicate → its base row; contaminated → its eval line

    def tagged(r: dict, where: str) -> dict:
        origin[len(rows)] = where
        return r

    long_ones = iter(rnd.sample([(i, r) for i, r in enumerate(base) if len(r["output"].split()) >= 40], 25))
    dirty = iter(rnd.sample(list(enumerate(evals)), 25))
    some = iter(rnd.sample(base, 50))
    for rule, make in (
        ("near_duplicate", lambda: tagged(_edit((x := next(long_ones))[1], rnd), f"planted.json:{x[0]}")),
        ("exact_duplicate", lambda: {**(r := alpaca(next(some))), "output": r["output"].replace(" ", "\u00a0 ", 1)}),
        ("contaminated", lambda: tagged({"instruction": "Answer this: " + (e := next(dirty))[1]["instruction"],
                                         "input": e[1]["input"], "output": e[1]["output"]}, f"eval.jsonl:{e[0] + 1}")),
        ("empty_response", lambda: {"instruction": next(some)["instruction"] + " (short)", "input": "",
                                    "output": "..."}),
        ("repetitive", lambda: {"instruction": "List: " + phrase(6), "input": "", "output": " ".join([phrase(3)] * 12)}),
        ("refusal", lambda: {"instruction": "Tell me about " + phrase(8), "input": "",
                             "output": f"As an AI language model, I cannot say. {phrase(25)}."}),
    ):
        for _ in range(25):
            labels[len(rows)] = rule
            rows.append(make())
    (tmp / "planted.json").write_text(json.dumps(rows))
    return tmp, labels, len(rows), origin


def test_each_rule_finds_what_was_planted(planted):
    tmp, labels, n, origin = planted
    result = curate([str(tmp / "planted.json")], tmp / "out.jsonl", eval_files=[str(tmp / "eval.jsonl")])
    found = {int(r["source"].rsplit(":", 1)[1]): r["rule"] for r in result.removed}
    for rule in ("near_duplicate", "exact_duplicate", "contaminated", "empty_response", "repetitive", "refusal"):
        truth = {i for i, r in labels.items() if r == rule}
        got = {i for i, r in found.items() if r == rule}
        precision = len(truth & got) / max(1, len(got))
        recall = len(truth & got) / len(truth)
        assert precision >= 0.95 and recall >= 0.95, (rule, precision, recall, sorted(got - truth)[:5])
    # nothing lost: every input record is kept or removed with its evidence
    assert len(result.kept) + len(result.removed) == n
    removed = [json.loads(x) for x in (tmp / "out.removed.jsonl").read_text().splitlines()]
    assert len(removed) == len(result.removed)
    assert all(set(r) == {"source", "rule", "evidence", "record"} for r in removed)
    for r in removed:  # the evidence names the very row each planted copy came from
        i = int(r["source"].rsplit(":", 1)[1])
        if r["rule"] == "near_duplicate" and i in origin:
            assert r["evidence"]["duplicate_of"].endswith(origin[i]) and r["evidence"]["jaccard"] >= 0.8
        if r["rule"] == "contaminated" and i in origin:
            assert r["evidence"]["eval_item"].endswith(origin[i]) and len(r["evidence"]["shared"].split()) >= 8
    kept = (tmp / "out.jsonl").read_text().splitlines()
    assert len(kept) == len(result.kept) and "messages" in json.loads(kept[0])  # canonical
    report = json.loads((tmp / "out.report.json").read_text())
    assert report["records"] == n and sum(report["removed_by_rule"].values()) == report["removed"]


def test_rule_helpers():
    assert normalise_text("a\u00a0b\u200b  \n\n\n\nc  ") == "a b\n\nc"
    assert normalise_text("def f():\n    return 1\r\n") == "def f():\n    return 1"  # indentation stays
    ratio, grams = repetition(" ".join(["one two three"] * 10))
    assert grams == 28 and ratio > 0.8
    assert repetition("every word here is new and so no three gram repeats at all")[0] == 0.0
    found = pii_in({"messages": [{"role": "user", "content": "mail me at jo.doe@example.org or +44 20 7946 0958"},
                                 {"role": "assistant", "content": "key sk-abcdefghijklmnopqrstuvwxyz012345"}]})
    assert found == {"email": ["jo.doe@example.org"], "phone": ["+44 20 7946 0958"],
                     "key": ["sk-abcdefghijklmnopqrstuvwxyz012345"]}
    for text in ("call (555) 123-4567 now", "555.123.4567", "+1 415 555 0100"):
        assert pii_in({"text": text}).get("phone"), text
    for text in ("on 2021-10-12 at 10:30", "it costs 12345678 dollars", "pi is 3.14159265", "(2011-2015)",
                 "on 12.10.2021", "host 192.168.1.254", "scores 12 45 67 89 100"):
        assert "phone" not in pii_in({"text": text}), text


def test_pii_flag_mask_remove(tmp_path):
    rows = [{"instruction": "Who to contact?", "input": "", "output": "Write to ana@example.com today."},
            {"instruction": "Say hi", "input": "", "output": "Hi there, friend."}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    flagged = curate([str(tmp_path / "d.json")], tmp_path / "f.jsonl")
    assert len(flagged.kept) == 2 and flagged.flagged == [{"source": f"{tmp_path / 'd.json'}:0", "pii": {"email": 1},
                                                           "masked": False}]
    report = (tmp_path / "f.report.json").read_text()
    assert '"email": 1' in report and "ana@" not in report and "ana@" not in (tmp_path / "f.report.html").read_text()
    masked = curate([str(tmp_path / "d.json")], tmp_path / "m.jsonl", cfg=CurateConfig(pii="mask"))
    assert "<EMAIL>" in json.dumps(masked.kept[0].record) and "ana@" not in (tmp_path / "m.jsonl").read_text()
    removed = curate([str(tmp_path / "d.json")], tmp_path / "r.jsonl", cfg=CurateConfig(pii="remove"))
    assert [r["rule"] for r in removed.removed] == ["pii"] and len(removed.kept) == 1


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tunesmith", "data", "curate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_on_the_shared_demos_and_bad_input(tmp_path):
    """alpaca + identity + an eval file drawn from alpaca, through the real command."""
    raw = json.loads((DEMO / "alpaca_en_demo.json").read_text())
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": r["instruction"], "reference": r["output"]})
                                                 + "\n" for r in raw[100:110]))
    proc = _cli(str(DEMO / "alpaca_en_demo.json"), str(DEMO / "identity.json"), "-o", "clean.jsonl", "--eval",
                "eval.jsonl", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["records"] == 999 + len(json.loads((DEMO / "identity.json").read_text()))
    assert report["removed_by_rule"]["contaminated"] >= 9 and report["removed_by_rule"]["exact_duplicate"] >= 1
    assert set(report["sources"]["before"]) == {str(DEMO / "alpaca_en_demo.json"), str(DEMO / "identity.json")}
    for args, says in ((["missing.json", "-o", "x.jsonl"], "does not exist"),
                       ([str(DEMO / "identity.json"), "-o", "clean.jsonl"], "already exists; pass --overwrite"),
                       ([str(DEMO / "identity.json"), "-o", "y.jsonl", "--pii", "hide"], "pii 'hide' is not a choice"),
                       ([str(DEMO / "identity.json"), str(DEMO / "dpo_en_demo.json"), "-o", "z.jsonl"],
                        "different kinds")):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    (tmp_path / "c.yaml").write_text("jacard: 0.9\n")
    proc = _cli(str(DEMO / "identity.json"), "-o", "w.jsonl", "--config", "c.yaml", cwd=tmp_path)
    assert proc.returncode != 0 and "unknown setting 'jacard'" in proc.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_chromium(planted, tmp_path):
    tmp = planted[0]
    curate([str(tmp / "planted.json")], tmp_path / "o.jsonl", eval_files=[str(tmp / "eval.jsonl")])
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           (tmp_path / "o.report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert re.search(r"<h1>Curation: \d+ of \d+ records kept</h1>", dom)
    assert 'id="rules"' in dom and "near_duplicate" in dom and "contaminated" in dom and "Words per record" in dom


def test_what_trains_is_judged_and_a_duplicate_names_a_kept_record(tmp_path):
    """A tool-calling turn (empty content) is no empty response; a bad rejected answer is not a
    fault of the pair; a removed record is not what a later copy is a duplicate of."""
    tool = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
                         {"role": "tool", "content": "18 C and sunny"},
                         {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]}
    refusal = {"messages": [{"role": "user", "content": "Tell me a joke about cats please"},
                            {"role": "assistant", "content": "As an AI language model, I don't tell jokes about cats."}]}
    copy = {"messages": [refusal["messages"][0], {"role": "assistant", "content":
                         "As an AI language model, I do not tell jokes about cats."}]}
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (tool, refusal, copy)))
    result = curate([str(tmp_path / "sft.jsonl")], tmp_path / "o.jsonl")
    assert [e.where.rsplit(":", 1)[1] for e in result.kept] == ["1"]
    assert [r["rule"] for r in result.removed] == ["refusal", "refusal"]  # the copy is a refusal too, not a dup
    pair = {"prompt": "Say something kind about the sea", "chosen": "The sea is calm and generous today.",
            "rejected": "..."}
    (tmp_path / "p.jsonl").write_text(json.dumps(pair) + "\n")
    assert len(curate([str(tmp_path / "p.jsonl")], tmp_path / "q.jsonl").kept) == 1


def test_bad_settings_are_one_sentence(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a b c", "input": "", "output": "d e f"}]))
    for cfg, says in ((CurateConfig(jaccard="0.8"), "jaccard is '0.8'; it takes a float"),
                      (CurateConfig(num_perm=4), "num_perm 4 must be between 16 and 1024"),
                      (CurateConfig(max_repetition=None), "max_repetition is None")):
        with pytest.raises(TunesmithError, match=re.escape(says)):
            curate([str(tmp_path / "d.json")], tmp_path / "o.jsonl", cfg=cfg)
    with pytest.raises(TunesmithError, match="is given twice"):
        curate([str(tmp_path / "d.json"), str(tmp_path / "d.json")], tmp_path / "o.jsonl")


def test_split_is_stratified_by_source_and_truncation_counts_tokens(tmp_path):
    from tiny import make_tokenizer

    raw = json.loads((DEMO / "alpaca_en_demo.json").read_text())[:60]
    (tmp_path / "a.json").write_text(json.dumps(raw))
    ident = json.loads((DEMO / "identity.json").read_text())[:20]
    (tmp_path / "b.json").write_text(json.dumps(ident))
    result = curate([str(tmp_path / "a.json"), str(tmp_path / "b.json")], tmp_path / "o.jsonl",
                    cfg=CurateConfig(split=0.25, near_duplicates=False, decontaminate=False))
    split = result.report["split"]
    sources = Counter(e.source for e in result.kept)
    assert split["train"] + split["eval"] == len(result.kept)
    for src, n in sources.items():  # each source holds out its own quarter
        assert split["by_source"][src] == max(1, round(0.25 * n))
    train = (tmp_path / "o-train.jsonl").read_text().splitlines()
    held = (tmp_path / "o-eval.jsonl").read_text().splitlines()
    assert len(train) == split["train"] and len(held) == split["eval"] and not set(train) & set(held)
    again = curate([str(tmp_path / "a.json"), str(tmp_path / "b.json")], tmp_path / "p.jsonl",
                   cfg=CurateConfig(split=0.25, near_duplicates=False, decontaminate=False))
    assert (tmp_path / "p-eval.jsonl").read_text() == (tmp_path / "o-eval.jsonl").read_text()  # seeded

    tok = make_tokenizer("chatml")
    cut = curate([str(tmp_path / "a.json")], tmp_path / "t.jsonl", cfg=CurateConfig(max_length=120), tokenizer=tok)
    long_ones = [r for r in cut.removed if r["rule"] == "truncated"]
    assert long_ones and all(r["evidence"]["tokens"] > 120 for r in long_ones)
    from tunesmith.data.curate import tokens_of

    assert all(tokens_of(e.record, tok) <= 120 for e in cut.kept)
    with pytest.raises(TunesmithError, match="max_length needs a tokenizer"):
        curate([str(tmp_path / "a.json")], tmp_path / "u.jsonl", cfg=CurateConfig(max_length=120))
