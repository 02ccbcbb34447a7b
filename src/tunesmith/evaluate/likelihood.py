"""Suites that read the model's log-probabilities of given text instead of its generations.

- ``loss``: held-out loss and perplexity of SFT/text records under the training masking
  (``data.tokenize.tokenize_record``: only trained tokens count), token-weighted like the
  engine's ``eval_loss`` — on a run's own held-out split it recomputes that number.
  Interval: bootstrap over records, since the tokens of one record are not independent.
- ``preference``: how often the model ranks ``chosen`` above ``rejected`` on held-out
  pairs, by the score its training optimised (``preference_rule``):

    reward run          the reward model's score (``infer.score.score_conversations``)
    DPO (IPO) / KTO     the implicit reward β·(log π − log π_ref) (IPO: per-token means), with
                        π_ref the model it was trained from: the adapter switched off
    SimPO / ORPO        β · mean per-token log π (they train without a reference)
    anything else       the model's own log π(chosen) > log π(rejected)

  The rule comes from the facts the training method recorded in ``run.json`` (``scoring``:
  rule, loss type, β, per-token or not; exports carry them in ``tunesmith.json``), so a
  ``method: ipo`` run and a ``method: dpo, loss_type: ipo`` run are scored alike.

  Ties count as wrong, as in training's ``rewards/accuracies`` (at DPO's step 0 every
  implicit reward is 0 and the accuracy is 0).
- multiple choice by log-likelihood (``accuracy`` suite with ``mc="loglik"``): each option
  as the assistant's reply; the best mean per-token log-prob wins (``scoring.pick_by_loglik``,
  so a long option does not lose for its length alone). The record's response reads
  "B) Paris", which the accuracy scorer reads back as option B.

Without ``--data``, loss and preference take the held-out records of the first run folder
among the models, rebuilt exactly as training built them (``data.eval`` files, else
``split_records`` with ``data.eval_split`` and ``train.seed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.data.batches import pad_batch
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.scoring import LETTERS, pick_by_loglik
from tunesmith.evaluate.stats import bootstrap_interval, mean, rate_summary
from tunesmith.models.runs import Run

# --- records ----------------------------------------------------------------------------


def _as_list(x) -> list[str]:
    return [] if x is None else [x] if isinstance(x, str) else list(x)


def heldout_records(run: Run | None, kinds: set[str], suite: str) -> list[dict]:
    """The run's eval records, as training selected them."""
    from tunesmith.data.validate import load_records, load_training

    if run is None:
        raise TunesmithError(f"the {suite} suite needs held-out records: pass --data FILE (or {suite}=FILE), or "
                             f"evaluate a run folder so that its eval split is used")
    data = run.config.get("data") or {}
    read = dict(format=data.get("format"), columns=data.get("columns"), expect=kinds, purpose=f"the {suite} suite")
    if data.get("eval"):
        return load_records(_as_list(data["eval"]), **read)
    if (data.get("eval_split") or 0) > 0:
        seed = (run.config.get("train") or {}).get("seed", 0)
        return load_training(data["train"], data["eval_split"], seed, **read)[1]  # as training held them out
    raise TunesmithError(f"run {run.dir} kept no held-out records (no data.eval, data.eval_split 0); pass --data FILE")


def _with_ids(records: list[dict]) -> list[dict]:
    return [{**r, "id": (r.get("meta") or {}).get("id", f"rec-{i + 1}")} for i, r in enumerate(records)]


def loss_records(inp) -> list[dict]:
    """SFT or text records: ``--data`` or the run's eval split (``runner.SuiteInput``)."""
    from tunesmith.data.validate import load_records

    kinds = {"sft", "text"}
    if inp.data:
        return _with_ids(load_records([inp.data], expect=kinds, purpose="the loss suite"))
    return _with_ids(heldout_records(inp.run, kinds, "loss"))


def preference_records(inp) -> list[dict]:
    """Preference pairs: ``--data`` or the run's eval split (``runner.SuiteInput``)."""
    from tunesmith.data.validate import load_records

    if inp.data:
        return _with_ids(load_records([inp.data], expect={"preference"}, purpose="the preference suite"))
    return _with_ids(heldout_records(inp.run, {"preference"}, "preference"))


# --- log-probabilities --------------------------------------------------------------------


@torch.inference_mode()
def sequence_logps(model, examples: list, pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(sum of log p over trained tokens, trained tokens) per ``TokenizedExample``, in input
    order; batched longest first so a batch pads little."""
    from tunesmith.models.forward import SequenceLogProbs

    scorer = SequenceLogProbs(model)
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([examples[i] for i in idx], pad_id).items()}
        logps, counts = scorer(**batch)
        for i, lp, n in zip(idx, logps.tolist(), counts.tolist()):
            out[i] = (lp, int(n))
    return out


def _ratio(pairs: list[tuple[float, int]]) -> float:
    return sum(a for a, _ in pairs) / max(1, sum(b for _, b in pairs))


def measure_loss(subject, records: list[dict], settings) -> dict[str, Any]:
    """Per record: trained tokens, summed NLL, mean loss; aggregate: token-weighted loss and
    perplexity = exp(loss), both with a bootstrap interval over records."""
    from tunesmith.data.tokenize import tokenize_sequences

    tok = subject.tokenizer
    # A conversation under a history-rewriting template is one sequence per turn (data/render.py):
    # a record's loss sums over its sequences, as training weighs them.
    seqs = [tokenize_sequences(r, tok, max_length=settings.max_length, train_on=settings.train_on,
                               on_overflow="drop", chat=settings.chat()) or [] for r in records]
    flat = [(i, e) for i, exs in enumerate(seqs) for e in exs if e.n_trained > 0]
    scores: dict[int, tuple[float, int]] = {}
    for (i, _), (lp, n) in zip(flat, sequence_logps(subject.model, [e for _, e in flat], tok.pad_token_id,
                                                    settings.batch_size)):
        had = scores.get(i, (0.0, 0))
        scores[i] = (had[0] + lp, had[1] + n)
    items = []
    for i, r in enumerate(records):
        if i not in scores:
            items.append({"id": r["id"], "dropped": True})
            continue
        lp, n = scores[i]
        items.append({"id": r["id"], "tokens": n, "nll": -lp, "loss": -lp / n,
                      "truncated": any(e.truncated for e in seqs[i])})
    pairs = [(it["nll"], it["tokens"]) for it in items if not it.get("dropped")]
    if not pairs:
        raise TunesmithError(f"no record of the loss suite keeps a trained token within max_length "
                             f"{settings.max_length}; raise --max-length")
    loss = _ratio(pairs)
    low, high = bootstrap_interval(pairs, stat=_ratio)
    return {"items": items, "aggregate": {
        "n": len(pairs), "dropped": len(items) - len(pairs), "tokens": sum(n for _, n in pairs),
        "loss": {"value": loss, "low": low, "high": high},
        "perplexity": {"value": math.exp(loss), "low": math.exp(low), "high": math.exp(high)},
    }}


# --- preference accuracy ------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceRule:
    """How a model scores one response of a pair (see the module docstring)."""

    kind: str  # "reward", "implicit", "policy" or "loglik"
    beta: float
    per_token: bool  # compare mean per-token log-probs (IPO, SimPO, ORPO train on those)
    describe: str


def preference_rule(subject) -> PreferenceRule:
    member = subject.member
    if member.is_scorer:
        return PreferenceRule("reward", 1.0, False, "reward model score")
    facts = member.scoring or {}
    rule, beta, per_token = facts.get("rule"), float(facts.get("beta", 1.0)), bool(facts.get("per_token"))
    loss_type = facts.get("loss_type")
    if rule == "policy":
        return PreferenceRule("policy", beta, per_token,
                              f"β·mean log π per token (β={beta:g}; {loss_type} has no reference)")
    if rule == "implicit" and subject.has_reference():
        return PreferenceRule("implicit", beta, per_token, f"implicit reward β·(log π − log π_ref)"
                              f"{' per token' if per_token else ''}, β={beta:g}, π_ref = the model it was trained from "
                              f"({loss_type})")
    return PreferenceRule("loglik", 1.0, False, "log π(chosen) > log π(rejected): no preference training recorded")


def _reward_scores(subject, records: list[dict], settings) -> list[tuple[float, float]]:
    from tunesmith.infer.score import score_conversations

    def reply(messages: list[dict]) -> str:
        return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")

    prompts = [r["prompt"] for r in records]
    kw = dict(max_length=settings.max_length, batch_size=settings.batch_size, chat=settings.chat())
    chosen = score_conversations(subject.model, subject.tokenizer, prompts, [reply(r["chosen"]) for r in records], **kw)
    rejected = score_conversations(subject.model, subject.tokenizer, prompts, [reply(r["rejected"]) for r in records],
                                   **kw)
    return list(zip(chosen, rejected))


def _logp_rewards(subject, records: list[dict], settings, rule: PreferenceRule) -> list[tuple[float, float]]:
    from tunesmith.data.tokenize import tokenize_preference

    tok = subject.tokenizer
    exs = [tokenize_preference(r, tok, max_length=settings.max_length, on_overflow="drop", chat=settings.chat())
           for r in records]
    kept = [i for i, e in enumerate(exs) if e is not None]
    rows = [exs[i].chosen for i in kept] + [exs[i].rejected for i in kept]
    policy = sequence_logps(subject.model, rows, tok.pad_token_id, settings.batch_size)
    if rule.kind == "implicit":
        with subject.reference() as ref:
            reference = sequence_logps(ref, rows, tok.pad_token_id, settings.batch_size)
    else:
        reference = [(0.0, n) for _, n in policy]

    def reward(p: tuple[float, int], r: tuple[float, int]) -> float:
        return rule.beta * (p[0] - r[0]) / (max(p[1], 1) if rule.per_token else 1)

    k = len(kept)
    out = [(math.nan, math.nan)] * len(records)
    for j, i in enumerate(kept):
        out[i] = (reward(policy[j], reference[j]), reward(policy[k + j], reference[k + j]))
    return out


def measure_preference(subject, records: list[dict], settings) -> dict[str, Any]:
    """Per pair: the score of chosen and rejected and whether chosen won; aggregate:
    accuracy (Wilson) and the mean margin (bootstrap), with the rule that scored them."""
    rule = preference_rule(subject)
    if rule.kind == "reward":
        scores = _reward_scores(subject, records, settings)
    else:
        scores = _logp_rewards(subject, records, settings, rule)
    items = []
    for r, (c, j) in zip(records, scores):
        if math.isnan(c) or math.isnan(j):
            items.append({"id": r["id"], "dropped": True})
        else:
            items.append({"id": r["id"], "chosen": c, "rejected": j, "margin": c - j, "passed": c > j})
    kept = [it for it in items if not it.get("dropped")]
    if not kept:
        raise TunesmithError(f"no pair of the preference suite fits max_length {settings.max_length}; "
                             f"raise --max-length")
    margins = [it["margin"] for it in kept]
    low, high = bootstrap_interval(margins)
    return {"items": items, "aggregate": {
        "n": len(kept), "dropped": len(items) - len(kept), "rule": rule.describe,
        "accuracy": rate_summary([it["passed"] for it in kept]),
        "margin": {"value": mean(margins), "low": low, "high": high},
    }}


# --- multiple choice by log-likelihood ---------------------------------------------------


def choose_by_loglik(subject, records: list[dict], settings) -> list[str | None]:
    """"X) option" for the multiple-choice records when ``settings.mc == "loglik"``; None for
    the records the model should answer by generating."""
    from tunesmith.data.tokenize import tokenize_unpaired

    out: list[str | None] = [None] * len(records)
    if settings.mc != "loglik":
        return out
    owners, examples = [], []
    for i, r in enumerate(records):
        if r.get("method") != "multiple_choice" or not r.get("options"):
            continue
        prompt = [{"role": "user", "content": r["prompt"]}]
        for o in r["options"]:
            rec = {"prompt": prompt, "completion": [{"role": "assistant", "content": o}], "label": True}
            examples.append(tokenize_unpaired(rec, subject.tokenizer, max_length=settings.max_length,
                                              chat=settings.chat()).completion)
            owners.append(i)
    scores = sequence_logps(subject.model, examples, subject.tokenizer.pad_token_id, settings.batch_size)
    for i in sorted(set(owners)):
        mine = [s for o, s in zip(owners, scores) if o == i]
        pick = pick_by_loglik([lp for lp, _ in mine], [n for _, n in mine])
        out[i] = f"{LETTERS[pick]}) {records[i]['options'][pick]}"
    return out
