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

ShareGPT tags map to roles: human/user → user, gpt/assistant → assistant, system →
system, observation/tool → tool, and function_call → an assistant message with content
"" and ``tool_calls`` parsed from the JSON value ``{"name": .., "arguments": {..}}``
(a ``gpt`` turn directly before a ``function_call`` is merged into the same message).
A conversation file in which *every* conversation ends with a user turn is read as
prompts (kind "prompt", for online RL); otherwise conversations must end with the
assistant reply. With a boolean ``label`` (also "true"/"false"/1/0) a conversation is an
unpaired (KTO) record: prompt = everything before the last assistant message.

Role order follows TRL / LLaMA-Factory: an optional system message first, then user and
assistant alternate; tool messages follow an assistant message with ``tool_calls``.
Columns the schema has no place for are kept under ``meta`` so conversion is lossless.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.readers import SUFFIXES, RecordProblem
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
                "tools", "question", "answer", "query")

_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("query", "response"))
_ROLE_OF = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
            "tool": "tool", "observation": "tool", "function_call": "function_call"}
_ROLE_HELP = "use one of system/user/assistant/tool (ShareGPT: human/gpt/system/function_call/observation)"
_CANONICAL_KEYS = {"sft": {"messages"}, "text": {"text"}, "preference": {"prompt", "chosen", "rejected"},
                   "unpaired": {"prompt", "completion", "label"}, "prompt": {"prompt"}}


@dataclass
class NormalisedFile:
    """One file's records in the canonical schema, each with its source line."""

    format: str | None
    kind: str | None
    entries: list[tuple[int, Record]] = field(default_factory=list)


class _Ctx:
    """Where problems go for one record: every problem is collected, never raised."""

    def __init__(self, file: str, line: int, errors: list[DataError]):
        self.file, self.line, self.errors, self.n = file, line, errors, 0

    def err(self, field: str, reason: str, code: str) -> None:
        self.errors.append(RecordProblem(self.file, self.line, field, reason, code))
        self.n += 1


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    return {list: "a list", dict: "an object"}.get(type(v), f"a {type(v).__name__}")


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


def _maybe_json(value: Any) -> Any:
    """A list-valued column may arrive as a JSON string (CSV, or a `tools` column)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _as_messages(value: Any) -> Any:
    """A prompt/response string that is a JSON message list (CSV cells) becomes the list."""
    parsed = _maybe_json(value)
    if parsed is not value and isinstance(parsed, list) and parsed and all(
            isinstance(m, dict) and ("role" in m or "from" in m) for m in parsed):
        return parsed
    return value


# --- messages -----------------------------------------------------------------------


def _tool_calls(ctx: _Ctx, value: Any, field: str) -> list[dict] | None:
    """Normalise tool calls to [{"type": "function", "function": {"name", "arguments"}}]."""
    value = _maybe_json(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        ctx.err(field, f"tool calls must be a JSON object {{\"name\": .., \"arguments\": {{..}}}} or a list "
                f"of them, got {_describe(value) if not isinstance(value, str) else repr(value[:40])}", "tool_call")
        return None
    calls = []
    for i, c in enumerate(value):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
            ctx.err(f"{field}.{i}" if len(value) > 1 else field,
                    "a tool call needs a string name and arguments", "tool_call")
            continue
        call = {k: v for k, v in c.items() if k != "function"} if "function" in c else {}
        call.update({"type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}})
        calls.append(call)
    return calls


def _messages(ctx: _Ctx, value: Any, base: str) -> tuple[list[Message], list[str]] | None:
    """Parse OpenAI {role, content} or ShareGPT {from, value} messages (either, per message).

    Returns the messages and, for each, its source path (``conversations.3``) so later
    problems point at the source file's fields; ``None`` if the list has any problem.
    """
    before = ctx.n
    if value is None:
        ctx.err(base, f"missing {base}; every record of this format needs it", "missing_field")
        return None
    value = _maybe_json(value)
    single = isinstance(value, dict)
    items = [value] if single else value
    if not isinstance(items, list):
        ctx.err(base, f"{base} is {_describe(value)}; expected a list of messages", "type")
        return None
    if not items:
        ctx.err(base, f"{base} is an empty list; it needs at least one message", "empty")
        return None
    msgs: list[Message] = []
    paths: list[str] = []
    for i, m in enumerate(items):
        path = base if single else f"{base}.{i}"
        if not isinstance(m, dict):
            ctx.err(path, f"message is {_describe(m)}; expected an object with role and content", "type")
            continue
        sharegpt = "from" in m or "value" in m
        rk, ck = ("from", "value") if sharegpt else ("role", "content")
        role = m.get(rk)
        if role is None:
            ctx.err(f"{path}.{rk}", f"missing {rk} in {path}; {_ROLE_HELP}", "missing_field")
            continue
        if not isinstance(role, str) or role not in _ROLE_OF:
            ctx.err(f"{path}.{rk}", f"unknown role {role!r} in {path}.{rk}; {_ROLE_HELP}", "role")
            continue
        role = _ROLE_OF[role]
        extra = {k: v for k, v in m.items() if k not in (rk, ck)}
        content = m.get(ck)
        if role == "function_call":  # ShareGPT: the value is the call itself, as JSON
            calls = _tool_calls(ctx, content, f"{path}.{ck}")
            if calls is None:
                continue
            prev = msgs[-1] if msgs else None
            if prev is not None and prev["role"] == "assistant" and "tool_calls" not in prev:
                prev["tool_calls"] = calls  # "gpt" text then its call: one assistant turn
                continue
            msgs.append({"role": "assistant", "content": "", **extra, "tool_calls": calls})
            paths.append(path)
            continue
        if "tool_calls" in extra:
            calls = _tool_calls(ctx, extra["tool_calls"], f"{path}.tool_calls")
            if calls is None:
                continue
            extra["tool_calls"] = calls
            if content is None:  # OpenAI allows content: null beside tool calls
                content = ""
        if ck not in m or content is None:
            ctx.err(f"{path}.{ck}", f"missing {ck} in {path}; every message needs a {ck} string",
                    "missing_field")
            continue
        if not isinstance(content, str):
            ctx.err(f"{path}.{ck}", f"{path}.{ck} is {_describe(content)}, not a string; quote it "
                    "(multimodal content lists are not supported: join the text parts)", "type")
            continue
        msgs.append({"role": role, "content": content, **extra})
        paths.append(path)
    return (msgs, paths) if ctx.n == before else None


def _check_turns(ctx: _Ctx, msgs: list[Message], paths: list[str], *, start: int = 0) -> None:
    """Role order and empty turns (problems reported only for messages at index >= start)."""
    for i, m in enumerate(msgs):
        if i < start:
            continue
        role, prev = m["role"], msgs[i - 1] if i else None
        prole = prev["role"] if prev else None
        why = None
        if role == "system" and i:
            why = "a system message may only come first"
        elif role == "user" and prole == "user":
            why = "two user turns in a row; user and assistant turns must alternate (merge them)"
        elif role == "user" and prole == "assistant" and prev.get("tool_calls"):
            why = "an assistant tool call must be followed by its tool result (role tool / observation)"
        elif role == "user" and prole == "tool":
            why = "after tool results the assistant must reply before the next user turn"
        elif role == "assistant" and prole in (None, "system"):
            why = "the conversation starts with an assistant turn; it must start with a user turn"
        elif role == "assistant" and prole == "assistant":
            why = ("two assistant turns in a row; user and assistant turns must alternate" if not
                   prev.get("tool_calls") else "an assistant tool call must be followed by its tool result")
        elif role == "tool" and not (prole == "tool" or (prole == "assistant" and prev.get("tool_calls"))):
            why = "a tool message must follow an assistant message with tool_calls (ShareGPT: function_call)"
        if why:
            ctx.err(paths[i], why, "role_order")
        elif role in ("user", "assistant") and not m.get("tool_calls") and not m["content"].strip():
            ctx.err(paths[i], f"empty or whitespace-only {role} message; give it text or drop the record",
                    "empty")


def _check_prompt(ctx: _Ctx, msgs: list[Message], paths: list[str]) -> None:
    _check_turns(ctx, msgs, paths)
    if msgs and msgs[-1]["role"] not in ("user", "tool"):
        ctx.err(paths[-1], f"the prompt ends with a {msgs[-1]['role']} turn; it must end with the user "
                "turn the model answers", "role_order")


def _check_response(ctx: _Ctx, prompt: list[Message], resp: list[Message], paths: list[str]) -> None:
    if resp[0]["role"] != "assistant":
        ctx.err(paths[0], f"the response starts with a {resp[0]['role']} turn; it must start with the "
                "assistant reply", "role_order")
        return
    # Check the response in context so order rules see the prompt's last turn.
    _check_turns(ctx, prompt + resp, [""] * len(prompt) + paths, start=len(prompt))


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


def _response_part(ctx: _Ctx, raw: dict, key: str) -> tuple[list[Message], list[str]] | None:
    """A response as a string (→ one assistant message), a message or a message list."""
    value = _as_messages(raw.get(key))
    if isinstance(value, (list, dict)):
        return _messages(ctx, value, key)
    text = _text(ctx, value, key)
    return ([{"role": "assistant", "content": text}], [key]) if text is not None else None


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
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        ctx.err("tools", f"tools is {_describe(value)}; expected a list of function schemas", "type")
        return None
    return value or None


# --- formats ------------------------------------------------------------------------


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
    if any(p in keys and r in keys for p, r in _PAIRS):
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
    if label_key:
        return ({"prompt": prompt[0], "completion": resp[0], "label": _label(ctx, raw[label_key], label_key)},
                {p, r, "system", "history", label_key})
    return {"messages": prompt[0] + resp[0]}, {p, r, "system", "history"}


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
    chosen, rejected = _response_part(ctx, raw, "chosen"), _response_part(ctx, raw, "rejected")
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
        pair = next(((p, r) for p, r in _PAIRS if p in keys and r in keys), ("prompt", "completion"))
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
                      format: str | None = None, columns: dict[str, str] | None = None) -> NormalisedFile:
    """Detect one file's format and normalise its rows; problems are appended to ``errors``.

    ``format`` (a name from ``FORMATS``) skips detection; ``columns`` maps canonical names
    to source columns before detection. A file holds one format: the first record's; the
    first record in another format is reported as a schema change.
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
    prompt_mode = file_fmt in ("openai_messages", "sharegpt") and all(
        _ends_with_user(raw) and not ({"label", "kto_tag"} & set(raw)) for _, raw, f in detected if f == file_fmt)

    out = NormalisedFile(file_fmt, None)
    for line, raw, fmt in detected:
        ctx = _Ctx(file, line, errors)
        res = _normalise(ctx, raw, fmt, prompt_mode)
        tools = _tools(ctx, raw) if "tools" in raw else None
        if res is None or ctx.n:
            continue
        rec, used = res
        if tools:
            rec["tools"] = tools
        meta = dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {}
        meta.update({k: v for k, v in raw.items() if k not in used and k not in ("tools", "meta")})
        if "meta" in raw and not isinstance(raw["meta"], dict):
            meta["meta"] = raw["meta"]
        if meta:
            rec["meta"] = meta
        out.entries.append((line, rec))
    kinds = Counter(kind_of(r) for _, r in out.entries)
    if kinds:
        out.kind = kind_of(out.entries[0][1])
        if len(kinds) > 1 and change is None:
            ln, rec = next((ln, r) for ln, r in out.entries if kind_of(r) != out.kind)
            _Ctx(file, ln, errors).err("", f"this record is {kind_of(rec)} but the file's first record is "
                                       f"{out.kind}; keep one kind per file", "mixed_schema")
    return out
