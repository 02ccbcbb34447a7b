"""The rendering contract (data/render.py) token by token on 15 real chat templates.

One conversation (a system prompt, three user turns, four assistant messages of which two
carry reasoning and one is a tool call answered by a tool result, and a ``tools=`` list) is
tokenized with each family's real template (tests/template_families.py). For assistant
message i, ``tokenize_prompt(messages[:i])`` -- exactly what generation feeds the model -- must
be the untrained ids that start turn i's training sequence, the trained ids right after it
must decode to turn i's continuation, and nothing else may train.

The oracle is the table ``EXPECTED`` below: the continuation of every turn, written by hand
from reading each template in tests/chat_templates/ (what the template emits for the turn
when it is the last message, minus the generation prompt), plus the mode the template
implies (``append`` when it only appends, ``per-turn`` when it rewrites history) and the
adaptations it needs (render.py's module docstring). Nothing in it is computed with
render.py. Reasoning that a template has no field for is written with the R1 markers
``<think>\\n...\\n</think>\\n\\n`` in front of the answer (render.py's documented convention).
Each family runs twice: every control string a special token, and flagged as the real tokenizer
flags it. The tests after the four main ones are the repros of bugs this campaign found
(a tool list the template reads from a message, a tool result quoted by the answer, gpt-oss's
trace after a reasoned tool call, inline calls after a trace, a conflict's field names).
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
from template_families import FAMILIES, make_family_tokenizer

from tunesmith.data.render import ChatOptions
from tunesmith.data.special_tokens import SpecialTokenError
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_conversation, tokenize_prompt
from tunesmith.data.validate import load_records
from tunesmith.errors import DataError

# -- the conversation ----------------------------------------------------------------------

SYSTEM = "Be terse."
Q1, R1, A1 = "What is 2+2?", "Add two and two.", "It is 4."
Q2, RESULT, A2 = "Weather in Paris?", "18C and sunny", "Sunny, 18C."  # A2 does not quote RESULT
Q3, R3, A3 = "Thanks!", "Be polite.", "You are welcome."
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def conversation(**last_turn) -> list[dict]:
    """Canonical messages; assistant messages are at 2, 4 (the tool call), 6 and 8."""
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1, "reasoning": R1},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": "", "tool_calls": [copy.deepcopy(CALL)]},
        {"role": "tool", "content": RESULT},
        {"role": "assistant", "content": A2},
        {"role": "user", "content": Q3},
        {"role": "assistant", "content": A3, "reasoning": R3},
    ]
    msgs[8].update(last_turn)
    return msgs


# -- the oracle: each turn's continuation, by hand from the templates ----------------------


def think(r: str) -> str:
    return f"<think>\n{r}\n</think>\n\n"


CLOSE = "\n</think>\n\n"  # the rest of the think block when the generation prompt opened "<think>\n"
EMPTY = "<think>\n\n</think>\n\n"
# Qwen's own tool-call block, and the block written into the content for templates without tool_calls.
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
IM, EOT, EOS_R1 = "<|im_end|>\n", "<|eot_id|>", "<｜end▁of▁sentence｜>"
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
MISTRAL_CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00000"}]'  # the adapter's 9-char id


def harmony(r: str | None, a: str) -> str:
    """gpt-oss's last assistant turn after '<|start|>assistant'."""
    analysis = f"<|channel|>analysis<|message|>{r}<|end|><|start|>assistant" if r else ""
    return f"{analysis}<|channel|>final<|message|>{a}<|return|>"


# family: (mode, adaptations, continuations of the assistant messages 2, 4, 6, 8)
EXPECTED: dict[str, tuple[str, tuple[str, ...], tuple[str, str, str, str]]] = {
    # meta-llama/Llama-3.1-8B-Instruct: no reasoning field; tool call as {"name", "parameters"} JSON.
    "llama-3.1": ("append", (), (think(R1) + A1 + EOT, LLAMA_CALL + EOT, A2 + EOT, think(R3) + A3 + EOT)),
    # meta-llama/Llama-3.2-3B-Instruct: as 3.1.
    "llama-3.2": ("append", (), (think(R1) + A1 + EOT, LLAMA_CALL + EOT, A2 + EOT, think(R3) + A3 + EOT)),
    # Qwen/Qwen2.5-7B-Instruct: ChatML, no reasoning field, history never rewritten.
    "qwen2.5": ("append", (), (think(R1) + A1 + IM, TOOL_CALL + IM, A2 + IM, think(R3) + A3 + IM)),
    # Qwen/Qwen3-0.6B: the last turn always gets a think block (empty without reasoning); history loses it.
    "qwen3": ("per-turn", (), (think(R1) + A1 + IM, EMPTY + TOOL_CALL + IM, EMPTY + A2 + IM, think(R3) + A3 + IM)),
    # Qwen/QwQ-32B: the generation prompt ends "<think>\n"; the template drops reasoning everywhere.
    "qwq": ("per-turn", (), (R1 + CLOSE + A1 + IM, CLOSE + TOOL_CALL + IM, CLOSE + A2 + IM, R3 + CLOSE + A3 + IM)),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-32B: prompt ends "<｜Assistant｜><think>\n"; calls render only for
    # content None (so they go into the content); after tool outputs there is no generation prompt at all.
    "deepseek-r1-distill": ("per-turn", ("inline_calls",), (
        R1 + CLOSE + A1 + EOS_R1, CLOSE + TOOL_CALL + EOS_R1, A2 + EOS_R1, R3 + CLOSE + A3 + EOS_R1)),
    # google/gemma-3-1b-it: no tool role (results become user turns), system folded by the template itself.
    "gemma-3": ("append", ("tool_as_user",), tuple(
        x + "<end_of_turn>\n" for x in (think(R1) + A1, TOOL_CALL, A2, think(R3) + A3))),
    # mistralai/Mistral-7B-Instruct-v0.2: ' ' + content + '</s>'; no tool role.
    "mistral-v0.2": ("append", ("tool_as_user",), tuple(
        " " + x + "</s>" for x in (think(R1) + A1, TOOL_CALL, A2, think(R3) + A3))),
    # mistralai/Mistral-7B-Instruct-v0.3: system prompt (and tools) in the LAST user turn; 9-char call ids.
    "mistral-v0.3": ("per-turn", ("call_ids",), (
        " " + think(R1) + A1 + "</s>", "[TOOL_CALLS] " + MISTRAL_CALL + "</s>", " " + A2 + "</s>",
        " " + think(R3) + A3 + "</s>")),
    # mistralai/Mistral-Nemo-Instruct-2407: v0.3 without the spaces (tekken).
    "mistral-nemo": ("per-turn", ("call_ids",), (
        think(R1) + A1 + "</s>", "[TOOL_CALLS]" + MISTRAL_CALL + "</s>", A2 + "</s>", think(R3) + A3 + "</s>")),
    # microsoft/phi-4: drops the tool role silently (results become user turns).
    "phi-4": ("append", ("tool_as_user",), tuple(
        x + "<|im_end|>" for x in (think(R1) + A1, TOOL_CALL, A2, think(R3) + A3))),
    # microsoft/Phi-4-mini-instruct: without a generation prompt the render ends with eos, so the last
    # turn is '...<|end|><|endoftext|>' while history turns end '<|end|>': per-turn.
    "phi-4-mini": ("per-turn", (), tuple(
        x + "<|end|><|endoftext|>" for x in (think(R1) + A1, TOOL_CALL, A2, think(R3) + A3))),
    # openai/gpt-oss-120b: analysis channel only in the last turn, which ends <|return|> (history: <|end|>).
    "gpt-oss": ("per-turn", (), (
        harmony(R1, A1), ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        harmony(None, A2), harmony(R3, A3))),
    # HuggingFaceTB/SmolLM2-135M-Instruct: plain ChatML with a tool role.
    "smollm2": ("append", (), (think(R1) + A1 + IM, TOOL_CALL + IM, A2 + IM, think(R3) + A3 + IM)),
    # HuggingFaceTB/SmolLM3-3B (reasoning mode /think): content as is, tool results as user turns.
    "smollm3": ("append", (), (think(R1) + A1 + IM, TOOL_CALL + IM, A2 + IM, think(R3) + A3 + IM)),
}

assert set(EXPECTED) == set(FAMILIES)
ALL = sorted(FAMILIES)
TURNS = (2, 4, 6, 8)  # the assistant messages of conversation()

# -- helpers -----------------------------------------------------------------------------------


def text(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def run_end(labels, start: int, trained: bool) -> int:
    """End of the run of trained (or untrained) labels that starts at ``start``."""
    end = start
    while end < len(labels) and (labels[end] != IGNORE_INDEX) == trained:
        end += 1
    return end


def layout(tok, messages, conv, *, tools=TOOLS, chat=ChatOptions(), context=None):
    """Per assistant turn k: (its example, the inference prompt ids, start and end of the run of
    trained ids after the prompt). Where ``context[k]`` is set (answer_only) an untrained run
    between the prompt and the trained ids is skipped first."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    out = []
    for k, i in enumerate(turns):
        ex = conv.examples[k] if conv.mode == "per-turn" else conv.examples[0]
        prompt = tokenize_prompt(messages[:i], tok, tools=tools, chat=chat)
        start = len(prompt)
        if context and context[k]:
            start = run_end(ex.labels, start, trained=False)
        out.append((ex, prompt, start, run_end(ex.labels, start, trained=True)))
    return out


def check_contract(tok, messages, conv, continuations, *, tools=TOOLS, chat=ChatOptions(), context=None):
    """(a) prompt ids start the sequence untrained, (b) the trained ids after them decode to the
    expected continuation, (c) nothing else trains. ``context``: expected untrained text per turn
    between the prompt and the trained ids (answer_only), or None."""
    n_turns = sum(m["role"] == "assistant" for m in messages)
    assert len(conv.examples) == (n_turns if conv.mode == "per-turn" else 1)
    trained: dict[int, set[int]] = {}
    for k, (ex, prompt, start, end) in enumerate(layout(tok, messages, conv, tools=tools, chat=chat,
                                                         context=context)):
        n = len(prompt)
        assert ex.input_ids[:n] == prompt, f"turn {k}: the sequence does not start with the inference prompt"
        assert ex.labels[n - 1] == IGNORE_INDEX
        if context and context[k]:
            assert text(tok, ex.input_ids[n:start]) == context[k], f"turn {k}: untrained context"
        assert text(tok, ex.input_ids[start:end]) == continuations[k], f"turn {k}"
        if conv.mode == "per-turn":
            assert end == len(ex.input_ids), f"turn {k}: tokens after the continuation"
        trained.setdefault(id(ex), set()).update(range(start, end))
    for ex in conv.examples:
        got = {t for t, label in enumerate(ex.labels) if label != IGNORE_INDEX}
        assert got == trained[id(ex)], "tokens outside the turns' continuations train"
        assert all(ex.labels[t] == ex.input_ids[t] for t in got)


@functools.lru_cache(maxsize=None)
def case(family: str, flags: str = "special"):
    """flags "special": every control string is a special token; "real": as the real tokenizer
    marks them (Qwen's <think> an ordinary added token, Mistral v0.2's [INST] plain text, ...)."""
    tok = make_family_tokenizer(family, real_flags=flags == "real")
    return tok, tokenize_conversation(conversation(), tok, tools=TOOLS)


FLAGS = pytest.mark.parametrize("flags", ["special", "real"])


# -- 1. every family: mode, prompt ids, continuations, nothing else ---------------------------


@FLAGS
@pytest.mark.parametrize("family", ALL)
def test_mode_and_adaptation(family, flags):
    _, conv = case(family, flags)
    mode, adapted, _ = EXPECTED[family]
    assert (conv.mode, tuple(conv.adapted)) == (mode, adapted)
    assert len(conv.examples) == (4 if mode == "per-turn" else 1)


@FLAGS
@pytest.mark.parametrize("family", ALL)
def test_inference_prompt_is_the_untrained_start(family, flags):
    tok, conv = case(family, flags)
    msgs = conversation()
    for k, (ex, prompt, start, _) in enumerate(layout(tok, msgs, conv)):
        assert ex.input_ids[:len(prompt)] == prompt, f"turn {k}"
        assert ex.labels[len(prompt)] != IGNORE_INDEX, f"turn {k}: the trained ids do not start right after the prompt"
        if conv.mode == "per-turn":
            assert set(ex.labels[:len(prompt)]) == {IGNORE_INDEX}, f"turn {k}"
        else:
            assert ex.labels[len(prompt) - 1] == IGNORE_INDEX, f"turn {k}"


@FLAGS
@pytest.mark.parametrize("family", ALL)
def test_continuations(family, flags):
    tok, conv = case(family, flags)
    got = [text(tok, ex.input_ids[start:end]) for ex, _, start, end in layout(tok, conversation(), conv)]
    assert got == list(EXPECTED[family][2])
    if conv.mode == "per-turn":
        assert all(end == len(ex.input_ids) for ex, _, _, end in layout(tok, conversation(), conv))


@FLAGS
@pytest.mark.parametrize("family", ALL)
def test_nothing_else_trains(family, flags):
    tok, conv = case(family, flags)
    check_contract(tok, conversation(), conv, EXPECTED[family][2])


@pytest.mark.parametrize("family", ALL)
def test_tool_definitions_reach_the_prompt(family):
    tok, _ = case(family)
    for i in TURNS:
        prompt = text(tok, tokenize_prompt(conversation()[:i], tok, tools=TOOLS))
        assert "Get the weather." in prompt and "get_weather" in prompt, f"message {i}"


def test_tool_result_quoted_by_the_answer_is_still_rendered():
    tok = make_family_tokenizer("phi-4")
    msgs = conversation()[:7]
    msgs[6]["content"] = f"It is {RESULT}."
    conv = tokenize_conversation(msgs, tok, tools=TOOLS)
    assert f"<tool_response>\n{RESULT}\n</tool_response>" in text(tok, conv.examples[0].input_ids)
    check_contract(tok, msgs, conv, tuple(x + "<|im_end|>" for x in (think(R1) + A1, TOOL_CALL, msgs[6]["content"])))


# Reasoning on the tool-call turn too (messages 4 and 6 both reason).
R_CALL, R_ANSWER = "Need the weather tool.", "Report it."


def test_gpt_oss_answer_trace_after_a_reasoned_tool_call():
    tok = make_family_tokenizer("gpt-oss")
    msgs = conversation()
    msgs[4]["reasoning"], msgs[6]["reasoning"] = R_CALL, R_ANSWER
    conv = tokenize_conversation(msgs, tok, tools=TOOLS)
    check_contract(tok, msgs, conv, (
        harmony(R1, A1),
        f"<|channel|>analysis<|message|>{R_CALL}<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        harmony(R_ANSWER, A2), harmony(R3, A3)))


def test_inline_call_after_reasoning_smollm3():
    tok = make_family_tokenizer("smollm3")
    msgs = conversation()
    msgs[4]["reasoning"] = R_CALL
    conv = tokenize_conversation(msgs, tok, tools=TOOLS)
    expected = list(EXPECTED["smollm3"][2])
    expected[1] = think(R_CALL) + TOOL_CALL + IM
    check_contract(tok, msgs, conv, expected)


# -- 2. reasoning policies -------------------------------------------------------------------

# family: {policy: (untrained context before the trained ids, trained continuation)} of each turn.
POLICIES = {
    "qwen3": {
        "train": ((None,) * 4, EXPECTED["qwen3"][2]),
        "answer_only": ((think(R1), None, None, think(R3)),
                        (A1 + IM, EMPTY + TOOL_CALL + IM, EMPTY + A2 + IM, A3 + IM)),
        "drop": ((None,) * 4, (EMPTY + A1 + IM, EMPTY + TOOL_CALL + IM, EMPTY + A2 + IM, EMPTY + A3 + IM)),
    },
    "deepseek-r1-distill": {
        "train": ((None,) * 4, EXPECTED["deepseek-r1-distill"][2]),
        "answer_only": ((R1 + CLOSE, None, None, R3 + CLOSE),
                        (A1 + EOS_R1, CLOSE + TOOL_CALL + EOS_R1, A2 + EOS_R1, A3 + EOS_R1)),
        "drop": ((None,) * 4, (CLOSE + A1 + EOS_R1, CLOSE + TOOL_CALL + EOS_R1, A2 + EOS_R1, CLOSE + A3 + EOS_R1)),
    },
    "llama-3.1": {
        "train": ((None,) * 4, EXPECTED["llama-3.1"][2]),
        "answer_only": ((think(R1), None, None, think(R3)), (A1 + EOT, LLAMA_CALL + EOT, A2 + EOT, A3 + EOT)),
        "drop": ((None,) * 4, (A1 + EOT, LLAMA_CALL + EOT, A2 + EOT, A3 + EOT)),
    },
}


@pytest.mark.parametrize("policy", ["train", "answer_only", "drop"])
@pytest.mark.parametrize("family", sorted(POLICIES))
def test_reasoning_policy(family, policy):
    tok = make_family_tokenizer(family)
    chat = ChatOptions(reasoning=policy)
    msgs = conversation()
    conv = tokenize_conversation(msgs, tok, tools=TOOLS, chat=chat)
    context, continuations = POLICIES[family][policy]
    check_contract(tok, msgs, conv, continuations, chat=chat, context=context)
    inputs = " ".join(text(tok, ex.input_ids) for ex in conv.examples)
    trained = " ".join(text(tok, [t for t in ex.labels if t != IGNORE_INDEX]) for ex in conv.examples)
    for r in (R1, R3):
        assert (r in inputs) == (policy != "drop"), r
        assert (r in trained) == (policy == "train"), r


# -- 3. template kwargs ---------------------------------------------------------------------


def test_qwen3_enable_thinking_false():
    tok = make_family_tokenizer("qwen3")
    chat = ChatOptions(template_kwargs={"enable_thinking": False})
    msgs = conversation()
    for m in msgs:
        m.pop("reasoning", None)
    for i in TURNS:
        prompt = text(tok, tokenize_prompt(msgs[:i], tok, tools=TOOLS, chat=chat))
        assert prompt.endswith("<|im_start|>assistant\n" + EMPTY), f"message {i}"
    conv = tokenize_conversation(msgs, tok, tools=TOOLS, chat=chat)
    check_contract(tok, msgs, conv, (A1 + IM, TOOL_CALL + IM, A2 + IM, A3 + IM), chat=chat)


# -- 4. reading reasoning from files ----------------------------------------------------------

USER = {"role": "user", "content": "Q?"}
ANSWER = {"role": "assistant", "content": "A."}
READ_FORMS = {
    "reasoning_content": {"messages": [USER, {**ANSWER, "reasoning_content": "R."}]},
    "reasoning": {"messages": [USER, {**ANSWER, "reasoning": "R."}]},
    "thinking": {"messages": [USER, {**ANSWER, "thinking": "R."}]},
    "leading_think": {"messages": [USER, {"role": "assistant", "content": "<think>\nR.\n</think>\n\nA."}]},
    "begin_of_thought": {"messages": [USER, {"role": "assistant", "content": (  # Bespoke-Stratos, OpenThoughts
        "<|begin_of_thought|>\nR.\n<|end_of_thought|>\n\n<|begin_of_solution|>\nA.\n<|end_of_solution|>")}]},
    "sharegpt_reasoning_content": {"conversations": [{"from": "human", "value": "Q?"},
                                                     {"from": "gpt", "value": "A.", "reasoning_content": "R."}]},
    "same_trace_twice": {"messages": [USER, {"role": "assistant", "content": "<think>R.</think>A.",
                                             "reasoning_content": " R.\n"}]},
    "openthoughts_columns": {"problem": "Q?", "deepseek_reasoning": "R.", "deepseek_solution": "A."},
    "question_reasoning_answer": {"question": "Q?", "reasoning": "R.", "answer": "A."},
    "prompt_thinking_completion": {"prompt": "Q?", "thinking": "R.", "completion": "A."},
}


def write_jsonl(tmp_path, row) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("form", sorted(READ_FORMS))
def test_reasoning_is_read_into_the_canonical_field(tmp_path, form):
    (rec,) = load_records([write_jsonl(tmp_path, READ_FORMS[form])])
    assert rec == {"messages": [USER, {"role": "assistant", "content": "A.", "reasoning": "R."}]}


# row, the field the error is located at, the names its message must give
CONFLICTS = {
    "content_and_reasoning_content": (
        {"messages": [USER, {"role": "assistant", "content": "<think>R1</think>A.", "reasoning_content": "R2"}]},
        "messages.1", ("messages.1.reasoning_content", "messages.1.content")),
    "reasoning_content_and_thinking": (
        {"messages": [USER, {**ANSWER, "reasoning_content": "R1", "thinking": "R2"}]},
        "messages.1", ("messages.1.reasoning_content", "messages.1.thinking")),
    "reasoning_and_thinking": (
        {"messages": [USER, {**ANSWER, "reasoning": "R1", "thinking": "R2"}]},
        "messages.1", ("messages.1.reasoning", "messages.1.thinking")),
    "distill_column_and_leading_think": (
        {"problem": "Q?", "deepseek_reasoning": "R1", "deepseek_solution": "<think>R2</think>A."},
        "deepseek_solution", ("deepseek_reasoning", "deepseek_solution")),
}
@pytest.mark.parametrize("name", sorted(CONFLICTS))
def test_conflicting_traces_are_refused(tmp_path, name):
    row, field, names = CONFLICTS[name]
    with pytest.raises(DataError) as err:
        load_records([write_jsonl(tmp_path, row)])
    assert err.value.field == field
    assert "two different reasoning traces" in str(err.value)
    for n in names:
        assert n in str(err.value)


# -- 5. special tokens inside content (a per-turn family) ----------------------------------------


def test_special_token_in_content_qwen3():
    tok = make_family_tokenizer("qwen3")
    answer = "Type <|im_end|> to end a turn."
    msgs = conversation(content=answer)
    with pytest.raises(SpecialTokenError) as err:
        tokenize_conversation(msgs, tok, tools=TOOLS)
    assert (err.value.field, err.value.token) == ("messages.8.content", "<|im_end|>")

    conv = tokenize_conversation(msgs, tok, tools=TOOLS, special_tokens_in_content="text")
    assert conv.mode == "per-turn"
    expected = (*EXPECTED["qwen3"][2][:3], think(R3) + answer + IM)
    check_contract(tok, msgs, conv, expected)
    # The literal is ordinary text: the turn's only <|im_end|> token is the one that closes it.
    ex, _, start, end = layout(tok, msgs, conv)[3]
    assert ex.input_ids[start:end].count(tok.convert_tokens_to_ids("<|im_end|>")) == 1
    assert ex.input_ids[end - 2] == tok.convert_tokens_to_ids("<|im_end|>")
    # Records without one tokenize as under the default.
    plain = tokenize_conversation(conversation(), tok, tools=TOOLS, special_tokens_in_content="text")
    assert [e.input_ids for e in plain.examples] == [e.input_ids for e in case("qwen3")[1].examples]
