"""Every training method, declared in one place: one row per ``method:`` of the run config.

A row says what the recipe needs to know, in the order it asks:

    check(cfg)          refusals that need no weights (run before anything loads)
    kinds               the record kinds its data files may hold (``data.schema.kind_of``)
    prepare(...)        records → the items ``collate`` receives (``base.Split``)
    reference(cfg)      the model its loss compares against: None, "sequence" (log-probs
                        per sequence: DPO family, KTO) or "token" (per token: GRPO's KL)
    rows_per_item(cfg)  sequences one item puts through the model (the memory estimate)
    task                "causal", or "score" for a sequence-classification head
    build(ctx)          the method object, with plain keyword arguments and its reference
    scoring(cfg)        recorded in run.json: how evaluation scores the trained model's
                        outputs (``evaluate.likelihood.preference_rule`` reads it)

Adding a method: a file under ``train/methods/`` with its ``Method`` subclass (and its
data preparation, if new), one row below, its name in ``config.RunConfig.method`` and
its config section. ``tests/test_methods_registry.py`` builds every row on a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith.config import RunConfig
from tunesmith.data.render import ChatOptions
from tunesmith.errors import TunesmithError
from tunesmith.train.methods import grpo, kto, preference, sft
from tunesmith.train.methods.base import Method, Split
from tunesmith.train.methods.losses import LENGTH_NORMALISED, REFERENCE_FREE
from tunesmith.train.methods.reference import Reference
from tunesmith.train.methods.reward import Reward


@dataclass
class BuildContext:
    """What ``build`` may use beyond the config: the tokenizer, the policy (GRPO samples
    from it), the reference, the autocast context and the run folder."""

    cfg: RunConfig
    tokenizer: Any
    model: Any
    reference: Reference
    autocast: Callable
    out: Path
    dtype: Any = None  # the compute dtype (torch.bfloat16 under bf16 autocast), None: fp32


@dataclass(frozen=True)
class MethodRow:
    kinds: frozenset[str]
    prepare: Callable[[list[dict], Any, RunConfig, str], Split]  # (records, tokenizer, cfg, "training"|"eval")
    build: Callable[[BuildContext], Method]
    scoring: Callable[[RunConfig], dict]
    reference: Callable[[RunConfig], str | None] = lambda cfg: None
    rows_per_item: Callable[[RunConfig], int] = lambda cfg: 1
    task: str = "causal"
    check: Callable[[RunConfig], None] = lambda cfg: None


# ---------------------------------------------------------------- the DPO family


def loss_type(cfg: RunConfig) -> str:
    """The pairwise loss a run trains with: ``method: ipo`` is ``method: dpo`` with
    ``loss_type: ipo`` (likewise simpo, orpo), so both spellings train and score alike."""
    return cfg.preference.loss_type if cfg.method == "dpo" else cfg.method


def _check_pairwise(cfg: RunConfig) -> None:
    if cfg.method == "dpo" and loss_type(cfg) not in ("sigmoid", "hinge", "ipo", "robust"):
        raise TunesmithError(f"preference.loss_type = {loss_type(cfg)!r} is not a DPO variant; use sigmoid, hinge, "
                             f"ipo or robust (or method: simpo / orpo)")


def _pairwise_reference(cfg: RunConfig) -> str | None:
    return None if loss_type(cfg) in REFERENCE_FREE else "sequence"


def _pairwise_scoring(cfg: RunConfig) -> dict:
    lt = loss_type(cfg)
    free = lt in REFERENCE_FREE
    return {"rule": "policy" if free else "implicit", "loss_type": lt, "beta": cfg.preference.beta,
            "per_token": lt in LENGTH_NORMALISED, "reference": not free}


def _build_pairwise(ctx: BuildContext) -> Method:
    p = ctx.cfg.preference
    return preference.Preference(ctx.tokenizer.pad_token_id, loss_type=loss_type(ctx.cfg), beta=p.beta,
                                 label_smoothing=p.label_smoothing, simpo_gamma=p.simpo_gamma,
                                 sft_weight=p.sft_weight, reference=ctx.reference)


def chat_options(cfg: RunConfig) -> ChatOptions:
    """How the run's records meet the chat template (``data.reasoning``, ``data.template_kwargs``)."""
    return ChatOptions(cfg.data.reasoning, dict(cfg.data.template_kwargs or {}))


def _prepare_pairs(records, tokenizer, cfg: RunConfig, what: str) -> Split:
    return preference.prepare_pairs(records, tokenizer, max_length=cfg.data.max_length,
                                    on_overflow=cfg.data.on_overflow, what=what,
                                    special_tokens_in_content=cfg.data.special_tokens_in_content, chat=chat_options(cfg))


# ---------------------------------------------------------------- the others


def _prepare_sft(records, tokenizer, cfg: RunConfig, what: str) -> Split:
    d = cfg.data
    return sft.prepare(records, tokenizer, max_length=d.max_length, train_on=d.train_on, packing=d.packing,
                       on_overflow=d.on_overflow, what=what, special_tokens_in_content=d.special_tokens_in_content,
                       chat=chat_options(cfg))


def _prepare_kto(records, tokenizer, cfg: RunConfig, what: str) -> Split:
    return kto.prepare(records, tokenizer, max_length=cfg.data.max_length, on_overflow=cfg.data.on_overflow,
                       what=what, seed=cfg.train.seed, special_tokens_in_content=cfg.data.special_tokens_in_content,
                       chat=chat_options(cfg))


def _check_kto(cfg: RunConfig) -> None:
    if cfg.train.batch_size < 2:
        raise TunesmithError("method kto needs train.batch_size >= 2 (its KL estimate averages over the "
                             "micro-batch; at 1 it would equal the example's own reward); raise it")


def _build_kto(ctx: BuildContext) -> Method:
    p = ctx.cfg.preference
    return kto.KTO(ctx.tokenizer.pad_token_id, beta=p.beta, desirable_weight=p.desirable_weight,
                   undesirable_weight=p.undesirable_weight, reference=ctx.reference)


def _build_grpo(ctx: BuildContext) -> Method:
    from tunesmith.train.methods.rewards import Rewards  # imports the user's reward code: only when asked

    g, cfg = ctx.cfg.grpo, ctx.cfg
    return grpo.GRPO(ctx.tokenizer, ctx.model, Rewards(g.reward_funcs, g.reward_weights, cfg.data.max_length),
                     num_generations=g.num_generations, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                     top_p=g.top_p, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                     loss_type=g.loss_type, scale_rewards=g.scale_rewards, autocast=ctx.autocast,
                     reference=ctx.reference, sample_dtype=ctx.dtype, log_path=ctx.out / "completions.jsonl",
                     log_completions=g.log_completions, logging_steps=cfg.train.logging_steps)


_PAIRWISE = MethodRow(kinds=frozenset({"preference"}), prepare=_prepare_pairs, build=_build_pairwise,
                      scoring=_pairwise_scoring, reference=_pairwise_reference, rows_per_item=lambda cfg: 2,
                      check=_check_pairwise)
_LOGLIK = {"rule": "loglik"}  # scored by the model's own likelihood: nothing preference-specific trained

METHODS: dict[str, MethodRow] = {
    "sft": MethodRow(kinds=frozenset({"sft", "text"}), prepare=_prepare_sft,
                     build=lambda ctx: sft.SFT(ctx.tokenizer.pad_token_id, packing=ctx.cfg.data.packing),
                     scoring=lambda cfg: _LOGLIK),
    "dpo": _PAIRWISE,
    "ipo": _PAIRWISE,
    "simpo": _PAIRWISE,
    "orpo": _PAIRWISE,
    "kto": MethodRow(kinds=frozenset({"unpaired", "preference"}), prepare=_prepare_kto, build=_build_kto,
                     scoring=lambda cfg: {"rule": "implicit", "loss_type": "kto", "beta": cfg.preference.beta,
                                          "per_token": False, "reference": True},
                     reference=lambda cfg: "sequence", rows_per_item=lambda cfg: 2, check=_check_kto),
    "reward": MethodRow(kinds=frozenset({"preference"}), prepare=_prepare_pairs,
                        build=lambda ctx: Reward(ctx.tokenizer.pad_token_id, margin=ctx.cfg.reward.margin,
                                                 center_coefficient=ctx.cfg.reward.center_coefficient),
                        scoring=lambda cfg: {"rule": "reward"}, rows_per_item=lambda cfg: 2, task="score"),
    "grpo": MethodRow(kinds=frozenset({"prompt", "sft"}),
                      prepare=lambda records, tok, cfg, what: grpo.prepare_prompts(
                          records, tok, max_length=cfg.data.max_length, max_new_tokens=cfg.grpo.max_new_tokens,
                          special_tokens_in_content=cfg.data.special_tokens_in_content, chat=chat_options(cfg)),
                      build=_build_grpo, scoring=lambda cfg: _LOGLIK,
                      reference=lambda cfg: "token" if cfg.grpo.beta > 0 else None,
                      rows_per_item=lambda cfg: cfg.grpo.num_generations),
}


def row(cfg: RunConfig) -> MethodRow:
    """The row of ``cfg.method``, after its refusals that need no weights."""
    if cfg.method not in METHODS:
        raise TunesmithError(f"method {cfg.method!r} is not available; use one of {', '.join(METHODS)}")
    r = METHODS[cfg.method]
    if cfg.data.packing and cfg.method != "sft":
        raise TunesmithError(f"data.packing applies to sft only; remove it for method {cfg.method}")
    r.check(cfg)
    return r
