"""Generation from chat prompts: batched (``generate``) and streamed (``stream``), with the
same settings, the chat template the model was trained with, and a fixed seed.

    model, tokenizer, _ = load_for_inference("runs/sft-demo")      # infer.load
    texts = generate(model, tokenizer, [[{"role": "user", "content": "Say hi."}]], max_new_tokens=64)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from tunesmith import console
from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.tokenize import tokenize_prompt
from tunesmith.infer import GENERATION_BATCH
from tunesmith.infer.decode import decoder_for, inference_dtype
from tunesmith.models.adapters import merged_adapter
from tunesmith.models.templates import stop_token_ids

# ---------------------------------------------------------------- generation


def _settings(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """A decoder's settings from our flags alone. Generation stops at the tokenizer's EOS and at
    any EOS the model's own config names."""
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "stop_ids": stop_token_ids(tokenizer, model.generation_config), "pad_id": tokenizer.pad_token_id}


@contextlib.contextmanager
def prepared(model, dtype: str = "auto"):
    """The model's active adapter merged and its decoder built once (``infer.decode.decoder_for``:
    a copy of the weights, ~1 s for SmolLM2), for every ``generate`` / ``stream`` call inside:
    ``tunesmith chat`` holds one for the whole session instead of one per reply."""
    with merged_adapter(model):
        yield decoder_for(model, inference_dtype(dtype))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt's last token sits at the same position and new tokens
    are appended right after it. Returns (input_ids, attention_mask), both [B, T] int64."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


class _Bar:
    """A rich progress bar on stderr (through the console), or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=console.console)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = GENERATION_BATCH,
             progress: bool = False, chat: ChatOptions = DEFAULT_OPTIONS, dtype: str = "auto") -> list[str]:
    """One completion per prompt (a message list ending with a user turn), in input order.

    Prompts are rendered with the chat template and its generation prompt
    (``data.tokenize.tokenize_prompt``), sorted by length so a batch pads little, left
    padded, and decoded by ``prepared(model, dtype)`` (tunesmith's decode loop for Llama-family
    models, else transformers' ``generate``; ``dtype`` auto|fp32|bf16, auto = bf16 weights where
    the hardware has native bf16) until EOS or ``max_new_tokens``. ``chat`` (``data.render.ChatOptions``): the template switches the
    model was trained with (e.g. ``enable_thinking``). ``temperature`` 0 is greedy and deterministic; otherwise
    sampling with ``top_p`` draws from a torch generator seeded with ``seed`` (the
    caller's global RNG state is left as it was).
    """
    config = _settings(model, tokenizer, max_new_tokens, temperature, top_p)
    ids = [tokenize_prompt(p, tokenizer, chat=chat) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    bar = _Bar(progress, len(ids), "generate")
    try:
        with torch.random.fork_rng(devices=[]), prepared(model, dtype) as decoder:  # one copy for every batch
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                input_ids, mask = left_pad([ids[i] for i in batch], tokenizer.pad_token_id)
                new = decoder.generate(input_ids, mask, **config)
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    out[i] = text
                bar.advance(len(batch))
    finally:
        bar.close()
    return out


def stream(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, chat: ChatOptions = DEFAULT_OPTIONS, dtype: str = "auto",
           decoder=None) -> Iterator[str]:
    """The reply to one conversation as text pieces, as they are decoded (for chat).

    Decoding runs in a thread feeding a ``TextIteratorStreamer``; the pieces joined equal
    ``generate(...)`` for the same settings. ``decoder``: one from ``prepared`` held by the
    caller (else one is prepared for this reply, in ``dtype``).
    """
    import threading

    from transformers import TextIteratorStreamer

    config = _settings(model, tokenizer, max_new_tokens, temperature, top_p)
    input_ids = torch.tensor([tokenize_prompt(messages, tokenizer, chat=chat)], dtype=torch.long)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            held = contextlib.nullcontext(decoder) if decoder is not None else prepared(model, dtype)
            with torch.inference_mode(), torch.random.fork_rng(devices=[]), held as dec:
                torch.manual_seed(seed)
                dec.generate(input_ids, torch.ones_like(input_ids), on_token=streamer.put, **config)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)
        finally:
            streamer.end()

    streamer.put(input_ids)  # the prompt, which skip_prompt drops
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- prompt files


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records through the data layer: ``prompt`` (a string) or ``messages`` ending
    with a user turn, one format per file — or SFT records (a held-out training file): the
    conversation up to its last assistant turn is the prompt and that turn's content the
    ``reference``. Returns canonical prompt records ``{"prompt": [Message], "meta": {...}}``
    (an ``id`` column and the reference land in ``meta``)."""
    from tunesmith.data.schema import as_prompt
    from tunesmith.data.validate import load_records

    return [as_prompt(r) for r in load_records([path], expect={"prompt", "sft"}, purpose="generation")]


def completion_record(record: dict, completion: str) -> dict:
    """An output line: id (when the input had one), the prompt as given, the completion.
    A lone user message is written back as a plain string, anything else as messages."""
    out = {"id": record["meta"]["id"]} if "id" in (record.get("meta") or {}) else {}
    p = record["prompt"]
    out["prompt"] = p[0]["content"] if len(p) == 1 and p[0]["role"] == "user" else p
    out["completion"] = completion
    return out
