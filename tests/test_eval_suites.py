"""Model-free evaluation: constraint checkers, refusal classifier, scorers, statistics,
and the built-in suites (they load, validate, have their counts, and can all be passed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunesmith.errors import DataError, TunesmithError
from tunesmith.evaluate.instructions import (
    CHECKERS, CONSTRAINTS, contradiction, count_bullets, count_paragraphs, count_sentences,
    score_instructions, strip_code_fence, words,
)
from tunesmith.evaluate.refusal import REFUSAL_PATTERNS, is_refusal, score_refusal
from tunesmith.evaluate.scoring import (
    BUILTIN_SUITES, choice_index, extract_choice, extract_number, load_suite, normalize_answer,
    pick_by_loglik, score, score_accuracy, score_suite,
)
from tunesmith.evaluate.stats import (
    bootstrap_interval, mcnemar_exact, mean, paired_diff, rate_summary, wilson_interval,
)

# --- instruction checkers: (type, value, passing response, failing response) ------------

CHECKER_CASES = [
    ("max_words", 5, "One two three four five.", "One two three four five six."),
    ("max_words", 3, "Don't stop now.  \n", "Do not stop now."),
    ("min_words", 4, "The river runs fast.", "The river runs."),
    ("max_sentences", 2, "It falls. Things drop!", "It falls. Things drop! Apples too?"),
    ("min_sentences", 3, "One.\nTwo\n- three", "One. Two."),
    ("include_keywords", ["river", "stone"], "Rivers carve the Stone.", "The river is calm."),
    ("include_keywords", ["key"], "I lost my key's ring.", "The monkey sat down."),
    ("forbidden_words", ["blue", "water"], "The sea is deep and wide.", "The sea is Blue."),
    ("forbidden_words", ["rain"], "The thunder was loud.", "Heavy rains fell."),
    ("all_lowercase", None, "a rainbow is light bent by rain.", "A rainbow is light."),
    ("all_uppercase", None, "FRESH BREAD DAILY! 24/7", "FRESH Bread DAILY"),
    ("json_format", None, '```json\n["red", "green"]\n```  ', 'Here it is: ["red"]'),
    ("json_format", {"title": "string", "year": "integer"},
     '{"title": "Dune", "year": 1965}', '{"title": "Dune", "year": "1965"}'),
    ("json_format", {"sunny": "boolean", "temperature": "number"},
     '```\n{"sunny": false, "temperature": 21.5}\n```', '{"sunny": 0, "temperature": 21.5}'),
    ("bullet_points", 3, "Tips:\n- rest\n* eat\n• walk\n", "- rest\n- eat\n**Bold** line"),
    ("bullet_points", 2, "1. dig\n2) plant", "1. dig\n2. plant\n3. water"),
    ("starts_with", "Sure thing", '**"Sure thing!** Boil water.', "Of course, sure thing."),
    ("ends_with", "Happy gardening!", "Water weekly. Happy gardening!  \n\n", "Happy gardening! Bye."),
    ("ends_with", "Have a nice day", "Bye, have a nice day.", "Have a nice day, friend."),
    ("ends_with", "You've got this!", "Stay calm. You’ve got this!", "You have got this!"),
    ("title", None, "<<Autumn Leaves>>\nRed and gold.", "<Autumn> leaves <<>>"),
    ("postscript", "P.S.", "See you Friday.\n\np. s. Bring dessert.", "Bring a P.S. on the card."),
    ("paragraphs", 2, "First part.\n\n  \nSecond part.\n", "First part.\nSecond part."),
    ("language", "fr", "Je pense que l'automne est très beau avec les feuilles.",
     "I think autumn is very nice and it has leaves."),
    ("language", "fr", "Le ciel est gris et les arbres sont nus.",
     "El verano es muy bonito y también la playa pour moi et vous."),  # Spanish outvotes French
    ("language", "de", "Ich mag den Sommer, weil wir auf den See gehen und es warm ist.",
     "El verano es muy bonito y también la playa."),
    ("placeholders", 2, "Dear [name], welcome to [company].", "Dear [name], see [docs](http://x)."),
    ("no_commas", None, "A cat naps in the sun.", "A cat, lazy, naps."),
    ("wrapped_in_quotes", None, ' "Dream big."\n', 'Dream "big".'),
]


@pytest.mark.parametrize("kind,value,good,bad", CHECKER_CASES)
def test_each_checker_passes_and_fails_hand_written_responses(kind, value, good, bad):
    assert CHECKERS[kind](good, value) is True
    assert CHECKERS[kind](bad, value) is False


def test_every_constraint_type_has_a_test_case():
    assert {c[0] for c in CHECKER_CASES} == set(CONSTRAINTS)


def test_counting_rules():
    assert words("Don't stop — it's 3.5 km!") == ["Don't", "stop", "it's", "3", "5", "km"]
    assert count_sentences("Pi is 3.14 today. Yes!\n\nOk") == 3
    assert count_bullets("- a\n-- not\n---\n  * b\n10. c\n*emph*") == 3
    assert count_paragraphs("a\n\n\n\nb\n \nc\n\n") == 3
    assert strip_code_fence("```python\nx = 1\n```") == "x = 1"


def test_contradictions_are_named():
    assert contradiction({"min_words": 50, "max_words": 20}) == "min_words 50 > max_words 20"
    assert contradiction({"all_lowercase": None, "all_uppercase": None})
    assert "rain" in contradiction({"forbidden_words": ["rain"], "include_keywords": ["rain"]})
    assert contradiction({"json_format": None, "bullet_points": 3}) == "json_format with bullet_points"
    assert contradiction({"json_format": None, "paragraphs": 1}) is None
    assert contradiction({"max_words": 50, "include_keywords": ["river"]}) is None


def test_score_instructions_aggregates_prompt_and_constraint_accuracy():
    records = [
        {"id": "a", "prompt": "p", "constraints": [{"type": "max_words", "value": 3},
                                                    {"type": "include_keywords", "value": ["sun"]}]},
        {"id": "b", "prompt": "p", "constraints": [{"type": "all_lowercase"}]},
    ]
    result = score_instructions(records, ["The sun shines brightly.", "all lower"])
    a, b = result["items"]
    assert (a["passed"], [c["passed"] for c in a["constraints"]]) == (False, [False, True])
    assert b["passed"] is True
    agg = result["aggregate"]
    assert agg["n"] == 2
    assert agg["prompt_accuracy"]["rate"] == 0.5 and agg["prompt_accuracy"]["n"] == 2
    assert agg["constraint_accuracy"]["rate"] == pytest.approx(2 / 3)
    assert agg["constraint_accuracy"]["n"] == 3
    assert agg["constraint_accuracy"]["low"] <= 2 / 3 <= agg["constraint_accuracy"]["high"]
    assert agg["by_type"]["max_words"]["rate"] == 0.0
    with pytest.raises(ValueError):
        score_instructions(records, ["only one response"])


# --- built-in suites ------------------------------------------------------------------

UNITS = {"en": "the day is calm", "fr": "je suis très content", "es": "yo estoy muy bien",
         "de": "ich bin auch hier"}
SAMPLE = {"string": "text", "number": 1.5, "integer": 2, "boolean": True, "array": [],
          "object": {}, "null": None}


def witness(constraints: list[dict]) -> str:
    """A response built to meet every constraint: proof that a prompt can be passed."""
    c = {x["type"]: x.get("value") for x in constraints}
    if "json_format" in c:
        schema = c["json_format"] or {}
        obj = {k: SAMPLE[t] for k, t in schema.items()} if schema else ["red", "green", "blue"]
        return "```json\n" + json.dumps(obj) + "\n```"
    unit = UNITS[c.get("language", "en")].split()[: c.get("max_words", 99)]
    n = max(c.get("min_sentences", 1), -(-c.get("min_words", 0) // len(unit)), c.get("paragraphs", 1))
    sentences = [" ".join(unit) for _ in range(n)]
    extra = c.get("include_keywords", []) + [f"[p{i}]" for i in range(c.get("placeholders", 0))]
    sentences[0] = " ".join([c.get("starts_with", "")] + [sentences[0]] + extra).strip()
    sentences = [s + "." for s in sentences]
    paras = c.get("paragraphs", 1)
    text = "\n\n".join(" ".join(sentences[i::paras]) for i in range(paras))
    text += "".join(f"\n- item {i}" for i in range(c.get("bullet_points", 0)))
    text = ("<<Title>>\n" if "title" in c else "") + text
    if "postscript" in c:
        text += "\n\nP.S. " + c.get("ends_with", "bye")
    elif "ends_with" in c:
        text += "\n" + c["ends_with"]
    if "wrapped_in_quotes" in c:
        text = f'"{text}"'
    return text.lower() if "all_lowercase" in c else text.upper() if "all_uppercase" in c else text


@pytest.fixture(scope="module")
def suites():
    return {name: load_suite(name) for name in BUILTIN_SUITES}


def test_builtin_suites_load_with_required_counts(suites):
    assert len(suites["instruction_following"]) >= 60
    assert len(suites["refusal_harmful"]) >= 40
    assert len(suites["refusal_benign"]) >= 40
    ids = [r["id"] for recs in suites.values() for r in recs]
    assert len(ids) == len(set(ids))


def test_instruction_suite_covers_every_type_and_mixes_constraints(suites):
    records = suites["instruction_following"]
    used = {c["type"] for r in records for c in r["constraints"]}
    assert used == set(CONSTRAINTS)
    assert sum(len(r["constraints"]) >= 2 for r in records) >= 10


def test_every_builtin_instruction_prompt_is_satisfiable(suites):
    for record in suites["instruction_following"]:
        response = witness(record["constraints"])
        failed = [c["type"] for c in score_instructions([record], [response])["items"][0]["constraints"]
                  if not c["passed"]]
        assert failed == [], (record["id"], response)


def test_an_empty_response_passes_only_pure_limits(suites):
    """Only limits (at most N, none of X) hold for empty text; every positive demand fails."""
    limits = {"max_words", "max_sentences", "forbidden_words", "no_commas"}
    records = suites["instruction_following"]
    result = score_instructions(records, [""] * len(records))
    passed = {it["id"] for it in result["items"] if it["passed"]}
    assert passed == {r["id"] for r in records if {c["type"] for c in r["constraints"]} <= limits}
    assert 0 < len(passed) < 10


def test_refusal_suites_have_categories(suites):
    harmful = {r["category"] for r in suites["refusal_harmful"]}
    assert {"weapons", "hacking", "drugs", "fraud", "harassment", "self_harm"} <= harmful
    assert len({r["category"] for r in suites["refusal_benign"]}) >= 8


# --- validation of user files -------------------------------------------------------


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = {"id": "x1", "prompt": "Say hi.", "constraints": [{"type": "max_words", "value": 5}]}


@pytest.mark.parametrize("bad,field,words_in_reason", [
    ({"type": "max_word", "value": 5}, "constraints.0.type", ["unknown constraint type 'max_word'",
                                                               "known types:", "max_words", "language"]),
    ({"type": "max_words", "value": "50"}, "constraints.0.value", ["max_words needs a whole number", '"50"']),
    ({"type": "max_words"}, "constraints.0.value", ["missing"]),
    ({"type": "language", "value": "klingon"}, "constraints.0.value", ['"fr"']),
    ({"type": "title", "value": 3}, "constraints.0.value", ["no value"]),
    ({"type": "json_format", "value": {"a": "str"}}, "constraints.0.value", ["string, number"]),
    ({"type": "max_words", "value": 5, "valeu": 3}, "constraints.0.valeu", ["unknown key"]),
])
def test_bad_constraint_names_file_line_and_field(tmp_path, bad, field, words_in_reason):
    path = write_jsonl(tmp_path / "mine.jsonl", [GOOD, {**GOOD, "id": "x2", "constraints": [bad]}])
    with pytest.raises(TunesmithError) as err:
        load_suite(path)
    assert isinstance(err.value, DataError)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 2, field)
    assert str(err.value).startswith(f"{path}:2:{field}: ")
    for w in words_in_reason:
        assert w in str(err.value)


@pytest.mark.parametrize("records,line,field", [
    ([GOOD, {**GOOD, "constraints": [{"type": "min_words", "value": 9},
                                     {"type": "max_words", "value": 3}]}], 2, "constraints"),
    ([GOOD, {**GOOD, "id": "x2", "constraints": []}], 2, "constraints"),
    ([GOOD, GOOD], 2, "id"),
    ([GOOD, {**GOOD, "id": "x2", "prompt": ""}], 2, "prompt"),
    ([{"id": "r", "prompt": "p", "category": ""}], 1, "category"),
    ([{"id": "q", "prompt": "p", "reference": "Z", "method": "multiple_choice",
       "options": ["a", "b"]}], 1, "reference"),
    ([{"id": "q", "prompt": "p", "reference": "x", "method": "fuzzy"}], 1, "method"),
    ([{"id": "q", "prompt": "p", "reference": "ten", "method": "numeric"}], 1, "reference"),
])
def test_bad_user_records_are_located(tmp_path, records, line, field):
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    with pytest.raises(DataError) as err:
        load_suite(path)
    assert (err.value.line, err.value.field) == (line, field)


def test_unreadable_or_unknown_sources_are_user_errors(tmp_path):
    with pytest.raises(TunesmithError, match="not a built-in suite .*instruction_following"):
        load_suite("ifeval")
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "category": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_suite(bad)
    assert err.value.line == 2
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"id": "a", "prompt": "p"}])
    with pytest.raises(DataError, match="'constraints'.*'category'.*'reference'"):
        load_suite(odd)


def test_user_files_load_by_kind_and_score_through_the_dispatch(tmp_path):
    path = write_jsonl(tmp_path / "acc.jsonl", [
        {"prompt": "12*7?", "reference": 84, "method": "numeric"},
        {"prompt": "Capital?", "reference": "B", "options": ["Lyon", "Paris"], "method": "multiple_choice"},
        {"prompt": "Colour?", "reference": ["blue", "azure"]},
    ])
    records = load_suite(path)
    assert [r["id"] for r in records] == ["line-1", "line-2", "line-3"]
    result = score_suite("accuracy", records, ["So 12*7 = 84.", "I pick Paris.", "Azure!"])
    assert [it["passed"] for it in result["items"]] == [True, True, True]
    assert result["aggregate"]["accuracy"]["rate"] == 1.0
    refusal = write_jsonl(tmp_path / "ref.jsonl", [{"id": 1, "prompt": "p", "category": "c"}])
    assert score_suite("refusal", load_suite(refusal), ["I can't."])["aggregate"]["refusal_rate"]["rate"] == 1.0
    with pytest.raises(TunesmithError, match="unknown suite kind"):
        score_suite("vibes", records, [])


# --- refusal ----------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for that.",
    "  As an AI language model, I must point out...",
    "Sorry, but I won't do that.",
    "I’m not able to help with hacking into accounts.",
    "I am unable to assist with this request.",
    "That request goes against my guidelines.",
    "I'm really sorry you're feeling this way. Please contact a suicide hotline or talk to someone you trust.",
])
def test_refusals_are_recognised(text):
    refused, pattern = is_refusal(text)
    assert refused and pattern in REFUSAL_PATTERNS


@pytest.mark.parametrize("text", [
    "Use `kill -9 <pid>` or `pkill python` to stop the process.",
    "Never mix bleach with ammonia: it releases toxic chloramine gas.",
    "If someone is choking, call emergency services and give back blows.",
    "Sorry to hear that! Here are some tips for low-light photos.",
    "",
    "I can't wait to help! Here is a plan for your trip to Lisbon.",
    "I cannot stress enough how useful a checklist is: 1. passport, 2. tickets.",
    "I won't bore you with history; the short answer is 42.",
    # The phrase appears, but only after the 200-character opening: not a refusal.
    "To sharpen a knife, hold it at 20 degrees against the whetstone and draw it across in "
    "smooth strokes, alternating sides. Finish on a fine grit and hone the edge with a steel "
    "rod, then wipe the blade clean and dry it. Note I can't see your knife, so check the angle.",
])
def test_answers_are_not_refusals(text):
    assert is_refusal(text) == (False, None)
    assert is_refusal(text, window=10_000)[0] is ("I can't see" in text)


def test_score_refusal_rates_with_wilson_interval_and_categories():
    records = [{"id": str(i), "prompt": "p", "category": "a" if i < 2 else "b"} for i in range(4)]
    result = score_refusal(records, ["I can't do that.", "Sure, here.", "I won't.", "I cannot."])
    assert [it["refused"] for it in result["items"]] == [True, False, True, True]
    rate = result["aggregate"]["refusal_rate"]
    assert (rate["successes"], rate["n"], rate["rate"]) == (3, 4, 0.75)
    assert (rate["low"], rate["high"]) == pytest.approx(wilson_interval(3, 4))
    assert result["aggregate"]["by_category"]["a"]["rate"] == 0.5


# --- domain scoring ---------------------------------------------------------------


def test_normalize_answer_matches_squad():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("“Paris”") == "paris"


@pytest.mark.parametrize("method,response,reference,opts,expected", [
    ("exact_match", "The Eiffel Tower.", "eiffel tower", {}, True),
    ("exact_match", "It is the Eiffel Tower.", "eiffel tower", {}, False),
    ("exact_match", "Azure", ["blue", "azure"], {}, True),
    ("contains", "I think it is the Eiffel Tower, in Paris.", "Eiffel Tower", {}, True),
    ("contains", "Parisian food", "Paris", {}, False),
    ("regex", "Order #A-1234 shipped", r"#A-\d{4}", {}, True),
    ("regex", "order #a-1234", r"#A-\d{4}", {}, False),
    ("regex", "order #a-1234", r"#A-\d{4}", {"ignore_case": True}, True),
    ("numeric", "First 3 + 4 = 7, so the total is 1,234.50 dollars.", 1234.5, {}, True),
    ("numeric", "The answer is 42.", "42", {}, True),
    ("numeric", "The answer is 43.", 42, {}, False),
    ("numeric", "About 101.", 100, {"rel_tol": 0.02}, True),
    ("numeric", "About 103.", 100, {"rel_tol": 0.02}, False),
    ("numeric", "No idea.", 42, {}, False),
    ("multiple_choice", "The answer is B.", "B", {}, True),
    ("multiple_choice", "(C) because it fits", "c", {}, True),
    ("multiple_choice", "Paris", "B", {"options": ["Lyon", "Paris"]}, True),
    ("multiple_choice", "Paris", 1, {"options": ["Lyon", "Paris"]}, True),
    ("multiple_choice", "A cat would choose Lyon", "Paris", {"options": ["Lyon", "Paris"]}, False),
])
def test_score_methods(method, response, reference, opts, expected):
    assert score(method, response, reference, **opts) is expected


def test_number_and_choice_extraction():
    assert extract_number("between 3-4 items") == 4.0
    assert extract_number("-2.5e3 or .5") == 0.5
    assert extract_number("-7 degrees") == -7.0
    assert extract_number("none") is None
    assert extract_choice("Answer: (D)") == 3
    assert extract_choice("B) Paris") == 1
    assert extract_choice("A nice question; I'd say Paris", ["Lyon", "Paris"]) == 1
    assert extract_choice("(A) Lyon or (B) Paris", ["Lyon", "Paris"]) is None
    assert extract_choice("The answer is E", ["a", "b", "c"]) is None
    assert choice_index("Paris", ["Lyon", "Paris"]) == 1 and choice_index("Z", ["x", "y"]) is None


def test_pick_by_loglik_and_unknown_method():
    assert pick_by_loglik([-5.0, -2.0, -3.0]) == 1
    assert pick_by_loglik([-2.0, -2.0]) == 0
    assert pick_by_loglik([-4.0, -6.0], lengths=[2, 6]) == 1  # -2.0 vs -1.0 per token
    with pytest.raises(TunesmithError, match="unknown scoring method 'fuzzy'.*exact_match"):
        score("fuzzy", "a", "a")
    with pytest.raises(TunesmithError, match="not a valid regular expression"):
        score("regex", "a", "(")


def test_score_accuracy_uses_record_method_over_default():
    records = [{"id": "1", "reference": "7", "method": "numeric"}, {"id": "2", "reference": "cat"}]
    result = score_accuracy(records, ["it is 7.0", "a cat"], method="exact_match")
    assert [(it["method"], it["passed"]) for it in result["items"]] == [("numeric", True), ("exact_match", True)]


# --- statistics -------------------------------------------------------------------


def wilson_reference(k: int, n: int, z: float) -> tuple[float, float]:
    """The algebraically rearranged closed form, independent of the implementation's."""
    p = k / n
    root = z * math.sqrt(z * z + 4 * n * p * (1 - p))
    return ((2 * n * p + z * z - root) / (2 * (n + z * z)), (2 * n * p + z * z + root) / (2 * (n + z * z)))


@pytest.mark.parametrize("k,n,expected", [
    (0, 10, (0.0, 0.277540)),
    (5, 10, (0.236590, 0.763410)),
    (10, 10, (0.722460, 1.0)),
    (1, 50, (0.003539, 0.104957)),
    (45, 60, (0.627677, 0.842236)),
])
def test_wilson_interval_known_values(k, n, expected):
    assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-6)
    assert wilson_interval(k, n, z=2.576) == pytest.approx(wilson_reference(k, n, 2.576), abs=1e-12)


def test_wilson_edge_cases_and_rate_summary():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    s = rate_summary([True, False, True, True])
    assert (s["rate"], s["successes"], s["n"]) == (0.75, 3, 4)
    assert rate_summary([])["n"] == 0


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 10
    lo, hi = bootstrap_interval(values)
    assert lo < mean(values) < hi
    assert (lo, hi) == bootstrap_interval(values, seed=0)
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    # A 95% bootstrap interval of a proportion is close to Wilson's at n=40.
    w = wilson_interval(30, 40)
    assert lo == pytest.approx(w[0], abs=0.06) and hi == pytest.approx(w[1], abs=0.06)
    narrow = bootstrap_interval(values, alpha=0.5)
    assert lo <= narrow[0] <= narrow[1] <= hi
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_paired_diff_and_mcnemar():
    a = [True, True, False, False, True]
    b = [True, False, True, True, False]
    d = paired_diff(a, b)
    assert (d["improved"], d["regressed"]) == ([2, 3], [1, 4])
    assert (d["both_passed"], d["both_failed"], d["n"]) == (1, 0, 5)
    assert d["p_value"] == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        paired_diff([True], [True, False])
