"""GRPO (Shao et al. 2024, DeepSeekMath §4.1): online RL from sampled groups.

For every prompt the current policy samples G completions (KV cache, batched); each is
scored by the reward functions (``rewards.py``: Python ``module:function`` or a reward
model folder), weighted and summed; advantages are the rewards minus their group's mean
(divided by the group's std only with ``scale_rewards``, which Dr. GRPO shows biases
toward easy/hard prompts). The loss per completion token t is

    -min(ρ_t A, clip(ρ_t, 1-ε, 1+ε_high) A) + β KL_t,   ρ_t = π(o_t)/π_old(o_t),
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (the k3 estimator, as TRL)

with one optimizer step per generated batch, so π_old = π detached (ρ = 1, the clip
inactive but its gradient path identical to TRL's with ``num_iterations=1``; ``losses.grpo_token_losses``).
Aggregation (``loss_type``), as units handed to the engine (which divides the step's
summed loss by the step's units):
- ``grpo``: each completion's mean token loss, averaged over completions — biased
  toward short answers (a long wrong answer's per-token penalty is diluted);
- ``dapo``: token sum over all completions of the step / their token count;
- ``dr_grpo``: token sum / (completions x max_new_tokens), a constant (Liu et al. 2025).

Generation is the method's ``rollout`` (sample, score, advantages): the engine rolls out
every micro-batch of a step before the first backward, so all samples come from the same
policy and the units (tokens) are known up front. Sampling draws from torch's global RNG,
which checkpoints save, so a resumed run samples the same completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.schema import as_prompt
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_record
from tunesmith.errors import TunesmithError
from tunesmith.infer.decode import decode
from tunesmith.infer.generate import left_pad
from tunesmith.models.adapters import merged_adapter
from tunesmith.models.forward import TokenLogProbs
from tunesmith.models.templates import stop_token_ids
from tunesmith.train.methods.base import Method, Split
from tunesmith.train.methods.losses import grpo_token_losses
from tunesmith.train.methods.reference import Reference


@dataclass
class PromptItem:
    input_ids: list[int]           # the prompt rendered with the generation prompt (left-truncated)
    prompt: list[dict]             # its messages, for reward functions
    meta: dict = field(default_factory=dict)  # extra columns (e.g. a reference answer) for reward functions


def prepare_prompts(records: list[dict], tokenizer, *, max_length: int, max_new_tokens: int,
                    special_tokens_in_content: str = "error", chat: ChatOptions = DEFAULT_OPTIONS) -> Split:
    """Prompts, left-truncated so that prompt + ``max_new_tokens`` fits ``max_length``. An
    SFT record serves as a prompt too: its last assistant message becomes the ``answer``
    column that reward functions receive."""
    room = max_length - max_new_tokens
    if room < 8:
        raise TunesmithError(f"data.max_length {max_length} leaves {room} prompt tokens after "
                             f"grpo.max_new_tokens {max_new_tokens}; raise max_length or lower max_new_tokens")
    items = []
    for r in records:
        r = as_prompt(r, "answer")
        meta = dict(r.get("meta") or {})
        ex = tokenize_record({k: v for k, v in r.items() if k != "meta"}, tokenizer, max_length=room,
                             special_tokens_in_content=special_tokens_in_content, chat=chat)
        items.append(PromptItem(ex.input_ids, r["prompt"], meta))
    return Split(items, [len(p.input_ids) for p in items])


class GRPO(Method):
    wrap = TokenLogProbs

    def __init__(self, tokenizer, policy, rewards, *, num_generations: int, max_new_tokens: int,
                 temperature: float, top_p: float, beta: float, epsilon: float, epsilon_high: float | None,
                 loss_type: str, scale_rewards: bool, autocast, reference: Reference | None = None,
                 sample_dtype: torch.dtype | None = None,
                 log_path: Path | None = None, log_completions: int = 2, logging_steps: int = 1):
        self.tok, self.policy, self.rewards = tokenizer, policy, rewards
        self.G, self.max_new_tokens = num_generations, max_new_tokens
        self.temperature, self.top_p, self.beta = temperature, top_p, beta
        self.eps_low, self.eps_high = epsilon, epsilon_high if epsilon_high is not None else epsilon
        self.loss_type, self.scale_rewards, self.autocast = loss_type, scale_rewards, autocast
        self.sample_dtype = sample_dtype or torch.float32  # the run's compute dtype: decoding in bf16 where training is
        self.log_path, self.log_completions, self.logging_steps = log_path, log_completions, logging_steps
        # KL to the starting policy: its adapter disabled (default), or a frozen copy (full fine-tuning)
        self.reference = reference or Reference()
        self._logged_step: int | None = None  # completions are logged once per logging step
        # End of a completion: the tokenizer's EOS and the generation config's (e.g. <|eot_id|>).
        self.stop_ids = stop_token_ids(tokenizer, getattr(policy, "generation_config", None))

    # -- sampling ---------------------------------------------------------------------
    def _sample(self, items: list[PromptItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt ids (N,P) left-padded, prompt mask, completion ids (N,C) right-padded with
        pad), N = len(items) x G, rows of a group consecutive."""
        pad = self.tok.pad_token_id
        ids, mask = left_pad([it.input_ids for it in items], pad)
        ids, mask = ids.repeat_interleave(self.G, 0), mask.repeat_interleave(self.G, 0)
        device = next(self.policy.parameters()).device
        was_training = self.policy.training
        self.policy.eval()
        # merged: ~10x faster decoding on CPU; infer.decode: tunesmith's engine in the run's compute
        # dtype (SmolLM2, 16 rows, bf16: 319 new tokens/s against transformers' ~100 in fp32)
        with torch.no_grad(), merged_adapter(self.policy):
            completion = decode(self.policy, ids.to(device), mask.to(device), max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, top_p=self.top_p, stop_ids=self.stop_ids, pad_id=pad,
                                dtype=self.sample_dtype)
        self.policy.train(was_training)
        return ids, mask, completion.cpu().clone()  # a plain tensor, not an inference-mode one

    def _completion_mask(self, completion: torch.Tensor) -> torch.Tensor:
        """1 up to and including the first end-of-turn token (it trains: it is the decision
        to stop), 0 after; a completion that never stops is all 1."""
        C = completion.shape[1]
        stop = torch.isin(completion, torch.tensor(self.stop_ids))
        first = torch.where(stop.any(1), stop.int().argmax(1), torch.full((completion.shape[0],), C))
        return (torch.arange(C).unsqueeze(0) <= first.unsqueeze(1)).long()

    def collate(self, items: list[PromptItem]) -> dict:
        """The prompts only: completions are sampled in ``rollout``, with the policy of the step."""
        return {"items": items}

    def rollout(self, batch: dict, step: int | None) -> dict:
        """Sample G completions per prompt, score them, and turn the scores into advantages."""
        items = batch["items"]
        p_ids, p_mask, completion = self._sample(items)
        c_mask = self._completion_mask(completion)
        texts = self.tok.batch_decode(completion.masked_fill(c_mask == 0, self.tok.pad_token_id),
                                      skip_special_tokens=True)
        groups = [it for it in items for _ in range(self.G)]
        scores = self.rewards([it.prompt for it in groups], texts, [it.meta for it in groups])  # (N, F)
        total = scores.total
        grouped = total.view(-1, self.G)
        std = grouped.std(dim=1)
        adv = (grouped - grouped.mean(dim=1, keepdim=True))
        if self.scale_rewards:
            adv = adv / (std.unsqueeze(1) + 1e-4)
        input_ids = torch.cat([p_ids, completion], dim=1)
        attention = torch.cat([p_mask, c_mask], dim=1)
        labels = torch.cat([torch.full_like(p_ids, IGNORE_INDEX), completion.masked_fill(c_mask == 0, IGNORE_INDEX)], 1)
        lengths = c_mask.sum(1)
        n = len(groups)
        units = {"grpo": n, "dapo": int(lengths.sum()), "dr_grpo": n * self.max_new_tokens}[self.loss_type]
        if step is not None and step % self.logging_steps == 0 and step != self._logged_step:
            if self.log_path is not None and self.log_completions:
                self._write_samples(step, groups, texts, scores)
            self._logged_step = step
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "position_ids": (attention.cumsum(1) - 1).clamp(min=0), "advantages": adv.reshape(-1),
                "lengths": lengths, "units": units, "rewards": total, "reward_std": std,
                "reward_parts": scores.parts}

    def _write_samples(self, step: int, groups, texts, scores) -> None:
        with open(self.log_path, "a") as f:
            for i in range(min(self.log_completions, len(texts))):
                f.write(json.dumps({"step": step, "prompt": groups[i].prompt[-1]["content"],
                                    "completion": texts[i], "reward": float(scores.total[i]),
                                    **{f"reward/{k}": float(v[i]) for k, v in scores.parts.items()}}) + "\n")

    # -- loss -------------------------------------------------------------------------
    def units(self, batch: dict) -> int:
        return int(batch["units"])

    def loss(self, module, batch: dict):
        inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}
        logp, mask = module(**inputs)                                   # (N, T-1)
        maskf = mask.float()
        ref = self.reference(module, {}, inputs) if self.beta > 0 else None  # per-token, no grad
        per_token, ratio, kl = grpo_token_losses(logp, batch["advantages"], epsilon_low=self.eps_low,
                                                 epsilon_high=self.eps_high, ref_logps=ref, beta=self.beta)
        adv = batch["advantages"].unsqueeze(1)
        metrics = {}
        tokens = maskf.sum()
        if kl is not None:
            metrics.update({"kl": (kl.detach() * maskf).sum(), "n:kl": tokens})
        per_seq = (per_token * maskf).sum(1)
        loss = (per_seq / batch["lengths"].clamp(min=1)).sum() if self.loss_type == "grpo" else per_seq.sum()
        n = len(batch["rewards"])
        is_clipped = ((ratio < 1 - self.eps_low) & (adv < 0)) | ((ratio > 1 + self.eps_high) & (adv > 0))
        metrics.update({
            "reward": batch["rewards"].sum(), "n:reward": n,
            "reward_std": batch["reward_std"].sum(), "n:reward_std": len(batch["reward_std"]),
            "completion_length": batch["lengths"].float().sum(), "n:completion_length": n,
            "clip_ratio": (is_clipped.float() * maskf).sum(), "n:clip_ratio": tokens,
        })
        for name, vals in batch["reward_parts"].items():
            metrics[f"rewards/{name}"] = vals.sum()
            metrics[f"n:rewards/{name}"] = n
        return loss, metrics
