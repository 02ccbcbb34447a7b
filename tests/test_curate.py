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

from tunesmith.data.curate import CurateConfig, curate
from tunesmith.data.curate_rules import REFUSAL_HINTS, REFUSALS, normalise_text, pii_in, repetition
from tunesmith.errors import TunesmithError

DEMO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "llamafactory-demo"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def removed_of(out) -> list[dict]:
    out = Path(out)
    return lines(out.with_name(out.stem + ".removed.jsonl"))


def index_of(source: str) -> int:
    return int(source.rsplit(":", 1)[1])


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
    curate([str(tmp / "base.json")], tmp / "base-clean.jsonl", eval_files=[str(tmp / "eval.jsonl")])
    out = {index_of(r["source"]) for r in removed_of(tmp / "base-clean.jsonl")}
    base = [r for i, r in enumerate(raw[:400]) if i not in out]
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
    removed = removed_of(tmp / "out.jsonl")
    found = {index_of(r["source"]): r["rule"] for r in removed}
    for rule in ("near_duplicate", "exact_duplicate", "contaminated", "empty_response", "repetitive", "refusal"):
        truth = {i for i, r in labels.items() if r == rule}
        got = {i for i, r in found.items() if r == rule}
        precision = len(truth & got) / max(1, len(got))
        recall = len(truth & got) / len(truth)
        assert precision >= 0.95 and recall >= 0.95, (rule, precision, recall, sorted(got - truth)[:5])
    # nothing lost: every input record is kept or removed with its evidence
    assert result.kept + result.removed == n and len(removed) == result.removed
    assert all(set(r) == {"source", "rule", "evidence", "record"} for r in removed)
    for r in removed:  # the evidence names the very row each planted copy came from
        i = int(r["source"].rsplit(":", 1)[1])
        if r["rule"] == "near_duplicate" and i in origin:
            assert r["evidence"]["duplicate_of"].endswith(origin[i]) and r["evidence"]["jaccard"] >= 0.8
        if r["rule"] == "contaminated" and i in origin:
            assert r["evidence"]["eval_item"].endswith(origin[i]) and len(r["evidence"]["shared"].split()) >= 8
    kept = (tmp / "out.jsonl").read_text().splitlines()
    assert len(kept) == result.kept and "messages" in json.loads(kept[0])  # canonical
    report = json.loads((tmp / "out.report.json").read_text())
    assert report["records"] == n and sum(report["removed_by_rule"].values()) == report["removed"]


def test_rule_helpers():
    assert normalise_text("a\u00a0b\u200b  \n\n\n\nc  ") == "a b\n\nc"
    assert normalise_text("def f():\n    return 1\r\n") == "def f():\n    return 1"  # indentation stays
    assert normalise_text("The Mona Lisa doesnâ€™t have eyebrows. CafÃ© au lait.") == \
        "The Mona Lisa doesn\u2019t have eyebrows. Caf\u00e9 au lait."  # mojibake repaired (ftfy)
    assert normalise_text("naïve café — “quoted” ﬁne") == "naïve café — “quoted” ﬁne"  # written text stays
    ratio, grams = repetition(" ".join(["one two three"] * 10))
    assert grams == 28 and ratio > 0.8
    assert repetition("every word here is new and so no three gram repeats at all")[0] == 0.0
    assert all(any(h in phrase for h in REFUSAL_HINTS) for phrase in REFUSALS)  # the prefilter misses none
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
    assert flagged.kept == 2 and flagged.flagged == [{"source": f"{tmp_path / 'd.json'}:0", "pii": {"email": 1},
                                                           "masked": False}]
    report = (tmp_path / "f.report.json").read_text()
    assert '"email": 1' in report and "ana@" not in report and "ana@" not in (tmp_path / "f.report.html").read_text()
    curate([str(tmp_path / "d.json")], tmp_path / "m.jsonl", cfg=CurateConfig(pii="mask"))
    assert "<EMAIL>" in json.dumps(lines(tmp_path / "m.jsonl")[0]) and "ana@" not in (tmp_path / "m.jsonl").read_text()
    removed = curate([str(tmp_path / "d.json")], tmp_path / "r.jsonl", cfg=CurateConfig(pii="remove"))
    assert [r["rule"] for r in removed_of(tmp_path / "r.jsonl")] == ["pii"] and removed.kept == 1


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
    (tmp_path / "m.yaml").write_text("mix: [{path: nowhere.json, weight: 2}]\n")
    proc = _cli(str(DEMO / "identity.json"), "-o", "w.jsonl", "--config", "m.yaml", cwd=tmp_path)
    assert proc.returncode != 0 and "mix names nowhere.json, which is not an input" in proc.stderr
    # a malformed record far into a file (past the first chunks) refuses the run in one sentence,
    # and what an earlier run wrote stays whole
    rows = [json.dumps({"instruction": r["instruction"], "input": r["input"], "output": r["output"]}) for r in raw]
    rows[700] = '{"instruction": "cut off'
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    before = (tmp_path / "clean.jsonl").read_bytes()
    proc = _cli("bad.jsonl", "-o", "clean.jsonl", "--overwrite", "--workers", "2", cwd=tmp_path)  # sent back by a worker
    assert proc.returncode != 0 and "bad.jsonl:701" in proc.stderr and "invalid JSON" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "clean.jsonl").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no half-written file left


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
    curate([str(tmp_path / "sft.jsonl")], tmp_path / "o.jsonl")
    assert lines(tmp_path / "o.jsonl") == [tool]
    assert [r["rule"] for r in removed_of(tmp_path / "o.jsonl")] == ["refusal", "refusal"]  # a refusal, not a dup
    pair = {"prompt": "Say something kind about the sea", "chosen": "The sea is calm and generous today.",
            "rejected": "..."}
    (tmp_path / "p.jsonl").write_text(json.dumps(pair) + "\n")
    assert curate([str(tmp_path / "p.jsonl")], tmp_path / "q.jsonl").kept == 1


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
    sources = result.report["sources"]["after"]
    assert split["train"] + split["eval"] == result.kept
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
    long_ones = [r for r in removed_of(tmp_path / "t.jsonl") if r["rule"] == "truncated"]
    assert long_ones and all(r["evidence"]["tokens"] > 120 for r in long_ones) and cut.removed >= len(long_ones)
    from tunesmith.data.curate_rules import tokens_of

    assert all(tokens_of(rec, tok) <= 120 for rec in lines(tmp_path / "t.jsonl"))
    tokens = cut.report["tokens"]  # the token-length histogram, before and after
    assert sum(tokens["before"].values()) == cut.report["records"] and sum(tokens["after"].values()) == cut.kept
    assert sum(v for k, v in tokens["after"].items() if int(k.split("-")[0].rstrip("+")) >= 128) == 0
    with pytest.raises(TunesmithError, match="max_length needs a tokenizer"):
        curate([str(tmp_path / "a.json")], tmp_path / "u.jsonl", cfg=CurateConfig(max_length=120))


def test_workers_and_every_file_format_give_the_same_curation(planted, tmp_path, monkeypatch):
    """The result does not depend on the number of workers, nor on the file format the records
    come in — a JSON array too large to read whole streams record by record."""
    import pandas as pd

    from tunesmith.data import readers

    tmp = planted[0]
    rows = json.loads((tmp / "planted.json").read_text())
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    ev = [str(tmp / "eval.jsonl")]
    curate([str(tmp / "planted.json")], tmp_path / "one.jsonl", eval_files=ev, workers=1)
    curate([str(tmp / "planted.json")], tmp_path / "two.jsonl", eval_files=ev, workers=2)
    for suffix in (".jsonl", ".removed.jsonl"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    kept = (tmp_path / "one.jsonl").read_text()
    rules = Counter(r["rule"] for r in removed_of(tmp_path / "one.jsonl"))
    monkeypatch.setattr(readers, "STREAM_JSON_BYTES", 1000)  # the planted .json now streams
    monkeypatch.setattr(readers, "_CHUNK", 4096)
    for name in ("planted.json", "p.jsonl", "p.csv", "p.parquet"):
        src = tmp / name if name == "planted.json" else tmp_path / name
        out = tmp_path / f"from-{src.suffix[1:]}.jsonl"
        curate([str(src)], out, eval_files=ev, workers=2)
        assert out.read_text() == kept, name
        assert Counter(r["rule"] for r in removed_of(out)) == rules, name


def test_languages_keep_the_wanted_ones(tmp_path):
    """English Alpaca records and records written in eight other languages: languages [en]
    removes the others (precision and recall >= 0.95), each with the language it saw."""
    pytest.importorskip("lingua")
    foreign = {
        "de": ["Die Stadt liegt an einem großen Fluss und hat viele alte Brücken aus Stein.",
               "Am Wochenende fahren wir mit dem Fahrrad zu unseren Großeltern aufs Land.",
               "Kannst du mir bitte erklären, wie man diesen Kuchen ohne Eier backt?"],
        "fr": ["Le petit village se trouve au pied de la montagne, près d'un lac très calme.",
               "Nous avons visité le musée hier après-midi avec toute la classe de mon fils.",
               "Pourriez-vous me dire comment préparer une bonne soupe aux légumes d'hiver ?"],
        "es": ["El museo abre todos los días a las nueve de la mañana y cierra por la tarde.",
               "Mis amigos y yo vamos a la playa cada verano para nadar y descansar juntos.",
               "¿Me puedes recomendar un libro interesante sobre la historia de España?"],
        "it": ["La nonna prepara ogni domenica una grande cena per tutta la famiglia.",
               "Il treno per Milano parte dalla stazione centrale ogni mattina alle otto.",
               "Puoi spiegarmi perché il cielo diventa rosso quando tramonta il sole?"],
        "pt": ["O comboio para a capital sai da estação central todas as manhãs muito cedo.",
               "Ontem à noite jantámos num restaurante novo perto da praia com os primos.",
               "Você pode me explicar como funciona o sistema de transporte desta cidade?"],
        "nl": ["De bakker op de hoek verkoopt elke ochtend vers brood en lekkere taarten.",
               "Wij fietsen elke zaterdag langs de rivier naar het huis van mijn ouders.",
               "Kun je mij vertellen hoe laat de winkels vandaag in het centrum sluiten?"],
        "ru": ["Зимой в этом районе выпадает много снега, и дети катаются на санках.",
               "Мы каждое лето ездим к бабушке в деревню, где растут яблоки и груши.",
               "Объясните, пожалуйста, как правильно приготовить настоящий украинский борщ?"],
        "zh": ["这个城市有很多历史悠久的建筑，每年都有大量游客来这里参观和旅游。",
               "我们每个周末都会去公园散步，呼吸新鲜空气，顺便和朋友们聊聊天。",
               "请问你能告诉我怎样才能在短时间内学好一门外语吗？有什么好方法？"],
    }
    english = [alpaca(r) for r in json.loads((DEMO / "alpaca_en_demo.json").read_text())[:150]]
    other = [{"instruction": s[i], "input": "", "output": s[(i + 1) % 3]} for s in foreign.values() for i in range(3)]
    (tmp_path / "mixed.json").write_text(json.dumps(english + other))
    curate([str(tmp_path / "mixed.json")], tmp_path / "o.jsonl", workers=2,
           cfg=CurateConfig(languages=["en"], near_duplicates=False, decontaminate=False, refusals=False))
    got = {index_of(r["source"]): r for r in removed_of(tmp_path / "o.jsonl") if r["rule"] == "wrong_language"}
    truth = set(range(len(english), len(english) + len(other)))
    tp = len(truth & set(got))
    assert tp / len(truth) >= 0.95 and tp / max(1, len(got)) >= 0.95, sorted(set(got) ^ truth)
    seen = {got[i]["evidence"]["language"] for i in truth & set(got)}
    assert seen == set(foreign), seen
    report = json.loads((tmp_path / "o.report.json").read_text())
    after = report["languages"]["after"]  # what stays: English, and a few too unsure to remove
    assert report["languages"]["before"]["en"] >= 145 and sum(after.values()) - after.get("en", 0) <= 2
    with pytest.raises(TunesmithError, match="'xx' is not an ISO 639-1 code"):
        curate([str(tmp_path / "mixed.json")], tmp_path / "x.jsonl", cfg=CurateConfig(languages=["xx"]))


def test_mix_takes_weights_and_counts_seeded(tmp_path):
    from tunesmith.data import mix
    from tunesmith.data.validate import load_records, load_training

    raw = json.loads((DEMO / "alpaca_en_demo.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps(raw[:40]))
    (tmp_path / "b.json").write_text(json.dumps(raw[100:110]))
    settings = dict(near_duplicates=False, decontaminate=False, refusals=False, pii="off")
    srcs = [{"path": str(tmp_path / "a.json"), "weight": 0.5}, {"path": str(tmp_path / "b.json"), "count": 25}]
    result = curate([], tmp_path / "m.jsonl", cfg=CurateConfig(mix=srcs, **settings))
    out = lines(tmp_path / "m.jsonl")
    mixed_a = result.report["mix"][str(tmp_path / "a.json")]
    assert mixed_a["asked"] == "weight 0.5" and mixed_a["out"] == round(0.5 * mixed_a["kept"])
    assert result.report["sources"]["after"][str(tmp_path / "a.json")] == mixed_a["out"]  # distinct records out
    assert len(out) == sum(v["out"] for v in result.report["mix"].values())
    left = [r for r in removed_of(tmp_path / "m.jsonl") if r["rule"] == "mix_left_out"]  # said, not lost
    assert len(left) == mixed_a["kept"] - mixed_a["out"] and {r["evidence"]["mix"] for r in left} == {"weight 0.5"}
    b_texts = Counter(r["messages"][-1]["content"] for r in out if r["messages"][-1]["content"] in
                      {normalise_text(x["output"]) for x in raw[100:110]})
    assert sum(b_texts.values()) == 25 and set(b_texts.values()) <= {2, 3}  # two whole copies + 5 drawn
    curate([], tmp_path / "again.jsonl", cfg=CurateConfig(mix=srcs, **settings))
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "m.jsonl").read_text()  # seeded
    curate([], tmp_path / "seed1.jsonl", cfg=CurateConfig(mix=srcs, seed=1, **settings))
    assert (tmp_path / "seed1.jsonl").read_text() != (tmp_path / "m.jsonl").read_text()
    # a run config's data.train takes the same entries; the held-out part comes before the mix
    train, held = load_training(srcs, 0.2, 0)
    from_a = sum(h in load_records(str(tmp_path / "a.json")) for h in held)
    assert len(held) == round(0.2 * 50) and len(train) == round(0.5 * (40 - from_a)) + 25
    for bad, says in (({"path": "a.json", "weight": 1, "count": 2}, "has both weight and count"),
                      ({"path": "a.json", "weight": -1}, "must be a number >= 0"),
                      ({"file": "a.json"}, "is not a source")):
        with pytest.raises(TunesmithError, match=says):
            mix.sources([bad])
    with pytest.raises(TunesmithError, match="not an input"):
        curate([str(tmp_path / "a.json")], tmp_path / "n.jsonl", cfg=CurateConfig(mix=srcs[1:]))


def test_pii_in_tool_call_arguments_and_the_split_check(tmp_path):
    call = {"messages": [{"role": "user", "content": "Send the invoice to our accountant"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "send", "arguments": {
                                 "to": "bob.smith@example.com", "note": "call +44 20 7946 0958"}}}]},
                         {"role": "tool", "content": "sent"},
                         {"role": "assistant", "content": "Done: the invoice is on its way."}]}
    as_string = json.loads(json.dumps(call))
    as_string["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"to": "eve@example.org"})
    as_string["messages"][0]["content"] = "Mail the report to the auditor"
    (tmp_path / "t.jsonl").write_text(json.dumps(call) + "\n" + json.dumps(as_string) + "\n")
    flagged = curate([str(tmp_path / "t.jsonl")], tmp_path / "f.jsonl", cfg=CurateConfig(near_duplicates=False))
    assert [f["pii"] for f in flagged.flagged] == [{"email": 1, "phone": 1}, {"email": 1}]
    curate([str(tmp_path / "t.jsonl")], tmp_path / "m.jsonl", cfg=CurateConfig(pii="mask", near_duplicates=False))
    masked = (tmp_path / "m.jsonl").read_text()
    assert "example.com" not in masked and "eve@" not in masked and masked.count("<EMAIL>") == 2
    assert lines(tmp_path / "m.jsonl")[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]["note"] == \
        "call <PHONE>"

    # the split: a train record sharing a 13-word span with a held-out one goes; a template
    # shared by many records (a boilerplate answer) does not count
    rnd = random.Random(1)
    vocab = sorted({w.strip(".,").lower() for r in json.loads((DEMO / "alpaca_en_demo.json").read_text())
                    for w in r["output"].split() if w.isalpha()})
    template = "Thank you for asking, I am happy to help you with this question today and always."
    rows = [{"instruction": " ".join(rnd.sample(vocab, 10)), "input": "",
             "output": " ".join(rnd.sample(vocab, 30)) + " " + template} for _ in range(40)]
    leak = " ".join(rnd.sample(vocab, 16))
    rows += [{"instruction": " ".join(rnd.sample(vocab, 10)), "input": "", "output": leak + " " + " ".join(
        rnd.sample(vocab, 30))} for _ in range(2)]  # the same 16-word span, otherwise different
    (tmp_path / "s.json").write_text(json.dumps(rows))
    leaked = set()
    for seed in range(40):  # seeds whose split puts the two leaking records on different sides
        result = curate([str(tmp_path / "s.json")], tmp_path / f"s{seed}.jsonl",
                        cfg=CurateConfig(split=0.25, seed=seed, pii="off"))
        held = (tmp_path / f"s{seed}-eval.jsonl").read_text()
        if (leak in held) != (held.count(leak) == 2):
            gone = [r for r in removed_of(tmp_path / f"s{seed}.jsonl") if r["rule"] == "contaminated"]
            assert len(gone) == 1 and gone[0]["evidence"]["split"] == "eval" and leak.startswith(
                gone[0]["evidence"]["shared"].split(" ", 1)[0])
            assert result.report["split"]["train"] == 42 - 1 - result.report["split"]["eval"]
            leaked.add(seed)
        else:
            assert result.removed == 0  # the template, in every record, is no leak
        if leaked:
            break
    assert leaked
    from tunesmith.data.curate import split_overlap

    recs = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in rows]
    assert split_overlap(recs[:41], recs[41:]) == (1, leak[:leak.index(" ", len(" ".join(leak.split()[:13])))]
                                                   if len(leak.split()) > 13 else leak)  # a run's eval_split
    assert split_overlap(recs[1:41], recs[:1]) == (0, None)  # the template in 40 train records is no leak


def test_a_pipeline_curates_then_trains_on_the_result(tmp_path):
    """`tunesmith run`: a curate stage (the shared demos, an eval file drawn from Alpaca, a
    held-out split) feeds a train stage's data.train — mixed with another file by count — and
    data.eval; the trainer reads exactly the curated file; a second run skips both."""
    import yaml

    from test_train_sft import write_sft_data
    from tiny import save_tiny_model
    from tunesmith.files import sha256_file

    model = save_tiny_model(tmp_path / "tiny", layers=2, hidden=32)
    raw = json.loads((DEMO / "alpaca_en_demo.json").read_text())
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": r["instruction"], "reference": r["output"]})
                                                 + "\n" for r in raw[100:110]))
    write_sft_data(tmp_path / "extra.jsonl", n=20)
    spec = {"name": "c", "output_dir": "out", "model": str(model), "stages": [
        {"name": "clean", "curate": {"inputs": [str(DEMO / "alpaca_en_demo.json"), str(DEMO / "identity.json")],
                                     "eval": ["eval.jsonl"], "settings": {"split": 0.05, "max_length": 256}}},
        {"name": "sft", "train": {"method": "sft", "data": {"train": ["clean", {"path": "extra.jsonl", "count": 30}],
                                                            "eval": "clean", "max_length": 256},
                                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                  "train": {"max_steps": 2, "batch_size": 4, "save_steps": 2, "eval_steps": 0,
                                            "dtype": "fp32", "threads": 1}}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run = [sys.executable, "-m", "tunesmith", "run", "p.yaml"]
    proc = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    curated, held = out / "clean" / "clean-train.jsonl", out / "clean" / "clean-eval.jsonl"
    lineage = json.loads((out / "lineage.json").read_text())["stages"]
    assert lineage["clean"]["status"] == lineage["sft"]["status"] == "done"
    assert lineage["sft"]["inputs"]["upstream"] == {"clean": lineage["clean"]["output"]}
    report = json.loads((out / "clean" / "clean.report.json").read_text())
    assert report["removed_by_rule"]["contaminated"] >= 9 and report["removed_by_rule"]["truncated"] > 0
    assert report["split"]["eval"] == len(held.read_text().splitlines())
    manifest = json.loads((out / "sft" / "run.json").read_text())
    assert manifest["data"][str(curated)] == sha256_file(curated) and str(held) in manifest["data"]
    n = len(curated.read_text().splitlines()) + 30
    assert re.search(rf"data: {n} \w+ train", proc.stderr), proc.stderr[-2000:]  # nothing left to truncate
    again = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("unchanged, skipped") == 2, again.stderr[-2000:]
