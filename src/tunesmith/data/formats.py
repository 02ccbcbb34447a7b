"""Detect each file's dataset format and normalise its records to the canonical schema.

A closed vocabulary of source formats, detected by keys (the first match wins):

format               keys (example)                                          kind
-------------------  ------------------------------------------------------  -----------------
sharegpt_preference  {"conversations": [{"from": "human", "value": "hi"}],   preference
                      "chosen": {"from": "gpt", "value": ..}, "rejected": ..}
sharegpt             {"conversations": [{"from", "value"}], "system"?,        sft | prompt |
                      "tools"? (list or JSON string), "label"?}               unpaired
canonical            {"prompt": [Message], "chosen": [..], "rejected": [..]}  preference |
                     (exactly the schema, conversational, see schema.py)      unpaired | prompt
preference           {"prompt": "..", "chosen": "..", "rejected": ".."}        preference
                     (strings or message lists; no prompt = implicit prompt,
                      the shared prefix of two full conversations)
openai_messages      {"messages": [{"role", "content", "tool_calls"?}],       sft | prompt |
                      "tools"?, "label"?}                                      unpaired
unpaired             {"prompt": "..", "completion": "..", "label": true}       unpaired
alpaca               {"instruction", "input"?, "output", "system"?,           sft
                      "history"?: [[user, assistant], ...]}
prompt_response      prompt/completion, prompt/response, question/answer,     sft
                     query/response (strings or message lists), "system"?
text                 {"text": ".."}                                           text
prompt_only          {"prompt": ".."} (e.g. with an "answer" kept in meta)    prompt

Message lists (OpenAI or ShareGPT, with tool calls) are parsed and their role order
checked in ``messages.py`` (TRL / LLaMA-Factory rules; ShareGPT tags mapped to roles there).
A conversation file in which *every* conversation ends with a user turn is read as
prompts (kind "prompt", for online RL); otherwise conversations must end with the
assistant reply. With a boolean ``label`` (also "true"/"false"/1/0) a conversation is an
unpaired (KTO) record: prompt = everything before the last assistant message.
Columns the schema has no place for are kept under ``meta`` so conversion is lossless.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.images import attach as attach_images
from tunesmith.data.messages import (_check_prompt, _check_response, _check_turns, _Ctx, _describe,
                                     _maybe_json, _messages, canonical_reasoning)
from tunesmith.data.readers import SUFFIXES, unsafe_value
from tunesmith.data.schema import Message, Record, kind_of
from tunesmith.errors import DataError, TunesmithError

FORMATS = {
    "alpaca": "instruction/input/output (+ system, history)",
    "prompt_response": "prompt/completion, prompt/response, question/answer or query/response",
    "text": "text (language modelling)",
    "openai_messages": "messages [{role, content}] (+ tools, label)",
    "sharegpt": "conversations [{from, value}] (+ system, tools, label)",
    "preference": "prompt + chosen + rejected (or chosen/rejected as full conversations)",
    "sharegpt_preference": "conversations + chosen/rejected {from, value}",
    "unpaired": "prompt + completion + label",
    "prompt_only": "prompt alone",
    "canonical": "tunesmith's own schema (what `data convert` writes)",
}

_KNOWN = ("alpaca (instruction, output), prompt_response (prompt+completion, prompt+response, question+answer, "
          "query+response), text, openai_messages (messages), sharegpt (conversations), preference (prompt, "
          "chosen, rejected), unpaired (prompt, completion, label), prompt_only (prompt)")

# Names a `columns:` mapping may target: canonical name -> source column.
COLUMN_NAMES = ("prompt", "response", "completion", "instruction", "input", "output", "system",
                "history", "messages", "conversations", "chosen", "rejected", "label", "text",
                "tools", "question", "answer", "query", "reasoning")

_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("query", "response"))
# Distillation sets put the trace in its own column beside the prompt and the answer
# (OpenThoughts: problem/deepseek_reasoning/deepseek_solution; reasoning-base-20k:
# user/reasoning/assistant; many: question|problem + reasoning|thinking + answer|solution).
REASONING_COLUMNS = ("reasoning", "reasoning_content", "thinking", "deepseek_reasoning")
_REASONING_PAIRS = tuple((p, r) for p in ("prompt", "question", "problem", "query", "user")
                         for r in ("completion", "response", "answer", "solution", "deepseek_solution", "assistant"))
_CANONICAL_KEYS = {"sft": {"messages"}, "text": {"text"}, "preference": {"prompt", "chosen", "rejected"},
                   "unpaired": {"prompt", "completion", "label"}, "prompt": {"prompt"}}


@dataclass
class NormalisedFile:
    """One file's records in the canonical schema, each with its source line."""

    format: str | None
    kind: str | None
    entries: list[tuple[int, Record]] = field(default_factory=list)
    prompt_mode: bool = False     # conversations ending with a user turn read as prompts


def _text(ctx: _Ctx, value: Any, field: str, *, allow_empty: bool = False) -> str | None:
    if value is None:
        ctx.err(field, f"missing {field}; every record of this format needs it", "missing_field")
        return None
    if not isinstance(value, str):
        ctx.err(field, f"{field} is {_describe(value)}, not a string; quote it in the file "
                "(values are not converted silently)", "type")
        return None
    if not allow_empty and not value.strip():
        ctx.err(field, f"{field} is empty or whitespace-only; give it text or drop the record", "empty")
        return None
    return value


def _as_messages(value: Any) -> Any:
    """A prompt/response string that is a JSON message list (CSV cells) becomes the list."""
    parsed = _maybe_json(value)
    if parsed is not value and isinstance(parsed, list) and parsed and all(
            isinstance(m, dict) and ("role" in m or "from" in m) for m in parsed):
        return parsed
    return value


# --- record parts -------------------------------------------------------------------


def _system(ctx: _Ctx, raw: dict) -> list[Message]:
    if raw.get("system") in (None, ""):
        return []
    s = _text(ctx, raw["system"], "system")
    return [{"role": "system", "content": s}] if s is not None else []


def _with_system(ctx: _Ctx, raw: dict, parsed: tuple[list[Message], list[str]], key: str):
    """Prepend the ``system`` column to a message list (an error if both give a system prompt)."""
    msgs, paths = parsed
    if raw.get("system") in (None, ""):
        return msgs, paths
    if msgs and msgs[0]["role"] == "system":
        ctx.err("system", f"both a system column and a system message ({paths[0]}); keep one", "role_order")
        return msgs, paths
    return _system(ctx, raw) + msgs, ["system"] + paths


def _history(ctx: _Ctx, raw: dict) -> tuple[list[Message], list[str]]:
    hist = _maybe_json(raw.get("history"))
    if hist in (None, "", []):
        return [], []
    if not isinstance(hist, list):
        ctx.err("history", f"history is {_describe(hist)}; expected a list of [user, assistant] pairs", "type")
        return [], []
    msgs, paths = [], []
    for i, pair in enumerate(hist):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            ctx.err(f"history.{i}", "each history entry must be a [user, assistant] pair", "type")
            continue
        for j, role in enumerate(("user", "assistant")):
            t = _text(ctx, pair[j], f"history.{i}.{j}")
            if t is not None:
                msgs.append({"role": role, "content": t})
                paths.append(f"history.{i}.{j}")
    return msgs, paths


def _prompt_part(ctx: _Ctx, raw: dict, key: str) -> tuple[list[Message], list[str]] | None:
    """A prompt as a string (→ system? + history + user) or as a message list."""
    value = _as_messages(raw.get(key))
    if isinstance(value, list):
        parsed = _messages(ctx, value, key)
        if raw.get("history") not in (None, "", []):
            ctx.err("history", f"history is only read with a string {key}; put the turns in {key}", "type")
        return None if parsed is None else _with_system(ctx, raw, parsed, key)
    text = _text(ctx, value, key)
    hist, hpaths = _history(ctx, raw)
    sys_msgs = _system(ctx, raw)
    if text is None:
        return None
    return (sys_msgs + hist + [{"role": "user", "content": text}],
            ["system"] * len(sys_msgs) + hpaths + [key])


def _response_part(ctx: _Ctx, raw: dict, key: str, reasoning_column: bool = True) -> tuple[list[Message], list[str]] | None:
    """A response as a string (→ one assistant message), a message or a message list."""
    value = _as_messages(raw.get(key))
    if isinstance(value, (list, dict)):
        return _messages(ctx, value, key)
    text = _text(ctx, value, key)
    if text is None:
        return None
    msg = {"role": "assistant", "content": text}
    column = next((c for c in REASONING_COLUMNS if reasoning_column and raw.get(c) not in (None, "")), None)
    if column is not None:
        msg["reasoning"] = raw[column]
    canonical_reasoning(ctx, msg, key, {"reasoning": column or "reasoning", "content": key})
    return [msg], [key]


def _label(ctx: _Ctx, value: Any, field: str) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")  # CSV gives every label as a string
    ctx.err(field, f"{field} must be true or false (or 1/0), got {value!r}", "label")
    return None


def _tools(ctx: _Ctx, raw: dict) -> list | None:
    value = raw.get("tools")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            ctx.err("tools", f"tools is not valid JSON ({e.msg} at column {e.colno}); give a list of "
                    "function schemas", "type")
            return None
        except RecursionError:
            ctx.err("tools", "tools is JSON nested too deeply to read; flatten it", "json")
            return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        ctx.err("tools", f"tools is {_describe(value)}; expected a list of function schemas", "type")
        return None
    return value or None


# --- formats ------------------------------------------------------------------------


def _pairs(keys: set) -> tuple:
    return _PAIRS + _REASONING_PAIRS if keys & set(REASONING_COLUMNS) else _PAIRS


def detect_format(raw: dict) -> str | None:
    """The source format of one raw record, by its keys (None if no format matches).

    >>> detect_format({"instruction": "Add 2+2", "input": "", "output": "4"})
    'alpaca'
    >>> detect_format({"conversations": [{"from": "human", "value": "hi"}], "tools": "[]"})
    'sharegpt'
    """
    keys = set(raw)
    if "conversations" in keys:
        return "sharegpt_preference" if {"chosen", "rejected"} <= keys else "sharegpt"
    if {"chosen", "rejected"} <= keys:
        return "canonical" if _is_canonical(raw) else "preference"
    if "messages" in keys:
        return "openai_messages"
    if "prompt" in keys and ({"completion", "response"} & keys) and ({"label", "kto_tag"} & keys):
        return "canonical" if _is_canonical(raw) else "unpaired"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if any(p in keys and r in keys for p, r in _pairs(keys)):
        return "prompt_response"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "canonical" if _is_canonical(raw) else "prompt_only"
    return None


def _is_canonical(raw: dict) -> bool:
    try:
        kind = kind_of(raw)
    except ValueError:
        return False
    if not _CANONICAL_KEYS[kind] <= set(raw) or set(raw) - _CANONICAL_KEYS[kind] - {"tools", "meta"}:
        return False
    lists = [raw[k] for k in _CANONICAL_KEYS[kind] if k not in ("label", "text")]
    return all(isinstance(v, list) and all(isinstance(m, dict) and "role" in m for m in v) for v in lists) \
        and (kind != "unpaired" or isinstance(raw["label"], bool))


def apply_columns(ctx: _Ctx, raw: dict, columns: dict[str, str]) -> dict:
    """Rename source columns to the names detection knows (``{"prompt": "q"}`` reads q as prompt)."""
    out = dict(raw)
    for canon, src in columns.items():
        if src not in raw:
            ctx.err(src, f"column {src!r} (mapped to {canon}) is missing; this record has "
                    f"{', '.join(map(str, raw)) or 'no columns'}", "columns")
            continue
        if canon in raw and canon != src and canon not in columns.values():
            ctx.err(canon, f"the mapping reads {src!r} as {canon}, but the record also has a {canon!r} "
                    "column; map or rename that one too", "columns")
            continue
        out[canon] = out.pop(src)
    return out


def check_columns(columns: dict[str, str] | None) -> None:
    for canon, src in (columns or {}).items():
        if canon not in COLUMN_NAMES:
            raise TunesmithError(f"columns: unknown name {canon!r}; map one of {', '.join(COLUMN_NAMES)} "
                                 "to your column, e.g. {\"prompt\": \"q\", \"response\": \"a\"}")
        if not isinstance(src, str):
            raise TunesmithError(f"columns: {canon} must name a source column (a string), got {src!r}")


def _ends_with_user(raw: dict) -> bool:
    conv = _maybe_json(raw.get("messages", raw.get("conversations")))
    last = conv[-1] if isinstance(conv, list) and conv and isinstance(conv[-1], dict) else {}
    return last.get("role", last.get("from")) in ("user", "human")


def _conversation(ctx, raw, key, prompt_mode):
    parsed = _messages(ctx, raw.get(key), key)
    if parsed is None:
        return None
    msgs, paths = _with_system(ctx, raw, parsed, key)
    label_key = "label" if "label" in raw else "kto_tag" if "kto_tag" in raw else None
    if label_key:
        label = _label(ctx, raw[label_key], label_key)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            ctx.err(key, "the conversation has no assistant turn to label; it needs one", "role_order")
            return None
        prompt, completion = msgs[:last], msgs[last:]
        _check_prompt(ctx, prompt, paths[:last])
        _check_response(ctx, prompt, completion, paths[last:])
        return {"prompt": prompt, "completion": completion, "label": label}, {key, "system", label_key}
    if prompt_mode:
        _check_prompt(ctx, msgs, paths)
        return {"prompt": msgs}, {key, "system"}
    _check_turns(ctx, msgs, paths)
    if msgs[-1]["role"] not in ("assistant",):
        ctx.err(paths[-1], f"the conversation ends with a {msgs[-1]['role']} turn; for SFT the last "
                "message must be the assistant reply", "role_order")
    return {"messages": msgs}, {key, "system"}


def _pair(ctx, raw, p, r):
    prompt, resp = _prompt_part(ctx, raw, p), _response_part(ctx, raw, r)
    if prompt is None or resp is None:
        return None
    _check_prompt(ctx, *prompt)
    _check_response(ctx, prompt[0], *resp)
    label_key = "label" if "label" in raw else "kto_tag" if "kto_tag" in raw else None
    used = {p, r, "system", "history", *REASONING_COLUMNS}
    if label_key:
        return ({"prompt": prompt[0], "completion": resp[0], "label": _label(ctx, raw[label_key], label_key)},
                used | {label_key})
    return {"messages": prompt[0] + resp[0]}, used


def _preference(ctx, raw, conv_key=None):
    used = {"chosen", "rejected", "system", "prompt", "instruction", "input", "history"}
    if conv_key:
        parsed = _messages(ctx, raw.get(conv_key), conv_key)
        prompt = None if parsed is None else _with_system(ctx, raw, parsed, conv_key)
        used.add(conv_key)
    elif "prompt" in raw:
        prompt = _prompt_part(ctx, raw, "prompt")
    elif "instruction" in raw:  # Alpaca-style preference: instruction/input/chosen/rejected
        inst = _text(ctx, raw["instruction"], "instruction")
        inp = _text(ctx, raw.get("input", ""), "input", allow_empty=True) or ""
        prompt = None if inst is None else (
            _system(ctx, raw) + [{"role": "user", "content": "\n".join(t for t in (inst, inp) if t)}],
            ["system"] * bool(raw.get("system")) + ["instruction"])
    else:
        prompt = "implicit"
    chosen, rejected = _response_part(ctx, raw, "chosen", False), _response_part(ctx, raw, "rejected", False)
    if chosen is None or rejected is None or prompt is None:
        return None
    if prompt == "implicit":
        if chosen[0][0]["role"] == "assistant":
            ctx.err("", "a preference record without a prompt needs chosen and rejected as full "
                    "conversations sharing the prompt; or add a prompt column", "missing_field")
            return None
        # TRL's extract_prompt: the longest shared message prefix, ending before an assistant turn.
        c, r = chosen[0], rejected[0]
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        while n > 0 and not (n < len(c) and c[n]["role"] == "assistant"):
            n -= 1
        if n == 0:
            ctx.err("", "chosen and rejected share no prompt turns; add a prompt column", "missing_field")
            return None
        prompt = (c[:n], chosen[1][:n])
        chosen, rejected = (c[n:], chosen[1][n:]), (r[n:], rejected[1][n:])
    _check_prompt(ctx, *prompt)
    for resp in (chosen, rejected):
        if resp[0]:
            _check_response(ctx, prompt[0], *resp)
        else:
            ctx.err("", "a response is empty after removing the shared prompt", "empty")
    if chosen[0] == rejected[0]:
        ctx.err("rejected", "chosen and rejected are identical; a preference pair needs two different "
                "responses", "identical_pair")
    return {"prompt": prompt[0], "chosen": chosen[0], "rejected": rejected[0]}, used


def _normalise(ctx: _Ctx, raw: dict, fmt: str, prompt_mode: bool):
    if fmt == "canonical":
        if not _is_canonical(raw):
            ctx.err("", f"not in the canonical schema (keys: {', '.join(sorted(raw))}); drop --format "
                    "canonical to detect the source format", "unknown_schema")
            return None
        fmt = {"sft": "openai_messages", "text": "text", "preference": "preference",
               "unpaired": "unpaired", "prompt": "prompt_only"}[kind_of(raw)]
    if fmt == "text":
        t = _text(ctx, raw.get("text"), "text")
        return ({"text": t}, {"text"}) if t is not None else None
    if fmt in ("openai_messages", "sharegpt"):
        return _conversation(ctx, raw, "messages" if fmt == "openai_messages" else "conversations", prompt_mode)
    if fmt == "alpaca":
        inst = _text(ctx, raw.get("instruction"), "instruction", allow_empty=True)
        inp = _text(ctx, raw.get("input", ""), "input", allow_empty=True)
        if inst is None or inp is None:
            return None
        # LLaMA-Factory joins instruction and input with one newline; keep the same text.
        raw = {**raw, "prompt": "\n".join(t for t in (inst, inp) if t)}
        if not raw["prompt"].strip():
            ctx.err("instruction", "instruction and input are both empty; the record has no prompt", "empty")
            return None
        out = _pair(ctx, raw, "prompt", "output")
        return None if out is None else (out[0], out[1] | {"instruction", "input"})
    if fmt in ("prompt_response", "unpaired"):
        keys = set(raw)
        pair = next(((p, r) for p, r in _pairs(keys) if p in keys and r in keys), ("prompt", "completion"))
        if fmt == "unpaired" and not ({"label", "kto_tag"} & keys):
            ctx.err("label", "missing label; an unpaired (KTO) record needs label true or false", "missing_field")
            return None
        return _pair(ctx, raw, *pair)
    if fmt in ("preference", "sharegpt_preference"):
        return _preference(ctx, raw, "conversations" if fmt == "sharegpt_preference" else None)
    if fmt == "prompt_only":
        prompt = _prompt_part(ctx, raw, "prompt")
        if prompt is None:
            return None
        _check_prompt(ctx, *prompt)
        return {"prompt": prompt[0]}, {"prompt", "system", "history"}
    raise AssertionError(fmt)


def normalise_records(rows: list[tuple[int, Any]], file: str, errors: list[DataError], *,
                      format: str | None = None, columns: dict[str, str] | None = None,
                      prompt_mode: bool | None = None) -> NormalisedFile:
    """Detect one file's format and normalise its rows; problems are appended to ``errors``.

    ``format`` (a name from ``FORMATS``) skips detection; ``columns`` maps canonical names
    to source columns before detection. A file holds one format: the first record's; the
    first record in another format is reported as a schema change. ``prompt_mode`` (conversations
    that all end with a user turn are prompts) is decided from ``rows`` unless given: a caller
    normalising a file in chunks decides it once, from the first chunk.
    """
    if format is not None and format not in FORMATS:
        raise TunesmithError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    check_columns(columns)
    detected: list[tuple[int, dict, str]] = []
    for line, raw in rows:
        ctx = _Ctx(file, line, errors)
        if not isinstance(raw, dict):
            ctx.err("", f"record is {_describe(raw)}; expected a JSON object", "not_object")
            continue
        if columns:
            raw = apply_columns(ctx, raw, columns)
            if ctx.n:
                continue
        fmt = format or detect_format(raw)
        if fmt is None:
            ctx.err("", f"unknown schema with keys {', '.join(map(str, raw)) or '(none)'}; known formats are "
                    f"{_KNOWN}; map your columns (e.g. --columns prompt=q,response=a) or pass --format",
                    "unknown_schema")
            continue
        detected.append((line, raw, fmt))
    if not detected:
        return NormalisedFile(None, None)
    file_fmt, first_line = detected[0][2], detected[0][0]
    fmts = Counter(f for _, _, f in detected)
    change = next((ln for ln, _, f in detected if f != file_fmt), None)
    if change is not None:
        other = next(f for _, _, f in detected if f != file_fmt)
        unit = "line" if SUFFIXES.get(Path(file).suffix.lower()) in ("jsonl", "csv") else "record"
        _Ctx(file, change, errors).err("", f"the schema changes here from {file_fmt} ({unit} {first_line}) to "
                                       f"{other} ({fmts[other]} records); keep one format per file", "mixed_schema")
    prompt_mode = prompt_mode if prompt_mode is not None else file_fmt in ("openai_messages", "sharegpt") and all(
        _ends_with_user(raw) and not ({"label", "kto_tag"} & set(raw)) for _, raw, f in detected if f == file_fmt)

    out = NormalisedFile(file_fmt, None, prompt_mode=prompt_mode)
    for line, raw, fmt in detected:
        ctx = _Ctx(file, line, errors)
        res = _normalise(ctx, raw, fmt, prompt_mode)
        tools = _tools(ctx, raw) if "tools" in raw else None
        if res is None or ctx.n:
            continue
        rec, used = res
        if "images" in raw or ("image" in raw and "conversations" in raw):  # LLaMA-Factory, LLaVA
            used = set(used) | attach_images(ctx, rec, raw)
            if ctx.n:
                continue
        if tools:
            rec["tools"] = tools
        meta = dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {}
        meta.update({k: v for k, v in raw.items() if k not in used and k not in ("tools", "meta")})
        if "meta" in raw and not isinstance(raw["meta"], dict):
            meta["meta"] = raw["meta"]
        if meta:
            rec["meta"] = meta
        # JSON inside a CSV cell or a `tools` string is parsed here, after the reader's check.
        bad = unsafe_value(rec)
        if bad is not None:
            ctx.err(*bad)
            continue
        out.entries.append((line, rec))
    kinds = Counter(kind_of(r) for _, r in out.entries)
    if kinds:
        out.kind = kind_of(out.entries[0][1])
        if len(kinds) > 1 and change is None:
            ln, rec = next((ln, r) for ln, r in out.entries if kind_of(r) != out.kind)
            _Ctx(file, ln, errors).err("", f"this record is {kind_of(rec)} but the file's first record is "
                                       f"{out.kind}; keep one kind per file", "mixed_schema")
    return out
