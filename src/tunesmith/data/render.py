"""Conversation → the texts a model sees at inference: the rendering half of the masking contract.

``tokenize.py`` turns what is decided here into ids and labels; everything about *which
characters* train is decided here, by the chat template itself.

Turns
-----
For assistant message ``i`` the model, at inference, is given ``P_i = render(messages[:i],
add_generation_prompt=True)`` and produces a continuation ``C_i``. ``C_i`` is read from the
template's render of ``messages[:i+1]`` — turn ``i`` as the *last* message, which is how a
template renders the turn the model is producing — minus ``P_i``. So Qwen3's turn keeps its
reasoning (the template strips ``<think>`` only from turns before the last user query),
gpt-oss's keeps its analysis channel, and whatever closes the turn (``<|im_end|>\\n``,
``<|eot_id|>``, ``</s>``, ``<|return|>``) is part of ``C_i``, because the model must learn to stop.

When ``P_i`` is not a prefix of that render, the generation prompt itself opened
something the render of a finished turn lacks: DeepSeek-R1 distills and QwQ end it with
``<think>\\n`` and drop reasoning from every turn, the last included. ``C_i`` is then the
reasoning block written with the model's markers, minus what the prompt already opened,
followed by the rendered answer: exactly what the model emits after ``<think>\\n``. Any
other mismatch is refused with the two texts.

Modes
-----
``append``: every trained turn's ``P_i + C_i`` is a prefix of the render of the whole
conversation (the template only appends). One sequence, every trained turn a span in it:
what the first wave did, token for token.
``per-turn``: the template rewrites history (Qwen3, QwQ, DeepSeek-R1, gpt-oss, Mistral
v0.3's system prompt in the last user turn). One sequence per trained turn, ``P_i + C_i``,
in which only ``C_i`` trains: each turn is trained on the context the model sees when it
produces it. The cost (more sequences, the shared history repeated) is what ``data check``
and the start-up summary report. Prefix sharing inside a packed row would save the
repeated history only where the histories agree, which is exactly where they do not here.

Reasoning
---------
The canonical field is ``reasoning`` on an assistant message (``data/messages.py`` reads
``reasoning_content``, ``reasoning``, ``thinking`` and a leading ``<think>…</think>`` into it).
It reaches the template as ``reasoning_content`` where the template reads that name
(Qwen3, QwQ), as ``thinking`` where it reads that one (gpt-oss), and otherwise as the
markers ``<think>\\n…\\n</think>\\n\\n`` before the content (the convention of R1-style
models; SmolLM3 and most distills use it). ``reasoning``: ``train`` (trace and answer
train), ``answer_only`` (the trace, its markers and channel headers up to the answer are
context, -100), ``drop`` (removed before rendering).

Adapting a conversation to a template
-------------------------------------
Tried in order until the template renders every message (tool results and tool-call names
must appear in the text, so a template that silently drops a role is not accepted):
tool-call arguments as a dict (most templates ``tojson`` them), then as a JSON string
(templates that concatenate them), then the calls written into the content as for
templates without them (DeepSeek-R1 renders calls only for ``content: null``, a key
transformers drops), tool results as user turns wrapped in
``<tool_response>`` (templates without a tool role: Gemma, Mistral v0.2), and the system
prompt folded into the first user turn (templates without a system role). Templates that
do not mention ``tool_calls`` get the calls in the content as ``<tool_call>`` blocks, and a
``tools=`` list is appended to the system prompt where the template does not mention
``tools``. What was adapted is reported by ``data check``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import TemplateError

from tunesmith.data.schema import Message
from tunesmith.errors import TunesmithError

REASONING = ("train", "answer_only", "drop")
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
# Adaptations, in the order they are tried (see the module docstring).
_ADAPTATIONS = ("string_arguments", "call_ids", "inline_calls", "tool_as_user", "fold_system")


@dataclass
class ChatOptions:
    """How records become chat-template input (``data.reasoning``, ``data.template_kwargs``)."""

    reasoning: str = "train"
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.reasoning not in REASONING:
            raise TunesmithError(f"data.reasoning must be one of {', '.join(REASONING)}, not {self.reasoning!r}")


DEFAULT_OPTIONS = ChatOptions()


@dataclass
class Turn:
    index: int  # the assistant message's index in the record
    prompt: str  # P_i: what the model is given at inference
    text: str  # C_i: what it produces
    context: int = 0  # the first ``context`` characters of text do not train (reasoning: answer_only)


@dataclass
class Rendered:
    """A conversation as training sequences: (text, trained char spans, prompt chars)."""

    mode: str
    sequences: list[tuple[str, list[tuple[int, int]], int]]
    full: str  # the render of the whole conversation (one sequence in append mode)
    adapted: tuple[str, ...] = ()


# -- what a template reads --------------------------------------------------------------


def template_text(tokenizer) -> str:
    """The Jinja text of the tokenizer's chat template ('' when it has none)."""
    t = tokenizer.chat_template
    if isinstance(t, dict):  # a few tokenizers ship {"default": ..., "tool_use": ...}
        t = t.get("default") or next(iter(t.values()), "")
    return t or ""


def renders_tool_calls(tokenizer) -> bool:
    """Whether the template itself renders assistant ``tool_calls`` (Qwen2.5, Llama-3.1 do)."""
    return "tool_calls" in template_text(tokenizer)


_PROBE_TOOL = {"type": "function", "function": {"name": "tunesmith_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


@functools.lru_cache(maxsize=64)
def _renders_tool_list(tokenizer, text: str) -> bool:
    try:
        out = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL], tokenize=False,
                                            add_generation_prompt=True)
    except Exception:  # noqa: BLE001 — any failure means the template does not take tools= this way
        return False
    return "tunesmith_probe_tool" in out


def accepts_tools(tokenizer) -> bool:
    """Whether the template renders a ``tools=`` list: tried, since a template may mention
    ``tools`` without reading the argument (Phi-4-mini reads ``messages[0]['tools']``)."""
    text = template_text(tokenizer)
    return "tools" in text and _renders_tool_list(tokenizer, text)


def reasoning_key(tokenizer) -> str | None:
    """The message key through which the template reads reasoning, or None (markers in content)."""
    text = template_text(tokenizer)
    if "reasoning_content" in text:
        return "reasoning_content"
    if "message.thinking" in text or "message['thinking']" in text or 'message["thinking"]' in text:
        return "thinking"
    return None


def inline_reasoning(reasoning: str, content: str) -> str:
    return f"{THINK_OPEN}{reasoning.strip()}{THINK_CLOSE}{content.lstrip()}"


# -- preparing messages for one template -------------------------------------------------


def _arguments(args: Any, as_string: bool) -> Any:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return args
    return json.dumps(args, ensure_ascii=False) if as_string else args


def _call(call: dict, as_string: bool = False) -> dict:
    fn = call.get("function", call)
    return {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}), as_string)}


def prepare(messages: list[Message], tools, tokenizer, opts: ChatOptions = DEFAULT_OPTIONS,
            adapt: frozenset = frozenset()) -> tuple[list[Message], Any, dict[int, int]]:
    """(messages and tools as this template renders them, record index → prepared index)."""
    if any(isinstance(m.get("content"), list) for m in messages):  # image parts (data.images)
        raise TunesmithError("a record holds images, which a text model's chat template cannot show; tunesmith "
                             "reads and checks image data (data check, data curate) but does not train or generate "
                             "with images yet — use text-only records for this model")
    native_calls, key = renders_tool_calls(tokenizer), reasoning_key(tokenizer)
    out: list[Message] = []
    where: dict[int, int] = {}
    ids: dict[str, str] = {}  # call_ids: source id → the 9-character id Mistral's templates demand
    pending: list[str] = []  # call_ids: ids of calls whose results have not come yet
    for i, src in enumerate(messages):
        m = {k: v for k, v in src.items() if k != "reasoning"}
        if m.get("content") is None:
            m["content"] = ""
        reasoning = src.get("reasoning") if opts.reasoning != "drop" and src["role"] == "assistant" else None
        if reasoning and key:
            m[key] = reasoning
        calls = m.pop("tool_calls", None)
        if calls and native_calls and "inline_calls" not in adapt:
            m["tool_calls"] = [{"type": "function", "function": _call(c, "string_arguments" in adapt)}
                               for c in calls]
            if "call_ids" in adapt:
                for c, out_call in zip(calls, m["tool_calls"]):
                    out_call["id"] = ids.setdefault(str(c.get("id", len(ids))), f"call{len(ids):05d}")
                    pending.append(out_call["id"])
        elif calls:
            blocks = "\n".join(f"<tool_call>\n{json.dumps(_call(c), ensure_ascii=False)}\n</tool_call>"
                               for c in calls)
            m["content"] = f"{m['content']}\n{blocks}" if m["content"] else blocks
        if reasoning and not key:
            m["content"] = inline_reasoning(reasoning, m["content"])
        if m["role"] == "tool" and "call_ids" in adapt:
            given = m.get("tool_call_id")
            m["tool_call_id"] = ids.get(str(given)) if given is not None and str(given) in ids else \
                (pending[0] if pending else "call00000")
            if m["tool_call_id"] in pending:
                pending.remove(m["tool_call_id"])
        if m["role"] == "tool" and "tool_as_user" in adapt:
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
                where[i] = len(out) - 1
                continue
            m = {"role": "user", "content": block, "_tool_results": True}
        where[i] = len(out)
        out.append(m)
    if tools and not accepts_tools(tokenizer):
        block = "# Tools\n\n<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n</tools>"
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
            where = {i: j + 1 for i, j in where.items()}
        tools = None
    first_user = next((j for j, m in enumerate(out) if m["role"] == "user"), None)
    if "fold_system" in adapt and out and out[0]["role"] == "system" and first_user is not None:
        system, rest = out[0]["content"], out[1:]
        rest[first_user - 1] = {**rest[first_user - 1], "content": f"{system}\n\n{rest[first_user - 1]['content']}"}
        out = rest
        where = {i: max(j - 1, 0) for i, j in where.items()}
    for m in out:
        m.pop("_tool_results", None)
    return out, (tools or None), where


# -- rendering ---------------------------------------------------------------------------


# apply_chat_template's own arguments: a template switch of that name would collide with them
_RESERVED = frozenset({"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                       "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                       "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@functools.lru_cache(maxsize=64)
def _check_switches(text: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in _RESERVED:
            raise TunesmithError(f"data.template_kwargs.{key} is an argument of the chat template call itself, not a "
                                 "template switch; remove it")
        if key not in text:
            raise TunesmithError(f"data.template_kwargs.{key}: the chat template never reads `{key}`, so it would "
                                 "change nothing; check the spelling against the model's template (e.g. "
                                 "enable_thinking for Qwen3)")


def render(tokenizer, messages: list[Message], tools, generation_prompt: bool,
           opts: ChatOptions = DEFAULT_OPTIONS) -> str:
    if not tokenizer.chat_template:
        raise TunesmithError("the tokenizer has no chat template; call models.templates.ensure_chat_template first")
    if opts.template_kwargs:
        _check_switches(template_text(tokenizer), tuple(sorted(opts.template_kwargs)))
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt, **opts.template_kwargs)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        roles = [m["role"] for m in messages]
        raise TunesmithError(f"the chat template cannot render a conversation with roles {roles}: {e}") from e


def _relevant(messages: list[Message], tools, tokenizer) -> tuple[str, ...]:
    calls = renders_tool_calls(tokenizer) and any(m.get("tool_calls") for m in messages)
    has = {"string_arguments": calls,
           "call_ids": calls,
           "inline_calls": calls,
           "tool_as_user": any(m["role"] == "tool" for m in messages),
           # a system message of the data, or the one that carries the tool list for a template without tools
           "fold_system": bool(messages) and messages[0]["role"] == "system" or bool(tools) and not
           accepts_tools(tokenizer)}
    return tuple(a for a in _ADAPTATIONS if has[a])


def _marked_tools(messages: list[Message]) -> tuple[list[Message], list[str]]:
    """A copy whose tool results and call names are unique markers, and the markers: a render
    that holds every marker renders every tool message and call (an answer that quotes a tool
    result cannot stand in for a dropped one)."""
    out, marks = [], []
    for m in messages:
        m = dict(m)
        if m["role"] == "tool":
            marks.append(f"\ue001result{len(marks)}\ue001")
            m["content"] = marks[-1]
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                marks.append(f"tunesmith_call_{len(marks)}")
                fn = dict(c.get("function", c), name=marks[-1])
                calls.append({**c, "function": fn} if "function" in c else fn)
            m["tool_calls"] = calls
        out.append(m)
    return out, marks


def _shows_everything(tokenizer, messages: list[Message], opts: ChatOptions, adapt: frozenset) -> bool:
    """Every tool result and tool call is in the render (a template may drop a role silently);
    rendered without the tool list, whose names would match too."""
    marked, marks = _marked_tools(messages)
    if not marks:
        return True
    text = _quiet_render(tokenizer, prepare(marked, None, tokenizer, opts, adapt)[0], opts)
    return text is not None and all(mark in text for mark in marks)


def _quiet_render(tokenizer, messages: list[Message], opts: ChatOptions) -> str | None:
    try:
        return render(tokenizer, messages, None, False, opts)
    except TunesmithError:
        return None


def _shape(messages: list[Message], tools) -> tuple:
    """What the adaptation depends on: roles, tool calls (how many), whether a call has text or a trace."""
    return (tuple((m["role"], len(m.get("tool_calls") or ()), bool(m.get("content")), bool(m.get("reasoning")))
                  for m in messages), bool(tools))


_ADAPT_CACHE: dict[tuple, frozenset] = {}


def adaptation(messages: list[Message], tools, tokenizer, opts: ChatOptions = DEFAULT_OPTIONS) -> frozenset:
    """The fewest adaptations (module docstring) with which the template renders every message."""
    key = (template_text(tokenizer), _shape(messages, tools), json.dumps(opts.template_kwargs, sort_keys=True,
                                                                         default=str))
    if key in _ADAPT_CACHE:
        return _ADAPT_CACHE[key]
    relevant, first_error = _relevant(messages, tools, tokenizer), None
    for n in range(len(relevant) + 1):
        for combo in itertools.combinations(relevant, n):
            adapt = frozenset(combo)
            msgs, tls, _ = prepare(messages, tools, tokenizer, opts, adapt)
            try:
                render(tokenizer, msgs, tls, False, opts)
            except TunesmithError as e:
                first_error = first_error or e
                continue
            if _shows_everything(tokenizer, messages, opts, adapt):
                if len(_ADAPT_CACHE) < 4096:
                    _ADAPT_CACHE[key] = adapt
                return adapt
    if first_error is not None:
        raise first_error
    raise TunesmithError("the chat template drops a tool result or tool call from the text; set data.chat_template "
                         "to a template that renders tools")


# -- turns -------------------------------------------------------------------------------


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


_SENTINEL = "\ue000tunesmith-turn\ue000"  # private-use text no template gives meaning
_WINDOW = 64  # how far before the turn's content its start is looked for
_MIN_ALIGN = 4  # characters of the prompt's end that must line up with the render


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b), _WINDOW * 8)  # the prompt's end, not its whole history, lines a turn up
    return len(os.path.commonprefix([a[len(a) - n:][::-1], b[len(b) - n:][::-1]]))


def _align(prompt: str, header: str) -> tuple[int, int]:
    """(j, n): the cut j of ``header`` (near its end) after which the turn starts, where the
    most characters (n) of the prompt's end match ``header[:j]``'s end."""
    best = (len(header), -1)
    for j in range(len(header), max(0, len(header) - _WINDOW) - 1, -1):
        n = _common_suffix(prompt, header[:j])
        if n > best[1]:
            best = (j, n)
    return best


def _opened(prompt: str, block: str) -> list[int]:
    """How many characters at the prompt's end could open ``block`` (the reasoning markers), longest first."""
    n = min(len(prompt), len(block), _WINDOW)  # a generation prompt opens a block with a few characters
    return [o for o in range(n, 0, -1) if block.startswith(prompt[-o:])]


def _continuation(prompt: str, rendered: str, header: str | None, block: str, index: int) -> tuple[str, int]:
    """C_i: the render of turn i (as the last message) after what its prompt already holds.

    ``header``: the render up to where the turn's content starts (a sentinel in place of the
    content), needed only when ``prompt`` is not a prefix of ``rendered``; ``block``: the
    reasoning block to complete when the generation prompt opened it (R1's ``<think>\\n``).
    Returns the text and how many characters of ``block`` the prompt had opened (0: none)."""
    if rendered.startswith(prompt):
        return rendered[len(prompt):], 0
    text, best, opened = None, _MIN_ALIGN - 1, 0
    for o in [0] + _opened(prompt, block):  # o: characters of the reasoning block the prompt opened
        j, n = _align(prompt[:len(prompt) - o], header or "")
        if n > best and rendered.startswith((header or "")[:j]):
            rest = rendered[j:].lstrip() if o else rendered[j:]  # the block ends the trace's whitespace
            best, text, opened = n, block[o:] * bool(o) + rest, o
    if text is None:
        k = _common_prefix(prompt, rendered)
        raise TunesmithError(
            f"the chat template's render of assistant message {index} cannot be lined up with its generation "
            f"prompt (the prompt ends {prompt[-40:]!r}, the turn renders {rendered[k:k + 40]!r}), so the turn "
            "cannot be trained as the model produces it; set data.chat_template to a template that renders it")
    return text, opened


def _context(text: str, plain: str, reasoning: str, answer: str) -> int:
    """answer_only: how many characters of ``text`` come before the answer — the trace, its
    markers and channel headers. ``plain``: the same turn rendered without the trace; what the
    two share at their end is the answer part, and the answer's own text starts no earlier."""
    r = reasoning.strip()
    end = text.find(r) + len(r) if r in text else 0
    shared = len(os.path.commonprefix([text[::-1], plain[::-1]]))
    at = max(end, len(text) - shared)
    a = answer.strip()
    found = text.find(a, end) if a else -1
    at = max(at, found)
    close = text.find("</think>", at)
    if close >= 0 and not text[at:close].strip():  # the trace's closing marker is part of the trace
        at = close + len("</think>")
        while at < len(text) and text[at].isspace() and at < len(text) - 1:
            at += 1
    return at


def _turn_text(tokenizer, msgs, j: int, tls, opts: ChatOptions, prompt: str, block: str, index: int,
               plain: Message) -> tuple[str, int]:
    """C_i for prepared messages ``msgs`` whose message j is the turn; ``plain``: that turn
    without its trace, whose render with a sentinel content marks where the turn starts."""
    rendered = render(tokenizer, msgs[:j + 1], tls, False, opts)
    header = None
    if not rendered.startswith(prompt):
        for turn in ({**plain, "content": _SENTINEL}, {"role": "assistant", "content": _SENTINEL}):
            # a tool-call turn may not render its content: then a plain turn marks where turns start
            probe = render(tokenizer, msgs[:j] + [turn], tls, False, opts)
            if _SENTINEL in probe:
                header = probe[:probe.find(_SENTINEL)]
                break
    return _continuation(prompt, rendered, header, block, index)


_TRACE = "\ue002tunesmith-trace\ue002"  # a trace no answer can contain: does the template render one?


def _with_trace(messages: list[Message], i: int, trace: str) -> list[Message]:
    return [{**m, "reasoning": trace} if k == i else m for k, m in enumerate(messages)]


def _no_place(i: int) -> TunesmithError:
    return TunesmithError(
        f"the chat template leaves no place for the reasoning of message {i} (its generation prompt closes the "
        "reasoning block, e.g. enable_thinking: false), so the trace cannot train; set data.reasoning: drop, or "
        "remove the template switch")


def _reasoning_turn(tokenizer, messages, i: int, j: int, ctx: tuple, prompt: str, plain: Message) -> tuple[str, str]:
    """(C_i with the trace, C_i without it) for assistant message i with reasoning."""
    msgs, tls, opts, adapt, tools = ctx
    reasoning = messages[i]["reasoning"]
    block, empty = inline_reasoning(reasoning, ""), inline_reasoning("", "")
    bare = _turn_text(tokenizer, msgs[:j] + [plain], j, tls, opts, prompt, empty, i, plain)[0]
    probe = prepare(_with_trace(messages, i, _TRACE), tools, tokenizer, opts, adapt)[0]
    if _TRACE in render(tokenizer, probe[:j + 1], tls, False, opts):  # the template renders the trace itself
        try:
            probed = _turn_text(tokenizer, probe, j, tls, opts, prompt, inline_reasoning(_TRACE, ""), i, plain)[0]
        except TunesmithError:
            raise _no_place(i) from None  # the turn lines up without its trace (bare), not with it
        if _TRACE not in probed:
            raise _no_place(i)
        return _turn_text(tokenizer, msgs, j, tls, opts, prompt, block, i, plain)[0], bare
    # the template drops the trace even from the last turn (R1, QwQ): the model's markers
    # around it — completing the block the generation prompt opened — then the answer
    text, opened = _turn_text(tokenizer, msgs[:j] + [plain], j, tls, opts, prompt, block, i, plain)
    return (text if opened else inline_reasoning(reasoning, text)), bare


def turns(messages: list[Message], tools, tokenizer, opts: ChatOptions = DEFAULT_OPTIONS, *,
          first: int = 0, last_only: bool = False, adapt: frozenset | None = None
          ) -> tuple[list[Turn], str, frozenset]:
    """The trained assistant turns (index >= first), the whole render, and the adaptation used."""
    adapt = adaptation(messages, tools, tokenizer, opts) if adapt is None else adapt
    msgs, tls, where = prepare(messages, tools, tokenizer, opts, adapt)
    traced = opts.reasoning != "drop" and any(m.get("reasoning") for m in messages)
    plain = prepare(messages, tools, tokenizer, ChatOptions("drop", opts.template_kwargs), adapt)[0] if traced else msgs
    full = render(tokenizer, msgs, tls, False, opts)
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    out = []
    for i in idx[-1:] if last_only else idx:
        j = where[i]
        prompt = render(tokenizer, msgs[:j], tls, True, opts)
        if opts.reasoning == "drop" or not messages[i].get("reasoning"):
            text = _turn_text(tokenizer, msgs, j, tls, opts, prompt, inline_reasoning("", ""), i, plain[j])[0]
            out.append(Turn(i, prompt, text))
            continue
        lead = {**plain[j], "content": (plain[j].get("content") or "").lstrip()}  # as inline_reasoning leaves it
        text, bare = _reasoning_turn(tokenizer, messages, i, j, (msgs, tls, opts, adapt, tools), prompt, lead)
        ctx = _context(text, bare, messages[i]["reasoning"], messages[i].get("content") or "") \
            if opts.reasoning == "answer_only" else 0
        out.append(Turn(i, prompt, text, ctx))
    return out, full, adapt


def conversation(messages: list[Message], tools, tokenizer, opts: ChatOptions = DEFAULT_OPTIONS, *,
                 last_only: bool = False) -> Rendered:
    """The training sequences of one SFT conversation (see "Modes")."""
    ts, full, adapt = turns(messages, tools, tokenizer, opts, last_only=last_only)
    if not ts:
        raise TunesmithError("a conversation has no assistant message to train on")
    if all(full.startswith(t.prompt + t.text) for t in ts):
        spans = [(len(t.prompt) + t.context, len(t.prompt) + len(t.text)) for t in ts]
        return Rendered("append", [(full, spans, 0)], full, tuple(sorted(adapt)))
    seqs = [(t.prompt + t.text, [(len(t.prompt) + t.context, len(t.prompt) + len(t.text))], len(t.prompt))
            for t in ts]
    return Rendered("per-turn", seqs, full, tuple(sorted(adapt)))


def prompt_text(messages: list[Message], tools, tokenizer, opts: ChatOptions = DEFAULT_OPTIONS,
                adapt: frozenset | None = None) -> tuple[str, str]:
    """(the prompt with the generation prompt, without it), adapted as its conversations are."""
    adapt = adaptation(messages, tools, tokenizer, opts) if adapt is None else adapt
    msgs, tls, _ = prepare(messages, tools, tokenizer, opts, adapt)
    return render(tokenizer, msgs, tls, True, opts), render(tokenizer, msgs, tls, False, opts)
