"""Readers: every layout and every broken file gives records or one located sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data.readers import RecordProblem, read_raw

FIX = Path(__file__).parent / "fixtures" / "data"


def read(path, **kw):
    errors, warnings = [], []
    rows = list(read_raw(path, errors, warnings))
    return rows, errors, warnings


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_lines_are_physical_and_blank_lines_are_a_warning(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "", "   ", '{"text": "b"}'])
    rows, errors, warnings = read(p)
    assert [ln for ln, _ in rows] == [1, 4]
    assert errors == []
    assert len(warnings) == 1 and warnings[0].code == "blank_line"
    assert str(warnings[0]) == f"{p}:2: skipped 2 blank line(s) (lines 2, 3)"


def test_malformed_json_on_line_57_is_reported_and_the_rest_is_read(tmp_path):
    lines = [json.dumps({"text": f"record {i}"}) for i in range(1, 61)]
    lines[56] = '{"text": "broken", }'
    p = write_lines(tmp_path / "gen.jsonl", lines)
    rows, errors, _ = read(p)
    assert len(rows) == 59
    assert len(errors) == 1
    e = errors[0]
    assert (e.file, e.line, e.code) == (str(p), 57, "json")
    assert str(e).startswith(f"{p}:57: invalid JSON: Expecting property name enclosed in double quotes at column 20")


def test_bom_and_crlf(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    rows, errors, _ = read(p)
    assert rows == [(1, {"text": "a"}), (3, {"text": "b"})] and errors == []

    c = tmp_path / "win.csv"
    c.write_bytes(b'\xef\xbb\xbfprompt,completion\r\n"multi\r\nline",x\r\nsecond,y\r\n')
    rows, errors, _ = read(c)
    assert errors == []
    assert rows == [(2, {"prompt": "multi\r\nline", "completion": "x"}), (4, {"prompt": "second", "completion": "y"})]

    j = tmp_path / "win.json"
    j.write_bytes(b'\xef\xbb\xbf[\r\n {"text": "a"}\r\n]\r\n')
    assert read(j)[0] == [(0, {"text": "a"})]


def test_non_utf8_bytes_name_line_and_offset(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n')
    rows, errors, _ = read(p)
    assert [ln for ln, _ in rows] == [1, 2, 3]  # decoded with U+FFFD so later checks still run
    assert len(errors) == 1
    assert str(errors[0]) == (f"{p}:2: invalid UTF-8 byte 0xe9 at byte offset 28 (column 14); "
                              "re-save the file as UTF-8")

    c = tmp_path / "latin1.csv"
    c.write_bytes(b"text\nok\ncaf\xe9\n")
    _, errors, _ = read(c)
    assert [(e.line, e.code) for e in errors] == [(3, "encoding")]
    assert "byte offset 11" in str(errors[0])


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_empty_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"")
    with pytest.raises(RecordProblem, match=r"file is empty; it holds no records") as ei:
        read(p)
    assert ei.value.file == str(p) and ei.value.line is None


def test_missing_file_directory_and_unknown_extension(tmp_path):
    with pytest.raises(RecordProblem, match=r"nope.jsonl: file not found; check the path"):
        read(tmp_path / "nope.jsonl")
    with pytest.raises(RecordProblem, match=r"is a directory, not a data file"):
        read(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(RecordProblem, match=r"unknown file type '.txt'; use .jsonl, .json, .csv or .parquet"):
        read(tmp_path / "notes.txt")


def test_ten_megabyte_record(tmp_path):
    big = "x" * (10 * 1024 * 1024)
    p = write_lines(tmp_path / "big.jsonl", [json.dumps({"text": "small"}), json.dumps({"text": big})])
    rows, errors, _ = read(p)
    assert errors == [] and len(rows[1][1]["text"]) == len(big)

    c = tmp_path / "big.csv"
    c.write_text(f"prompt,completion\nq,{big}\n", encoding="utf-8")
    rows, errors, _ = read(c)
    assert errors == [] and len(rows[0][1]["completion"]) == len(big)


def test_csv_row_with_a_missing_column():
    rows, errors, _ = read(FIX / "missing_column.csv")
    assert [ln for ln, _ in rows] == [2]
    assert [str(e) for e in errors] == [
        f"{FIX / 'missing_column.csv'}:3: row has 2 fields but the header has 3 (missing: output); "
        "quote fields that contain commas or newlines"]


def test_csv_labels_stay_strings_and_rows_are_dicts():
    rows, errors, _ = read(FIX / "kto.csv")
    assert errors == [] and rows[0] == (2, {"prompt": "Is water wet?", "completion": "Yes, in the everyday sense.",
                                            "label": "true"})


@pytest.mark.parametrize("content, expected", [
    ([{"a": 1}, {"a": 2}], [(0, {"a": 1}), (1, {"a": 2})]),
    ({"train": [{"a": 1}, {"a": 2}]}, [(0, {"a": 1}), (1, {"a": 2})]),
    ({"prompt": ["p1", "p2"], "response": ["r1", "r2"]}, [(0, {"prompt": "p1", "response": "r1"}),
                                                         (1, {"prompt": "p2", "response": "r2"})]),
    ({"instruction": "i", "output": "o"}, [(0, {"instruction": "i", "output": "o"})]),
    ({"messages": [{"role": "user", "content": "u"}]}, [(0, {"messages": [{"role": "user", "content": "u"}]})]),
])
def test_json_layouts(tmp_path, content, expected):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(content))
    rows, errors, _ = read(p)
    assert rows == expected and errors == []


def test_json_lines_saved_as_json_and_bad_json(tmp_path):
    p = write_lines(tmp_path / "lines.json", ['{"a": 1}', '{"a": 2}'])
    assert read(p)[0] == [(1, {"a": 1}), (2, {"a": 2})]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"a": 1},\n{"a": }\n]')
    with pytest.raises(RecordProblem, match=r"bad.json:3: invalid JSON: Expecting value at column 7"):
        read(bad)
    several = tmp_path / "splits.json"
    several.write_text(json.dumps({"train": [{"a": 1}], "test": [{"a": 2}]}))
    with pytest.raises(RecordProblem, match=r"several record lists \(train, test\); put each in its own file"):
        read(several)


def test_parquet_uses_record_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]), p)
    rows, errors, _ = read(p)
    assert rows == [(0, {"prompt": "a", "completion": "b"}), (1, {"prompt": "c", "completion": "d"})]
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(RecordProblem, match=r"junk.parquet: cannot read as Parquet"):
        read(junk)


def test_lone_surrogates_are_refused_with_their_field(tmp_path):
    # json.loads turns a "\ud800" escape into half a UTF-16 pair: no UTF-8 file or tokenizer can hold it.
    p = write_lines(tmp_path / "d.jsonl", [
        '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x\\udc00"}]}',
        '{"text": "a pair \\ud83d\\ude00 is one character"}',
        '{"text": "ok", "meta": {"bad\\ud800key": 1}}',
    ])
    rows, errors, _ = read(p)
    assert rows == [(2, {"text": "a pair \U0001F600 is one character"})]
    assert [(e.line, e.field, e.code) for e in errors] == [(1, "conversations.1.value", "encoding"),
                                                          (3, "meta", "encoding")]
    assert str(errors[0]) == (f"{p}:1:conversations.1.value: the text holds a lone surrogate \\udc00 at character 1 "
                              "(half of a UTF-16 pair, not a character); fix the escape or remove it")
    assert "the key 'bad\\ud800key'" in errors[1].reason
    j = tmp_path / "d.json"
    j.write_text('[{"text": "ok"}, {"text": "\\ud800"}]')
    rows, errors, _ = read(j)
    assert rows == [(0, {"text": "ok"})] and [(e.line, e.field) for e in errors] == [(1, "text")]


def test_deep_nesting_is_refused_with_file_and_line(tmp_path):
    too_deep = "[" * 150 + "]" * 150  # parses, but no record format nests like that
    unreadable = "[" * 100_000 + "]" * 100_000  # json.loads itself meets the recursion limit
    p = write_lines(tmp_path / "d.jsonl", ['{"text": "ok"}', '{"text": "x", "meta": ' + too_deep + "}",
                                           '{"text": "y", "meta": ' + unreadable + "}", '{"text": "last"}'])
    rows, errors, _ = read(p)
    assert [ln for ln, _ in rows] == [1, 4]
    assert [(e.line, e.field, e.code) for e in errors] == [(2, "meta", "json"), (3, "", "json")]
    assert all(e.reason == "nested more than 100 levels deep; no record format needs that, flatten it"
               for e in errors)
    j = tmp_path / "d.json"
    j.write_text('[\n{"text": "ok"},\n{"text": "x", "meta":\n' + unreadable + "}\n]\n")
    with pytest.raises(RecordProblem) as e:
        read(j)
    assert str(e.value) == f"{j}:4: nested more than 100 levels deep; no record format needs that, flatten it"


def test_a_large_json_array_streams_record_by_record(tmp_path, monkeypatch):
    """Above STREAM_JSON_BYTES a top-level array is decoded from a refilled buffer: the same
    records for any buffer size (escapes, multi-byte characters and numbers cut at its end),
    and a syntax error found where it is, at its line, without reading on."""
    from tunesmith.data import readers

    recs = [{"id": i, "t": "x [ { \" \\u00e9 é 😀" * (i % 4), "n": 1.5e10, "z": [True, None, -0.5]}
            for i in range(120)]
    path = tmp_path / "big.json"
    monkeypatch.setattr(readers, "STREAM_JSON_BYTES", 100)
    for chunk in (1, 3, 7, 64, 4096):
        monkeypatch.setattr(readers, "_CHUNK", chunk)
        for ascii_only in (True, False):
            path.write_text(json.dumps(recs, indent=1, ensure_ascii=ascii_only), encoding="utf-8")
            errors: list = []
            assert [r for _, r in read_raw(path, errors)] == recs and not errors, (chunk, ascii_only)
    text = json.dumps(recs, indent=1).replace('"id": 5,', '"id": 5 "oops",', 1)
    path.write_text(text)
    errors = []
    assert len(list(read_raw(path, errors))) == 5
    line = text[:text.index('5 "oops"')].count("\n") + 1
    assert [str(e) for e in errors] == [f"{path}:{line}: invalid JSON: Expecting ',' delimiter in record 5"]


def test_csv_with_old_mac_line_endings(tmp_path):
    path = tmp_path / "cr.csv"
    path.write_bytes(b'instruction,output\rhi,there\r"a\rb",c\r')
    assert list(read_raw(path, [])) == [(2, {"instruction": "hi", "output": "there"}),
                                        (3, {"instruction": "a\rb", "output": "c"})]
