"""Preference-optimisation losses: pure functions over per-sequence log-probabilities.

Every input is an fp32 tensor of shape (B,), one value per sequence, where a sequence's
log-probability is taken over its completion tokens only (the label-masking contract of
the data layer). What each loss wants:

    name       reference?  log-probs  hyper-parameters              paper
    sigmoid    yes         summed     beta, label_smoothing         DPO eq. 7 / cDPO
    robust     yes         summed     beta, label_smoothing         rDPO
    hinge      yes         summed     beta                          SLiC / RSO hinge
    ipo        yes         averaged   beta (= τ)                    IPO eq. 17
    simpo      no          averaged   beta, gamma, label_smoothing  SimPO eq. 6
    orpo       no          averaged   beta (= λ)                    ORPO eq. 6-7
    kto        yes         summed     beta, w_d, w_u, kl            KTO eq. 8 (unpaired)
    grpo       optional    per token  beta, epsilon(s)              GRPO eq. 3 (online, per token)

"summed" = sum of log p over the completion's tokens; "averaged" = that sum divided by the
completion's token count (the trainer divides; these functions never see token counts).
Reference-based losses take ``(chosen, rejected, ref_chosen, ref_rejected)``; the
reference-free ones take ``(chosen, rejected)``; see ``REFERENCE_FREE`` and
``LENGTH_NORMALISED``.

Pairwise losses return ``(losses, chosen_rewards, rejected_rewards)``, each (B,),
unreduced: the trainer sums them and divides by the pairs of the whole optimizer step, so
every pair weighs the same whatever micro-batch or process it lands in. Rewards are
detached and only logged. ORPO's NLL term and the optional SFT term
(``sft_weight * NLL(chosen)``) are added by the trainer; ``nll_from_logps`` gives the NLL.

Parity with TRL 1.16 (``DPOTrainer``, ``KTOTrainer``, ``trl.experimental`` CPO/ORPO) is
pinned in ``tests/test_preference_losses.py`` at atol 1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _margin(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
            ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (π_c - ref_c) - (π_r - ref_r), (B,): how much more the policy prefers chosen than the reference does."""
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def _implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, beta):
    """DPO's implicit rewards β·(π - ref), detached, (B,) each."""
    return beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def dpo_sigmoid_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                     ref_rejected_logps: torch.Tensor, *, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7), with conservative-DPO label smoothing (Mitchell 2023, cDPO).

    loss = -(1-ε) logσ(βh) - ε logσ(-βh),   h = (π_c - ref_c) - (π_r - ref_r)

    ε = 0 is plain DPO; ε > 0 treats each label as flipped with probability ε, so the loss
    stops rewarding margins past βh = log((1-ε)/ε) instead of pushing h to infinity.
    Inputs (B,): summed completion log-probs of policy and reference.
    Returns (losses, chosen_rewards, rejected_rewards), (B,) each; rewards = β(π - ref).

    TRL 1.16's ``DPOTrainer`` ignores ``label_smoothing`` for ``loss_type="sigmoid"`` (it
    only reads it for robust/exo_pair/aot); ``CPOTrainer``'s sigmoid keeps this cDPO form.
    """
    logits = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses, *_implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def robust_dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, *, beta: float, label_smoothing: float):
    """Robust DPO, rDPO (Chowdhury et al. 2024, "Provably Robust DPO"), TRL's ``robust``.

    loss = [-(1-ε) logσ(βh) + ε logσ(-βh)] / (1 - 2ε),   0 <= ε < 0.5

    ε is the assumed probability that a preference label is flipped; the de-biased loss is
    an unbiased estimate of the clean-label DPO loss (unlike cDPO, the ε term has a plus
    sign, and the loss is not bounded below). ε = 0 is plain DPO.
    Inputs (B,): summed completion log-probs. Returns (losses, chosen_rewards, rejected_rewards).
    """
    logits = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits)
              + label_smoothing * F.logsigmoid(-logits)) / (1 - 2 * label_smoothing)
    return (losses, *_implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def hinge_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, *, beta: float):
    """Hinge loss of SLiC (Zhao et al. 2023), in the reference-normalised form TRL uses.

    loss = relu(1 - βh)

    SLiC's calibration loss is max(0, δ - log π(y_c) + log π(y_r)) on raw policy log-probs;
    TRL (following RSO, Liu et al. 2024, "hinge-norm") uses the reference-normalised margin
    h, which is the same hinge with margin δ = 1/β. Pass zero reference log-probs for the
    reference-free SLiC form. Inputs (B,): summed completion log-probs.
    Returns (losses, chosen_rewards, rejected_rewards).
    """
    losses = torch.relu(1 - beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    return (losses, *_implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float):
    """IPO (Azar et al. 2023, eq. 17): squared distance of the margin from 1/(2τ), τ = beta.

    loss = (h - 1/(2β))²

    Inputs (B,): **length-averaged** log-probs (sum over completion tokens / token count),
    policy and reference; the trainer divides. Summed log-probs would make h, and the
    squared loss, grow with completion length; TRL divides by the completion length too
    (its comment: confirmed with the IPO authors, the paper's results use this form).
    Returns (losses, chosen_rewards, rejected_rewards); rewards = β(avg π - avg ref),
    which is what TRL logs divided by the token count (TRL logs β times the *summed*
    log-ratio for every loss type) — the trainer can log summed rewards instead.
    """
    losses = (_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) - 1 / (2 * beta)) ** 2
    return (losses, *_implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, target margin γ.

    loss = -(1-ε) logσ(β(avg_c - avg_r) - γ) - ε logσ(-(β(avg_c - avg_r) - γ))

    γ is the paper's reward margin, in reward units (TRL's ``CPOConfig.simpo_gamma``, default
    0.5): TRL writes it as logits = (avg_c - avg_r) - γ/β, then σ(β·logits) — the same
    thing. ε = ``label_smoothing`` as in TRL's CPO (0 in the paper).
    Inputs (B,): **length-averaged** policy log-probs; no reference model.
    Returns (losses, chosen_rewards, rejected_rewards); rewards = β·avg (the paper's r).
    """
    logits = beta * (chosen_logps - rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012): log1p(-exp(x)) loses
    precision near 0, log(-expm1(x)) far from it; they cross over at x = -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float):
    """ORPO's odds-ratio term (Hong et al. 2024, eq. 6-7), weighted by λ = beta (TRL's name).

    loss = -λ logσ(log odds_c - log odds_r),   log odds = avg - log(1 - exp(avg))

    The full objective (eq. 6) is NLL(chosen) + λ·L_OR; the trainer adds the NLL.
    Inputs (B,): **length-averaged** policy log-probs (< 0); no reference model.
    Returns (losses, chosen_rewards, rejected_rewards); rewards = β·avg, as TRL logs them.
    TRL's ``odds_ratio_loss`` returns +λ logσ(·) and subtracts its mean; this returns the
    loss itself. TRL's NLL term averages over prompt *and* completion tokens of the chosen
    sequence (eq. 2 of the paper is over the response only).
    """
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
    return -beta * F.logsigmoid(log_odds), beta * chosen_logps.detach(), beta * rejected_logps.detach()


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """KTO's reference point z₀ = max(0, mean(π - ref)) over mismatched (prompt, completion) pairs.

    Inputs (M,): summed completion log-probs of completions paired with *another* example's
    prompt (TRL shifts the batch's completions by one). Returns a detached scalar; no
    gradient flows through z₀ (KTO paper, Sec. 4).

    TRL averages the local mean across processes *before* clamping
    (``gather_for_metrics(kl).mean().clamp(min=0)``: the mean of per-process means). With
    several processes, call with ``clamp=False``, all-reduce the mean, then ``.clamp(min=0)``.
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    return kl.clamp(min=0) if clamp else kl


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8; TRL's comment cites it as eq. 7): unpaired.

    r = π - ref;  loss = w_d (1 - σ(β(r - z₀)))  if desirable
                         w_u (1 - σ(β(z₀ - r)))  otherwise

    Inputs: policy_logps, ref_logps (B,) summed completion log-probs; desirable (B,) bool;
    kl: z₀ from ``kto_kl_estimate`` (scalar, detached, >= 0).
    Returns (losses (B,), rewards (B,)) in input order; rewards = β r, detached. TRL
    averages all B losses together (``nanmean``), weights included, so w_d/w_u shift the
    weight between the two groups; its logged rewards/chosen and rewards/rejected are the
    means over the desirable and undesirable examples.
    """
    r = policy_logps - ref_logps
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, beta * r.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, margin: float = 0.0,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """Reward-model pairwise loss (Bradley-Terry; Ouyang et al. 2022, eq. 1), per pair (B,):

        -log σ(r_c - r_r - m) + c (r_c + r_r)²

    Inputs (B,): scalar scores of the chosen and rejected sequences. ``margin`` m asks for
    a gap (Llama 2's margin loss); ``center_coefficient`` c keeps rewards centred at 0
    (Eisenstein et al. 2023). The mean over pairs equals TRL ``RewardTrainer``'s loss with
    ``center_rewards_coefficient=c``.
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


def grpo_token_losses(logps: torch.Tensor, advantages: torch.Tensor, *, epsilon_low: float, epsilon_high: float,
                      ref_logps: torch.Tensor | None = None, beta: float = 0.0):
    """GRPO's per-token loss (Shao et al. 2024, eq. 3; clip-higher from DAPO, Yu et al. 2025):

        -min(ρ_t A, clip(ρ_t, 1-ε_low, 1+ε_high) A) + β KL_t,   ρ_t = π(o_t) / π_old(o_t)
        KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (the k3 estimator, as TRL)

    One optimizer step per generated batch, so π_old = π detached: ρ = 1 in value, with
    the gradient of the ratio. Inputs: ``logps`` (N, T-1) per-token log-probs of the
    completions, ``advantages`` (N,), ``ref_logps`` (N, T-1) when β > 0. Returns
    (per-token losses (N, T-1), ρ (N, T-1), KL_t (N, T-1) or None); masking and aggregation
    over tokens are the caller's (the ``loss_type``).
    """
    ratio = torch.exp(logps - logps.detach())
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta > 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    return per_token, ratio, kl


def nll_from_logps(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of each sequence, (B,): -logps / counts.

    logps (B,): summed log-probs over a sequence's trained tokens; counts (B,): how many.
    For the optional SFT term (``sft_weight * NLL(chosen)``) and ORPO's NLL term. TRL's
    DPO ``sft`` loss type and CPO/ORPO average over all tokens of the batch instead,
    sum(-logps) / sum(counts); the two agree when all completions have the same length.
    """
    return -logps / counts.clamp(min=1)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs (detached scalars) of TRL's reward metrics; divide by the pairs of the step to log.

    rewards/chosen, rewards/rejected, rewards/margins (chosen - rejected) and
    rewards/accuracies (pairs where chosen > rejected, strictly, as TRL counts).
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
    }


PAIRWISE_LOSSES = {
    "sigmoid": dpo_sigmoid_loss,
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
REFERENCE_FREE = frozenset({"simpo", "orpo"})  # called with (chosen, rejected) only
LENGTH_NORMALISED = frozenset({"ipo", "simpo", "orpo"})  # want log-probs averaged per token
