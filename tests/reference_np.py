"""Independent float64 NumPy references for the loss formulas, written from the papers/TRL math.

Nothing here imports cpo_jax: these are the tests' ground truth.
"""

from __future__ import annotations

import numpy as np


def logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def sig(x):
    return np.exp(logsig(x))


def smoothed(z, eps=0.0):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def g(u, kind="reverse_kl", alpha=0.5):
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1.0 - np.exp(-u)
    if kind == "js_divergence":
        return np.log(2.0) + logsig(u)
    if kind == "alpha_divergence":
        return (np.exp((alpha - 1.0) * u) - 1.0) / (alpha - 1.0)
    raise ValueError(kind)


def dpo_family(name, pc, pr, rc, rr, nc, nr, beta=0.1, eps=0.0, fdiv="reverse_kl", falpha=0.5, tau=0.05):
    """Per-pair loss of TRL 1.13 loss_type ``name``."""
    uw, ul = pc - rc, pr - rr
    sw, sl = g(uw, fdiv, falpha), g(ul, fdiv, falpha)
    delta = sw - sl
    delta_bar = sw / np.maximum(nc, 1) - sl / np.maximum(nr, 1)
    z = beta * delta
    if name == "sigmoid":
        return smoothed(z, eps)
    if name == "sigmoid_norm":
        return -logsig(beta * delta_bar)
    if name == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if name == "ipo":
        return (delta_bar - 1.0 / (2 * beta)) ** 2
    if name == "exo_pair":
        return sig(z) * (logsig(z) - np.log(1 - eps)) + sig(-z) * (logsig(-z) - np.log(eps))
    if name == "robust":
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if name == "discopop":
        m = sig(z / tau)
        return (1 - m) * -logsig(z) + m * np.exp(-z)
    if name == "nca_pair":
        a, b = beta * uw, beta * ul
        return -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)
    if name == "bco_pair":
        return -logsig(beta * uw) - logsig(-beta * ul)
    if name == "sppo_hard":
        return (uw - 0.5 / beta) ** 2 + (ul + 0.5 / beta) ** 2
    if name == "aot":
        d = np.sort(pc - pr) - np.sort(rc - rr)
        return smoothed(beta * d, eps)
    if name == "aot_unpaired":
        d = np.sort(uw) - np.sort(ul)
        return smoothed(beta * d, eps)
    if name == "apo_zero":
        return (1 - sig(beta * uw)) + sig(beta * ul)
    if name == "apo_down":
        return sig(beta * uw) + (1 - sig(beta * (uw - ul)))
    raise ValueError(name)


def batch_token_nll(pc, nc):
    """Per-pair values whose mean is TRL's token-mean NLL over the batch."""
    return -pc * np.sum(nc > 0) / np.sum(nc)


def reference_free(name, pc, pr, nc, nr, beta, gamma=None, eps=0.0, nll_coef=1.0):
    ac, ar = pc / nc, pr / nr
    if name == "sft":
        return batch_token_nll(pc, nc)
    if name == "simpo":
        return smoothed(beta * (ac - ar) - gamma, eps)
    if name == "orpo":
        log_odds = (ac - ar) - (np.log(1 - np.exp(ac)) - np.log(1 - np.exp(ar)))
        return batch_token_nll(pc, nc) - beta * logsig(log_odds)
    if name == "contrastive":
        return smoothed(beta * (pc - pr), eps) + nll_coef * batch_token_nll(pc, nc)
    raise ValueError(name)


def cpo_family(name, pc, pr, rc, rr, nc, nr, beta=0.1, gamma=0.5, tau=2.0, alpha=1.0, normalize=True):
    if normalize:
        pc, pr, rc0, rr0 = pc / nc, pr / nr, rc / nc, rr / nr
    else:
        rc0, rr0 = rc, rr
    d_theta, d_ref = pc - pr, rc0 - rr0
    if name == "cpo":
        t = d_ref + np.logaddexp(0.0, tau * (gamma - d_ref)) / (tau * alpha)
    elif name == "cpo_clip":
        t = np.maximum(d_ref, 0.0)
    elif name == "cpo_easy":
        t = d_ref + (gamma / beta) * (1.0 / (rc / nc) + 1.0 / (rr / nr))
    else:
        raise ValueError(name)
    return -logsig(beta * (d_theta - t))


def kto(policy, reference, desirable, kl, beta=0.1, wd=1.0, wu=1.0):
    u = policy - reference
    return np.where(desirable, wd * (1 - sig(beta * (u - kl))), wu * (1 - sig(beta * (kl - u))))


def kl_k(logp, ref, kind):
    d = logp - ref
    return {"k1": d, "k2": 0.5 * d * d, "k3": np.exp(-d) - 1 + d}[kind]


def rloo(rewards):
    p, k = rewards.shape
    out = np.zeros_like(rewards)
    for i in range(p):
        for j in range(k):
            others = [rewards[i, m] for m in range(k) if m != j]
            out[i, j] = rewards[i, j] - np.mean(others)
    return out


def grpo(rewards, eps=1e-4):
    mean = rewards.mean(-1, keepdims=True)
    std = rewards.std(-1, ddof=1, keepdims=True)
    return (rewards - mean) / (std + eps)


def gae(rewards, values, mask, gamma, lam):
    rewards, values = rewards * mask, values * mask
    b, t = rewards.shape
    adv = np.zeros_like(rewards)
    for i in range(b):
        last = 0.0
        for s in reversed(range(t)):
            next_v = values[i, s + 1] if s + 1 < t else 0.0
            delta = rewards[i, s] + gamma * next_v - values[i, s]
            last = delta + gamma * lam * last
            adv[i, s] = last
    adv = adv * mask
    return adv, adv + values


def aggregate(per_token, mask, mode):
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum()
    if mode == "seq_mean_token_mean":
        return np.mean((per_token * mask).sum(-1) / mask.sum(-1))
    if mode == "seq_mean_token_sum":
        return np.mean((per_token * mask).sum(-1))
    raise ValueError(mode)


def ppo(logp, old, adv, mask, eps_low, eps_high, mode):
    ratio = np.exp(logp - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    return aggregate(per_token, mask, mode)


def value(v, v_old, ret, mask, eps, mode):
    clipped = v_old + np.clip(v - v_old, -eps, eps)
    return 0.5 * aggregate(np.maximum((v - ret) ** 2, (clipped - ret) ** 2), mask, mode)


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
