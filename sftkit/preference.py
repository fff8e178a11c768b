"""Preference losses as pure functions of sequence log-probabilities, each written as its paper defines it.

DPO (Rafailov et al. 2023) with its variants: sigmoid with label smoothing (cDPO), IPO (Azar et al. 2023),
hinge (SLiC), robust (Chowdhury et al. 2024), and the RPO NLL term (Pang et al. 2024); ORPO (Hong et al.
2024), SimPO (Meng et al. 2024), CPO (Xu et al. 2024) and KTO (Ethayarajh et al. 2024).

A batch holds 2B sequences: for pairs the B chosen completions then the B rejected ones; for KTO the B
labelled completions then their B mismatched (prompt, other completion) sequences that estimate the KL
term. Inputs are per-sequence log-probabilities summed over the completion's tokens and the token counts;
the length-normalised methods (IPO, ORPO, SimPO) divide by the counts themselves. Each function returns
per-pair (KTO: per-example) losses, so a window's loss is their sum over the pairs of the window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RLHF_TYPES = ("dpo", "orpo", "simpo", "cpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCE_FREE = ("orpo", "simpo", "cpo")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "cpo": 0.1, "kto": 0.1}
METRIC_ORDER = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class PreferenceSettings:
    """Which preference loss, with its coefficients (ms-swift's / TRL's names)."""

    rlhf_type: str = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.rlhf_type not in REFERENCE_FREE

    @property
    def paired(self) -> bool:
        return self.rlhf_type != "kto"


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(z), with the label flipped with probability label_smoothing (conservative DPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None):
    """(losses, chosen rewards, rejected rewards); a reward is beta * log(pi / pi_ref) of a completion.

    h = log(pi(y_w)/pi_ref(y_w)) - log(pi(y_l)/pi_ref(y_l)); sigmoid: -log sigmoid(beta h) (smoothed); robust:
    the unbiased estimate under flipped labels, divided by 1 - 2 eps; hinge: max(0, 1 - beta h); ipo:
    (h' - 1/(2 beta))^2 with h' from per-token log-ratios, the normalisation IPO's authors confirmed to TRL.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * margin, label_smoothing)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  + label_smoothing * F.logsigmoid(-beta * margin)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got '{loss_type}'")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float):
    """(odds-ratio losses, chosen rewards, rejected rewards, log odds ratio) from per-token mean log-probabilities.

    ORPO's L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)), weighted by
    lambda (beta here, as TRL and ms-swift call it); the SFT term on the chosen is added by the caller.
    """
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach(), log_odds.detach()


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """(losses, chosen rewards, rejected rewards): -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma),
    with the per-token means given."""
    chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    losses = smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, label_smoothing: float = 0.0):
    """(losses, chosen rewards, rejected rewards): CPO's preference term -log sigmoid(beta (log pi(y_w) - log pi(y_l)));
    its NLL term on the chosen is added by the caller."""
    losses = smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_loss(completion: torch.Tensor, ref_completion: torch.Tensor, mismatched: torch.Tensor,
             ref_mismatched: torch.Tensor, desirable: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """(losses, rewards, KL estimate) for unpaired completions labelled desirable or not.

    r = log(pi(y|x) / pi_ref(y|x)); z0 = max(0, mean over mismatched pairs of log(pi(y'|x) / pi_ref(y'|x))),
    not differentiated; desirable: lambda_D (1 - sigmoid(beta (r - z0))), undesirable: lambda_U (1 - sigmoid(beta (z0 - r))).
    """
    kl = (mismatched - ref_mismatched).mean().clamp(min=0).detach()
    ratio = completion - ref_completion
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach(), kl


def chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen completion, per token: the SFT term of RPO, ORPO and CPO."""
    return -chosen / chosen_tokens.clamp(min=1)


def preference_losses(settings: PreferenceSettings, log_probs: torch.Tensor, tokens: torch.Tensor,
                      ref_log_probs: torch.Tensor | None = None, desirable: torch.Tensor | None = None):
    """(per-pair losses, metric totals {name: (sum, count)}) of one batch of 2B sequences (see the module doc).

    The totals add up across micro-batches and ranks; `summarise` turns a window's totals into the logged means.
    """
    half = log_probs.shape[0] // 2
    first, second, first_tokens, second_tokens = log_probs[:half], log_probs[half:], tokens[:half], tokens[half:]
    kind, beta, extra = settings.rlhf_type, settings.beta, {}
    if kind == "kto":
        losses, rewards, kl = kto_loss(first, ref_log_probs[:half], second, ref_log_probs[half:], desirable,
                                       beta=beta, desirable_weight=settings.desirable_weight,
                                       undesirable_weight=settings.undesirable_weight)
        return losses, _kto_totals(rewards, beta * kl, first.detach(), desirable, kl)
    if kind in ("orpo", "simpo"):
        first, second = first / first_tokens.clamp(min=1), second / second_tokens.clamp(min=1)
    if kind == "dpo":
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            first, second, ref_log_probs[:half], ref_log_probs[half:], beta=beta, loss_type=settings.loss_type,
            label_smoothing=settings.label_smoothing, chosen_tokens=first_tokens, rejected_tokens=second_tokens)
        nll_weight = settings.rpo_alpha
    elif kind == "orpo":
        losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(first, second, beta=beta)
        extra["log_odds_ratio"] = log_odds
        nll_weight = 1.0
    elif kind == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(first, second, beta=beta, gamma=settings.simpo_gamma,
                                                              label_smoothing=settings.label_smoothing)
        nll_weight = settings.cpo_alpha
    elif kind == "cpo":
        losses, chosen_rewards, rejected_rewards = cpo_loss(first, second, beta=beta, label_smoothing=settings.label_smoothing)
        nll_weight = settings.cpo_alpha
    else:
        raise ValueError(f"rlhf_type must be one of {', '.join(RLHF_TYPES)}, got '{kind}'")
    if nll_weight:
        nll = chosen_nll(log_probs[:half], first_tokens)
        losses = losses + nll_weight * nll
        extra["nll_loss"] = nll.detach()
    values = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
              "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
              "logps/chosen": first.detach(), "logps/rejected": second.detach(), **extra}
    return losses, {name: (value.sum(), value.new_tensor(float(half))) for name, value in values.items()}


def _kto_totals(rewards: torch.Tensor, baseline: torch.Tensor, log_probs: torch.Tensor, desirable: torch.Tensor,
                kl: torch.Tensor) -> dict:
    """KTO's rewards split by label; accuracy: the reward lies on the label's side of the baseline beta z0."""
    desirable_f = desirable.float()
    undesirable_f = 1 - desirable_f
    correct = torch.where(desirable, rewards > baseline, rewards < baseline).float()
    return {
        "rewards/chosen": ((rewards * desirable_f).sum(), desirable_f.sum()),
        "rewards/rejected": ((rewards * undesirable_f).sum(), undesirable_f.sum()),
        "rewards/accuracies": (correct.sum(), rewards.new_tensor(float(rewards.shape[0]))),
        "logps/chosen": ((log_probs * desirable_f).sum(), desirable_f.sum()),
        "logps/rejected": ((log_probs * undesirable_f).sum(), undesirable_f.sum()),
        "kl": (kl, rewards.new_tensor(1.0)),
    }


def summarise(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """A window's (or an evaluation's) metric totals as means, plus rewards/margins = mean chosen reward - mean
    rejected reward (for pairs the mean of the per-pair margins; for KTO, whose labels are unpaired, the only one)."""
    means = {name: total / count for name, (total, count) in totals.items() if count}
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    order = sorted(means, key=lambda name: (METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER), name))
    return {name: round(means[name], 6) for name in order}
