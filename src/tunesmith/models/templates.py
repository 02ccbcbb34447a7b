"""Which chat template renders a conversation, and which tokens end a turn.

Policy (recorded with every run, so a result can be reproduced):

- The tokenizer's own template wins: ``ensure_chat_template`` returns ``"model"``.
- A tokenizer with no template (a base model) gets ``DEFAULT_CHATML``: returns
  ``"chatml-default"``. ChatML needs ``<|im_start|>`` and ``<|im_end|>`` as single
  tokens, so they are added as special tokens when missing (the model builder must then
  grow the embedding matrix to ``len(tokenizer)``), and ``<|im_end|>`` becomes the EOS
  token, so that generation stops at the end of an assistant turn. This is what TRL's
  ``setup_chat_format`` does; we add no default system prompt.

The masking code never relies on ``{% generation %}`` markers (stock templates lack
them); it only needs the template to be *prefix-stable* (see ``data/tokenize.py``, which
also asks what a template can render: tools, tool calls).
"""

from __future__ import annotations

# Plain ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEMPLATE_SOURCES = ("model", "chatml-default")


def ensure_chat_template(tokenizer) -> str:
    """Make sure ``tokenizer.chat_template`` is set; return where it came from, one of
    ``TEMPLATE_SOURCES`` (see the module docstring for the policy)."""
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
