"""Reward-model scores of conversations: what ``tunesmith score``, the preference suite, the
refusal classifier and GRPO's reward-model rewards all call.

    model, tokenizer = load_scorer("runs/rm/final")            # models.load
    scores = score_conversations(model, tokenizer, prompts, completions)
"""

from __future__ import annotations

import torch

from tunesmith.data.batches import pad_batch
from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.tokenize import tokenize_unpaired
from tunesmith.models.forward import SequenceScores


def score_conversations(model, tokenizer, prompts: list[list[dict]], completions: list[str], *,
                        max_length: int | None = None, batch_size: int = 8,
                        chat: ChatOptions = DEFAULT_OPTIONS) -> list[float]:
    """Scores of ``completions`` (assistant text) after their prompt conversations, with the
    tokenizer's chat template (``chat``: ``data.render.ChatOptions`` the scorer trained with)
    and the same truncation as training (prompt cut from the left first); nan where nothing
    of the completion fits."""
    exs = [tokenize_unpaired({"prompt": p, "completion": [{"role": "assistant", "content": c}], "label": True},
                             tokenizer, max_length=max_length, on_overflow="drop", chat=chat)
           for p, c in zip(prompts, completions)]
    scorer = SequenceScores(model)
    device = next(model.parameters()).device
    out = [float("nan")] * len(exs)
    kept = [i for i, e in enumerate(exs) if e is not None]
    with torch.no_grad():
        for start in range(0, len(kept), batch_size):
            idx = kept[start:start + batch_size]
            batch = pad_batch([exs[i].completion for i in idx], tokenizer.pad_token_id)
            scores = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for i, s in zip(idx, scores.tolist()):
                out[i] = s
    return out
