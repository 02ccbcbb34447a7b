"""Which chat template renders a conversation, and what that template can do.

Policy (recorded with every run, so a result can be reproduced):

- The tokenizer's own template wins: ``ensure_chat_template`` returns ``"model"``.
- A template given in the config (Jinja text) replaces it: returns ``"config"``.
- A tokenizer with no template (a base model) gets ``DEFAULT_CHATML``: returns
  ``"chatml-default"``. ChatML needs ``<|im_start|>`` and ``<|im_end|>`` as single
  tokens, so they are added as special tokens when missing (the model builder must then
  grow the embedding matrix to ``len(tokenizer)``), and ``<|im_end|>`` becomes the EOS
  token, so that generation stops at the end of an assistant turn. This is what TRL's
  ``setup_chat_format`` does; we add no default system prompt.

The masking code never relies on ``{% generation %}`` markers (stock templates lack
them); it only needs the template to be *prefix-stable* (see ``data/tokenize.py``).
"""

from __future__ import annotations

# Plain ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEMPLATE_SOURCES = ("model", "config", "chatml-default")


def ensure_chat_template(tokenizer, template: str | None = None) -> str:
    """Make sure ``tokenizer.chat_template`` is set; return where it came from.

    ``template``: Jinja text from the run config, used instead of the model's own.
    Returns one of ``TEMPLATE_SOURCES`` (see the module docstring for the policy).
    """
    if template:
        tokenizer.chat_template = template
        return "config"
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


def template_source(tokenizer) -> str:
    """The Jinja text of the tokenizer's chat template ('' when it has none)."""
    t = tokenizer.chat_template
    if isinstance(t, dict):  # a few tokenizers ship {"default": ..., "tool_use": ...}
        t = t.get("default") or next(iter(t.values()), "")
    return t or ""


def renders_tool_calls(tokenizer) -> bool:
    """Whether the template itself renders assistant ``tool_calls`` (Qwen2.5, Llama-3.1 do)."""
    return "tool_calls" in template_source(tokenizer)


def accepts_tools(tokenizer) -> bool:
    """Whether the template renders a ``tools=`` list (it mentions ``tools``)."""
    return "tools" in template_source(tokenizer)
