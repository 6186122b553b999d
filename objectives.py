"""
The per-mode pieces of the GRPO objective, each a small function of log-probs (B, T), logits and masks: group
advantages, the off-policy corrections (TIS's truncated weights, Sparse-RL's rejection sampling), the
sampler/learner mismatch, the clipped policy-gradient loss and the two KL terms (SMD's distillation, every
mode's reference KL; smd.kl_divergence). train.grpo_step adds them up. Not here: sampling, the learner passes,
optimisation.
"""

import math

import torch

import smd


def group_advantages(rewards, group_size):
    """rewards (B,) with B = n_prompts * group_size, group-major -> (B,) advantages, zero mean per group.
    A group whose samples all scored the same carries no signal and gets advantage exactly 0 (its mean
    can differ from its values in the last bit, which the division by a tiny std would blow up)."""
    r = rewards.view(-1, group_size)                                       # (n_prompts, G)
    adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=False) + 1e-6)
    uniform = (r == r[:, :1]).all(-1, keepdim=True)                        # (n_prompts, 1)
    return adv.masked_fill(uniform, 0.0).view(-1)


def tis_weights(lp_learner, lp_sampler, cap):
    """Truncated importance weights min(pi_learner / pi_sampler, cap), (B, T), no gradient: they correct
    for sampling from the compressed policy while training the full-cache one; the cap bounds the variance."""
    return torch.exp(lp_learner - lp_sampler).clamp(max=cap).detach()


def tis_diagnostics(lp_learner, lp_sampler, response_mask, cap):
    """verl's rollout-correction checks over response tokens: the effective sample size (sum w)^2 /
    (n sum w^2) of the truncated weights (1 = no correction needed; below 0.3 is a warning) and the fraction
    capped."""
    ratio = torch.exp(lp_learner - lp_sampler)[response_mask]             # (n_response_tokens,)
    w = ratio.clamp(max=cap)
    return (w.sum() ** 2 / (w.numel() * (w ** 2).sum())).item(), (ratio > cap).float().mean().item()


def sparse_rl_weights(lp_learner, lp_sampler, response_mask, low, high, veto):
    """Sparse-RL's correction as its released code runs it (slime's mis.py with mis.yaml: token-level
    truncated IS, token rejection and a sequence veto, weights normalised over the batch). With
    ratio = pi_learner / pi_sampler per response token:
      weights  min(ratio, high), divided by their mean over the batch's response tokens, no gradient;
      keep     response tokens with low <= ratio <= high, in sequences with no token ratio below veto.
    -> weights (B, T), keep (B, T) bool, fraction of response tokens outside [low, high], fraction of
    sequences rejected."""
    log_ratio = (lp_learner - lp_sampler).detach()                         # (B, T)
    ratio = log_ratio.clamp(-20.0, 20.0).exp()                             # slime's bound against overflow
    weights = ratio.clamp(max=high) * response_mask
    mean = weights.sum() / response_mask.sum().clamp(min=1)
    if mean > 1e-8:  # as slime: normalise unless every weight vanished
        weights = weights / mean
    in_range = (ratio >= low) & (ratio <= high)
    rejected = ((log_ratio < math.log(veto)) & response_mask).any(-1)      # (B,): the raw ratio, as slime
    keep = response_mask & in_range & ~rejected[:, None]
    outside = (response_mask & ~in_range).sum() / response_mask.sum().clamp(min=1)
    return weights, keep, outside.item(), rejected.float().mean().item()


def correction(cfg, lp_learner, lp_sampler, response_mask):
    """How a mode corrects for the sampler being another policy: per-token weights (None: all 1), the tokens
    the loss averages over, and the diagnostics it logs (None where the mode has none)."""
    weights, loss_mask, ess, capped, outside, rejected = None, response_mask, None, None, None, None
    if cfg["mode"] == "tis":
        weights = tis_weights(lp_learner, lp_sampler, cfg["tis_cap"])
        ess, capped = tis_diagnostics(lp_learner, lp_sampler, response_mask, cfg["tis_cap"])
    if cfg["mode"] == "sparse_rl":
        bounds = cfg["sparse_rl_low"], cfg["sparse_rl_high"], cfg["sparse_rl_veto"]
        weights, loss_mask, outside, rejected = sparse_rl_weights(lp_learner, lp_sampler, response_mask,
                                                                  *bounds)
    return weights, loss_mask, dict(tis_ess=ess, tis_capped=capped, sparse_rl_outside=outside,
                                    sparse_rl_rejected=rejected)


def mismatch(lp_learner, lp_sampler, response_mask):
    """Max |log pi_learner - log pi_sampler| and the mean k3 estimate of KL(sampler || learner)
    (exp(r) - 1 - r, r the log-ratio: unbiased and >= 0 per token) over response tokens."""
    r = (lp_learner - lp_sampler)[response_mask]                           # (n_response_tokens,)
    return r.abs().max().item(), (r.exp() - 1 - r).mean().item()


def grpo_loss(lp, lp_old, advantages, response_mask, clip_eps, weights=None):
    """Clipped-ratio policy-gradient loss, a mean over every response token of the batch (token-level, so a
    long response is not down-weighted) that response_mask keeps. lp, lp_old, weights (B, T); advantages (B,).
    -> loss, clip fraction."""
    ratio = torch.exp(lp - lp_old)                                         # (B, T)
    adv = advantages[:, None]                                              # (B, 1), one per sequence
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if weights is not None:
        per_token = per_token * weights
    token_mask = response_mask.to(lp.dtype)                               # (B, T): 1 on response tokens
    clipped = ((ratio - 1).abs() > clip_eps).to(lp.dtype)
    n = token_mask.sum().clamp(min=1)                                      # sparse_rl may drop every token
    return (per_token * token_mask).sum() / n, ((clipped * token_mask).sum() / n).item()


def distill_loss(cfg, masked_logits, unmasked_logits, ref_logits, response_mask):
    """SMD's distillation term (0 in the other modes and with distill_coef 0):
      unmasked_from_masked (the paper): KL(pi_unmasked || sg(pi_masked)), the unmasked pass learns from the
        masked one;
      masked_from_warmup_unmasked: KL(sg(pi_warm-up) || pi_masked), the masked pass learns from the
        warm-up."""
    if cfg["mode"] != "smd" or cfg["distill_coef"] == 0:
        return torch.zeros((), device=response_mask.device)
    if cfg["distill"] == "unmasked_from_masked":
        return smd.kl_divergence(unmasked_logits, masked_logits.detach(), response_mask, cfg["temperature"])
    return smd.kl_divergence(ref_logits, masked_logits, response_mask, cfg["temperature"])


def reference_kl(cfg, unmasked_logits, ref_logits, response_mask):
    """KL(pi_unmasked || pi_warm-up), every mode's anchor of the full-cache policy (0 with ref_kl_coef 0)."""
    if cfg["ref_kl_coef"] == 0:
        return torch.zeros((), device=response_mask.device)
    return smd.kl_divergence(unmasked_logits, ref_logits, response_mask, cfg["temperature"])
