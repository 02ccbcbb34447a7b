"""Read raw records from JSONL, JSON, CSV and Parquet files, locating every problem.

Each reader yields ``(line, raw_record)``:

- JSONL and CSV: ``line`` is the physical 1-based line the record starts on (a CSV
  record with a quoted multi-line field starts on its first line).
- JSON and Parquet: ``line`` is the 0-based record index.

Accepted JSON layouts::

    [{"instruction": "...", "output": "..."}, ...]          # array of records
    {"train": [{...}, {...}]}                                # one named list of records
    {"instruction": ["a", "b"], "output": ["x", "y"]}        # columns of equal length
    {"instruction": "a", "output": "x"}                      # a single record
    {"a": 1}\\n{"a": 2}\\n                                    # JSON Lines saved as .json

Problems are collected, never raised mid-file, so one bad line never hides the rest:
``errors`` gets a ``RecordProblem`` per bad line (invalid JSON, non-UTF-8 bytes, a CSV
row with the wrong number of fields) and reading continues with the next line.
Blank (empty or whitespace-only) JSONL lines are skipped and reported once as a
*warning* that lists their line numbers: they are harmless, but often a sign of a
hand-edited file. Only problems that make the whole file unreadable (missing file,
a directory, an empty file, an unknown extension) are raised, as ``RecordProblem``.
There is no line-length limit: a 10 MB record reads like any other.

A record is refused (and reading goes on) when a string in it holds a lone surrogate
(JSON ``"\\ud800"`` decodes to half a UTF-16 pair, which no UTF-8 file or tokenizer can
hold) or when it nests more than ``MAX_DEPTH`` levels deep (no record format needs that,
and Python's JSON functions hit their recursion limit on it).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_DEPTH = 100  # nesting levels of one record (a message's content sits at level 3)
_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep; no record format needs that, flatten it"

# Field names that hold a record's content, used to tell a single JSON record such as
# {"messages": [...]} from a file of named record lists such as {"train": [...]}.
_RECORD_FIELDS = {
    "messages", "conversations", "chosen", "rejected", "prompt", "completion", "response",
    "instruction", "input", "output", "text", "history", "tools", "question", "answer",
    "query", "label", "system",
}


class RecordProblem(DataError):
    """A ``DataError`` with a machine-readable ``code`` so the check report can tally kinds.

    Codes: file, encoding, json, csv, blank_line, not_object, unknown_schema,
    mixed_schema, missing_field, type, empty, role, role_order, tool_call, label,
    identical_pair, columns, duplicate, special_token (with a tokenizer), template.
    """

    def __init__(self, file: str, line: int | None, field: str, reason: str, code: str = "invalid"):
        super().__init__(file, line, field, reason)
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field,
                "reason": self.reason, "code": self.code, "message": str(self)}


def file_kind(path: Path) -> str:
    """'jsonl' | 'json' | 'csv' | 'parquet' from the extension, after checking the file exists."""
    if not path.exists():
        raise RecordProblem(str(path), None, "", "file not found; check the path", "file")
    if path.is_dir():
        raise RecordProblem(str(path), None, "", "is a directory, not a data file; pass the "
                            "files inside it (e.g. DIR/*.jsonl)", "file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise RecordProblem(str(path), None, "", f"unknown file type '{path.suffix or path.name}'; "
                            "use .jsonl, .json, .csv or .parquet", "file")
    return kind


def read_raw(path: str | Path, errors: list[DataError], warnings: list[DataError] | None = None, *,
             parse_jsonl: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, raw_record)`` from one file; per-line problems go to ``errors``. With
    ``parse_jsonl`` off, a JSONL file's rows are ``(line, (byte offset, bytes))`` for
    ``jsonl_record`` to parse elsewhere (``data curate``'s workers), after the same file checks.

    Raises ``RecordProblem`` (a ``DataError``) when the file as a whole cannot be read.

    >>> errs = []
    >>> list(read_raw("tests/fixtures/data/alpaca.jsonl", errs))[0][0]
    1
    """
    path = Path(path)
    kind = file_kind(path)
    warnings = warnings if warnings is not None else []
    if path.stat().st_size == 0:
        raise RecordProblem(str(path), None, "", "file is empty; it holds no records", "file")
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind]
    rows = _read_jsonl(path, errors, warnings, parse_jsonl) if kind == "jsonl" else reader(path, errors, warnings)
    for line, raw in rows:
        if kind == "jsonl":  # checked line by line (jsonl_record)
            yield line, raw
            continue
        bad = unsafe_value(raw)
        if bad is not None:
            errors.append(RecordProblem(str(path), line, bad[0], bad[1], bad[2]))
            continue
        yield line, raw


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _surrogate(text: str, where: str) -> str | None:
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return (f"{where} holds a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start} (half of a "
                "UTF-16 pair, not a character); fix the escape or remove it")


def unsafe_value(obj: Any) -> tuple[str, str, str] | None:
    """(field, reason, code) of the first lone surrogate or too-deep nesting in ``obj``, else None.

    Iterative, so that the check itself never meets the recursion limit it guards against."""
    stack = [(obj, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path.split(".", 1)[0], _TOO_DEEP, "json"
        if isinstance(value, str):
            why = _surrogate(value, "the text")
            if why:
                return path, why, "encoding"
        elif isinstance(value, dict):
            for key, v in reversed(list(value.items())):
                why = _surrogate(key, f"the key {key!r}") if isinstance(key, str) else None
                if why:
                    return path, why, "encoding"
                stack.append((v, _join(path, key), depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, _join(path, i), depth + 1) for i, v in reversed(list(enumerate(value))))
    return None


def _deep_line(text: str) -> int | None:
    """The physical line where ``text`` (JSON) first nests deeper than ``MAX_DEPTH``."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH + 1:  # + 1: the top-level list of a .json file holds the records
                return text.count("\n", 0, i) + 1
        elif ch in "]}":
            depth -= 1
    return None


# --- encoding -----------------------------------------------------------------------


def _decode(data: bytes, file: str, errors: list[DataError], *, line: int | None = None,
            base_offset: int = 0) -> str:
    """UTF-8 decode, reporting each invalid byte with its line and file offset.

    Bad bytes become U+FFFD so parsing can go on and find the file's other problems;
    the file still fails the check because of the reported error.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    pos, shown = 0, 0
    while shown < 20:  # 20 bad bytes are enough to show the file's encoding is wrong
        try:
            data[pos:].decode("utf-8")
            break
        except UnicodeDecodeError as e:
            off = pos + e.start
            where = line if line is not None else data.count(b"\n", 0, off) + 1
            col = off - (data.rfind(b"\n", 0, off) + 1) + 1
            errors.append(RecordProblem(
                file, where, "", f"invalid UTF-8 byte 0x{data[off]:02x} at byte offset "
                f"{base_offset + off} (column {col}); re-save the file as UTF-8", "encoding"))
            pos, shown = off + max(1, e.end - e.start), shown + 1
    return data.decode("utf-8", errors="replace")


def _strip_bom(text: str) -> str:
    return text[1:] if text.startswith("\ufeff") else text


# --- JSON Lines ---------------------------------------------------------------------


def _numbered(lines: Iterable[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of each line, the BOM off the first."""
    offset = 0
    for lineno, raw in enumerate(lines, start=1):
        start, offset = offset, offset + len(raw)
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw, start = raw[3:], start + 3
        yield lineno, start, raw


def jsonl_lines(path: Path, blank: list[int] | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of each non-blank line (the BOM off the first);
    blank line numbers go to ``blank``. Binary iteration splits on b"\n" only and has no
    line-length limit."""
    with path.open("rb") as f:
        for lineno, start, raw in _numbered(f):
            if not raw.strip():
                if blank is not None:
                    blank.append(lineno)
                continue
            yield lineno, start, raw


_NO_RECORD = object()
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud83d" (of a pair, or alone)


def jsonl_record(file: str, lineno: int, start: int, raw: bytes, errors: list[DataError]) -> Any:
    """One JSONL line's record, checked as ``read_raw`` checks every record (``_NO_RECORD``
    when it is refused; the problem goes to ``errors``). Apart from ``jsonl_lines`` so that
    a reader process can hand lines to workers that parse them."""
    # Without the line ending, an error at the end of the line keeps its column; a trailing
    # "\r" (Windows line endings) is JSON whitespace, so json.loads ignores it.
    text = _decode(raw.rstrip(b"\r\n"), file, errors, line=lineno, base_offset=start)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        errors.append(RecordProblem(file, lineno, "", f"invalid JSON: {e.msg} at column {e.colno}; "
                                    "each line must be one complete JSON object", "json"))
        return _NO_RECORD
    except RecursionError:
        errors.append(RecordProblem(file, lineno, "", _TOO_DEEP, "json"))
        return _NO_RECORD
    # A lone surrogate needs a \u escape and deep nesting needs that many brackets: most
    # lines have neither, and skip the walk over the record (a third of reading's time).
    if _SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_DEPTH:
        bad = unsafe_value(obj)
        if bad is not None:
            errors.append(RecordProblem(file, lineno, bad[0], bad[1], bad[2]))
            return _NO_RECORD
    return obj


def _read_jsonl(path: Path, errors: list[DataError], warnings: list[DataError], parse: bool = True
                ) -> Iterator[tuple[int, Any]]:
    file, blank, n = str(path), [], 0
    for lineno, start, raw in jsonl_lines(path, blank):
        obj = jsonl_record(file, lineno, start, raw, errors) if parse else (start, raw)
        if obj is _NO_RECORD:
            continue
        n += 1
        yield lineno, obj
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
        warnings.append(RecordProblem(file, blank[0], "", f"skipped {len(blank)} blank line(s) "
                                      f"(lines {shown})", "blank_line"))
    if n == 0 and not errors:
        raise RecordProblem(file, None, "", "file holds no records (only blank lines)", "file")


# --- JSON ---------------------------------------------------------------------------


# A .json file larger than this whose top level is a list is read one record at a time
# (``_stream_json_array``): a 10 GB array is never held whole. Smaller files parse at once.
STREAM_JSON_BYTES = 64 << 20
_CHUNK = 1 << 20
_MAX_RECORD = 1 << 30  # a record this large that still does not parse is invalid, not cut off


def _first_char(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


def _stream_json_array(path: Path, errors: list[DataError]) -> Iterator[tuple[int, Any]]:
    """Each element of a top-level JSON array, decoded from a buffer refilled 1 MiB at a time.
    A problem (invalid JSON or UTF-8) ends the file with one error at its line."""
    import codecs

    file, dec = str(path), json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, lines, eof, index = "", 0, 0, False, 0
    with path.open("rb") as f:
        def fill() -> bool:  # more text after pos; False at the end of the file
            nonlocal buf, pos, lines, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            eof = not chunk
            lines += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + utf8.decode(chunk, final=eof), 0
            return True

        def skip() -> str:  # the next non-space character ("" at the end)
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos:pos + 1]

        def fail(why: str, at: int | None = None) -> RecordProblem:
            return RecordProblem(file, lines + buf.count("\n", 0, pos if at is None else at) + 1, "", why, "json")

        try:
            skip()
            pos += 1  # the "[" (checked by the caller)
            while True:
                ch = skip()
                if ch == "]":
                    pos += 1
                    if skip():
                        errors.append(fail("invalid JSON: extra data after the top-level list"))
                    return
                if index and ch != ",":
                    errors.append(fail("invalid JSON: expected ',' or ']' between records"))
                    return
                if index:
                    pos += 1
                    skip()
                while True:
                    try:
                        obj, end = dec.raw_decode(buf, pos)
                        if end < len(buf) or eof:  # a number at the buffer's end may go on
                            break
                    except json.JSONDecodeError as e:
                        # only a record cut off by the buffer's end fails at that end (or as a
                        # string never closed): any other error is the file's, found here
                        cut = e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")  # 8: "\\uXXXX" cut
                        if eof or not cut or len(buf) - pos > _MAX_RECORD:
                            errors.append(fail(f"invalid JSON: {e.msg} in record {index}", e.pos))
                            return
                    except RecursionError:
                        errors.append(fail(_TOO_DEEP))
                        return
                    fill()
                yield index, obj
                index, pos = index + 1, end
        except UnicodeDecodeError as e:
            errors.append(RecordProblem(file, None, "", f"invalid UTF-8 ({e.reason}) after record {index}; "
                                        "re-save the file as UTF-8", "encoding"))


def _read_json(path: Path, errors: list[DataError], warnings: list[DataError]) -> Iterator[tuple[int, Any]]:
    file = str(path)
    if path.stat().st_size > STREAM_JSON_BYTES and _first_char(path) == "[":
        n = 0
        for n, (i, rec) in enumerate(_stream_json_array(path, errors), start=1):
            yield i, rec
        if n == 0 and not errors:
            raise RecordProblem(file, None, "", "file holds no records (an empty list)", "file")
        return
    data = path.read_bytes()
    text = _strip_bom(_decode(data, file, errors))
    if not text.strip():
        raise RecordProblem(file, None, "", "file is empty; it holds no records", "file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            yield from _read_jsonl(path, errors, warnings)
            return
        raise RecordProblem(file, e.lineno, "", f"invalid JSON: {e.msg} at column {e.colno} "
                            "(the whole .json file must be one JSON value)", "json") from None
    except RecursionError:
        raise RecordProblem(file, _deep_line(text), "", _TOO_DEEP, "json") from None
    records = _json_records(obj, file)
    if not records:
        raise RecordProblem(file, None, "", "file holds no records (an empty list)", "file")
    yield from enumerate(records)


def _json_records(obj: Any, file: str) -> list[Any]:
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict):
        raise RecordProblem(file, None, "", f"top-level JSON is a {type(obj).__name__}; expected a list "
                            "of records or an object", "json")
    if obj and all(isinstance(v, list) for v in obj.values()):
        named = [k for k, v in obj.items()
                 if k not in _RECORD_FIELDS and v and all(isinstance(r, dict) for r in v)]
        if len(named) == len(obj) == 1:  # {"train": [{...}, ...]}
            return obj[named[0]]
        if len(named) == len(obj):
            raise RecordProblem(file, None, "", f"the JSON object holds several record lists "
                                f"({', '.join(named)}); put each in its own file", "json")
        # Columns hold one value per record; a single record's list fields hold dicts
        # (messages), so dict elements mean "one record", anything else "columns".
        if not any(isinstance(x, dict) for v in obj.values() for x in v):
            lengths = {len(v) for v in obj.values()}
            if len(lengths) > 1:
                raise RecordProblem(file, None, "", "the JSON object's columns have different lengths ("
                                    + ", ".join(f"{k}: {len(v)}" for k, v in obj.items())
                                    + "); every column needs one value per record", "json")
            return [dict(zip(obj, row)) for row in zip(*obj.values())]
    return [obj]  # a single record


# --- CSV ----------------------------------------------------------------------------


_EOL = re.compile(rb"\r\n|\n|\r")


def _physical_lines(f) -> Iterator[bytes]:
    """Lines ending in \n, \r\n or a lone \r (old Mac files), each with its ending, as a text
    reader with newline="" splits them — read 1 MiB at a time."""
    rest = b""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        data, start = rest + chunk, 0
        for m in _EOL.finditer(data):
            if m.group() == b"\r" and m.end() == len(data):  # its \n may open the next chunk
                break
            yield data[start:m.end()]
            start = m.end()
        rest = data[start:]
    if rest:
        yield rest


def _csv_lines(path: Path, errors: list[DataError]) -> Iterator[str]:
    """The file's lines, decoded one at a time (streamed: a large CSV is never held whole);
    an invalid byte is reported at its line and file offset, as for any file."""
    with path.open("rb") as f:
        for lineno, start, raw in _numbered(_physical_lines(f)):
            yield _decode(raw, str(path), errors, line=lineno, base_offset=start)


def _read_csv(path: Path, errors: list[DataError], warnings: list[DataError]) -> Iterator[tuple[int, Any]]:
    file = str(path)
    # The default field limit (128 KiB) would reject a long response; lift it.
    old = csv.field_size_limit()
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    try:
        # Lines keep their "\r\n" (quoted multi-line fields stay whole) and reader.line_num
        # counts physical lines, so a record's first line is the previous line_num + 1.
        reader = csv.reader(_csv_lines(path, errors))
        header: list[str] | None = None
        prev = 0
        n = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                errors.append(RecordProblem(file, prev + 1, "", f"invalid CSV: {e}", "csv"))
                break
            start, prev = prev + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in row]
                dups = sorted({h for h in header if header.count(h) > 1})
                if dups:
                    raise RecordProblem(file, start, "", f"duplicate column name(s) in the header: "
                                        f"{', '.join(dups)}; rename them", "csv")
                continue
            if len(row) != len(header):
                if len(row) < len(header):
                    missing = ", ".join(header[len(row):])
                    why = f"row has {len(row)} fields but the header has {len(header)} (missing: {missing})"
                else:
                    why = f"row has {len(row)} fields but the header has {len(header)}"
                errors.append(RecordProblem(file, start, "", why + "; quote fields that contain commas "
                                            "or newlines", "csv"))
                continue
            n += 1
            yield start, dict(zip(header, row))
        if header is None and not errors:
            raise RecordProblem(file, None, "", "file is empty; it holds no records", "file")
        if n == 0 and not errors:
            raise RecordProblem(file, None, "", "file has a header but no records", "file")
    finally:
        csv.field_size_limit(old)


# --- Parquet ------------------------------------------------------------------------


def _read_parquet(path: Path, errors: list[DataError], warnings: list[DataError]) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a corrupt file
        raise RecordProblem(str(path), None, "", f"cannot read as Parquet ({e})", "file") from None
    if table.metadata.num_rows == 0:
        raise RecordProblem(str(path), None, "", "file holds no records", "file")
    # Batch by batch keeps memory to one batch at a time for large files.
    i = 0
    batches = table.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group further on
            raise RecordProblem(str(path), i, "", f"cannot read as Parquet from record {i} on ({e})", "file") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield i, row
            i += 1
