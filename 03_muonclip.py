"""Chapter 3: MuonClip, the Muon optimizer with QK-Clip (Kimi K2 report, section 2.1).

Muon (Jordan et al. 2024) treats a weight matrix as a matrix, not as a bag of numbers. It keeps
momentum like SGD, but before applying it replaces the momentum matrix M = U S Vᵀ by (roughly) its
"orthogonal part" U Vᵀ: every direction the gradient points in gets the same step size, so rare
directions are not drowned out by the dominant ones. U Vᵀ is computed with five Newton-Schulz
iterations (only matmuls, no SVD). Moonlight (arXiv:2502.16982) made it scale: add weight decay and
scale the update by 0.2·√max(A, B) so its RMS (root mean square) matches AdamW's (about 0.2); then AdamW's lr and weight
decay carry over, and Muon reaches the same loss with about 52% of AdamW's training FLOPs.

Kimi K2 (arXiv:2507.20534, §2.1) found one failure when scaling Muon up: attention logits explode.
The max pre-softmax logit S_max of some heads grows past 1000 and training becomes unstable. QK-Clip
is the fix: after each optimizer step, for each head h whose S_max^h (recorded in the forward) exceeds
tau, rescale that head's query and key weights by γ_h = tau / S_max^h, split as √γ_h on each side
(γ_h on the rope query, since the rope key is shared by all heads). The forward is untouched; the
clip only acts on heads that misbehave, and it deactivates itself once the logits settle (K2 Fig. 2:
S_max capped at 100 early on, then decaying below it). Muon + weight decay + RMS matching + QK-Clip
is MuonClip (K2 Algorithm 1); K2 pre-trained 15.5T tokens with it without a single loss spike.

Design choices
- One routing function `split_params` decides Muon vs AdamW, by module type and shape, and tests check
  that every parameter lands in exactly one group.
- `MuonClip` is one `torch.optim.Optimizer` with two kinds of param groups (`use_muon` True/False), so
  LR schedulers, `state_dict` and `load_state_dict` work as usual; QK-Clip runs inside `step()`.
- Momentum in the textbook form M ← μM + G (torch.optim.Muon keeps the exponential-moving-average (EMA) form M ← μM + (1-μ)G; the
  Newton-Schulz normalisation makes the two identical up to eps, and a test checks it).
- Newton-Schulz in fp32 by default (we run on CPUs; bf16 is what GPUs use and an option here).
- 3-D expert stacks (E, out, in) are orthogonalised per expert matrix, batched over E.
- QK-Clip uses the S_max of the forwards that produced the gradient (K2 Algorithm 1): the max over every
  micro-batch of the step (MLA.step_s_max, fp32), consumed by the clip so it is never applied twice; a
  `reduce_max` hook MAX-all-reduces it over replicas (chapter 4). The next forward can sit above tau by
  however much that one update moved the logits; it is a cap with one step of lag.
- Optimizer state (momentum, AdamW moments) is fp32 even for a bf16 model.
- Muon vs AdamW is measured as Moonlight does: validation loss on held-out documents, and the tokens Muon
  needs to reach AdamW's final loss over AdamW's tokens, per width, each optimizer at the best lr of its
  own grid (both grids scaled by 64/width), 3 seeds. Only the hidden matrices change optimizer: the Muon
  runs keep AdamW at the AdamW side's best lr for embeddings, head and norms.

Simplified vs K2
- Single process. K2 runs Muon on ZeRO-1 shards (ZeRO stage 1: each data-parallel rank keeps the optimizer
  state of only a slice of the parameters; Muon gathers the full matrix, runs Newton-Schulz, keeps the local
  slice); chapter 4 does that.
- K2's MuonClip clips heads per layer with tau = 100 over 15.5T tokens; the demo uses a tiny model, a
  synthetic language and a small tau to make the explosion and the clip visible in minutes on a CPU.
- The Muon-vs-AdamW comparison (Moonlight Fig. 3 in miniature) trains 2-layer K2-shaped models of width
  32 and 64 (43k and 133k parameters; --widths for more) for 2048 (default) or 4096 (README) tokens per unit
  of width on chapter 5's synthetic text, with 4-point lr grids; Moonlight fits compute-optimal scaling
  laws over models of up to 1.5B activated parameters.

References
- K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024 (blog + code).
- J. Liu et al., "Muon is Scalable for LLM Training" (Moonlight), arXiv:2502.16982, §2 (weight decay,
  update RMS matching), §3 (distributed Muon), Fig. 3 (≈2x compute efficiency).
- Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534, §2.1 (MuonClip, Algorithm 1, Fig. 2).

Run:
  python 03_muonclip.py --help
  python 03_muonclip.py                  # both demos (4.4 min of CPU, demo 1 ~1.5 of it; partial results as it goes)
  python 03_muonclip.py --demo muon_vs_adamw --tokens-per-width 4096 --seeds 0,1,2 --json muon.json  # README
  python 03_muonclip.py --demo qk_clip --tau 8
  python 03_muonclip.py --bench          # only the optimizer overhead vs forward-backward (no demos)
"""

import argparse
import importlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import cli

mla = importlib.import_module("02_mla")

# ---- Newton-Schulz: the orthogonal part of a matrix with matmuls only ----

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of the quintic, tuned for a steep slope at 0 (Jordan 2024)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                                eps: float = 1e-7) -> torch.Tensor:
    """Approximate U·Vᵀ of G = U·S·Vᵀ, batched over leading dims: (..., A, B) -> (..., A, B).

    The quintic p(x) = a·x + b·x³ + c·x⁵ acts on every singular value of X separately (X Xᵀ X has the
    same U, V and cubes S). Iterating it pushes each singular value in (0, 1] towards 1. The coefficients
    are tuned for speed, not convergence: after 5 steps the singular values sit in a band around 1
    (about 0.7 to 1.2) instead of exactly 1, which trains just as well. The exact answer is
    `U @ Vh` from `torch.linalg.svd(G, full_matrices=False)`; the test compares the two.

    dtype: compute precision. fp32 is the CPU default; bf16 is what GPU runs use (and torch.optim.Muon).
    """
    if G.ndim < 2:
        raise ValueError(f"G must have at least 2 dims (..., A, B), got shape {tuple(G.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    wide = X.size(-2) <= X.size(-1)
    if not wide:
        X = X.mT  # (..., B, A): work on the wide side so X Xᵀ is the small Gram matrix
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # ||X||_F = 1 ⇒ every singular value <= 1
    lead, (m, n) = X.shape[:-2], X.shape[-2:]
    X = X.reshape(-1, m, n)  # (N, m, n), N = product of leading dims (experts), m <= n
    for _ in range(steps):
        A = X @ X.mT  # (N, m, m) Gram matrix
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # B = b·A + c·A·A  (one fused op: one rounding in bf16)
        X = torch.baddbmm(X, B, X, beta=a)  # X = a·X + B·X = a X + b (X Xᵀ) X + c (X Xᵀ)² X
    X = X.reshape(*lead, m, n)
    if not wide:
        X = X.mT
    return X.to(G.dtype)


# ---- Muon: momentum, orthogonalise, scale, step ----

SCALINGS = ("match_rms_adamw", "original")


def update_scale(shape: torch.Size, scaling: str) -> float:
    """Factor applied to the orthogonalised update of an (A, B) matrix (last two dims of `shape`).

    An A x B matrix with orthonormal rows/columns has RMS 1/√max(A, B), so
    "match_rms_adamw" (Moonlight §2.2): 0.2·√max(A, B) gives every matrix the update RMS 0.2 of a
    typical AdamW update, and AdamW's lr and weight decay carry over.
    "original" (Jordan): √max(1, A/B), only corrects tall matrices.
    """
    A, B = shape[-2], shape[-1]
    if scaling == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if scaling == "original":
        return math.sqrt(max(1.0, A / B))
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


@torch.no_grad()
def muon_update_(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, *, lr: float, momentum: float,
                 nesterov: bool, weight_decay: float, ns_steps: int, ns_dtype: torch.dtype,
                 scaling: str) -> None:
    """One Muon step on one parameter (2-D, or a stack (E, A, B) handled one matrix at a time)."""
    buf.mul_(momentum).add_(grad)  # M_t = μ M_{t-1} + G_t
    m = grad.add(buf, alpha=momentum) if nesterov else buf  # Nesterov: G_t + μ M_t
    O = zeropower_via_newtonschulz5(m, ns_steps, ns_dtype)  # O_t ≈ U Vᵀ per matrix (batched over E)
    p.mul_(1.0 - lr * weight_decay)  # W ← W - lr·λ·W  (decoupled decay, unadjusted lr)
    p.add_(O, alpha=-lr * update_scale(p.shape, scaling))  # W ← W - lr·0.2·√max(A,B)·O_t


@torch.no_grad()
def adamw_update_(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                  eps: float, weight_decay: float) -> None:
    """One AdamW step (Loshchilov & Hutter) on one parameter; matches torch.optim.AdamW (tested)."""
    beta1, beta2 = betas
    grad = grad.float()  # the moments are fp32 (see step_param_)
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(grad, 1 - beta1)  # m ← β1 m + (1-β1) g
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β2 v + (1-β2) g²
    denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps)  # √v̂ + ε
    p.mul_(1.0 - lr * weight_decay)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))  # W ← W - lr·m̂/(√v̂+ε)


def _check_hparams(lr: float, momentum: float, weight_decay: float, ns_steps: int, scaling: str) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(ns_steps, int) and ns_steps >= 1):
        raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


class Muon(torch.optim.Optimizer):
    """Muon for matrices (2-D, or 3-D expert stacks (E, A, B) orthogonalised per expert).

    Per matrix W (A x B): M ← μM + G;  O = NS5(G + μM);  W ← W - lr·(scale(A, B)·O + λ·W).
    """

    def __init__(self, params: Iterable, lr: float = 2e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32,
                 scaling: str = "match_rms_adamw"):
        _check_hparams(lr, momentum, weight_decay, ns_steps, scaling)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, scaling=scaling)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"params for Muon must be 2-D matrices or 3-D stacks, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                _muon_step_param(p, self.state[p], group)
        return loss


def _muon_step_param(p: torch.Tensor, state: dict, group: dict) -> None:
    """One Muon update of one parameter with its group's hyperparameters (shared by Muon and MuonClip).
    The momentum is fp32 whatever the parameter's dtype (a bf16 model keeps fp32 optimizer state)."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
    muon_update_(p, p.grad, state["momentum_buffer"], lr=group["lr"], momentum=group["momentum"],
                 nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                 ns_steps=group["ns_steps"], ns_dtype=group["ns_dtype"], scaling=group["scaling"])


# ---- Routing: which parameter goes to which optimizer ----

def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """The one routing function -> (muon_params, adamw_params), each a list of (name, parameter).

    Muon: every hidden matrix, i.e. 2-D weights of attention projections, dense FFNs and shared experts,
    the router weight, and 3-D expert stacks (E, out, in).
    AdamW: the token embedding and the output head (their rows are looked up / scored one token at a
    time, not mixed as a linear map on the hidden state; Jordan 2024, Moonlight §2), RMSNorm weights
    and any other vector. The router's balance bias `e_score_correction_bias` is a buffer updated by
    the sign rule (chapter 1), so it is in neither list.
    """
    muon, adamw, seen = [], [], set()
    for mod_name, module in model.named_modules():
        embedding_or_head = isinstance(module, nn.Embedding) or mod_name.split(".")[-1] == "lm_head"
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied embeddings: the head shares the embedding's tensor
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim in (2, 3) and not embedding_or_head:
                muon.append((name, p))
            else:
                adamw.append((name, p))
    return muon, adamw


# ---- QK-Clip: cap each head's max attention logit after the step ----

def _mla_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules with MLA's row layout (chapter 2), in layer order."""
    return [m for m in model.modules() if isinstance(m, mla.MLA)]


def set_record_s_max(model: nn.Module, flag: bool) -> None:
    """Turn the per-head S_max recording of every MLA layer on or off."""
    if hasattr(model, "set_record_s_max"):
        model.set_record_s_max(flag)
    else:
        for m in _mla_modules(model):
            m.record_s_max = flag


@torch.no_grad()
def qk_clip_(model: nn.Module, tau: float = 100.0, apply: bool = True,
             reduce_max: Callable[[torch.Tensor], None] | None = None) -> dict:
    """QK-Clip (K2 §2.1, Algorithm 1), after the optimizer step, from the step's S_max.

    The step's S_max^h is the max over every recording forward since the last call (all micro-batches of the
    step: MLA.step_s_max); this call consumes it, so a stale S_max is never applied twice (a second call
    without a forward in between raises). `reduce_max`, if given, MAX-all-reduces the (L, H) fp32 tensor in
    place over the ranks that hold replicas of these layers (chapter 4), so every replica clips identically.

    Per layer and head h with S_max^h > tau:
        γ_h = tau / S_max^h
        W_qc^h ← √γ_h·W_qc^h   (q_nope rows of q_b_proj / q_proj)
        W_kc^h ← √γ_h·W_kc^h   (k_nope rows of kv_b_proj)
        W_qr^h ← γ_h·W_qr^h    (q_rope rows; the rope key W_kr is shared by all heads, so left alone)
    Both parts of the logit q·k = q_nope·k_nope + q_rope·k_rope then shrink by exactly γ_h, so the
    same batch would now peak at tau. Value rows and the shared W_kr (kv_a_proj_with_mqa rows
    [kv_lora_rank:]) are untouched. apply=False only measures (monitoring mode).

    Returns a dict: s_max (L, H) as recorded, clipped (L, H) bool, n_clipped, frac_clipped,
    max_s_max_per_layer (list of L floats), max_s_max.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    layers = _mla_modules(model)
    if not layers:
        raise ValueError("qk_clip_: model has no MLA layers")
    if any(getattr(attn, "step_s_max", None) is None for attn in layers):
        raise RuntimeError("qk_clip_: no S_max recorded since the last clip; call set_record_s_max(model, True) "
                           "and run a forward")
    s_all = torch.stack([attn.step_s_max.float() for attn in layers])  # (L, H) max over the step's micro-batches
    for attn in layers:
        attn.step_s_max = None  # consumed: the next step starts a fresh max
    if reduce_max is not None:
        reduce_max(s_all)  # S_max ← max over replicas (all-reduce MAX)
    for attn, s_max in zip(layers, s_all):
        clip = s_max > tau  # (H,)
        if not apply or not clip.any():
            continue
        gamma = torch.where(clip, tau / s_max, torch.ones_like(s_max))  # (H,) γ_h, 1 for heads below tau
        H, dn, dr, dv = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
        q_lin = attn.q_b_proj if attn.q_lora_rank else attn.q_proj
        w_q = q_lin.weight.view(H, dn + dr, -1)  # (H, dn+dr, in), a view: edits land in the weight
        w_q[:, :dn].mul_(gamma.sqrt().view(H, 1, 1).to(w_q.dtype))  # W_qc ← √γ·W_qc
        w_q[:, dn:].mul_(gamma.view(H, 1, 1).to(w_q.dtype))  # W_qr ← γ·W_qr
        w_kv = attn.kv_b_proj.weight.view(H, dn + dv, -1)  # (H, dn+dv, kv_lora_rank)
        w_kv[:, :dn].mul_(gamma.sqrt().view(H, 1, 1).to(w_kv.dtype))  # W_kc ← √γ·W_kc ; values untouched
    clipped = s_all > tau
    return dict(s_max=s_all, clipped=clipped, n_clipped=int(clipped.sum()), frac_clipped=float(clipped.float().mean()),
                max_s_max_per_layer=s_all.max(dim=1).values.tolist(), max_s_max=float(s_all.max()))


# ---- MuonClip: one optimizer object ----

class MuonClip(torch.optim.Optimizer):
    """Muon for hidden matrices + AdamW for the rest + QK-Clip after every step (K2 Algorithm 1).

    One optimizer with two kinds of param groups (group["use_muon"]), so schedulers and state_dict work
    as for any torch optimizer. `lr` is Muon's lr (on AdamW's scale thanks to RMS matching, in demo 1 the best
    Muon lr is 2-4x AdamW's); `adamw_lr` is the lr of embeddings, head, norms. Constructing it turns on S_max recording in
    every MLA layer (eval forwards with recording on also count toward the step's S_max: turn it off around
    them); `s_max_reduce` is the all-reduce MAX hook of `qk_clip_`; `step()` returns the loss of the closure, if any, and leaves the QK-Clip stats in
    `self.clip_stats`.
    """

    def __init__(self, model: nn.Module, lr: float = 2e-3, adamw_lr: float = 2e-3, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.1, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, adamw_weight_decay: float = 0.1, tau: float = 100.0, qk_clip: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32, scaling: str = "match_rms_adamw",
                 s_max_reduce: Callable[[torch.Tensor], None] | None = None):
        _check_hparams(lr, momentum, weight_decay, ns_steps, scaling)
        if not adamw_lr >= 0.0:
            raise ValueError(f"adamw_lr must be >= 0, got {adamw_lr}")
        if not all(0.0 <= b < 1.0 for b in adamw_betas):
            raise ValueError(f"adamw_betas must each be in [0, 1), got {adamw_betas}")
        if not adamw_weight_decay >= 0.0:
            raise ValueError(f"adamw_weight_decay must be >= 0, got {adamw_weight_decay}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        muon_named, adamw_named = split_params(model)
        groups = [
            dict(params=[p for _, p in muon_named], use_muon=True, lr=lr, momentum=momentum, nesterov=nesterov,
                 weight_decay=weight_decay, ns_steps=ns_steps, ns_dtype=ns_dtype, scaling=scaling),
            dict(params=[p for _, p in adamw_named], use_muon=False, lr=adamw_lr, betas=tuple(adamw_betas),
                 eps=adamw_eps, weight_decay=adamw_weight_decay),
        ]
        super().__init__([g for g in groups if g["params"]], {})
        self.model, self.tau, self.qk_clip = model, tau, qk_clip
        self.s_max_reduce = s_max_reduce  # e.g. an all-reduce MAX over data-parallel replicas (chapter 4)
        self.clip_stats: dict | None = None
        set_record_s_max(model, True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    step_param_(p, self.state[p], group)
        # QK-Clip reads the S_max of the forwards that produced these gradients (K2 Alg. 1, after the update).
        self.clip_stats = qk_clip_(self.model, self.tau, apply=self.qk_clip, reduce_max=self.s_max_reduce)
        return loss


def step_param_(p: torch.Tensor, state: dict, group: dict) -> None:
    """MuonClip's update of one parameter: Muon or AdamW by its group. Optimizer state is fp32 even for bf16
    parameters. Chapter 4's ZeRO-1 calls this on the parameters a rank owns."""
    if group["use_muon"]:
        _muon_step_param(p, state, group)
        return
    if "step" not in state:
        state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                     exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
    adamw_update_(p, p.grad, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                  weight_decay=group["weight_decay"])


# ---- A toy language that a tiny model can learn in minutes ----

def toy_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int, n_symbols: int = 64,
                successors: int = 4):
    """Endless (idx, targets) batches of a seeded synthetic language, no downloads.

    A sentence is a walk on a sparse random "grammar" (each symbol has `successors` allowed next symbols
    with Zipf-like probabilities), and its second half repeats the first half (a quote). Three things to
    learn at different speeds: symbol frequencies, the grammar (bigrams), and copying (an induction head
    that needs sharp attention, which is what makes attention logits grow in the QK-Clip demo).
    """
    if not 2 <= n_symbols <= vocab_size:
        raise ValueError(f"n_symbols must be in [2, vocab_size={vocab_size}], got {n_symbols}")
    if not 1 <= successors <= n_symbols:
        raise ValueError(f"successors must be in [1, n_symbols={n_symbols}], got {successors}")
    g = torch.Generator().manual_seed(seed)
    n = n_symbols
    nxt = torch.stack([torch.randperm(n, generator=g)[:successors] for _ in range(n)])  # (n, successors)
    probs = 1.0 / torch.arange(1, successors + 1).float()  # Zipf: 1, 1/2, 1/3, ...
    half = (seq_len + 2) // 2
    while True:
        x = torch.empty(batch_size, half, dtype=torch.long)
        x[:, 0] = torch.randint(n, (batch_size,), generator=g)
        choice = torch.multinomial(probs.expand(batch_size * half, -1), 1, generator=g).view(batch_size, half)
        for t in range(1, half):
            x[:, t] = nxt[x[:, t - 1], choice[:, t]]
        seq = torch.cat([x, x], dim=1)[:, : seq_len + 1]  # (B, S+1): sentence, then its quote
        yield seq[:, :-1], seq[:, 1:]


def text_corpus(n_tokens: int, seed: int, n_people: int = 400) -> torch.Tensor:
    """n_tokens byte tokens of chapter 5's synthetic text, a corpus with structure at several depths.

    Half the documents are biographies of a fixed world of people (chapter 5's KnowledgeWorld, 4 facts
    each), rewritten in a random one of its four styles; the other half are worked arithmetic problems
    with fresh numbers. A model learns the byte statistics first, then the templates, then the facts of
    each person (memorisation) and the arithmetic of the solutions, which keeps the loss falling long after
    the toy language would have saturated. Different seeds give different documents about the same people.
    """
    data = importlib.import_module("05_data")  # lazily: only this experiment reads chapter 5's text
    tok, world, rng = data.Tokenizer(), data.KnowledgeWorld(n_people, seed=0), random.Random(seed)
    rewriter, styles = data.TemplateParaphraser(world, seed=seed), sorted(data.STYLES)
    ids: list[int] = []
    while len(ids) < n_tokens:
        if rng.random() < 0.5:
            doc = rewriter(world.raw_document(rng.choice(world.entities)), style=rng.choice(styles))
        else:
            doc = data.make_math_problems(1, seed=rng.randrange(2**31))[0].solution()
        ids += [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
    return torch.tensor(ids[:n_tokens])


def stream_batches(ids: torch.Tensor, batch_size: int, seq_len: int):
    """(idx, targets) batches read through `ids` in order, each token once (one epoch, then stop)."""
    n = batch_size * seq_len
    for start in range(0, len(ids) - n, n):
        chunk = ids[start: start + n + 1]
        yield chunk[:-1].view(batch_size, seq_len), chunk[1:].view(batch_size, seq_len)  # (B, S) each


def width_config(width: int, vocab_size: int = 268, num_hidden_layers: int = 2):
    """A K2-shaped miniature of a given width: head dims fixed (32 + 16 rope), width/32 heads, one dense
    layer then MoE layers of 8 experts top-2 plus a shared expert; FFNs scale with the width as in tiny()."""
    if width < 32 or width % 32:
        raise ValueError(f"width must be a positive multiple of 32, got {width}")
    return mla.ModelConfig.tiny(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=num_hidden_layers,
                                num_attention_heads=width // 32, q_lora_rank=3 * width // 4, kv_lora_rank=width // 2,
                                intermediate_size=21 * width // 8, moe_intermediate_size=width // 4,
                                n_routed_experts=8, num_experts_per_tok=2)


# ---- One training run, instrumented ----

def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.1, tau: float = 100.0,
                   adamw_lr: float | None = None):
    """name in {adamw, muon, muonclip}; adamw_lr (default: lr) is the Muon runs' lr for non-matrix params."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    if name in ("muon", "muonclip"):
        return MuonClip(model, lr=lr, adamw_lr=lr if adamw_lr is None else adamw_lr, weight_decay=weight_decay,
                        adamw_weight_decay=weight_decay, tau=tau, qk_clip=name == "muonclip")
    raise ValueError(f"optimizer must be one of ('adamw', 'muon', 'muonclip'), got {name!r}")


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% (the same schedule for every optimizer)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_run(cfg, opt_name: str, lr: float, steps: int, batch_size: int, seq_len: int, seed: int,
              weight_decay: float = 0.1, tau: float = 100.0, adamw_lr: float | None = None, progress=None,
              label: str = "", data=None, val: torch.Tensor | None = None, eval_every: int = 0,
              record_s_max: bool = True) -> dict:
    """Train a fresh `Transformer(cfg)` from seed; return per-step losses, S_max, clip fractions, timings.

    data: an iterator of (idx, targets) batches (default: the toy language); val: held-out sequences
    (N, seq_len + 1), whose mean loss is measured every `eval_every` steps and after the last one, into
    out["val"] as (tokens seen, loss) pairs, and at the same steps the RMS of the hidden matrices' update per
    unit lr into out["update_rms"]. record_s_max=False skips the per-head logit recording of
    AdamW runs (Muon runs always record it: MuonClip measures S_max even with the clip off).
    """
    torch.manual_seed(seed)
    model = mla.Transformer(cfg)
    opt = make_optimizer(model, opt_name, lr, weight_decay, tau, adamw_lr)
    set_record_s_max(model, record_s_max or opt_name != "adamw")
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    data = toy_batches(cfg.vocab_size, batch_size, seq_len, seed=seed + 1) if data is None else data
    out = dict(loss=[], s_max=[], clip_frac=[], val=[], update_rms=[], t_fb=0.0, t_opt=0.0)
    hidden = [p for _, p in split_params(model)[0]]
    task = progress.add_task(label or f"{opt_name} lr={lr:g}", total=steps) if progress else None
    for step in range(steps):
        if val is not None and eval_every and step % eval_every == 0:
            out["val"].append((step * batch_size * seq_len, val_loss(model, val)))
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, steps, warmup=max(1, steps // 20))
        idx, targets = next(data)
        t0 = time.perf_counter()
        res = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        t1 = time.perf_counter()
        if record_s_max:
            out["s_max"].append(model.s_max().detach().clone())  # (L, H) recorded in this forward, before any clip
        measure = val is not None and eval_every and step % eval_every == 0
        if measure:  # the hidden matrices' group is the first: AdamW's only group, MuonClip's Muon group
            lr_h, before = opt.param_groups[0]["lr"], [p.detach().clone() for p in hidden]
        opt.step()
        if measure:  # update u of W ← W(1 - lr·λ) - lr·u, per unit lr: RMS(u) (Moonlight's 0.2 target)
            u = [(b * (1 - lr_h * weight_decay) - p.detach()) / lr_h for b, p in zip(before, hidden)]
            out["update_rms"].append(sum(x.pow(2).mean().sqrt().item() for x in u) / len(u))
        t2 = time.perf_counter()
        if res.expert_load is not None:  # aux-loss-free balancing (chapter 1), identical for every optimizer
            mla.update_router_biases_(model, res.expert_load, cfg.bias_update_speed)
        out["t_fb"] += t1 - t0
        out["t_opt"] += t2 - t1
        out["loss"].append(res.loss.item())
        stats = getattr(opt, "clip_stats", None)
        out["clip_frac"].append(stats["frac_clipped"] if stats and opt.qk_clip else 0.0)
        if not math.isfinite(out["loss"][-1]):
            break
        if task is not None:
            progress.update(task, advance=1, description=f"{label} loss {out['loss'][-1]:.3f}")
    if val is not None:
        out["val"].append((len(out["loss"]) * batch_size * seq_len, val_loss(model, val)))
    if record_s_max:
        out["s_max"] = torch.stack(out["s_max"])  # (steps, L, H)
    out["model"], out["opt"] = model, opt
    return out


@torch.no_grad()
def val_loss(model: nn.Module, val: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy on held-out sequences val (N, S+1); nan/inf stay visible. The S_max
    recording is paused, so evaluation never counts toward a training step's QK-Clip."""
    recording = [m.record_s_max for m in _mla_modules(model)]
    set_record_s_max(model, False)
    model.eval()
    total = 0.0
    for i in range(0, len(val), batch_size):
        chunk = val[i: i + batch_size]  # (b, S+1)
        logits = model(chunk[:, :-1]).logits.float()  # (b, S, V)
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    for m, flag in zip(_mla_modules(model), recording):
        m.record_s_max = flag
    return total / (val.numel() - len(val))


def smooth(xs: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (the losses are per-batch, hence noisy)."""
    out, m = [], 0.0
    for i, x in enumerate(xs):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** (i + 1)))
    return out


def tokens_to_reach(points: list[tuple[float, float]], target: float) -> float:
    """Tokens at which a (tokens, loss) curve first reaches `target` (linear interpolation); inf if never."""
    for i, (t, v) in enumerate(points):
        if v <= target:
            if i == 0:
                return t
            t0, v0 = points[i - 1]
            return t0 + (t - t0) * (v0 - target) / max(v0 - v, 1e-12)
    return math.inf


def token_ratio(muon: list[tuple[float, float]], adamw: list[tuple[float, float]]) -> tuple[float, str]:
    """Muon's tokens to AdamW's final validation loss / AdamW's tokens (Moonlight's measure of efficiency).

    -> (ratio, how). how = "reached": read off Muon's curve. When Muon never gets there, the ratio is
    extrapolated by symmetry, how = "mirrored": AdamW reaches Muon's final loss after t tokens of its T,
    so Muon is T/t (> 1) times slower.
    """
    T = adamw[-1][0]
    t = tokens_to_reach(muon, adamw[-1][1])
    if math.isfinite(t):
        return t / T, "reached"
    return T / max(tokens_to_reach(adamw, muon[-1][1]), 1.0), "mirrored"


# ---- Demo 1: Muon vs AdamW across widths (Moonlight Fig. 3 in miniature) ----

def sweep(width: int, seed: int, tokens: int, adamw_lrs: list[float], muon_lrs: list[float], batch_size: int,
          seq_len: int, n_val: int = 64, n_evals: int = 20, log=print) -> dict:
    """One (width, seed) cell of the comparison: each optimizer over its lr grid, on the same data and init.

    Both sides: the same fresh text (each token seen once), warmup + cosine schedule, weight decay 0.1, betas
    (0.9, 0.95), and the validation loss on the same held-out documents `n_evals` times per run. Grids are
    given at width 64 and scaled by 64/width for both optimizers (wider matrices take smaller steps). The
    Muon runs keep AdamW at the AdamW side's best lr for embeddings, head and norms, so the two sides differ
    only in the optimizer of the hidden matrices.
    """
    cfg = width_config(width)
    steps = tokens // (batch_size * seq_len)
    if steps < n_evals:
        raise ValueError(f"tokens: {tokens} gives {steps} steps of {batch_size}x{seq_len}, fewer than {n_evals}")
    train = text_corpus(steps * batch_size * seq_len + 1, seed)
    val = text_corpus(n_val * (seq_len + 1), seed=10**6 + seed).view(n_val, seq_len + 1)  # other documents
    scale = 64 / width
    cell = dict(width=width, seed=seed, tokens=steps * batch_size * seq_len, final={}, curves={}, best={})
    for name, grid in (("adamw", adamw_lrs), ("muon", muon_lrs)):
        for lr in (x * scale for x in grid):
            t0 = time.perf_counter()
            r = train_run(cfg, name, lr, steps, batch_size, seq_len, seed, adamw_lr=cell["best"].get("adamw"),
                          data=stream_batches(train, batch_size, seq_len), val=val, eval_every=steps // n_evals,
                          record_s_max=False)
            cell["curves"][(name, lr)] = r["val"]
            cell["final"][(name, lr)] = final = r["val"][-1][1] if math.isfinite(r["val"][-1][1]) else math.inf
            cell.setdefault("params", sum(p.numel() for p in r["model"].parameters()))
            rms = r["update_rms"][1:]  # after the first step (Adam's first update is sign(g), RMS 1)
            log(f"width {width:4d} seed {seed}  {name:5s} lr {lr:.4g}: val loss {final:.4f}, hidden-matrix update "
                f"RMS per unit lr {sum(rms) / max(len(rms), 1):.3f}  ({time.perf_counter() - t0:.0f} s)")
        cell["best"][name] = min((lr for n, lr in cell["final"] if n == name), key=lambda lr: cell["final"][(name, lr)])
        cell[f"{name}_edge"] = cell["best"][name] in (min(grid) * scale, max(grid) * scale)
    cell["ratio"], cell["ratio_how"] = token_ratio(cell["curves"][("muon", cell["best"]["muon"])],
                                                   cell["curves"][("adamw", cell["best"]["adamw"])])
    return cell


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def fit_power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares of log y = log c + k log x -> (c, k); y = c·x^k."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var > 0 else 0.0
    return math.exp(my - k * mx), k


def demo_muon_vs_adamw(args, console: Console) -> dict:
    """Per width and seed a `sweep`; per width the token ratio over seeds, a power-law trend, a figure, JSON."""
    cells = []
    for width in args.widths:  # partial results print as they come: one line per run, one row per cell
        for seed in args.seeds:
            c = sweep(width, seed, args.tokens_per_width * width, args.adamw_lrs, args.muon_lrs,
                      args.sweep_batch_size, args.sweep_seq_len, log=lambda s: console.print(s, highlight=False))
            cells.append(c)
            console.print(f"[bold]width {width} seed {seed}: best lr AdamW {c['best']['adamw']:.4g} -> "
                          f"{c['final'][('adamw', c['best']['adamw'])]:.4f}, Muon {c['best']['muon']:.4g} -> "
                          f"{c['final'][('muon', c['best']['muon'])]:.4f}; Muon tokens / AdamW tokens "
                          f"= {c['ratio']:.3f} ({c['ratio_how']})[/]")
            for name in ("adamw", "muon"):
                if c[f"{name}_edge"]:
                    console.print(f"[yellow]{name}: best lr at the edge of the grid; widen it[/]")
    return report_muon_vs_adamw(cells, args, console)


def report_muon_vs_adamw(cells: list[dict], args, console: Console) -> dict:
    """The table, the power-law trend, the JSON summary and the figure from the sweeps' cells."""
    rows = []
    for width in args.widths:
        cs = [c for c in cells if c["width"] == width]
        mean, std = _mean_std([c["ratio"] for c in cs])
        rows.append(dict(width=width, params=cs[0]["params"], tokens=cs[0]["tokens"], ratio_mean=mean, ratio_std=std,
                         seeds=len(cs), ratios=[c["ratio"] for c in cs], how=[c["ratio_how"] for c in cs],
                         adamw_final=_mean_std([c["final"][("adamw", c["best"]["adamw"])] for c in cs])[0],
                         muon_final=_mean_std([c["final"][("muon", c["best"]["muon"])] for c in cs])[0],
                         best_lr={n: [c["best"][n] for c in cs] for n in ("adamw", "muon")}))
    table = Table(title=f"Muon vs AdamW: tokens Muon needs to reach AdamW's final validation loss / AdamW's tokens, "
                        f"seeds {','.join(map(str, args.seeds))} (Moonlight: ~0.52)")
    for col in ("width", "params", "tokens", "best lr AdamW", "best lr Muon", "val loss AdamW / Muon",
                "Muon / AdamW tokens", "per seed"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["width"]), f"{r['params']:,}", f"{r['tokens']:,}",
                      *(" ".join(f"{x:g}" for x in r["best_lr"][n]) for n in ("adamw", "muon")),
                      f"{r['adamw_final']:.3f} / {r['muon_final']:.3f}", f"{r['ratio_mean']:.3f} ± {r['ratio_std']:.3f}",
                      " ".join(f"{x:.2f}" + ("*" if h == "mirrored" else "") for x, h in zip(r["ratios"], r["how"])))
    console.print(table)
    fit = None
    if len(rows) > 1:
        fit = fit_power_law([r["params"] for r in rows], [r["ratio_mean"] for r in rows])
        console.print(f"trend: ratio ≈ {fit[0]:.3g}·params^{fit[1]:+.3f} (least squares over the {len(rows)} widths)")
    if any(h == "mirrored" for r in rows for h in r["how"]):
        console.print("* Muon never reached AdamW's final loss: ratio mirrored from AdamW's tokens to Muon's final loss")
    keys = ("width", "params", "ratio_mean", "ratio_std", "seeds", "tokens", "ratios", "how")
    summary = dict(widths=[{k: r[k] for k in keys} for r in rows], fit=dict(c=fit[0], k=fit[1]) if fit else None)
    if args.json:
        _write_json(args.json, summary)
        console.print(f"wrote {args.json}")
    if not args.no_figures:
        _plot_muon_vs_adamw(cells, rows, fit, console)
    return dict(cells=cells, rows=rows, fit=fit, summary=summary)


def _plot_muon_vs_adamw(cells: list[dict], rows: list[dict], fit, console: Console) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        for c in (c for c in cells if c["width"] == r["width"]):
            for name, ls in (("adamw", "--"), ("muon", "-")):
                pts = c["curves"][(name, c["best"][name])][1:]
                axes[0].plot([t for t, _ in pts], [v for _, v in pts], ls, color=colors[i % len(colors)], lw=1,
                             label=f"width {r['width']} {'AdamW' if name == 'adamw' else 'Muon'}" if c["seed"] ==
                             cells[0]["seed"] else None)
    axes[0].set(xscale="log", xlabel="training tokens", ylabel="validation loss (held-out documents)",
                title="each optimizer at its best lr (dashed AdamW, solid Muon; every seed)")
    axes[0].legend(fontsize=8)
    p = [r["params"] for r in rows]
    axes[1].errorbar(p, [r["ratio_mean"] for r in rows], yerr=[r["ratio_std"] for r in rows], fmt="o", capsize=4,
                     color="tab:red", label="mean ± std over seeds")
    for r in rows:
        axes[1].scatter([r["params"]] * len(r["ratios"]), r["ratios"], s=10, color="gray", zorder=3)
    if fit:
        xs = [min(p) * (max(p) / min(p)) ** (i / 20) for i in range(21)]
        axes[1].plot(xs, [fit[0] * x ** fit[1] for x in xs], ":", color="tab:red", label=f"fit ∝ params^{fit[1]:+.2f}")
    axes[1].axhline(1.0, color="gray", lw=1)
    axes[1].axhline(0.52, color="tab:blue", ls="--", lw=1, label="Moonlight ~0.52")
    axes[1].set(xscale="log", xlabel="parameters", ylabel="Muon tokens / AdamW tokens", ylim=(0, 1.2),
                title="tokens to AdamW's final validation loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, "figures/muon_vs_adamw.png", console)


# ---- Demo 2: logit explosion in miniature, and QK-Clip ----

def demo_qk_clip(args, console: Console) -> dict:
    cfg = mla.ModelConfig.tiny()
    runs = {}
    with Progress(console=console, transient=True) as progress:
        for name in ("muon", "muonclip"):
            runs[name] = train_run(cfg, name, args.clip_lr, args.clip_steps, args.batch_size, args.seq_len,
                                   args.seed, weight_decay=args.clip_wd, tau=args.tau, progress=progress,
                                   label=f"{name:8s} lr={args.clip_lr:g}")
    plain, clip = runs["muon"], runs["muonclip"]
    s_plain = plain["s_max"].flatten(1).max(dim=1).values  # (steps,) max over layers and heads
    s_clip = clip["s_max"].flatten(1).max(dim=1).values
    ever = (clip["s_max"] > args.tau).any(dim=0)  # (L, H) heads clipped at least once
    n = len(s_clip)
    table = Table(title=f"Max attention logit S_max: Muon vs MuonClip (tau={args.tau:g}), lr {args.clip_lr:g}, "
                        f"weight decay {args.clip_wd:g}, seed {args.seed}")
    for col in ("step", "Muon S_max", "MuonClip S_max", "heads clipped", "Muon loss", "MuonClip loss"):
        table.add_column(col, justify="right")
    lp, lc = smooth(plain["loss"]), smooth(clip["loss"])
    for i in sorted({*range(0, n, max(1, n // 8)), n - 1}):
        table.add_row(str(i), f"{s_plain[i]:.1f}", f"{s_clip[i]:.1f}", f"{100 * clip['clip_frac'][i]:.0f}%",
                      f"{lp[i]:.3f}", f"{lc[i]:.3f}")
    console.print(table)
    last = clip["clip_frac"][-max(1, n // 10):]
    console.print(f"heads that triggered QK-Clip at least once: {int(ever.sum())}/{ever.numel()} "
                  f"({100 * ever.float().mean():.0f}%); mean fraction clipped in the last 10% of steps: "
                  f"{100 * sum(last) / len(last):.1f}%  (K2: 12.7% of heads ever, none after 70k steps)")

    if not args.no_figures:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        axes[0].plot(s_plain.tolist(), color="tab:red", label="Muon")
        axes[0].plot(s_clip.tolist(), color="tab:blue", label=f"MuonClip (tau={args.tau:g})")
        axes[0].axhline(args.tau, color="gray", ls=":", lw=1)
        axes[0].set(xlabel="step", ylabel="max attention logit (all layers, heads)", title="S_max per step")
        axes[0].legend()
        axes[1].plot([100 * f for f in clip["clip_frac"]], color="tab:blue")
        axes[1].set(xlabel="step", ylabel="% of heads clipped", title="QK-Clip activity (self-deactivation)")
        axes[2].plot(lp, color="tab:red", label="Muon")
        axes[2].plot(lc, color="tab:blue", label="MuonClip")
        axes[2].set(xlabel="step", ylabel="train loss (EMA)", title="loss (same data, init, lr)",
                    ylim=(0.95 * min(lp + lc), 2.0))
        axes[2].legend()
        fig.tight_layout()
        _save(fig, "figures/qk_clip_max_logits.png", console)
    return dict(s_plain=s_plain, s_clip=s_clip, clip_frac=clip["clip_frac"], loss_plain=lp, loss_clip=lc)


# ---- Bench: optimizer overhead vs forward-backward ----

def newton_schulz_flops(shape: torch.Size, steps: int = 5) -> int:
    """FLOPs of `zeropower_via_newtonschulz5` on an (..., A, B) tensor: per step X Xᵀ, A·A, B·X."""
    m, n = sorted(shape[-2:])
    batch = math.prod(shape[:-2])
    return batch * steps * (2 * m * m * n + 2 * m ** 3 + 2 * m * m * n)


def bench(args, console: Console) -> dict:
    cfg = mla.ModelConfig.tiny()
    with Progress(console=console, transient=True) as progress:
        r = train_run(cfg, "muonclip", 2e-3, args.bench_steps, args.batch_size, args.seq_len, args.seed,
                      progress=progress, label="bench")
    measured = r["t_opt"] / r["t_fb"]
    rows = []
    for label, c, tokens in (("tiny (this run)", cfg, args.batch_size * args.seq_len),
                             ("Kimi K2 (meta device)", mla.ModelConfig.kimi_k2(), args.k2_batch_tokens)):
        with torch.device("meta"):
            model = mla.Transformer(c)
        muon_named, _ = split_params(model)
        ns = sum(newton_schulz_flops(p.shape) for _, p in muon_named)
        _, activated = mla.count_params(c)
        fb = 6 * activated * tokens  # forward + backward ≈ 6 FLOPs per activated parameter per token
        rows.append((label, tokens, ns, fb))
    table = Table(title="Optimizer overhead vs forward-backward")
    for col in ("model", "tokens / step", "Newton-Schulz FLOPs", "fwd+bwd FLOPs (6·N_act·T)", "ratio"):
        table.add_column(col, justify="right")
    for label, tokens, ns, fb in rows:
        table.add_row(label, f"{tokens:,}", f"{ns:.2e}", f"{fb:.2e}", f"{100 * ns / fb:.1f}%")
    table.add_row("tiny, measured wall time", f"{args.batch_size * args.seq_len:,}", f"{r['t_opt']:.2f} s",
                  f"{r['t_fb']:.2f} s", f"{100 * measured:.0f}%")
    console.print(table)
    console.print("Newton-Schulz costs ~steps·(4m²n + 2m³) FLOPs per m x n matrix whatever the batch, while "
                  "forward-backward grows with the tokens per step: a few hundred here, ~67M in K2. So the same "
                  "optimizer is a large share of a tiny CPU step (where per-op overhead, not FLOPs, also "
                  "dominates the wall time) and a fraction of a percent of K2's FLOPs. Moonlight's measured "
                  "1-3% at scale also counts the gather/scatter of distributed Muon (chapter 4).")
    return dict(measured=measured, rows=rows)


# ---- main ----

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, console: Console) -> None:
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    console.print(f"wrote {path}")


def _write_json(path: str, obj) -> None:
    """Write atomically: a temp file beside the target, then rename."""
    import json
    import os

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--demo", choices=("all", "muon_vs_adamw", "qk_clip"), default=None,
                   help="which demo (unset: all, or none with --bench)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="demo 2 and bench: seed for model init and data")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="demo 2 and bench: sequences per step")
    p.add_argument("--seq-len", type=cli.positive_int, default=64, help="demo 2 and bench: tokens per sequence")
    p.add_argument("--widths", type=cli.positive_int_list, default=[32, 64],
                   help="demo 1: model widths, multiples of 32 (e.g. 32,64,128)")
    p.add_argument("--seeds", type=cli.nonneg_int_list, default=[0], help="demo 1: seeds, one sweep per width each")
    p.add_argument("--tokens-per-width", type=cli.positive_int, default=2048,
                   help="demo 1: training tokens per run = this x width (the budget grows with the model)")
    p.add_argument("--sweep-batch-size", type=cli.positive_int, default=16, help="demo 1: sequences per step")
    p.add_argument("--sweep-seq-len", type=cli.positive_int, default=128, help="demo 1: tokens per sequence")
    p.add_argument("--adamw-lrs", type=cli.positive_float_list, default=[2e-3, 4e-3, 8e-3, 1.6e-2],
                   help="demo 1: AdamW lr grid at width 64 (scaled by 64/width)")
    p.add_argument("--muon-lrs", type=cli.positive_float_list, default=[8e-3, 1.6e-2, 3.2e-2, 6.4e-2],
                   help="demo 1: Muon lr grid at width 64 (scaled by 64/width; the rest keep AdamW's best lr)")
    p.add_argument("--json", type=cli.out_file, default=None, help="demo 1: write the per-width summary here")
    p.add_argument("--clip-steps", type=cli.positive_int, default=600, help="demo 2: training steps per run")
    p.add_argument("--clip-lr", type=cli.positive_float, default=3e-2, help="demo 2: (high) lr for both runs")
    p.add_argument("--clip-wd", type=cli.nonneg_float, default=0.1,
                   help="demo 2: weight decay for both runs (0 = no decay)")
    p.add_argument("--tau", type=cli.positive_float, default=10.0, help="demo 2: QK-Clip threshold (K2: 100)")
    p.add_argument("--bench", action="store_true",
                   help="measure optimizer overhead vs forward-backward (alone, unless --demo is given too)")
    p.add_argument("--bench-steps", type=cli.positive_int, default=30, help="bench: training steps timed")
    p.add_argument("--k2-batch-tokens", type=cli.positive_int, default=67_108_864,
                   help="bench: K2's tokens per step (67M)")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads")
    p.add_argument("--no-figures", action="store_true", help="skip writing figures/")
    args = p.parse_args(argv)
    if not args.no_figures:
        try:
            cli.out_dir("figures")
        except argparse.ArgumentTypeError as err:
            p.error(f"figures/ cannot be written ({err}); pass --no-figures")
    demo = args.demo or ("none" if args.bench else "all")
    for w in args.widths if demo in ("all", "muon_vs_adamw") else ():
        try:
            width_config(w)
        except ValueError as err:
            cli.flag_error(p, err, {"width": "--widths"})
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 110)
    if demo in ("all", "muon_vs_adamw"):
        demo_muon_vs_adamw(args, console)
    if demo in ("all", "qk_clip"):
        demo_qk_clip(args, console)
    if args.bench:
        bench(args, console)


if __name__ == "__main__":
    cli.run(main)
