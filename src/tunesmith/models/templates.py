"""Which chat template renders a conversation, and which tokens end a turn.

Policy (recorded with every run, so a result can be reproduced):

- The tokenizer's own template wins: ``ensure_chat_template`` returns ``"model"``.
- A tokenizer with no template (a base model) gets ``DEFAULT_CHATML``: returns
  ``"chatml-default"``. ChatML needs ``<|im_start|>`` and ``<|im_end|>`` as single
  tokens, so they are added as special tokens when missing (the model builder must then
  grow the embedding matrix to ``len(tokenizer)``), and ``<|im_end|>`` becomes the EOS
  token, so that generation stops at the end of an assistant turn. This is what TRL's
  ``setup_chat_format`` does; we add no default system prompt.

An override (``data.chat_template``, ``--chat-template``) replaces whatever the tokenizer
has, for a model without a template or with a broken one: a Jinja file (returns
``"file:NAME"``) or a family name from ``FAMILIES`` (returns ``"family:NAME"``), whose real
template ships in ``models/chat_templates/``. A family's control tokens that the
vocabulary lacks are added as special tokens (the embeddings then grow, as for the
ChatML default) and its end-of-turn token becomes EOS, so generation stops where the
template ends a turn. The saved and exported tokenizer carries the template used.

The masking code never relies on ``{% generation %}`` markers (stock templates lack
them); ``data/render.py`` reads from the template itself which tokens train, also for
templates that rewrite earlier turns, and asks what a template can render (tools, tool
calls, reasoning).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tunesmith.errors import TunesmithError

# Plain ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEMPLATE_SOURCES = ("model", "chatml-default", "file:NAME", "family:NAME")


@dataclass(frozen=True)
class Family:
    file: str  # in models/chat_templates/ (None: the built-in ChatML default)
    model: str  # the model the template ships with
    tokens: tuple[str, ...]  # control tokens the template writes
    end_of_turn: str | None  # becomes EOS; None keeps the tokenizer's (it is the template's eos_token)
    text_tokens: tuple[str, ...] = ()  # of ``tokens``: added as ordinary tokens, as the model has them (Qwen's <think>)


FAMILIES = {
    "chatml": Family("", "plain ChatML (tunesmith's default for models without a template)",
                     ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": Family("llama3.jinja", "meta-llama/Llama-3.1-8B-Instruct",
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|eom_id|>"),
                     "<|eot_id|>"),
    "gemma": Family("gemma.jinja", "google/gemma-3-1b-it", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    "mistral": Family("mistral.jinja", "mistralai/Mistral-7B-Instruct-v0.2", (), None),
    "qwen3": Family("qwen3.jinja", "Qwen/Qwen3-0.6B",
                    ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                     "<tool_response>", "</tool_response>"), "<|im_end|>",
                    ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")),
}


def _override(tokenizer, override: str) -> str:
    """Apply ``data.chat_template``; returns the template source (see the module docstring)."""
    family = FAMILIES.get(override)
    if family is None:
        path = Path(override)
        if not path.is_file():
            raise TunesmithError(f"data.chat_template: {override!r} is neither a Jinja file nor a known family; "
                                 f"give a path to a .jinja file or one of {', '.join(FAMILIES)}")
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TunesmithError(f"data.chat_template: cannot read {path} ({e}); give a UTF-8 Jinja file") from None
        return f"file:{path.name}"
    text = DEFAULT_CHATML if not family.file else \
        resources.files("tunesmith.models").joinpath("chat_templates", family.file).read_text(encoding="utf-8")
    vocab = tokenizer.get_vocab()
    missing = [t for t in family.tokens if t not in vocab]
    for special in (True, False):
        group = [t for t in missing if (t in family.text_tokens) != special]
        if group:
            tokenizer.add_tokens(group, special_tokens=special)
    if family.end_of_turn:
        tokenizer.eos_token = family.end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = text
    return f"family:{override}"


def ensure_chat_template(tokenizer, override: str | None = None) -> str:
    """Make sure ``tokenizer.chat_template`` is set; return where it came from, one of
    ``TEMPLATE_SOURCES`` (see the module docstring for the policy)."""
    if override:
        return _override(tokenizer, override)
    if tokenizer.chat_template:
        # A folder we saved after adding the default keeps saying so (idempotent).
        return "chatml-default" if tokenizer.chat_template == DEFAULT_CHATML else "model"
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = DEFAULT_CHATML
    return "chatml-default"


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS (the chat template's end of turn,
    e.g. ``<|im_end|>``) first, then any the model's generation config names (Llama-3's
    ``<|eot_id|>`` and ``<|end_of_text|>``), without repeats."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys(t for t in (tokenizer.eos_token_id, *eos) if t is not None))
