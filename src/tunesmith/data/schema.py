"""The canonical record schema every reader normalises to.

One closed vocabulary (TRL's dataset kinds), plain JSON-serialisable dicts so that the
canonical JSONL written by ``tunesmith data convert`` is itself readable input:

kind         keys                                        used by
-----------  ------------------------------------------  -------------------------
"text"       text: str                                   language modelling (all tokens train)
"sft"        messages: [Message], tools?: [dict]         SFT (assistant tokens train)
"preference" prompt: [Message], chosen: [Message],        DPO family, reward model
             rejected: [Message], tools?: [dict]
"unpaired"   prompt: [Message], completion: [Message],    KTO
             label: bool, tools?: [dict]
"prompt"     prompt: [Message], tools?: [dict]            online RL (GRPO): prompt only

Message = {"role": "system"|"user"|"assistant"|"tool", "content": str (or, for a user turn holding
           images, a list of parts [{"type": "text", "text": str} | {"type": "image", "image":
           absolute path or data: URI}], see data/images.py),
           "tool_calls"?: [{"type": "function", "function": {"name": str, "arguments": dict|str}}],
           "name"?: str, "tool_call_id"?: str}

Every record may also carry ``meta: dict`` holding source columns that have no place in
the schema (kept so conversion is lossless). A prompt-completion source record becomes
an "sft" record whose last message is the assistant completion.
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]
Message = dict[str, Any]

KINDS = ("text", "sft", "preference", "unpaired", "prompt")
ROLES = ("system", "user", "assistant", "tool")


def kind_of(record: Record) -> str:
    """The kind of a canonical record (see module docstring)."""
    if "text" in record:
        return "text"
    if "messages" in record:
        return "sft"
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "label" in record and "completion" in record:
        return "unpaired"
    if "prompt" in record:
        return "prompt"
    raise ValueError(f"not a canonical record: keys {sorted(record)}")


def message(role: str, content: str, **extra: Any) -> Message:
    m: Message = {"role": role, "content": content}
    m.update({k: v for k, v in extra.items() if v is not None})
    return m


def as_prompt(record: Record, key: str = "reference") -> Record:
    """An SFT record as a prompt record: the conversation up to its last assistant turn,
    whose content lands in ``meta[key]`` (the reference answer of an eval, the ``answer``
    column of GRPO's reward functions). Other kinds come back unchanged."""
    if kind_of(record) != "sft":
        return record
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    meta = dict(record.get("meta") or {})
    meta.setdefault(key, msgs[last]["content"])
    out: Record = {"prompt": msgs[:last], "meta": meta}
    if record.get("tools"):
        out["tools"] = record["tools"]
    return out


def unpair(record: Record) -> list[Record]:
    """A preference record → two "unpaired" records (chosen: label True, rejected: False),
    so paired data can train KTO (as TRL's ``unpair_preference_dataset``)."""
    if kind_of(record) != "preference":
        return [record]
    common = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    return [{**common, "completion": record["chosen"], "label": True},
            {**common, "completion": record["rejected"], "label": False}]
