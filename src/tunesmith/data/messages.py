"""Parse one record's messages and check their role order.

Messages come as OpenAI ``{"role", "content", "tool_calls"?}`` or ShareGPT ``{"from", "value"}``
objects (either, per message). ShareGPT tags map to roles: human/user → user, gpt/assistant →
assistant, system → system, observation/tool → tool, and function_call → an assistant message
with content "" and ``tool_calls`` parsed from the JSON value ``{"name": .., "arguments": {..}}``
(a ``gpt`` turn directly before a ``function_call`` is merged into the same message).

Role order follows TRL / LLaMA-Factory: an optional system message first, then user and
assistant alternate; tool messages follow an assistant message with ``tool_calls``.
Every problem is collected on a ``_Ctx`` (one record's problem list), never raised.
"""

from __future__ import annotations

import json
from typing import Any

from tunesmith.data.images import content_parts
from tunesmith.data.readers import RecordProblem
from tunesmith.data.schema import Message
from tunesmith.errors import DataError

_ROLE_OF = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
            "tool": "tool", "observation": "tool", "function_call": "function_call"}
_ROLE_HELP = "use one of system/user/assistant/tool (ShareGPT: human/gpt/system/function_call/observation)"


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


def _maybe_json(value: Any) -> Any:
    """A list-valued column may arrive as a JSON string (CSV, or a `tools` column)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # not JSON after all: the caller reports the string
            return value
    return value


# --- reasoning ----------------------------------------------------------------------

# Message keys that hold an assistant's reasoning, in the order they are read: OpenAI-style
# `reasoning_content` (DeepSeek, vLLM, Qwen3's template), `reasoning` (OpenRouter, Ollama),
# `thinking` (gpt-oss's template, Anthropic exports).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Markers of a trace written at the start of the content: <think>…</think> (DeepSeek-R1,
# QwQ, Qwen3, SmolLM3) and Bespoke-Stratos / OpenThoughts' <|begin_of_thought|> blocks.
_MARKED = (("<think>", "</think>", None, None),
           ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"))


def split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content that starts with a marked trace — or that holds a
    ``</think>`` with no opener, as R1 and QwQ write their output when the prompt opened the
    block; (None, content) if it does not."""
    text = content.lstrip()
    if "</think>" in text and "<think>" not in text:
        trace, rest = text.split("</think>", 1)
        return trace.strip(), rest.strip()
    for open_, close, sol_open, sol_close in _MARKED:
        if text.startswith(open_) and close in text:
            trace, rest = text[len(open_):].split(close, 1)
            rest = rest.strip()
            if sol_open and rest.startswith(sol_open):
                rest = rest[len(sol_open):].split(sol_close, 1)[0].strip() if sol_close in rest else \
                    rest[len(sol_open):].strip()
            return trace.strip(), rest
    return None, content


def canonical_reasoning(ctx: "_Ctx", m: dict, path: str, names: dict[str, str] | None = None) -> None:
    """Read an assistant message's reasoning into its one canonical field ``reasoning``.
    ``names``: the source field of a key, where it is not ``path.key`` (a column)."""
    names = names or {}
    found = [(k, m.pop(k)) for k in REASONING_KEYS if k in m]
    found = [(k, v) for k, v in found if v not in (None, "")]
    for k, v in found:
        if not isinstance(v, str):
            name = names.get(k, f"{path}.{k}")
            ctx.err(name, f"{name} is {_describe(v)}; reasoning must be a string", "type")
            return
    if m["role"] != "assistant":
        if found:
            ctx.err(f"{path}.{found[0][0]}", "only assistant messages carry reasoning; remove it from this "
                    f"{m['role']} message", "reasoning")
        return
    inline, answer = split_reasoning(m.get("content") if isinstance(m.get("content"), str) else "")
    if inline is not None:
        found.append(("content", inline))
        m["content"] = answer
    values = {v.strip() for _, v in found}
    if len(values) > 1:
        keys = " and ".join(names.get(k, f"{path}.{k}") for k, _ in found)
        ctx.err(path, f"{keys} give two different reasoning traces; keep one", "reasoning")
        return
    if values and next(iter(values)):
        m["reasoning"] = next(iter(values))


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
        if isinstance(content, list):  # OpenAI / transformers content parts: text and images
            content = content_parts(ctx, content, f"{path}.{ck}")
            if content is None:
                continue
            if not isinstance(content, str) and role != "user":
                ctx.err(f"{path}.{ck}", f"an image in a {role} message; images go in user turns", "image")
                continue
        if not isinstance(content, str) and not isinstance(content, list):
            ctx.err(f"{path}.{ck}", f"{path}.{ck} is {_describe(content)}, not a string; quote it (or give a list "
                    "of content parts)", "type")
            continue
        msgs.append({"role": role, "content": content, **extra})
        canonical_reasoning(ctx, msgs[-1], path)
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
        elif role in ("user", "assistant") and not m.get("tool_calls") and isinstance(m["content"], str) \
                and not m["content"].strip():
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
