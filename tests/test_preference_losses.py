"""Parity of tunesmith's preference losses with TRL 1.16, and their behaviour.

References, called on the same fixed tensors without building a trainer (a
``SimpleNamespace`` stands in for ``self``, carrying only the attributes the code reads):

- DPO sigmoid / hinge / ipo / robust: inline in ``trl.trainer.dpo_trainer.DPOTrainer._compute_loss``
  (TRL 1.x has no separate ``dpo_loss``). It runs a model forward, so the stub model returns
  fixed per-token log-probs (zero outside the completion, as TRL's fused LM head does for
  label -100) and the reference log-probs come in precomputed (``precompute_ref_logps``).
  The loss is a batch mean, so it is called once per pair to get per-pair losses; the
  rewards come from its ``_metrics``.
- cDPO (sigmoid + label smoothing): TRL 1.16's DPOTrainer ignores ``label_smoothing`` for
  sigmoid, so the reference is ``trl.experimental.cpo.CPOTrainer.cpo_loss`` (``loss_type=
  "sigmoid"``), fed the log-ratios π - ref as its "policy log-probs": its logits are then h.
- SimPO: ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``; ORPO: ``trl.experimental.orpo.
  ORPOTrainer.odds_ratio_loss`` (returns +λ logσ, i.e. minus our loss).
- KTO: inline in ``trl.trainer.kto_trainer.KTOTrainer._compute_loss`` (no ``kto_loss`` method in
  1.x), stubbed like DPO, called per example with the same mismatched-pair KL batch.

Precision: fp32 throughout (the trainer's dtype), except IPO in float64: TRL divides the
summed log-ratio by the length, we take averaged log-probs, and the fp32 rounding of the two
orders, amplified by the square around 1/(2β) = 5 at β = 0.1, reaches 6e-6 on these tensors.
Tolerance: atol 1e-6, rtol 0.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunesmith.train.methods.losses import (
    LENGTH_NORMALISED,
    PAIRWISE_LOSSES,
    REFERENCE_FREE,
    dpo_sigmoid_loss,
    kto_kl_estimate,
    kto_loss,
    nll_from_logps,
    orpo_loss,
    reward_metrics,
)

trl = pytest.importorskip("trl")
from trl import DPOTrainer, KTOTrainer  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning
    from trl.experimental.cpo import CPOTrainer  # noqa: E402
    from trl.experimental.orpo import ORPOTrainer  # noqa: E402

B, T = 16, 24  # pairs, sequence length (1 prompt token + up to 23 completion tokens)
CPU = torch.device("cpu")
ACCELERATOR = SimpleNamespace(device=CPU, gather=lambda t: t, gather_for_metrics=lambda t: t)


def close(ours, ref):
    torch.testing.assert_close(ours, torch.as_tensor(ref, dtype=ours.dtype), rtol=0, atol=1e-6)


def completions(n: int, seed: int, dtype=torch.float32):
    """n completions of 5..20 tokens: per-token log-probs (n, T-1) of policy and reference,
    zero outside the completion, and the completion mask (n, T) with the prompt token at 0.
    Per-token log p in [-3, -0.3] → summed log-probs about -40..-4; the reference differs
    by N(0, 0.5) per token, so |h| reaches a few nats."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 21, (n,), generator=g)
    mask = (torch.arange(T - 1) < lengths[:, None]).to(dtype)
    policy = -(0.3 + 2.7 * torch.rand(n, T - 1, generator=g, dtype=torch.float64))
    ref = (policy + 0.5 * torch.randn(n, T - 1, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    policy, ref = policy.to(dtype) * mask, ref.to(dtype) * mask
    completion_mask = torch.cat([torch.zeros(n, 1, dtype=torch.long), mask.long()], dim=1)
    return policy, ref, completion_mask


def pairs(dtype=torch.float32):
    """Per-token tensors of B pairs, and their summed log-probs and token counts, (B,) each."""
    pc, rc, mc = completions(B, seed=0, dtype=dtype)
    pr, rr, mr = completions(B, seed=1, dtype=dtype)
    return SimpleNamespace(
        tok=(pc, pr, rc, rr), masks=(mc, mr),
        logps=tuple(t.sum(1) for t in (pc, pr, rc, rr)),
        counts=(mc.sum(1).to(dtype), mr.sum(1).to(dtype)),
    )


def model_outputs(per_token_logps):
    zeros = torch.zeros_like(per_token_logps)
    return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                           is_top1=zeros.bool(), aux_loss=None)


def trainer_stub(**attrs):
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=ACCELERATOR, aux_loss_enabled=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **attrs)


def trl_dpo(loss_type: str, beta: float, data, label_smoothing: float = 0.0):
    """Per-pair (losses, chosen_rewards, rejected_rewards) from DPOTrainer._compute_loss, one call per pair."""
    pc, pr, _, _ = data.tok
    mc, mr = data.masks
    _, _, ref_c, ref_r = data.logps
    out = []
    for i in range(B):
        stub = trainer_stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                            loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                            use_weighting=False)
        inputs = {"input_ids": torch.zeros(2, T, dtype=torch.long),
                  "attention_mask": torch.ones(2, T, dtype=torch.long),
                  "completion_mask": torch.stack([mc[i], mr[i]]),  # batch is [chosen, rejected]
                  "ref_chosen_logps": ref_c[i:i + 1], "ref_rejected_logps": ref_r[i:i + 1]}
        outputs = model_outputs(torch.stack([pc[i], pr[i]]))
        loss = DPOTrainer._compute_loss(stub, lambda **_: outputs, inputs, return_outputs=False)
        m = stub._metrics["train"]
        out.append((loss.item(), m["rewards/chosen"][-1], m["rewards/rejected"][-1]))
    return [torch.tensor(col, dtype=pc.dtype) for col in zip(*out)]


def cpo_stub(loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
    return SimpleNamespace(alpha=0.0, accelerator=ACCELERATOR, loss_type=loss_type, beta=beta,
                           label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)


# --- DPO family -------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,beta,kwargs", [
    ("sigmoid", 0.1, {}),
    ("sigmoid", 0.5, {}),
    ("hinge", 0.1, {}),
    ("hinge", 0.5, {}),
    ("robust", 0.1, {"label_smoothing": 0.1}),
    ("robust", 0.5, {"label_smoothing": 0.3}),
    ("robust", 0.1, {"label_smoothing": 0.0}),
])
def test_dpo_family_matches_trl(loss_type, beta, kwargs):
    data = pairs()
    ours = PAIRWISE_LOSSES[loss_type](*data.logps, beta=beta, **kwargs)
    for o, t in zip(ours, trl_dpo(loss_type, beta, data, **kwargs)):
        close(o, t)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl(beta):
    data = pairs(torch.float64)
    n_c, n_r = data.counts
    pc, pr, rc, rr = data.logps
    losses, chosen_rewards, rejected_rewards = PAIRWISE_LOSSES["ipo"](pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=beta)
    trl_losses, trl_chosen, trl_rejected = trl_dpo("ipo", beta, data)
    close(losses, trl_losses)
    # TRL logs β x the summed log-ratio for every loss type; ours is per token for IPO.
    close(chosen_rewards * n_c, trl_chosen)
    close(rejected_rewards * n_r, trl_rejected)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (0.5, 0.25), (0.1, 0.0)])
def test_cdpo_matches_trl_cpo_sigmoid(beta, eps):
    data = pairs()
    pc, pr, rc, rr = data.logps
    ours = dpo_sigmoid_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    theirs = CPOTrainer.cpo_loss(cpo_stub("sigmoid", beta, label_smoothing=eps), pc - rc, pr - rr)
    for o, t in zip(ours, theirs):
        close(o, t)


def test_trl_dpo_sigmoid_ignores_label_smoothing():
    """Documents a TRL 1.16 difference: DPOTrainer's sigmoid is plain DPO whatever label_smoothing is."""
    data = pairs()
    close(dpo_sigmoid_loss(*data.logps, beta=0.1)[0], trl_dpo("sigmoid", 0.1, data, label_smoothing=0.2)[0])


# --- reference-free: SimPO, ORPO ----------------------------------------------------------


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.1)])
def test_simpo_matches_trl_cpo(beta, gamma, eps):
    data = pairs()
    avg_c, avg_r = data.logps[0] / data.counts[0], data.logps[1] / data.counts[1]
    ours = PAIRWISE_LOSSES["simpo"](avg_c, avg_r, beta=beta, gamma=gamma, label_smoothing=eps)
    theirs = CPOTrainer.cpo_loss(cpo_stub("simpo", beta, label_smoothing=eps, simpo_gamma=gamma), avg_c, avg_r)
    for o, t in zip(ours, theirs):
        close(o, t)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(beta):
    data = pairs()
    avg_c, avg_r = data.logps[0] / data.counts[0], data.logps[1] / data.counts[1]
    losses, chosen_rewards, rejected_rewards = PAIRWISE_LOSSES["orpo"](avg_c, avg_r, beta=beta)
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=beta, accelerator=ACCELERATOR), avg_c, avg_r)
    close(losses, -trl_losses)  # TRL returns λ logσ(·) and subtracts it
    close(chosen_rewards, trl_chosen)
    close(rejected_rewards, trl_rejected)


def test_orpo_is_the_papers_odds_ratio():
    """Eq. 7 written out directly in float64: odds = p / (1 - p), p = exp(avg log-prob)."""
    avg = -torch.tensor([[0.05, 0.7], [1.3, 0.2], [2.0, 2.5], [0.69, 0.7]], dtype=torch.float64)
    p_c, p_r = avg[:, 0].exp(), avg[:, 1].exp()
    expected = -0.1 * F.logsigmoid(torch.log((p_c / (1 - p_c)) / (p_r / (1 - p_r))))
    torch.testing.assert_close(orpo_loss(avg[:, 0], avg[:, 1], beta=0.1)[0], expected, rtol=0, atol=1e-12)


# --- KTO ---------------------------------------------------------------------------------


def test_kto_matches_trl():
    beta, w_d, w_u = 0.1, 1.0, 1.33
    policy_tok, ref_tok, mask = completions(B, seed=2)
    kl_policy_tok, kl_ref_tok, kl_mask = completions(B, seed=3)  # mismatched (prompt, completion) pairs
    kl_policy_tok = kl_policy_tok + 0.1 * kl_mask[:, 1:]  # policy above the reference: z0 ≈ 1.2 nats, not clamped
    desirable = torch.rand(B, generator=torch.Generator().manual_seed(4)) < 0.6
    assert 0 < desirable.sum() < B

    kl = kto_kl_estimate(kl_policy_tok.sum(1), kl_ref_tok.sum(1))
    assert kl > 0  # the clamp is not what makes the two agree
    losses, rewards = kto_loss(policy_tok.sum(1), ref_tok.sum(1), desirable, kl,
                               beta=beta, desirable_weight=w_d, undesirable_weight=w_u)

    def trl_kto(rows):
        stub = trainer_stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                            desirable_weight=w_d, undesirable_weight=w_u)
        stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
        n = len(rows)
        batch = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
                 "completion_mask": mask[rows], "label": desirable[rows], "ref_logps": ref_tok[rows].sum(1),
                 "KL_input_ids": torch.zeros(B, T, dtype=torch.long),
                 "KL_attention_mask": torch.ones(B, T, dtype=torch.long),
                 "KL_completion_mask": kl_mask, "ref_KL_logps": kl_ref_tok.sum(1)}
        # The stub model answers the main forward and the KL forward by which input_ids it gets.
        outputs = {id(batch["input_ids"]): model_outputs(policy_tok[rows]),
                   id(batch["KL_input_ids"]): model_outputs(kl_policy_tok)}
        loss = KTOTrainer._compute_loss(stub, lambda input_ids, **_: outputs[id(input_ids)], batch,
                                        return_outputs=False)
        return loss, stub._metrics["train"]

    for i in range(B):  # per example: TRL's loss is a mean, so one example per call
        loss, metrics = trl_kto([i])
        close(losses[i], loss)
        close(rewards[i], metrics["rewards/chosen" if desirable[i] else "rewards/rejected"][-1])
        close(kl, metrics["kl"][-1])

    loss, metrics = trl_kto(list(range(B)))  # whole batch: TRL's mean and group-mean rewards
    close(losses.mean(), loss)
    close(rewards[desirable].mean(), metrics["rewards/chosen"][-1])
    close(rewards[~desirable].mean(), metrics["rewards/rejected"][-1])


def test_kto_kl_estimate_clamps_at_zero_and_is_detached():
    policy = torch.tensor([-10.0, -12.0], requires_grad=True)
    ref = torch.tensor([-9.0, -11.0])  # mean(π - ref) = -1
    assert kto_kl_estimate(policy, ref).item() == 0.0
    assert kto_kl_estimate(policy, ref, clamp=False).item() == -1.0
    assert not kto_kl_estimate(policy + 3, ref).requires_grad


def test_kto_loss_directions():
    """A desirable completion's loss falls as its reward rises; an undesirable one's rises."""
    r = torch.linspace(-5, 5, 11)
    kl = torch.tensor(0.5)
    d, _ = kto_loss(r, torch.zeros(11), torch.ones(11, dtype=torch.bool), kl, beta=0.5)
    u, _ = kto_loss(r, torch.zeros(11), torch.zeros(11, dtype=torch.bool), kl, beta=0.5)
    assert (d.diff() < 0).all() and (u.diff() > 0).all()


# --- behaviour ---------------------------------------------------------------------------


def test_dpo_loss_falls_as_margin_grows():
    h = torch.linspace(-20, 20, 81)
    zero = torch.zeros_like(h)
    losses, _, _ = dpo_sigmoid_loss(h, zero, zero, zero, beta=0.1)
    assert (losses.diff() < 0).all()


def test_cdpo_minimum_sits_at_log_odds_of_the_smoothing():
    """With ε > 0 the loss bottoms out at βh = log((1-ε)/ε) instead of falling forever."""
    beta, eps = 0.1, 0.1
    h = torch.linspace(0, 60, 60001, dtype=torch.float64)
    zero = torch.zeros_like(h)
    losses, _, _ = dpo_sigmoid_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps)
    assert abs(h[losses.argmin()].item() - math.log((1 - eps) / eps) / beta) < 1e-2


def test_label_smoothing_zero_is_plain_dpo():
    data = pairs()
    pc, pr, rc, rr = data.logps
    expected = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
    close(dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)[0], expected)
    close(dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)[0], expected)


def test_reward_metrics_hand_made():
    chosen = torch.tensor([1.0, 2.0, 0.5, -1.0])
    rejected = torch.tensor([0.0, 3.0, 0.5, -2.0])  # chosen wins pairs 0 and 3; a tie does not count
    m = reward_metrics(chosen, rejected)
    assert {k: v.item() for k, v in m.items()} == {
        "rewards/chosen": 2.5, "rewards/rejected": 1.5, "rewards/margins": 1.0, "rewards/accuracies": 2.0}


def test_nll_from_logps_is_per_token_cross_entropy():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.arange(7) < torch.tensor([[7], [4], [1]])
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    ours = nll_from_logps((token_logps * mask).sum(1), mask.sum(1))
    expected = torch.stack([F.cross_entropy(logits[i][mask[i]], labels[i][mask[i]]) for i in range(3)])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_loss_table():
    assert set(PAIRWISE_LOSSES) == {"sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"}
    assert REFERENCE_FREE <= set(PAIRWISE_LOSSES) and LENGTH_NORMALISED <= set(PAIRWISE_LOSSES)
