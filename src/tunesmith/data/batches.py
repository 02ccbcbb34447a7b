"""Batches that waste little: right padding, length grouping, and packing.

Shapes: B = rows in a batch, T = the batch's padded length.

Padding (``pad_batch``) → input_ids (B, T) long, labels (B, T) long with -100 at pads,
attention_mask (B, T) long (1 = real token). Right padding.

Packing (``pack_examples`` + ``pack_batch``) puts several records in one row and returns
input_ids (B, T), labels (B, T), position_ids (B, T) restarting at 0 for each record,
and attention_mask (B, 1, T, T): an *additive float* mask in ``dtype`` (0.0 = may
attend, ``torch.finfo(dtype).min`` = may not) that is causal and block-diagonal, so no
record sees the one before it and no real token sees padding. Why a 4D mask: measured
with transformers 5.23's SDPA on CPU, restarting position ids alone does not stop a
packed record from attending to the previous one when a 2D mask is passed. A 4D mask is
passed to attention untouched (``masking_utils._preprocess_mask_arguments`` returns it
as is); eager attention *adds* it to the scores (so a bool mask would be wrong there)
and ``torch.nn.functional.scaled_dot_product_attention`` adds a float mask the same
way, so one additive mask serves both. Its dtype must be the dtype of the attention
scores (the model's compute dtype: bf16 under bf16 weights or autocast). Padding rows
may attend to themselves only, so no softmax row is empty (an all-min row would still
be finite, but this keeps pads' outputs independent of everything). Cost: B·T² mask
entries, e.g. 8 x 2048² x 4 bytes = 134 MB in fp32 — fine for the sequence lengths we
train on; flash-attention's varlen path would avoid it on GPU.

Labels at record boundaries: the loss predicts ``labels[t+1]`` from position ``t``
(transformers shifts by one). Unpacked, a record's first label is never predicted
(nothing comes before it). Packed, the last token of record A would predict record B's
first token — a prediction from the wrong context. So ``pack_batch`` sets the label of
every record's first token to -100, which makes the packed loss equal to the
token-weighted loss of the records run one by one (tests/test_batches.py pins it).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunesmith.errors import TunesmithError


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad_batch(
    examples: Sequence[TokenizedExample], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest (rounded up to ``pad_to_multiple_of``)."""
    T = _round_up(max(len(ex.input_ids) for ex in examples), pad_to_multiple_of)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        labels[b, :n] = torch.tensor(ex.labels)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int = 50
) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive batches have similar lengths.

    As transformers' ``LengthGroupedSampler``: shuffle with ``seed``, cut into
    mega-batches of ``batch_size * mega_batch_mult`` items, sort each by length
    (longest first). The mega-batch holding the longest item goes first, so a batch
    that does not fit in memory fails at step 1, not hours in. Same seed, same order.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    size = max(1, batch_size * mega_batch_mult)
    megas = [sorted(perm[i:i + size], key=lambda k: -lengths[k]) for i in range(0, len(perm), size)]
    if megas:
        longest = max(range(len(megas)), key=lambda m: lengths[megas[m][0]])
        megas[0], megas[longest] = megas[longest], megas[0]
    return [k for mega in megas for k in mega]


def pack_examples(examples: Sequence[TokenizedExample], max_length: int) -> list[list[TokenizedExample]]:
    """Group examples into packs of at most ``max_length`` tokens (best-fit decreasing).

    Longest first, each into the fullest pack it still fits in; deterministic (ties by
    input order). Best-fit decreasing fills packs to ~95-99% on instruction data; the
    order of packs is left to the trainer's shuffling. Examples must already be
    truncated to ``max_length`` (tokenize with ``max_length``).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    packs: list[list[TokenizedExample]] = []
    free: list[tuple[int, int]] = []  # (room left, pack index), sorted
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise TunesmithError(f"an example of {n} tokens cannot be packed into max_length={max_length}")
        j = bisect.bisect_left(free, (n, -1))  # the pack with the least room that still fits
        if j < len(free):
            room, p = free.pop(j)
        else:
            room, p = max_length, len(packs)
            packs.append([])
        packs[p].append(examples[i])
        if room - n > 0:
            bisect.insort(free, (room - n, p))
    return packs


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) record ids (0 = padding, 1.. = records) → (B, 1, T, T) additive mask.

    Query q may attend key k iff k <= q and both lie in the same record; a padding
    query attends only to itself.
    """
    T = seq_ids.shape[1]
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] > 0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (same & causal) | (torch.eye(T, dtype=torch.bool) & (seq_ids == 0)[:, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def pack_batch(
    packs: Sequence[Sequence[TokenizedExample]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Packs → model inputs (see the module docstring for the mask and boundary labels).

    Returns input_ids, labels, position_ids (B, T) long and attention_mask (B, 1, T, T)
    in ``dtype``; pass them all to the model: ``model(**batch)``.
    """
    T = _round_up(max(sum(len(ex.input_ids) for ex in pack) for pack in packs), pad_to_multiple_of)
    B = len(packs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    seq_ids = torch.zeros((B, T), dtype=torch.long)
    for b, pack in enumerate(packs):
        t = 0
        for r, ex in enumerate(pack, start=1):
            n = len(ex.input_ids)
            input_ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            labels[b, t] = IGNORE_INDEX  # never predicted from the previous record
            position_ids[b, t:t + n] = torch.arange(n)
            seq_ids[b, t:t + n] = r
            t += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": block_causal_mask(seq_ids, dtype),
    }


def packing_efficiency(batches: Sequence[Sequence[int]], pad_to: int | None = None) -> float:
    """Real tokens / processed tokens, for reporting.

    ``batches``: for each batch, the real-token length of each row (a padded example's
    length, or the summed lengths of a pack). A batch processes rows x longest row
    tokens, or rows x ``pad_to`` when every row is padded to a fixed length.
    """
    real = sum(sum(rows) for rows in batches)
    processed = sum(len(rows) * (pad_to or max(rows)) for rows in batches if rows)
    return real / processed if processed else 0.0
