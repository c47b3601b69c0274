"""Chapter 1: the ultra-sparse Mixture-of-Experts layer of Kimi K2.

What it is. A Mixture-of-Experts (MoE) layer replaces one big feed-forward network (FFN) by many small ones,
the experts, and a router that sends each token to only a few of them. The model then has many parameters
(capacity to store knowledge) while each token pays for only the few experts it visits (compute). The ratio
total experts / activated experts is the *sparsity*. Each expert is a SwiGLU FFN, W_down(silu(W_gate x) ⊙ W_up x):
a two-layer network whose hidden units are gated elementwise by a second projection (Shazeer 2020).

Why K2 uses it. Kimi K2 has 384 routed experts, activates 8 per token plus 1 shared expert that every token
visits: sparsity 384 / 8 = 48, 1.04T parameters in total, 32.6B activated. The report's sparsity scaling law
(K2 report §2.3, Figure 5): at a fixed number of activated experts, and therefore fixed FLOPs per token, more
total experts keep lowering the loss; sparsity 48 reaches validation loss 1.5 with 1.69x / 1.39x / 1.15x fewer
FLOPs than sparsity 8 / 16 / 32. `--sparsity-sweep` reproduces that trend in miniature.

The router, as in DeepSeek-V3 (which K2 inherits; K2 config: scoring_func=sigmoid, topk_method=noaux_tc):
    s_{t,i} = sigmoid(u_tᵀ e_i)                     affinity of token t for expert i
    TopK_t  = top-k over i of (s_{t,i} + b_i)        the bias b is used for *selection only*
    g_{t,i} = s_{t,i} / Σ_{j∈TopK_t} s_{t,j} · routed_scaling_factor      (K2: 2.827)
    y_t     = SharedFFN(u_t) + Σ_{i∈TopK_t} g_{t,i} · FFN_i(u_t)
The bias b is the auxiliary-loss-free load balancer: after each optimizer step, b_i += γ · sign(mean_load - load_i)
(an overloaded expert becomes less attractive, an idle one more), with no gradient and no loss term distorting
the language-model objective. A tiny sequence-wise balance loss (K2: alpha = 0.001) is available as a backstop.

Design choices
- Expert weights are stacked tensors `w_gate (E, F, D)`, `w_up (E, F, D)`, `w_down (E, D, F)`: expert parallelism
  (chapter 4) shards dim 0, Muon (chapter 3) orthogonalises each [e] slice on its own, and each slice has
  nn.Linear's (out, in) layout so export to transformers' per-expert weights is a slice.
- Two dispatch paths with identical results (a test keeps outputs and all gradients equal):
  `naive_dispatch`, a loop over experts that gathers each expert's tokens with `torch.where` (the definition);
  `fast_dispatch`, which sorts the T·K token-slots by expert once (argsort), runs each expert on a contiguous
  block of rows, and adds the weighted results back with one `index_add_`. The per-expert SwiGLU is a small
  autograd.Function (`grouped_swiglu`) whose backward is SwiGLU's chain rule written out, a loop over the
  non-empty experts that writes outputs and gradients straight into preallocated buffers. Why, as profiled at
  the `--bench` sizes (time relative to the dense SwiGLU of equal activated FLOPs, interleaved runs on the
  shared 2-core machine): autograd through the same loop took 2.4x-3.3x (wall, 2 threads): it spends more
  time on bookkeeping than on matmuls (`w_gate[e]` costs an (E, F, D) zero-fill per expert in backward, plus
  (T·K, D) concatenations and stacks). Padded batched `bmm` took 3.2x (it computes and moves the padding).
  `torch._grouped_mm` runs forward on CPU fp32 in torch 2.13 but its own backward fails ("Invalid
  strides/sizes"); driving it from our hand-written backward works (9 calls) but measured 1.63x against 1.40x
  for this loop (CPU time, 1 thread), because the elementwise SwiGLU math then runs on whole (T·K, F) tensors
  in memory instead of one cache-sized expert block at a time.
- The gating weight multiplies the expert's hidden activation h (width F) instead of its output (width D);
  by linearity of w_down, g · W_down h = W_down (g · h), and the product touches 4x fewer numbers at K2 sizes.
- The router computes in fp32 (also under bf16 autocast) and returns its affinities `scores` so callers can
  log or regularise them; its bias stays an fp32 buffer under `model.to(torch.bfloat16)` (`KeepBuffersFP32`).
- Statistics and the auxiliary loss come back from `forward` in `MoEStats`; nothing global is mutated.
  The bias update is a separate function the training loop calls with loads summed over the batch (and, in
  chapter 4, over data-parallel ranks), so every rank applies the same update.

Simplified vs K2
- Real sizes differ (K2: D = 7168, F = 2048, 384 experts); `--preset kimi-k2` builds the real layer on the meta
  device (PyTorch tensors with shapes but no storage, so a 17B-parameter layer costs no memory) and prints its
  parameter counts.
- No expert parallelism or token dropping here (chapter 4 shards experts); DeepSeek-V3 drops none either.
- The demos train a minimal language model local to this file (embedding, a causal token-shift, one MoE, a
  head); the real decoder with MLA attention is chapter 2.
- The sparsity sweep is a miniature of Figure 5. It keeps: a fixed number of activated experts (2 routed + 1
  shared, as K2 keeps 8 + 1), hence fixed expert FLOPs per token (only the router's D x E product grows), the
  same training tokens for every sparsity, total experts growing (sparsity 1 ... 32), the bias balancer on,
  and validation loss as the measure, read also as "steps (= FLOPs) to reach the least sparse model's final
  loss". It drops: real text (the task is 64 x 64 random facts (a, b) -> v, where loss measures stored
  knowledge, so extra experts have something to hold; validation uses fresh sequences of the same facts),
  model scale (D = 16, F = 16), several model sizes per sparsity and a fitted scaling law, and K2's 8-of-384.

References
- Kimi K2: Open Agentic Intelligence, arXiv:2507.20534, §2.3 (sparsity scaling law, Figure 5).
- DeepSeek-V3 Technical Report, arXiv:2412.19437, §2.1.2 (sigmoid router, auxiliary-loss-free balancing,
  sequence-wise balance loss, group-limited routing), eqs. 12-20.
- Wang et al., Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts, arXiv:2408.15664 (MaxVio).
- Shazeer, GLU Variants Improve Transformer, arXiv:2002.05202 (SwiGLU).

Run:
    python 01_moe.py --help
    python 01_moe.py                      # load balance with and without the bias update (15-30 s on 2 cores)
    python 01_moe.py --sparsity-sweep     # sparsity law in miniature, figures/sparsity_scaling.png (70 s of CPU)
    python 01_moe.py --bench              # fast dispatch vs dense SwiGLU vs transformers' DeepseekV3MoE
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \
        python 01_moe.py --bench          # the same with glibc keeping freed memory (no page faults per step)
    python 01_moe.py --preset kimi-k2     # the real layer's sizes, built on the meta device
"""

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import cli

# ---- configuration checks ----


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_router_config(n_routed_experts: int, num_experts_per_tok: int, n_group: int, topk_group: int,
                         scoring_func: str, routed_scaling_factor: float) -> None:
    """Reject a bad routing configuration loudly (never replace it silently)."""
    _check_positive("n_routed_experts", n_routed_experts)
    _check_positive("num_experts_per_tok", num_experts_per_tok)
    _check_positive("n_group", n_group)
    _check_positive("topk_group", topk_group)
    if num_experts_per_tok > n_routed_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, n_routed_experts={n_routed_experts}], "
                         f"got {num_experts_per_tok}")
    if n_routed_experts % n_group != 0:
        raise ValueError(f"n_group must divide n_routed_experts={n_routed_experts}, got n_group={n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if num_experts_per_tok > topk_group * (n_routed_experts // n_group):
        raise ValueError(f"num_experts_per_tok={num_experts_per_tok} exceeds the experts inside topk_group="
                         f"{topk_group} groups of {n_routed_experts // n_group}; raise topk_group")
    if scoring_func not in ("sigmoid", "softmax"):
        raise ValueError(f"scoring_func must be one of 'sigmoid', 'softmax', got {scoring_func!r}")
    if not routed_scaling_factor > 0:
        raise ValueError(f"routed_scaling_factor must be > 0, got {routed_scaling_factor!r}")


# ---- the experts ----


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) ⊙ W_up x)  (Shazeer 2020). The dense FFN and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        _check_positive("hidden_size", hidden_size)
        _check_positive("intermediate_size", intermediate_size)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts as three stacked tensors; slice [e] is expert e in nn.Linear's (out, in) layout."""

    def __init__(self, n_routed_experts: int, hidden_size: int, moe_intermediate_size: int):
        super().__init__()
        E, D, Fd = n_routed_experts, hidden_size, moe_intermediate_size
        for name, value in (("n_routed_experts", E), ("hidden_size", D), ("moe_intermediate_size", Fd)):
            _check_positive(name, value)
        self.w_gate = nn.Parameter(torch.empty(E, Fd, D))  # (E, F, D)
        self.w_up = nn.Parameter(torch.empty(E, Fd, D))  # (E, F, D)
        self.w_down = nn.Parameter(torch.empty(E, D, Fd))  # (E, D, F)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the same U(-1/√in, 1/√in) as nn.Linear's default, per expert
        for w in (self.w_gate, self.w_up, self.w_down):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    @property
    def n_experts(self) -> int:
        return self.w_gate.shape[0]


# ---- the router ----


class KeepBuffersFP32(nn.Module):
    """A module whose buffers named in `fp32_buffers` stay fp32 under `.to(torch.bfloat16)` / `.half()` (they
    still move between devices), as transformers does with `_keep_in_fp32_modules`. In bf16 (spacing 2⁻⁸ near
    0.5) 0.5 + 0.001 rounds back to 0.5, so the router bias would lose its γ = 0.001 sign-rule steps."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after is not None and after.dtype != torch.float32:
                setattr(self, name, before.to(after.device, torch.float32))  # exact value, new device
        return self


class Router(KeepBuffersFP32):
    """Sigmoid (or softmax) affinities; top-k on affinity + bias; gates from the unbiased affinities."""

    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, hidden_size: int, n_routed_experts: int, num_experts_per_tok: int,
                 scoring_func: str = "sigmoid", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 2.827):
        super().__init__()
        _check_positive("hidden_size", hidden_size)
        _check_router_config(n_routed_experts, num_experts_per_tok, n_group, topk_group, scoring_func,
                             routed_scaling_factor)
        self.n_routed_experts, self.top_k = n_routed_experts, num_experts_per_tok
        self.scoring_func, self.n_group, self.topk_group = scoring_func, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size))  # (E, D): centroids e_i
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        # b: the aux-loss-free bias. A persistent fp32 buffer: saved, moved with .to() (kept fp32 under bf16),
        # never seen by optimizers.
        self.register_buffer("e_score_correction_bias", torch.zeros(n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # T tokens, D model dim, E experts, K top-k, G groups
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this matmul in bf16
            logits = F.linear(x.float(), self.weight.float())  # (T, E), fp32 like DeepSeek-V3
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()  # s_{t,i} = σ(u_tᵀ e_i)
        else:
            scores = logits.softmax(dim=-1)  # s_{t,i} = softmax_i(u_tᵀ e_i)  (DeepSeek-V2 style)
        choice = scores.detach() + self.e_score_correction_bias  # (T, E): s + b, for selection only
        if self.n_group > 1:
            choice = self._mask_to_top_groups(choice)  # (T, E), -inf outside the chosen groups
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # (T, K): TopK_t
        topk_weight = scores.gather(1, topk_idx)  # (T, K): unbiased s_{t,i}, i ∈ TopK_t
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)  # g = s / Σ_TopK s
        topk_weight = topk_weight * self.routed_scaling_factor  # g · routed_scaling_factor
        return topk_idx, topk_weight, scores

    def _mask_to_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V3 §2.1.2): experts split into n_group groups (one per device
        group); a group's score is the sum of its 2 best (s + b); only the topk_group best groups compete."""
        T, E = choice.shape
        grouped = choice.view(T, self.n_group, E // self.n_group)  # (T, G, E/G)
        group_score = grouped.topk(min(2, E // self.n_group), dim=-1).values.sum(-1)  # (T, G)
        top_groups = group_score.topk(self.topk_group, dim=-1).indices  # (T, topk_group)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top_groups, True)  # (T, G)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)  # (T, E)


@torch.no_grad()
def update_router_bias_(router_or_moe: nn.Module, load: torch.Tensor, speed: float) -> None:
    """b_i += γ · sign(mean(load) - load_i)  (DeepSeek-V3 §2.1.2). `load` (E,) is tokens per expert summed over
    the batch (and over data-parallel ranks, by the caller). Touches only the buffer, never a gradient."""
    router = router_or_moe.router if isinstance(router_or_moe, MoE) else router_or_moe
    if not isinstance(router, Router):
        raise ValueError(f"router_or_moe must be a Router or a MoE, got {type(router_or_moe).__name__}")
    b = router.e_score_correction_bias
    if load.shape != b.shape:
        raise ValueError(f"load must have shape {tuple(b.shape)} (one count per expert), got {tuple(load.shape)}")
    if speed < 0:
        raise ValueError(f"speed must be >= 0, got {speed}")
    load = load.to(b.device, torch.float32)
    b.add_(speed * torch.sign(load.mean() - load))


def load_balance_stats(load: torch.Tensor) -> dict:
    """Balance of tokens per expert `load` (E,):
    MaxVio = max_i load_i / mean(load) - 1 (Wang et al. 2024); CV = std / mean; dead = experts with no token."""
    load = torch.as_tensor(load).detach().float().cpu()
    if load.dim() != 1 or load.numel() == 0:
        raise ValueError(f"load must be a non-empty 1-D tensor of tokens per expert, got shape {tuple(load.shape)}")
    if (load < 0).any():
        raise ValueError("load must be non-negative (token counts)")
    mean = load.mean()
    if mean == 0:
        raise ValueError("load must contain at least one routed token (all counts are zero)")
    return {
        "tokens_per_expert": load.tolist(),
        "max_vio": float(load.max() / mean - 1),
        "cv": float(load.std(unbiased=False) / mean),
        "dead_experts": int((load == 0).sum()),
    }


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3 eqs. 17-20), per sequence then averaged over the batch:
    f_i = E/(K·S) Σ_t 1[i ∈ TopK_t] ;  P_i = 1/S Σ_t s_{t,i} / Σ_j s_{t,j} ;  L = α Σ_i f_i P_i."""
    B, S, E = scores.shape  # B batch, S seq, E experts
    K = topk_idx.shape[-1]
    hits = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, topk_idx.view(B, S * K), torch.ones(B, S * K, device=scores.device))  # (B, E)
    f = hits * E / (K * S)  # (B, E), no gradient (a count)
    P = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)  # (B, E)
    return alpha * (f * P).sum(-1).mean()  # scalar


# ---- dispatch: naive loop and sorted grouped matmuls ----


def naive_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: Experts):
    """The definition: y_t = Σ_{i∈TopK_t} g_{t,i} FFN_i(x_t), one expert at a time."""
    y = torch.zeros_like(x)  # (T, D)
    for e in range(experts.n_experts):
        token, slot = torch.where(topk_idx == e)  # (n_e,), (n_e,): who chose e, in which of its K slots
        if token.numel() == 0:
            continue
        h = x[token]  # (n_e, D)
        h = F.silu(F.linear(h, experts.w_gate[e])) * F.linear(h, experts.w_up[e])  # (n_e, F)
        out = F.linear(h, experts.w_down[e])  # (n_e, D)
        y.index_add_(0, token, out * topk_weight[token, slot, None])  # y_t += g_{t,e} FFN_e(x_t)
    return y


class _GroupedSwiGLU(torch.autograd.Function):
    """Rows of x sorted by expert; block e (counts[e] rows) goes through expert e:
        G = X W_gᵀ ; U = X W_uᵀ ; A = silu(G) ; H = w ⊙ A ⊙ U ; Y = H W_dᵀ        (w: the rows' gates g_{t,i})
    The backward is SwiGLU's chain rule written out, per expert block:
        dW_d = dYᵀ H ; dH = dY W_d ; dw = Σ_f dH ⊙ A ⊙ U ; dU = w ⊙ dH ⊙ A ; dG = w ⊙ dH ⊙ U ⊙ silu'(G)
        dW_g = dGᵀ X ; dW_u = dUᵀ X ; dX = dG W_g + dU W_u      with silu'(g) = σ(g) (1 + g (1 - σ(g)))
    Each expert's outputs and gradients are written straight into preallocated buffers (`out=` slices)."""

    @staticmethod
    def forward(ctx, x, weight, counts, w_gate, w_up, w_down):
        y = x.new_empty(x.shape[0], w_down.shape[1])  # (N, D)
        G = x.new_empty(x.shape[0], w_gate.shape[1])  # (N, F) pre-activations, kept for backward
        U = torch.empty_like(G)  # (N, F)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            torch.mm(x[rows], w_gate[e].t(), out=G[rows])  # (n, F)
            torch.mm(x[rows], w_up[e].t(), out=U[rows])  # (n, F)
            H = F.silu(G[rows]) * U[rows] * weight[rows, None]  # (n, F)
            torch.mm(H, w_down[e].t(), out=y[rows])  # (n, D)
            start += n
        ctx.counts = counts
        ctx.save_for_backward(x, weight, w_gate, w_up, w_down, G, U)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, w_gate, w_up, w_down, G, U = ctx.saved_tensors
        dy = dy.contiguous()
        need_dx = ctx.needs_input_grad[0]  # False when the layer's input needs no gradient: skip dX's two matmuls
        dx, dweight = (torch.empty_like(x) if need_dx else None), torch.empty_like(weight)
        dw_gate, dw_up, dw_down = torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:  # an expert that got no token gets a zero gradient
                dw_gate[e].zero_(), dw_up[e].zero_(), dw_down[e].zero_()
                continue
            rows = slice(start, start + n)
            w = weight[rows, None]  # (n, 1)
            A = F.silu(G[rows])  # (n, F)
            AU = A * U[rows]  # (n, F)
            torch.mm(dy[rows].t(), AU * w, out=dw_down[e])  # (D, F)  dW_d = dYᵀ H
            dH = dy[rows] @ w_down[e]  # (n, F)
            dweight[rows] = (dH * AU).sum(-1)  # (n,)
            dH = dH * w  # (n, F)
            dU = dH * A  # (n, F)
            dG = torch.ops.aten.silu_backward(dH * U[rows], G[rows])  # (n, F): dA ⊙ silu'(G), one fused op
            torch.mm(dG.t(), x[rows], out=dw_gate[e])  # (F, D)
            torch.mm(dU.t(), x[rows], out=dw_up[e])  # (F, D)
            if need_dx:
                torch.mm(dG, w_gate[e], out=dx[rows])  # (n, D)
                dx[rows].addmm_(dU, w_up[e])  # dX = dG W_g + dU W_u
            start += n
        return dx, dweight, None, dw_gate, dw_up, dw_down


def grouped_swiglu(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows sorted by expert: the first tokens_per_expert[0] rows go through expert 0, the next through expert 1...
    x_sorted (N, D), tokens_per_expert (E_local,) long, w_gate/w_up (E_local, F, D), w_down (E_local, D, F),
    optional per-row gate `weight` (N,) -> (N, D). Chapter 4 calls this on its local expert shard."""
    counts = [int(c) for c in tokens_per_expert.tolist()]
    if len(counts) != w_gate.shape[0] or sum(counts) != x_sorted.shape[0]:
        raise ValueError(f"tokens_per_expert must have one entry per expert ({w_gate.shape[0]}) summing to "
                         f"x_sorted.shape[0]={x_sorted.shape[0]}, got {len(counts)} entries summing to {sum(counts)}")
    if weight is None:
        weight = x_sorted.new_ones(x_sorted.shape[0])
    return _GroupedSwiGLU.apply(x_sorted.contiguous(), weight.to(x_sorted.dtype), counts, w_gate, w_up, w_down)


def fast_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: Experts):
    """Sort the T·K token-slots by expert once, run each expert on a contiguous block, scatter-add back."""
    T, K = topk_idx.shape
    flat = topk_idx.flatten()  # (T*K,) expert of each token-slot
    order = flat.argsort(stable=True)  # (T*K,) slots grouped by expert
    tokens_per_expert = torch.bincount(flat, minlength=experts.n_experts)  # (E,)
    token = order // K  # (T*K,) which token each sorted slot belongs to
    x_sorted = x.index_select(0, token)  # (T*K, D)
    y_sorted = grouped_swiglu(x_sorted, tokens_per_expert, experts.w_gate, experts.w_up, experts.w_down,
                              weight=topk_weight.flatten()[order])  # (T*K, D), already times g_{t,i}
    return torch.zeros_like(x).index_add_(0, token, y_sorted)  # (T, D): y_t = Σ_slots g FFN(x_t)


# ---- the MoE layer ----


@dataclass
class MoEStats:
    """What one MoE forward reports: tokens per expert (E,) (detached) and the balance loss (0 when alpha=0)."""

    load: torch.Tensor
    aux_loss: torch.Tensor


class MoE(nn.Module):
    """y = shared_experts(x) + Σ_{i∈TopK} g_i · expert_i(x), per token (no mixing across positions)."""

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                 num_experts_per_tok: int, n_shared_experts: int = 1, routed_scaling_factor: float = 2.827,
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 scoring_func: str = "sigmoid", aux_loss_alpha: float = 0.0, dispatch: str = "fast"):
        super().__init__()
        if not isinstance(n_shared_experts, int) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an integer >= 0, got {n_shared_experts!r}")
        if aux_loss_alpha < 0:
            raise ValueError(f"aux_loss_alpha must be >= 0, got {aux_loss_alpha}")
        self.router = Router(hidden_size, n_routed_experts, num_experts_per_tok, scoring_func, n_group,
                             topk_group, norm_topk_prob, routed_scaling_factor)
        self.experts = Experts(n_routed_experts, hidden_size, moe_intermediate_size)
        self.shared_experts = (SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts)
                               if n_shared_experts > 0 else None)
        self.aux_loss_alpha = aux_loss_alpha
        self.dispatch = dispatch

    @property
    def dispatch(self) -> str:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, value: str) -> None:
        if value not in ("naive", "fast"):
            raise ValueError(f"dispatch must be one of 'naive', 'fast', got {value!r}")
        self._dispatch = value

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        # B batch, S seq, D model dim, T=B*S tokens, E experts, K top-k
        B, S, D = x.shape
        flat = x.reshape(B * S, D)  # (T, D)
        topk_idx, topk_weight, scores = self.router(flat)  # (T, K), (T, K), (T, E)
        run = fast_dispatch if self._dispatch == "fast" else naive_dispatch
        y = run(flat, topk_idx, topk_weight.to(x.dtype), self.experts)  # (T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)  # (T, D): the always-on shared expert
        load = torch.bincount(topk_idx.flatten(), minlength=self.experts.n_experts).float()  # (E,)
        if self.aux_loss_alpha > 0:
            aux = sequence_balance_loss(scores.view(B, S, -1), topk_idx.view(B, S, -1), self.aux_loss_alpha)
        else:
            aux = x.new_zeros((), dtype=torch.float32)
        return y.view(B, S, D), MoEStats(load=load.detach(), aux_loss=aux)


# ---- a minimal MoE language model for the demos ----


class ToyMoELM(nn.Module):
    """Embedding -> causal token shift (x_t + W x_{t-1}) -> RMSNorm -> MoE (residual) -> head.
    Just enough context for the demos' tasks; chapter 2 builds the real decoder."""

    def __init__(self, vocab_size: int, hidden_size: int, **moe_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.shift = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm = nn.RMSNorm(hidden_size)
        self.moe = MoE(hidden_size, **moe_kwargs)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.embed(idx)  # (B, S, D)
        h = h + self.shift(F.pad(h, (0, 0, 1, 0))[:, :-1])  # (B, S, D): x_t + W x_{t-1}, causal
        y, stats = self.moe(self.norm(h))  # (B, S, D)
        logits = self.head(h + y)  # (B, S, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss, stats


def markov_batch(table: torch.Tensor, probs: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Sequences from a sparse random bigram language: token v is followed by table[v, j] w.p. probs[v, j]."""
    V = table.shape[0]
    start = torch.multinomial(torch.full((V,), 1.0 / V), batch, replacement=True, generator=gen)
    seqs = [start]
    for _ in range(seq):
        j = torch.multinomial(probs[seqs[-1]], 1, generator=gen).squeeze(1)  # (B,)
        seqs.append(table[seqs[-1], j])
    seqs = torch.stack(seqs, 1)  # (B, S+1)
    return seqs[:, :-1], seqs[:, 1:]


def make_markov_language(vocab_size: int, branching: int, gen: torch.Generator):
    """Zipf-skewed successors: frequent tokens are frequent successors, so the router sees skewed traffic."""
    zipf = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float)
    table = torch.multinomial(zipf.expand(vocab_size, -1), branching, generator=gen)  # (V, branching)
    probs = torch.rand(vocab_size, branching, generator=gen) ** 2 + 0.05
    return table, probs / probs.sum(-1, keepdim=True)


# ---- demo 1: load balance with and without the bias update ----


def train_balance(args, bias_speed: float, progress: Progress, task) -> list[dict]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    table, probs = make_markov_language(args.vocab_size, 4, gen)
    model = ToyMoELM(args.vocab_size, args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                     n_routed_experts=args.n_routed_experts, num_experts_per_tok=args.top_k,
                     routed_scaling_factor=args.routed_scaling_factor)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rows, window = [], []
    for step in range(1, args.steps + 1):
        idx, targets = markov_batch(table, probs, args.batch_size, args.seq_len, gen)
        _, loss, stats = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_router_bias_(model.moe, stats.load, bias_speed)  # after the optimizer step; speed 0 = off
        window.append((load_balance_stats(stats.load)["max_vio"], loss.item()))
        if step % args.log_every == 0:
            rows.append({"step": step, "max_vio": statistics.mean(v for v, _ in window),
                         "loss": statistics.mean(lo for _, lo in window),
                         "dead": load_balance_stats(stats.load)["dead_experts"]})
            window = []
        progress.advance(task)
    return rows


def demo_balance(args, console: Console) -> None:
    runs = {}
    with Progress(console=console, transient=True) as progress:
        for label, speed in (("no bias update", 0.0), (f"bias update γ={args.bias_update_speed}",
                                                        args.bias_update_speed)):
            task = progress.add_task(label, total=args.steps)
            runs[label] = train_balance(args, speed, progress, task)
    (a, ra), (b, rb) = runs.items()
    table = Table(title=f"Load balance, {args.n_routed_experts} experts top-{args.top_k} + 1 shared, toy bigram LM "
                        f"(MaxVio and loss averaged over the last {args.log_every} steps)")
    table.add_column("step", justify="right")
    for label in (a, b):
        table.add_column(f"MaxVio\n{label}", justify="right")
    for label in (a, b):
        table.add_column(f"loss\n{label}", justify="right")
    table.add_column("dead experts\n(no / with bias)", justify="right")
    for x, y in zip(ra, rb):
        table.add_row(str(x["step"]), f"{x['max_vio']:.3f}", f"{y['max_vio']:.3f}", f"{x['loss']:.3f}",
                      f"{y['loss']:.3f}", f"{x['dead']} / {y['dead']}")
    console.print(table)
    console.print("MaxVio = max_i load_i / mean load - 1 (0 = perfectly balanced). The bias only changes which "
                  "experts are selected; no auxiliary loss term enters the gradient.")


# ---- demo 2: the sparsity scaling law in miniature ----


def fact_batch(facts: torch.Tensor, n_symbols: int, batch: int, n_facts_per_seq: int, gen: torch.Generator):
    """Sequences `a b v a b v ...` where v = facts[a, b]; the target is v at each b position (else ignored)."""
    a = torch.randint(0, n_symbols, (batch, n_facts_per_seq), generator=gen)
    b = torch.randint(0, n_symbols, (batch, n_facts_per_seq), generator=gen)
    v = facts[a, b]  # (B, n)
    idx = torch.stack([a, b, v], -1).flatten(1)  # (B, 3n)
    targets = torch.full_like(idx, -100)
    targets[:, 1::3] = v  # predict v after seeing (a, b)
    return idx, targets


def train_facts(args, n_experts: int, seed: int, progress: Progress, task) -> list[float]:
    """Returns the validation loss at each evaluation (every args.eval_every steps)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    facts = torch.randint(0, args.n_symbols, (args.n_symbols, args.n_symbols), generator=gen)  # the knowledge
    val_gen = torch.Generator().manual_seed(10_000 + seed)
    val = [fact_batch(facts, args.n_symbols, args.sweep_batch_size, args.facts_per_seq, val_gen) for _ in range(4)]
    model = ToyMoELM(args.n_symbols, args.sweep_hidden_size, moe_intermediate_size=args.sweep_expert_size,
                     n_routed_experts=n_experts, num_experts_per_tok=args.sweep_top_k, n_shared_experts=1,
                     routed_scaling_factor=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sweep_lr, weight_decay=0.0)
    curve = []
    for step in range(1, args.sweep_steps + 1):
        idx, targets = fact_batch(facts, args.n_symbols, args.sweep_batch_size, args.facts_per_seq, gen)
        _, loss, stats = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_router_bias_(model.moe, stats.load, args.bias_update_speed)
        if step % args.eval_every == 0:
            with torch.no_grad():
                curve.append(statistics.mean(model(i, t)[1].item() for i, t in val))
        progress.advance(task)
    return curve


def demo_sparsity(args, console: Console) -> None:
    K = args.sweep_top_k
    sparsities, seeds = args.sparsities, args.seeds
    curves = {}
    with Progress(console=console) as progress:
        task = progress.add_task("sparsity sweep", total=len(sparsities) * len(seeds) * args.sweep_steps)
        for s in sparsities:
            curves[s] = [train_facts(args, s * K, seed, progress, task) for seed in seeds]
            progress.console.print(f"sparsity {s} ({s * K} experts): final val loss "  # partial result
                                   f"{statistics.mean(c[-1] for c in curves[s]):.3f} (mean of {len(seeds)} seeds)")
    mean_curve = {s: [statistics.mean(c[i] for c in cs) for i in range(len(cs[0]))] for s, cs in curves.items()}
    steps = [args.eval_every * (i + 1) for i in range(len(mean_curve[sparsities[0]]))]
    target = mean_curve[sparsities[0]][-1]  # the loss the least sparse model reaches at the end

    def steps_to(curve):  # first evaluation at or below the target loss (equal FLOPs per step for all)
        return next((st for st, v in zip(steps, curve) if v <= target), None)

    table = Table(title=f"Sparsity sweep: {K} routed + 1 shared expert active, same FLOPs/token and tokens; "
                        f"{args.n_symbols}x{args.n_symbols} random facts; {len(seeds)} seeds")
    for col in ("sparsity", "experts", "val loss (mean)", "± std over seeds", f"steps to loss {target:.3f}",
                f"FLOPs saved vs sparsity {sparsities[0]}"):
        table.add_column(col, justify="right")
    for s in sparsities:
        finals = [c[-1] for c in curves[s]]
        reach = steps_to(mean_curve[s])
        table.add_row(str(s), str(s * K), f"{statistics.mean(finals):.3f}",
                      f"{statistics.pstdev(finals):.3f}", str(reach) if reach else "not reached",
                      f"{steps[-1] / reach:.2f}x" if reach else "-")
    console.print(table)
    if not args.no_figures:
        plot_sparsity(args, sparsities, steps, mean_curve, console)


def plot_sparsity(args, sparsities, steps, mean_curve, console: Console) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for s in sparsities:
        left.plot(steps, mean_curve[s], label=f"sparsity {s}")
    left.set(xlabel="training steps (= FLOPs, the same per step)", ylabel="validation loss", title="Loss curves")
    left.legend()
    right.plot(sparsities, [mean_curve[s][-1] for s in sparsities], "o-")
    right.set(xscale="log", xlabel="sparsity (total / activated routed experts)", ylabel="final validation loss",
              title="More experts, same FLOPs: lower loss")
    right.set_xticks(sparsities, [str(s) for s in sparsities])
    fig.tight_layout()
    out = Path(args.figures_dir) / "sparsity_scaling.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    console.print(f"wrote {out}")


# ---- speed: fast dispatch vs a dense SwiGLU of the same activated FLOPs ----



def hf_deepseek_moe(D: int, Fd: int, E: int, K: int, impl: str):
    """transformers' DeepseekV3MoE with our bench layer's shape (1 shared expert, no groups), N(0, 0.02) weights;
    `impl` is its experts implementation ("eager" or "grouped_mm"). Raises ImportError without transformers."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=Fd, n_routed_experts=E, num_experts_per_tok=K,
                           n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                           routed_scaling_factor=2.827)
    cfg._experts_implementation = impl
    hf = DeepseekV3MoE(cfg)
    for p in hf.parameters():
        nn.init.normal_(p, std=0.02)
    return hf

def bench(args, console: Console) -> None:
    T, D, E, K, Fd = args.bench_tokens, 512, 64, 8, 128
    torch.manual_seed(args.seed)
    moe = MoE(D, Fd, E, K, n_shared_experts=1)
    nn.init.normal_(moe.router.weight, std=0.02)  # near-uniform routing, as early in training
    dense = SwiGLU(D, (K + 1) * Fd)  # same activated FLOPs: K routed + 1 shared expert of width F
    variants = {"dense SwiGLU (width (K+1)·F)": dense, "MoE, fast dispatch (ours)": moe}
    try:
        import transformers  # noqa: F401  (optional: DeepseekV3MoE for comparison)
    except ImportError:
        console.print("transformers not installed: skipping DeepseekV3MoE")
    else:
        for impl in ("eager", "grouped_mm"):  # transformers' per-expert loop, and its grouped-matmul kernel path
            hf = hf_deepseek_moe(D, Fd, E, K, impl)
            try:
                hf(torch.randn(1, 8, D, requires_grad=True)).sum().backward()
            except Exception as err:  # an implementation this torch build cannot run on this device
                console.print(f"skipping transformers DeepseekV3MoE ({impl}): {type(err).__name__}: {err}")
                continue
            variants[f"transformers DeepseekV3MoE ({impl})"] = hf
    x0 = torch.randn(1, T, D)
    load_before = os.getloadavg()[0]  # other processes on this machine skew timings

    def step(module):  # -> (wall seconds, CPU seconds of this process)
        x = x0.clone().requires_grad_()
        t0, c0 = time.perf_counter(), time.process_time()
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
        return time.perf_counter() - t0, time.process_time() - c0

    times = {name: [] for name in variants}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench (interleaved)", total=(args.bench_reps + 1) * len(variants))
        for rep in range(args.bench_reps + 1):  # rep 0 is warm-up; variants interleaved against noisy neighbours
            for name, module in variants.items():
                dt = step(module)
                if rep > 0:
                    times[name].append(dt)
                progress.advance(task)
    dense_name = "dense SwiGLU (width (K+1)·F)"
    base_wall = statistics.median(t for t, _ in times[dense_name])
    base_cpu = statistics.median(c for _, c in times[dense_name])
    table = Table(title=f"forward+backward, {T} tokens, D={D}, {E} experts top-{K} of width {Fd} + 1 shared; "
                        f"median of {args.bench_reps}, {torch.get_num_threads()} threads, load average before "
                        f"{load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    for col in ("variant", "wall ms (median)", "wall ms (min)", "wall / dense", "CPU ms (median)", "CPU / dense"):
        table.add_column(col, justify="right")
    for name, ts in times.items():
        wall, cpu = statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts)
        table.add_row(name, f"{wall * 1e3:.1f}", f"{min(t for t, _ in ts) * 1e3:.1f}", f"{wall / base_wall:.2f}x",
                      f"{cpu * 1e3:.1f}", f"{cpu / base_cpu:.2f}x")
    console.print(table)
    console.print("CPU ms = process CPU time: less sensitive than wall time to other processes on a shared machine "
                  "(with 1 thread it is the compute itself; with more it also counts threads spinning at barriers).")


# ---- the real sizes, on the meta device ----

MOE_PRESETS = {  # (D, F, E, K, shared, n_group, topk_group, scale) from the public config.json files
    "kimi-k2": (7168, 2048, 384, 8, 1, 1, 1, 2.827),
    "deepseek-v3": (7168, 2048, 256, 8, 1, 8, 4, 2.5),
}


def show_preset(args, console: Console) -> None:
    """One MoE layer of the chosen preset, built on the meta device ("meta": shapes only, no memory, no values)."""
    if args.preset == "tiny":  # demo 1's layer, from the flags
        sizes = (args.hidden_size, args.moe_intermediate_size, args.n_routed_experts, args.top_k, 1, 1, 1,
                 args.routed_scaling_factor)
    else:
        sizes = MOE_PRESETS[args.preset]
    D, Fd, E, K, shared, ng, tg, scale = sizes
    with torch.device("meta"):
        moe = MoE(D, Fd, E, K, shared, scale, ng, tg)
    total = sum(p.numel() for p in moe.parameters())
    activated = total - (E - K) * moe.experts.w_gate[0].numel() * 3  # idle experts: gate, up, down each
    table = Table(title=f"One MoE layer of {args.preset} (built on the meta device: shapes only, no memory used)")
    table.add_column("")
    table.add_column(args.preset, justify="right")
    for row in (("hidden size D / expert width F", f"{D} / {Fd}"),
                ("routed experts E, top-k K, shared", f"{E}, {K}, {shared}"),
                ("sparsity E / K", f"{E / K:g}"),
                ("routed_scaling_factor", f"{scale:g}"),
                ("group-limited routing", "none (1 group)" if ng == 1 else f"top {tg} of {ng} groups"),
                ("parameters in the layer", f"{total:,} ({_human(total)})"),
                ("activated per token", f"{activated:,} ({_human(activated)})")):
        table.add_row(*row)
    console.print(table)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


# ---- command line ----


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sparsity-sweep", action="store_true", help="run the sparsity scaling sweep instead of demo 1")
    mode.add_argument("--bench", action="store_true", help="only time fast dispatch vs dense SwiGLU vs DeepseekV3MoE")
    mode.add_argument("--preset", choices=["tiny", "kimi-k2", "deepseek-v3"], default=None,
                      help="only print one MoE layer's sizes (tiny = demo 1's layer; meta device)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of one run (demo 1, bench)")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch CPU threads (unset: 1 for the tiny demos, torch's default for --bench)")
    # demo 1
    p.add_argument("--steps", type=cli.positive_int, default=400, help="training steps per run (load balance demo)")
    p.add_argument("--log-every", type=cli.positive_int, default=50, help="table row every this many steps")
    p.add_argument("--vocab-size", type=cli.positive_int, default=256, help="toy bigram language vocabulary")
    p.add_argument("--hidden-size", type=cli.positive_int, default=64, help="model width D")
    p.add_argument("--moe-intermediate-size", type=cli.positive_int, default=64, help="expert width F")
    p.add_argument("--n-routed-experts", type=cli.positive_int, default=16, help="routed experts E")
    p.add_argument("--top-k", type=cli.positive_int, default=2, help="routed experts per token K")
    p.add_argument("--routed-scaling-factor", type=cli.positive_float, default=2.827, help="gate scale (K2: 2.827)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=cli.positive_int, default=64, help="tokens per sequence (load balance demo)")
    p.add_argument("--lr", type=cli.positive_float, default=3e-3, help="AdamW learning rate (load balance demo)")
    p.add_argument("--bias-update-speed", type=cli.nonneg_float, default=0.01,
                   help="γ in b_i += γ·sign(mean - load_i) (DeepSeek-V3: 0.001 over far more steps)")
    # demo 2
    p.add_argument("--sparsities", type=cli.positive_int_list, default=[1, 2, 4, 8, 16, 32],
                   help="comma-separated total/activated ratios to sweep (the first one is the baseline)")
    p.add_argument("--seeds", type=cli.nonneg_int_list, default=[0, 1],
                   help="sweep: comma-separated seeds, one run per seed and sparsity, averaged")
    p.add_argument("--n-symbols", type=cli.positive_int, default=64, help="symbols; facts are all (a, b) -> v pairs")
    p.add_argument("--facts-per-seq", type=cli.positive_int, default=16,
                   help="facts (3 tokens each) per training sequence")
    p.add_argument("--sweep-steps", type=cli.positive_int, default=600, help="training steps per sweep run")
    p.add_argument("--eval-every", type=cli.positive_int, default=50, help="validation every this many sweep steps")
    p.add_argument("--sweep-hidden-size", type=cli.positive_int, default=16, help="model width D in the sweep")
    p.add_argument("--sweep-expert-size", type=cli.positive_int, default=16, help="expert width F in the sweep")
    p.add_argument("--sweep-top-k", type=cli.positive_int, default=2, help="activated routed experts in the sweep")
    p.add_argument("--sweep-batch-size", type=cli.positive_int, default=32, help="sequences per sweep step")
    p.add_argument("--sweep-lr", type=cli.positive_float, default=3e-3, help="AdamW learning rate in the sweep")
    p.add_argument("--figures-dir", type=cli.out_dir, default="figures", help="where sparsity_scaling.png goes")
    p.add_argument("--no-figures", action="store_true", help="sweep: do not write the figure")
    # bench
    p.add_argument("--bench-tokens", type=cli.positive_int, default=4096, help="tokens per bench step")
    p.add_argument("--bench-reps", type=cli.positive_int, default=7,
                   help="timed repetitions per variant (median reported)")
    args = p.parse_args(argv)
    if args.preset in (None, "tiny") and not args.bench:  # checked before any training starts
        try:
            _check_router_config(args.n_routed_experts, args.top_k, 1, 1, "sigmoid", args.routed_scaling_factor)
        except ValueError as err:
            cli.flag_error(p, err, {"num_experts_per_tok": "--top-k", "n_routed_experts": "--n-routed-experts"})
    if args.sparsity_sweep and args.eval_every > args.sweep_steps:
        p.error(f"argument --eval-every: {args.eval_every} > --sweep-steps {args.sweep_steps}: no validation point")
    if not (args.sparsity_sweep or args.bench or args.preset) and args.log_every > args.steps:
        p.error(f"argument --log-every: {args.log_every} > --steps {args.steps}: the table would have no row")
    console = Console()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif not args.bench:
        torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP hand-offs (and noisy neighbours)
    if args.preset:
        show_preset(args, console)
    elif args.bench:
        bench(args, console)
    elif args.sparsity_sweep:
        demo_sparsity(args, console)
    else:
        demo_balance(args, console)


if __name__ == "__main__":
    cli.run(main)
