"""Formats: detection, normalisation to the canonical schema, round trips, located problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.data.schema import kind_of
from tunesmith.data.validate import check_file, load_records, write_jsonl
from tunesmith.errors import TunesmithError

FIX = Path(__file__).parent / "fixtures" / "data"
DEMO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "llamafactory-demo"

GOOD = [  # file, detected format, kind, records
    ("alpaca.jsonl", "alpaca", "sft", 2),
    ("prompt_completion.jsonl", "prompt_response", "sft", 2),
    ("question_answer.csv", "prompt_response", "sft", 2),
    ("query_response.json", "prompt_response", "sft", 2),
    ("text.jsonl", "text", "text", 2),
    ("openai_tools.jsonl", "openai_messages", "sft", 2),
    ("sharegpt.json", "sharegpt", "sft", 2),
    ("preference_explicit.jsonl", "preference", "preference", 2),
    ("preference_implicit.jsonl", "preference", "preference", 1),
    ("sharegpt_preference.json", "sharegpt_preference", "preference", 1),
    ("kto.csv", "unpaired", "unpaired", 4),
    ("kto_messages.jsonl", "openai_messages", "unpaired", 1),
    ("prompt_only.jsonl", "prompt_only", "prompt", 2),
    ("prompt_messages.jsonl", "openai_messages", "prompt", 2),
]
# What the canonical JSONL of each kind is detected as when read back.
READ_BACK = {"sft": "openai_messages", "text": "text", "preference": "canonical", "unpaired": "canonical",
             "prompt": "canonical"}


def run_cli(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("name, fmt, kind, n", GOOD)
def test_detect_and_round_trip_through_convert(tmp_path, capsys, name, fmt, kind, n):
    rep = check_file(FIX / name)
    assert rep.errors == [] and (rep.format, rep.kind, rep.valid) == (fmt, kind, n)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(["data", "convert", str(FIX / name), "-o", str(out)], capsys)
    assert code == 0 and f"wrote {n} {kind} record(s) ({fmt} → canonical)" in err
    back = check_file(out)
    assert back.errors == [] and (back.format, back.kind) == (READ_BACK[kind], kind)
    assert [r for _, r in back.entries] == [r for _, r in rep.entries]
    code, _, _ = run_cli(["data", "check", str(out)], capsys)
    assert code == 0


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Say x.", "input": "", "output": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    recs = load_records(tmp_path / "d.parquet")
    write_jsonl(recs, tmp_path / "d.jsonl")
    assert load_records(tmp_path / "d.jsonl") == recs
    assert recs[0]["messages"][0] == {"role": "user", "content": "Add.\n1 2"}


def test_alpaca_system_history_and_meta():
    r = load_records(FIX / "alpaca.jsonl")
    assert r[1] == {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Say hi to {{name}}."}, {"role": "assistant", "content": "Hi {{name}}!"}],
        "meta": {"id": 2}}


def test_sharegpt_tool_calls_and_tools_string():
    r = load_records(FIX / "sharegpt.json")[0]
    assert r["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "convert", "arguments": {"amount": 10, "from": "USD", "to": "EUR"}}}]}
    assert r["messages"][3] == {"role": "tool", "content": '{"result": 9.2}'}
    assert r["messages"][0] == {"role": "system", "content": "You are a finance bot."}
    assert r["tools"][0]["name"] == "convert"  # parsed from the JSON string, otherwise verbatim
    assert "tools" not in load_records(FIX / "sharegpt.json")[1]  # "" means no tools


def test_openai_tool_calls_are_kept():
    a, b = load_records(FIX / "openai_tools.jsonl")
    assert a["messages"][2]["tool_calls"][0] == {"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    assert a["messages"][2]["content"] == "" and a["messages"][3]["tool_call_id"] == "call_1"
    assert a["tools"] == b["tools"]  # list and JSON string give the same tools


def test_preference_and_unpaired_shapes():
    imp = load_records(FIX / "preference_implicit.jsonl")[0]
    assert imp["prompt"] == [{"role": "user", "content": "Best pet?"}]
    assert imp["rejected"] == [{"role": "assistant", "content": "A rock."}]
    exp = load_records(FIX / "preference_explicit.jsonl")[1]
    assert exp["prompt"][0] == {"role": "system", "content": "Be correct."} and exp["chosen"][0]["content"] == "4"
    assert [r["label"] for r in load_records(FIX / "kto.csv")] == [True, False, True, False]
    kto = load_records(FIX / "kto_messages.jsonl")[0]
    assert len(kto["prompt"]) == 3 and kto["completion"] == [{"role": "assistant", "content": "Whatever."}]
    assert kto["label"] is False


def test_prompt_only_keeps_answer_in_meta():
    r = load_records(FIX / "prompt_only.jsonl")
    assert r[0] == {"prompt": [{"role": "user", "content": "What is 6*7?"}], "meta": {"answer": "42"}}
    assert load_records(FIX / "prompt_messages.jsonl")[1]["prompt"][-1]["role"] == "user"


def test_columns_mapping_and_format_override(tmp_path):
    r = load_records(FIX / "custom_columns.jsonl", columns={"prompt": "q", "response": "a"})
    assert r == [{"messages": [{"role": "user", "content": "Who wrote Hamlet?"},
                               {"role": "assistant", "content": "Shakespeare."}]}]
    with pytest.raises(TunesmithError, match=r"columns: unknown name 'question_text'"):
        load_records(FIX / "custom_columns.jsonl", columns={"question_text": "q"})
    with pytest.raises(TunesmithError, match=r"custom_columns.jsonl:1:zz: column 'zz' \(mapped to prompt\) is missing"):
        load_records(FIX / "custom_columns.jsonl", columns={"prompt": "zz"})
    # {"text": ..., "prompt": ...} detects as text; --format prompt_only reads it as a prompt.
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"prompt": "Hi", "text": "extra"}) + "\n")
    assert load_records(p, format="prompt_only") == [{"prompt": [{"role": "user", "content": "Hi"}],
                                                      "meta": {"text": "extra"}}]
    with pytest.raises(TunesmithError, match=r"unknown format 'chatml'; use one of alpaca"):
        load_records(p, format="chatml")
    with pytest.raises(TunesmithError, match=r"t.jsonl:1:messages: missing messages"):
        load_records(p, format="openai_messages")


def test_canonical_meta_round_trip(tmp_path):
    recs = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}],
             "label": True, "tools": [{"name": "f"}], "meta": {"id": 7, "source": "x"}}]
    write_jsonl(recs, tmp_path / "c.jsonl")
    assert load_records(tmp_path / "c.jsonl") == recs
    assert load_records(tmp_path / "c.jsonl", format="canonical") == recs


# --- problems -----------------------------------------------------------------------


def problems(path, **kw):
    return [str(e) for e in check_file(path, **kw).errors]


def test_bad_role():
    f = FIX / "bad_role.jsonl"
    assert problems(f) == [f"{f}:2:messages.3.role: unknown role 'bot' in messages.3.role; use one of "
                           "system/user/assistant/tool (ShareGPT: human/gpt/system/function_call/observation)"]


def test_missing_content_non_string_unknown_schema_same_pair():
    f = FIX / "missing_content.jsonl"
    assert problems(f) == [f"{f}:1:messages.1.content: missing content in messages.1; every message needs a "
                           "content string"]
    f = FIX / "non_string.jsonl"
    assert problems(f) == [f"{f}:1:output: output is a number (4), not a string; quote it in the file "
                           "(values are not converted silently)"]
    f = FIX / "unknown_schema.jsonl"
    (msg,) = problems(f)
    assert msg.startswith(f"{f}:1: unknown schema with keys foo, bar; known formats are alpaca (instruction, output)")
    f = FIX / "same_pair.jsonl"
    assert problems(f) == [f"{f}:1:rejected: chosen and rejected are identical; a preference pair needs two "
                           "different responses"]


def test_mixed_schemas_name_the_line_where_it_changes():
    f = FIX / "mixed.jsonl"
    assert problems(f) == [f"{f}:3: the schema changes here from alpaca (line 1) to openai_messages (1 records); "
                           "keep one format per file"]


def test_role_order_and_empty_response_all_collected():
    f = FIX / "role_order.jsonl"
    assert problems(f) == [
        f"{f}:1:messages.1: two user turns in a row; user and assistant turns must alternate (merge them)",
        f"{f}:2:messages.1: empty or whitespace-only assistant message; give it text or drop the record",
        f"{f}:3:messages.0: the conversation ends with a user turn; for SFT the last message must be the "
        "assistant reply",
    ]


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
     "1:messages.1: a tool message must follow an assistant message with tool_calls"),
    ({"messages": [{"role": "assistant", "content": "a"}]},
     "1:messages.0: the conversation starts with an assistant turn; it must start with a user turn"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{oops"}]},
     "1:conversations.1.value: tool calls must be a JSON object"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "tools": "[{bad"},
     "1:tools: tools is not valid JSON (Expecting property name enclosed in double quotes at column 3)"),
    ({"prompt": "q", "completion": "a", "label": "maybe"}, "1:label: label must be true or false (or 1/0), got 'maybe'"),
    ({"prompt": "q", "response": "   "}, "1:response: response is empty or whitespace-only"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},  # text and images only
                   {"role": "assistant", "content": "x"}]},
     "1:messages.0.content.0: content part of type 'audio'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}], "system": "other"},
     "1:system: both a system column and a system message (messages.0); keep one"),
    (["not", "an", "object"], "1: record is a list; expected a JSON object"),
])
def test_record_problems(tmp_path, record, expected):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(record) + "\n")
    msgs = problems(p)
    assert msgs and msgs[0].startswith(f"{p}:{expected}"), msgs


def test_every_bad_record_is_reported(tmp_path):
    p = tmp_path / "many.jsonl"
    lines = [{"prompt": "q", "completion": "a"}] * 3 + [{"prompt": "q", "completion": 1},
                                                        {"prompt": "", "completion": "a"}]
    p.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert [e.line for e in check_file(p).errors] == [4, 5]


# --- the shared demo datasets -------------------------------------------------------

DEMOS = [("alpaca_en_demo.json", 999, "alpaca", "sft", 14), ("identity.json", 91, "alpaca", "sft", 0),
         ("dpo_en_demo.json", 300, "sharegpt_preference", "preference", 5),
         ("kto_en_demo.json", 300, "openai_messages", "unpaired", 0),
         ("glaive_toolcall_en_demo.json", 300, "sharegpt", "sft", 35)]


@pytest.mark.skipif(not DEMO.is_dir(), reason=f"shared demo datasets not found at {DEMO}")
@pytest.mark.parametrize("name, n, fmt, kind, dups", DEMOS)
def test_demo_dataset_loads_converts_and_checks_clean(tmp_path, name, n, fmt, kind, dups):
    rep = check_file(DEMO / name)
    assert rep.errors == [] and (rep.records, rep.valid, rep.format, rep.kind) == (n, n, fmt, kind)
    assert len(rep.duplicates) == dups  # real duplicates in the source: warnings, not errors
    recs = [r for _, r in rep.entries]
    assert all(kind_of(r) == kind for r in recs)
    write_jsonl(recs, tmp_path / "out.jsonl")
    assert load_records(tmp_path / "out.jsonl") == recs  # lossless


@pytest.mark.skipif(not DEMO.is_dir(), reason=f"shared demo datasets not found at {DEMO}")
def test_demo_dataset_content():
    raw = json.loads((DEMO / "identity.json").read_text())
    ident = load_records(DEMO / "identity.json")
    assert ident[0]["messages"][1]["content"] == raw[0]["output"]
    assert "{{name}}" in ident[0]["messages"][1]["content"] and "{{author}}" in ident[0]["messages"][1]["content"]

    glaive = load_records(DEMO / "glaive_toolcall_en_demo.json")
    call = glaive[0]["messages"][3]
    assert call["role"] == "assistant" and call["content"] == ""
    assert call["tool_calls"] == [{"type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]
    assert glaive[0]["messages"][4]["role"] == "tool"
    assert glaive[0]["tools"][0]["name"] == "search_recipes"
    n_calls = sum(1 for r in glaive for m in r["messages"] if m.get("tool_calls"))
    raw_calls = sum(1 for r in json.loads((DEMO / "glaive_toolcall_en_demo.json").read_text())
                    for m in r["conversations"] if m["from"] == "function_call")
    assert n_calls == raw_calls

    kto_raw = json.loads((DEMO / "kto_en_demo.json").read_text())
    kto = load_records(DEMO / "kto_en_demo.json")
    assert [r["label"] for r in kto] == [r["label"] for r in kto_raw]
    assert kto[0]["completion"] == [kto_raw[0]["messages"][-1]]
    assert kto[0]["prompt"] == kto_raw[0]["messages"][:-1]

    dpo_raw = json.loads((DEMO / "dpo_en_demo.json").read_text())
    dpo = load_records(DEMO / "dpo_en_demo.json")
    assert dpo[0]["chosen"] == [{"role": "assistant", "content": dpo_raw[0]["chosen"]["value"]}]
    assert dpo[0]["prompt"][-1] == {"role": "user", "content": dpo_raw[0]["conversations"][-1]["value"]}
    assert sum(1 for r in dpo if r["prompt"][0]["role"] == "system") == 80

    alpaca_raw = json.loads((DEMO / "alpaca_en_demo.json").read_text())
    alpaca = load_records(DEMO / "alpaca_en_demo.json")
    with_input = next(i for i, r in enumerate(alpaca_raw) if r["input"])
    assert alpaca[with_input]["messages"][0]["content"] == (alpaca_raw[with_input]["instruction"] + "\n"
                                                             + alpaca_raw[with_input]["input"])


def test_json_inside_a_csv_cell_is_checked_like_a_json_file(tmp_path):
    # The reader sees only strings; the cell's JSON is parsed here, so the check runs again on the record.
    p = tmp_path / "d.csv"
    p.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}, '
                 '{""role"": ""assistant"", ""content"": ""x\\ud800""}]"\n'
                 '"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""ok""}]"\n')
    rep = check_file(p)
    (e,) = rep.errors
    assert (e.line, e.field, e.code) == (2, "messages.1.content", "encoding") and rep.valid == 1
    assert "lone surrogate \\ud800" in e.reason
