"""Reward functions for `method: grpo` (named in the config as `examples/rewards.py:NAME`).

Each is called with prompts (the last user message of each prompt), completions (the
sampled answers, as text), messages (the whole prompt conversations) and every extra
column of the prompt records, one value per completion; it returns one float per
completion.
"""

import re


def concise(completions, **kwargs):
    """1.0 for answers of at most 30 words, falling linearly to 0 at 90 words."""
    return [max(0.0, min(1.0, (90 - len(c.split())) / 60)) for c in completions]


def ends_cleanly(completions, **kwargs):
    """1.0 when the answer ends with sentence punctuation (it stopped, not cut off)."""
    return [1.0 if re.search(r"[.!?)\]`\"']\s*$", c.strip()) else 0.0 for c in completions]


def exact_answer(completions, answer, **kwargs):
    """1.0 when the reference answer (an `answer` column) appears in the completion."""
    return [1.0 if str(a).strip().lower() in c.lower() else 0.0 for c, a in zip(completions, answer)]
