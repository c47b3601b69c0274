"""Chapter 2: Multi-head Latent Attention (MLA) and the Kimi K2 decoder.

What it is
    Standard multi-head attention caches a key and a value vector per head for every past token: for K2's
    64 heads of 192/128 dims that is 20,480 numbers per token per layer. MLA (DeepSeek-V2 §2.1) caches one
    shared latent c_kv (kv_lora_rank = 512) plus one shared RoPE key k_rope (qk_rope_head_dim = 64): 576
    numbers, 36x fewer. The per-head keys and values are linear functions of c_kv: k_nope = W_UK·c_kv and
    v = W_UV·c_kv (W_UK, W_UV: the "up-projections" stacked in kv_b_proj), so at decode time W_UK can be folded
    ("absorbed") into the query and W_UV into the output: attention then runs directly on the latent cache and
    the full keys/values never exist. Position enters through RoPE (rotary position embedding, RoFormer: each
    pair of query/key dims is rotated by an angle proportional to the token's position, so q·k depends on
    the distance between tokens). It gets its own decoupled dims (q_rope, k_rope), because a rotation between
    W_UK and the query would block absorption. YaRN rescales RoPE's frequencies to stretch a 4k-trained context.
    Kimi K2 keeps DeepSeek-V3's MLA but uses 64 heads instead of 128: at 128k context 128 heads would cost
    +83% inference FLOPs for only 0.5-1.2% lower validation loss (K2 report §2.3). This file also builds the
    whole K2 decoder: embedding, 1 dense SwiGLU layer (the gated FFN W_down(silu(W_gate x) * W_up x)), then MoE
    layers from chapter 1, 61 layers: 1,026,408,209,408 parameters counted from config.json (published: 1.04T;
    `--preset kimi-k2` shows what each counting convention gives).

Design choices
    - Names follow transformers' DeepseekV3 (q_a_proj, kv_a_proj_with_mqa, kv_b_proj, ...), so a checkpoint is a
      rename away (`to_hf_state_dict` / `from_hf_state_dict` at the end of the file; parity is tested).
    - RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... as the DeepSeek/Kimi checkpoints do
      (transformers: `rope_interleave=True`), so real checkpoint weights load without any permutation.
    - The decode cache is an explicit object (`model.new_cache(...)`) passed to `forward`; it holds only the
      latent (c_kv, k_rope). Two attention paths read it: "naive" re-expands it to full K/V every step (what
      transformers does), "absorbed" works in latent space. Training never touches a cache.
    - Training attention uses torch's fused SDPA (`scaled_dot_product_attention`, is_causal=True); cached attention is written out by hand so
      the reader sees the mask for a multi-token prefill chunk (query i sees keys <= start_pos + i).
    - S_max (the per-head max pre-softmax logit QK-Clip needs, chapter 3) is recorded on request, in fp32, in plain
      attributes: `last_s_max` (the last forward) and `step_s_max` (the max over every forward since QK-Clip last
      consumed it, i.e. over all micro-batches of a step); it never feeds back into the output.
    - Mixed precision: under `model.to(torch.bfloat16)` or bf16 autocast, the router (logits, bias), RoPE
      (frequencies, tables, rotation) and S_max stay fp32.

Simplified vs K2
    - No multi-token-prediction (MTP) module, an extra layer trained to predict the token after next (K2's
      checkpoint has none; DeepSeek-V3 has 1, not built; `num_nextn_predict_layers` kept).
    - No FP8, no tensor parallel, no fused MLA or MoE kernels; fp32 on CPU, bf16 on CUDA.
    - Batched generation takes equal-length prompts (no left padding / attention mask).
    - tiny() has 4 layers of width 128 and 32 experts top-4 (sparsity 8, K2: 48); ratios noted in tiny().

References
    DeepSeek-V2 (arXiv 2405.04434) §2.1.2 low-rank KV joint compression and absorption, §2.1.3 decoupled RoPE,
    App. C full MLA formulas;
    DeepSeek-V3 (arXiv 2412.19437) §2.1; Kimi K2 (arXiv 2507.20534) §2.3 (64 heads, +83% FLOPs), §2.1 (QK-Clip);
    YaRN (arXiv 2309.00071) §3.2-3.4; RoFormer (arXiv 2104.09864); Chinchilla (arXiv 2203.15556) App. F (FLOPs).

Run:
    python 02_mla.py --help
    python 02_mla.py            # tables for the real configs + tiny-model checks on CPU (20-50 s on 2 cores)
    python 02_mla.py --preset kimi-k2   # one config: parameters by component, published vs counted, KV, FLOPs
    python 02_mla.py --bench    # our training step vs transformers' DeepseekV3; absorbed vs naive decode at 4k
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import cli

moe_lib = importlib.import_module("01_moe")  # chapter 1: SwiGLU, MoE, update_router_bias_


# ---- config ----

@dataclass
class ModelConfig:
    """The K2 architecture; field names are those of K2's config.json (HF DeepseekV3)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    q_lora_rank: int = 1536  # 0 = no query bottleneck (q_proj instead of q_a/q_b)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    intermediate_size: int = 18432  # dense FFN of the first layers
    moe_intermediate_size: int = 2048  # per expert
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.827
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None  # YaRN: factor, beta_fast, beta_slow, mscale, mscale_all_dim, original_max_...
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    aux_loss_alpha: float = 0.001  # sequence-wise balance loss weight (K2 config.json)
    bias_update_speed: float = 0.001  # u in the aux-loss-free bias rule b_i += u*sign(mean - load_i)
    num_nextn_predict_layers: int = 0  # MTP modules of the checkpoint; recorded, not built here

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str):
            if not ok:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive int")
        need(isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 0, "q_lora_rank", "an int >= 0 (0 = no LoRA)")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "even (RoPE rotates pairs)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size > 0, "intermediate_size", "> 0 when there are dense layers")
        if self.first_k_dense_replace < self.num_hidden_layers:  # there are MoE layers
            need(self.n_routed_experts >= 1, "n_routed_experts", ">= 1")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"in [1, n_routed_experts={self.n_routed_experts}]")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "> 0")
            need(self.n_shared_experts >= 0, "n_shared_experts", ">= 0")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"a divisor of n_routed_experts={self.n_routed_experts}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(self.n_group == 1 or per_group >= 2, "n_group", "such that each group has >= 2 experts")
            need(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"<= topk_group * experts per group = {self.topk_group * per_group}")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", "'sigmoid' or 'softmax'")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "> 0")
        need(self.rope_theta > 0, "rope_theta", "> 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "> 0")
        need(self.aux_loss_alpha >= 0, "aux_loss_alpha", ">= 0")
        need(self.bias_update_speed >= 0, "bias_update_speed", ">= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", ">= 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(isinstance(rs, dict), "rope_scaling", "None or a dict")
            kind = rs.get("type", rs.get("rope_type"))
            need(kind == "yarn", "rope_scaling", "None or {'type': 'yarn', ...} (only YaRN is implemented)")
            unknown = set(rs) - {"type", "rope_type", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                 "original_max_position_embeddings"}
            need(not unknown, "rope_scaling", f"free of unknown keys {sorted(unknown)}")
            need(float(rs.get("factor", 0)) >= 1, "rope_scaling", "a dict with factor >= 1")
            need(int(rs.get("original_max_position_embeddings", 0)) > 0, "rope_scaling",
                 "a dict with original_max_position_embeddings > 0")

    # -- presets --
    @classmethod
    def kimi_k2(cls, **overrides) -> ModelConfig:
        """Kimi K2 (moonshotai/Kimi-K2-Instruct config.json): 1,026,408,209,408 weights, 32,861,477,888 activated
        (published: 1.04T / 32.6B; `python 02_mla.py --preset kimi-k2` reconciles them)."""
        base = dict(rope_scaling=dict(type="yarn", factor=32.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0,
                                      mscale_all_dim=1.0, original_max_position_embeddings=4096))
        return cls(**{**base, **overrides})

    @classmethod
    def deepseek_v3(cls, **overrides) -> ModelConfig:
        """DeepSeek-V3 (deepseek-ai/DeepSeek-V3 config.json): 671B total, 37B activated (MTP not built)."""
        base = dict(vocab_size=129280, num_attention_heads=128, n_routed_experts=256, first_k_dense_replace=3,
                    routed_scaling_factor=2.5, n_group=8, topk_group=4, rope_theta=10000.0,
                    rope_scaling=dict(type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                      mscale_all_dim=1.0, original_max_position_embeddings=4096),
                    max_position_embeddings=163840, aux_loss_alpha=0.001, num_nextn_predict_layers=1)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A K2-shaped miniature that trains on a laptop CPU in minutes (override e.g. vocab_size=...).

        Kept from K2: 1 dense layer first, sigmoid router with 1 shared expert, q/kv bottlenecks, rope dim = half
        the no-rope dim, v dim = no-rope dim, dense FFN ~2.6x hidden, expert FFN ~hidden/4, routed scale 2.827.
        Changed: 4 layers, width 128, 4 heads, 32 experts top-4 (sparsity 8 instead of 48), vocab 512.
        """
        base = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96,
                    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=336,
                    moe_intermediate_size=32, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
                    first_k_dense_replace=1, rope_theta=50000.0, rope_scaling=None, max_position_embeddings=8192,
                    bias_update_speed=0.01)
        return cls(**{**base, **overrides})

    # -- config.json interop (bodies at the end of the file, with the state-dict renames) --
    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike) -> ModelConfig:
        """Read a K2 / DeepSeek-V3 config.json (dict or path). An absent key means what it means to transformers'
        DeepseekV3Config (HF_DEFAULTS); a setting this implementation would not honour raises, naming the key."""
        return config_from_hf(cls, config)

    def to_hf(self) -> dict:
        """A config.json dict in K2's format; `transformers.DeepseekV3Config(**cfg.to_hf())` accepts it."""
        return config_to_hf(self)


# ---- norms and rotary position embedding (RoPE + YaRN) ----

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x²) + eps), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1·m·ln(s) + 1 (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ_i of the rope dims and the cos/sin magnitude (YaRN §3.2-3.4, as in DeepSeek-V3).

    Plain RoPE: θ_i = base^(-2i/d). YaRN keeps high-frequency dims (many rotations within the original context)
    as they are, divides low-frequency dims by `factor` (position interpolation), and ramps linearly between the
    dims that rotate beta_fast and beta_slow times over original_max_position_embeddings.
    """
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor, orig = float(rs["factor"]), int(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def dim_of(n_rot: float) -> float:  # the dim whose wavelength fits n_rot rotations into `orig` positions
        return d * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)  # 0 keep, 1 stretch
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq, attention_factor


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)² when context is stretched (DeepSeek-V3)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x_2i, x_2i+1) by angle pos·θ_i; cos/sin broadcast to x[..., ::2].
    Computed in fp32 (a bf16 x is upcast), returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


# ---- multi-head latent attention ----

@dataclass
class LayerCache:
    """One layer's latent decode cache: c_kv (B, T_max, kv_lora_rank) and k_rope (B, T_max, qk_rope_head_dim)."""

    c_kv: torch.Tensor
    k_rope: torch.Tensor
    absorbed: bool = True  # which attention path reads it; the contents are the same for both


@dataclass
class DecodeCache:
    layers: list[LayerCache]

    @property
    def absorbed(self) -> bool:
        return self.layers[0].absorbed

    def with_mode(self, absorbed: bool) -> DecodeCache:
        """The same cached tensors (shared, not copied) read by the other attention path."""
        return DecodeCache([LayerCache(c.c_kv, c.k_rope, absorbed) for c in self.layers])


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1) with decoupled RoPE and an optional latent cache.

    Row layout (QK-Clip, chapter 3, relies on it): q weight viewed (H, dn+dr, in): rows [:dn] = W_qc, [dn:] = W_qr;
    kv_b_proj.weight viewed (H, dn+dv, r): rows [:dn] = W_kc (= W_UK), [dn:] = W_UV; kv_a rows [r:] = shared W_kr.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        H, D, r, dr = self.num_heads, cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)  # W_DQ: x -> c_q
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)  # [W_UQ; W_QR] per head
        else:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, r + dr, bias=False)  # [W_DKV; W_KR]: x -> (c_kv, k_rope)
        self.kv_a_layernorm = RMSNorm(r, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(r, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)  # [W_UK; W_UV] per head
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        self.softmax_scale = softmax_scale(cfg)
        self.record_s_max = False
        self.last_s_max: torch.Tensor | None = None  # (H,) fp32, from the last forward when record_s_max
        # (H,) fp32, max over every recording forward since QK-Clip last consumed it (all micro-batches of a step)
        self.step_s_max: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, start_pos: int = 0,
                cache: LayerCache | None = None) -> torch.Tensor:
        # B batch, S new tokens, T cached+new tokens, H heads, D model dim
        # dn no-rope head dim, dr rope head dim, dv value head dim, r kv_lora_rank; cos/sin: (S, dr/2)
        B, S, _ = x.shape
        H, dn, dr, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank > 0:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # q = W_UQ·RMSNorm(W_DQ·x)  (B, S, H*(dn+dr))
        else:
            q = self.q_proj(x)  # (B, S, H*(dn+dr))
        q_nope, q_rope = q.view(B, S, H, dn + dr).split([dn, dr], dim=-1)  # (B, S, H, dn), (B, S, H, dr)
        q_rope = apply_rope(q_rope, cos[:, None], sin[:, None])  # RoPE per head
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # (B, S, r), (B, S, dr)
        c_kv = self.kv_a_layernorm(c_kv)  # the latent that gets cached
        k_rope = apply_rope(k_rope, cos, sin)  # one rope key shared by all heads  (B, S, dr)

        if cache is None:  # training / uncached: expand K, V and run fused causal attention
            o = self._attend_training(q_nope, q_rope, c_kv, k_rope)  # (B, S, H, dv)
        else:
            T = start_pos + S
            if T > cache.c_kv.shape[1] or B > cache.c_kv.shape[0]:
                raise ValueError(f"cache too small: need batch {B} x length {T}, have {tuple(cache.c_kv.shape[:2])}")
            cache.c_kv[:B, start_pos:T] = c_kv
            cache.k_rope[:B, start_pos:T] = k_rope
            c_kv, k_rope = cache.c_kv[:B, :T], cache.k_rope[:B, :T]  # (B, T, r), (B, T, dr)
            # query i sits at position start_pos + i and may see keys 0 .. start_pos + i (causal inside the chunk)
            mask = torch.arange(T, device=x.device) <= torch.arange(start_pos, T, device=x.device)[:, None]  # (S, T)
            attend = self._attend_absorbed if cache.absorbed else self._attend_naive
            o = attend(q_nope, q_rope, c_kv, k_rope, mask)  # (B, S, H, dv)
        return self.o_proj(o.reshape(B, S, H * self.v_head_dim))  # (B, S, D)

    def _expand(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_nope = W_UK·c_kv and v = W_UV·c_kv for every head: (B, T, H, dn), (B, T, H, dv)."""
        B, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, T, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    def _attend_training(self, q_nope, q_rope, c_kv, k_rope):
        B, S, H, _ = q_nope.shape
        k_nope, v = self._expand(c_kv)  # (B, S, H, dn), (B, S, H, dv)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, S, dn+dr)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, H, -1)], dim=-1).transpose(1, 2)  # (B, H, S, dn+dr)
        dv, dqk = self.v_head_dim, q.shape[-1]
        if dv < dqk:  # zero-pad v to the qk dim: torch's fused (flash) kernel wants equal head dims; ~1.4x on CPU
            v = F.pad(v, (0, dqk - dv))  # (B, S, H, dn+dr)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale)
        o = o[..., :dv]  # (B, H, S, dv)
        if self.record_s_max:  # SDPA hides its logits: recompute them, 256 queries at a time (bounded memory)
            with torch.no_grad(), torch.autocast(q.device.type, enabled=False):  # fp32 matmul, even under bf16
                s_max = torch.full((H,), float("-inf"), device=q.device)
                qf, kf = q.float(), k.float()
                for i in range(0, S, 256):
                    n = min(256, S - i)
                    logits = (qf[:, :, i:i + n] @ kf[:, :, :i + n].transpose(-2, -1)) * self.softmax_scale
                    causal = torch.arange(i + n, device=q.device) <= torch.arange(i, i + n, device=q.device)[:, None]
                    self._record(logits, causal)  # logits (B, H, n, i+n), causal (n, i+n)
                    s_max = torch.maximum(s_max, self.last_s_max)
                self.last_s_max = s_max  # (H,)
                self._fold_step_s_max()
        return o.transpose(1, 2)  # (B, S, H, dv)

    def _attend_naive(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Re-expand the whole latent cache to per-head K/V, then ordinary attention (what transformers does)."""
        B, T, _ = c_kv.shape
        k_nope, v = self._expand(c_kv)  # (B, T, H, dn), (B, T, H, dv): O(T·r·H·(dn+dv)) work per step
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, T, self.num_heads, -1)], dim=-1)  # (B, T, H, dn+dr)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, S, H, dn+dr)
        # einsum letters: b batch, s query, t key, h head, d qk dim, v value dim, c latent, r rope
        logits = torch.einsum("bshd,bthd->bhst", q, k) * self.softmax_scale  # (B, H, S, T)
        p = self._softmax(logits, mask)
        return torch.einsum("bhst,bthv->bshv", p, v)  # (B, S, H, dv)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attention in latent space (DeepSeek-V2 §2.1.2): W_UK folds into the query, W_UV into the output.

        q_nope·k_nope = q_nope·(W_UK c) = (W_UKᵀ q_nope)·c   and   Σ_t p_t (W_UV c_t) = W_UV (Σ_t p_t c_t).
        """
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]  # (H, dn, r), (H, dv, r)
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # q̃ = W_UKᵀ q_nope  (B, S, H, r)
        logits = (torch.einsum("bshc,btc->bhst", q_lat, c_kv)
                  + torch.einsum("bshr,btr->bhst", q_rope, k_rope)) * self.softmax_scale  # (B, H, S, T)
        p = self._softmax(logits, mask)
        o_lat = torch.einsum("bhst,btc->bshc", p, c_kv)  # Σ_t p_t c_t  (B, S, H, r)
        return torch.einsum("bshc,hvc->bshv", o_lat, w_uv)  # W_UV · o_lat  (B, S, H, dv)

    def _softmax(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.record_s_max:
            with torch.no_grad():
                self._record(logits.float(), mask)
                self._fold_step_s_max()
        return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(logits.dtype)

    def _record(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """S_max^h = max over batch, queries and allowed keys of the pre-softmax logit (K2 §2.1)."""
        self.last_s_max = logits.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3)).detach().float()  # (H,)

    def _fold_step_s_max(self) -> None:
        """step_s_max ← max(step_s_max, last_s_max): the step's S_max covers every micro-batch, not the last."""
        s = self.last_s_max
        self.step_s_max = s.clone() if self.step_s_max is None else torch.maximum(self.step_s_max, s)


# ---- the K2 decoder ----

class Block(nn.Module):
    """Pre-norm block: x += MLA(norm(x)); x += FFN(norm(x)), FFN = SwiGLU (first layers) or MoE (chapter 1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer_idx >= cfg.first_k_dense_replace
        if self.is_moe:
            self.mlp = moe_lib.MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                                   cfg.num_experts_per_tok, n_shared_experts=cfg.n_shared_experts,
                                   routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
                                   topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                                   scoring_func=cfg.scoring_func, aux_loss_alpha=cfg.aux_loss_alpha)
        else:
            self.mlp = moe_lib.SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, *, start_pos=0, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos=start_pos, cache=cache)  # (B, S, D)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, stats = self.mlp(h)
        else:
            y, stats = self.mlp(h), None
        return x + y, stats


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, V); None on a pipeline stage without the head
    loss: torch.Tensor | None = None  # mean CE over targets != -100, plus aux_loss
    aux_loss: torch.Tensor | None = None  # sum of the MoE layers' balance losses (0 when aux_loss_alpha = 0)
    expert_load: torch.Tensor | None = None  # (n_moe_layers, E) tokens per expert in this forward
    hidden: torch.Tensor | None = None  # (B, S, D) output of the last held layer (for pipeline stages)


class Transformer(moe_lib.KeepBuffersFP32):
    """The K2 decoder. A pipeline stage can hold a slice: `Transformer(cfg, layer_ids=range(8, 16), embed=False)`.
    RoPE's inverse frequencies stay fp32 under `.to(torch.bfloat16)` (rounded to bf16 they put pos·θ at position 4096
    off by radians; tests/test_02_mla.py measures it); the cos/sin tables are fp32 and `apply_rope` rotates in fp32."""

    fp32_buffers = ("rope_inv_freq",)

    def __init__(self, cfg: ModelConfig, *, layer_ids=None, embed: bool = True, head: bool = True):
        super().__init__()
        self.cfg = cfg
        ids = range(cfg.num_hidden_layers) if layer_ids is None else list(layer_ids)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if embed else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in ids)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if head else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if head else None
        inv_freq, self.rope_attention_factor = rope_frequencies(cfg)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)  # (dr/2,), never trained
        for p in self.parameters():  # DeepSeek-V3 init: N(0, 0.02) for every matrix, norms at 1
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
        if cfg.tie_word_embeddings and embed and head:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, start_pos: int, S: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start_pos, start_pos + S, device=self.rope_inv_freq.device, dtype=torch.float32)
        angle = pos[:, None] * self.rope_inv_freq[None, :]  # pos·θ_i  (S, dr/2)
        a = self.rope_attention_factor
        return (angle.cos() * a).to(dtype), (angle.sin() * a).to(dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, start_pos: int = 0,
                cache: DecodeCache | None = None) -> ModelOutput:
        # B batch, S seq, D model dim, V vocab, E routed experts; idx: (B, S) token ids or (B, S, D) hidden states
        B, S = idx.shape[:2]
        if start_pos < 0 or start_pos + S > self.cfg.max_position_embeddings:
            raise ValueError(f"positions {start_pos}..{start_pos + S - 1} outside "
                             f"[0, max_position_embeddings={self.cfg.max_position_embeddings})")
        h = self.embed_tokens(idx) if self.embed_tokens is not None else idx  # (B, S, D)
        cos, sin = self.rope(start_pos, S, torch.float32)  # fp32 tables, also for a bf16 model
        aux_loss, loads = h.new_zeros((), dtype=torch.float32), []
        for i, layer in enumerate(self.layers):
            h, stats = layer(h, cos, sin, start_pos=start_pos, cache=None if cache is None else cache.layers[i])
            if stats is not None:
                aux_loss = aux_loss + stats.aux_loss
                loads.append(stats.load)
        if self.lm_head is None:
            return ModelOutput(logits=None, aux_loss=aux_loss, expert_load=torch.stack(loads) if loads else None,
                               hidden=h)
        logits = self.lm_head(self.norm(h))  # (B, S, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100) + aux_loss
        return ModelOutput(logits, loss, aux_loss, torch.stack(loads) if loads else None, h)

    def new_cache(self, batch_size: int, max_len: int, *, absorbed: bool = True, dtype=None, device=None) -> DecodeCache:
        """An empty latent cache, kept outside the module: (kv_lora_rank + qk_rope_head_dim) values per token/layer."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        c = self.cfg
        return DecodeCache([LayerCache(torch.zeros(batch_size, max_len, c.kv_lora_rank, dtype=dtype, device=device),
                                       torch.zeros(batch_size, max_len, c.qk_rope_head_dim, dtype=dtype, device=device),
                                       absorbed) for _ in self.layers])

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: DecodeCache, chunk: int = 512) -> torch.Tensor:
        """Fill the cache with a prompt, chunk by chunk (attention logits stay (B, H, chunk, T)); last logits (B, V)."""
        for pos in range(0, idx.shape[1], chunk):
            logits = self(idx[:, pos:pos + chunk], start_pos=pos, cache=cache).logits
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stop_tokens=(), generator: torch.Generator | None = None,
                 use_cache: bool = True, absorbed: bool = True, pad_token_id: int = 0) -> torch.Tensor:
        """Sample continuations of equal-length prompts idx (B, S0) -> (B, S0 + n).

        temperature 0 = greedy. A row that emits a stop token is finished: later positions hold pad_token_id and
        generation ends when every row is finished. use_cache=False recomputes the whole prefix each step.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        B, S0 = idx.shape
        if S0 < 1:
            raise ValueError("idx must hold at least one prompt token per row")
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=idx.device)
        cache = self.new_cache(B, S0 + max_new_tokens, absorbed=absorbed) if use_cache else None
        out, done = idx, torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits = self.prefill(idx, cache) if use_cache else None
        for step in range(max_new_tokens):
            if not use_cache:
                logits = self(out).logits[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)  # (B, S0 + step + 1)
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                logits = self(nxt[:, None], start_pos=S0 + step, cache=cache).logits[:, -1]
        return out

    # -- hooks later chapters use --
    def moe_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def set_record_s_max(self, flag: bool) -> None:
        for layer in self.layers:
            layer.self_attn.record_s_max = flag
            layer.self_attn.last_s_max = layer.self_attn.step_s_max = None

    def s_max(self) -> torch.Tensor:
        """(num_layers, H) per-head max logits of the last forward (needs set_record_s_max(True) before it)."""
        vals = [layer.self_attn.last_s_max for layer in self.layers]
        if any(v is None for v in vals):
            raise RuntimeError("no S_max recorded: call set_record_s_max(True) and run a forward first")
        return torch.stack(vals)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy when temperature == 0, else temperature / top-k / top-p."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be None or >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be None or in (0, 1]")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def update_router_biases_(model: Transformer, loads: torch.Tensor, speed: float) -> None:
    """Aux-loss-free balancing for every MoE layer: loads (n_moe_layers, E), e.g. ModelOutput.expert_load."""
    moes = model.moe_layers()
    if len(loads) != len(moes):
        raise ValueError(f"loads has {len(loads)} rows but the model has {len(moes)} MoE layers")
    for moe, load in zip(moes, loads):
        moe_lib.update_router_bias_(moe, load, speed)


# ---- counting: parameters, KV cache, FLOPs ----

def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated per token) weights of Transformer(cfg), built on the meta device (PyTorch tensors with
    shapes but no storage: a 1T-parameter model is counted without memory).

    Activated = everything a token touches: embedding row, attention, dense FFNs, router, shared expert, its
    num_experts_per_tok routed experts, final norm, head. Buffers (router bias, rope) are not weights.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up, down
    idle = len(model.moe_layers()) * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - idle


def kv_cache_values_per_token(cfg: ModelConfig, attention: str = "mla", n_kv_heads: int | None = None) -> int:
    """Values cached per token per layer: MLA caches c_kv + k_rope; MHA/GQA cache per-(kv)head keys and values."""
    if attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if attention == "mha":
        return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    if attention == "gqa":
        g = n_kv_heads or 8
        if cfg.num_attention_heads % g:
            raise ValueError(f"n_kv_heads={g} must divide num_attention_heads={cfg.num_attention_heads}")
        return g * (cfg.qk_head_dim + cfg.v_head_dim)
    raise ValueError(f"attention={attention!r}; allowed: 'mla', 'mha', 'gqa'")


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "chinchilla") -> float:
    """Inference FLOPs for one token with seq_len tokens of context; 2 FLOPs per multiply-add throughout.

    Weights: 2 x activated parameters of count_params (embedding and head included, as Chinchilla counts them).
    Attention core per layer, by convention:
      "chinchilla"   (Hoffmann et al. 2022, App. F): logits + reduce = 2·seq_len·H·(dn + dv); every token attends
                     to the full seq_len (no causal discount), the rope dims are not counted. With it, K2's 64 -> 128
                     heads at 128k context is +83% (1.8315x), the report's figure.
      "mla_prefill": what MLA actually computes in a causal prefill of seq_len tokens: 2·avg_keys·H·(dn+dr+dv),
                     avg_keys = (seq_len+1)/2. Gives +77%.
      "mla_absorbed_decode": one decode step at position seq_len in latent space: 2·seq_len·H·(2r + dr). Gives +95%.
      "mla_naive_decode": the same step, re-expanding the latent cache to per-head keys and values first:
                     2·seq_len·H·(r·(dn + dv) + dn + dr + dv). Absorbed decode counts more FLOPs per token than
                     prefill (every key, not (seq_len+1)/2 on average, each scored in the r-dim latent space) and far
                     fewer than this re-expansion.
    """
    total, activated = count_params(cfg)
    H, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    if convention == "chinchilla":
        attn = 2 * seq_len * H * (dn + dv)
    elif convention == "mla_prefill":
        attn = 2 * (seq_len + 1) / 2 * H * (dn + dr + dv)
    elif convention == "mla_absorbed_decode":
        attn = 2 * seq_len * H * (2 * r + dr)
    elif convention == "mla_naive_decode":
        attn = 2 * seq_len * H * (r * (dn + dv) + dn + dr + dv)
    else:
        raise ValueError(f"convention={convention!r}; allowed: 'chinchilla', 'mla_prefill', 'mla_absorbed_decode', "
                         "'mla_naive_decode'")
    return 2.0 * activated + cfg.num_hidden_layers * attn


# ---- transformers interop (config.json and DeepseekV3ForCausalLM names) ----

# What transformers' DeepseekV3Config (5.x) assumes for a key absent from config.json: a file must mean here what it
# means there (a test compares these with DeepseekV3Config() when transformers is installed). Keys transformers
# does not know (scoring_func, aux_loss_alpha, bias_update_speed) keep ModelConfig's defaults.
HF_DEFAULTS = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                   num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                   routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                   qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                   norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                   rope_theta=10000.0, rope_scaling=None, num_nextn_predict_layers=1)

# config.json keys that do not change the model we build, whatever their value
HF_IGNORED_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
                   "quantization_config", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "ep_size",
                   "output_router_logits", "_name_or_path", "tokenizer_class", "pretraining_tp"}


def config_from_hf(cls, config: dict | str | os.PathLike) -> ModelConfig:
    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)
    d = dict(config)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {**HF_DEFAULTS, **{k: d.pop(k) for k in list(d) if k in fields}}
    if kwargs["q_lora_rank"] is None:
        kwargs["q_lora_rank"] = 0  # HF writes null for "no query bottleneck"
    if "num_mtp_layers" in d:  # transformers 5 spelling
        kwargs["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
    rope = d.pop("rope_parameters", None)  # transformers 5 folds rope_theta and the scaling into one dict
    if rope:
        rope = dict(rope)
        kwargs["rope_theta"] = rope.pop("rope_theta", kwargs["rope_theta"])
        kind = rope.pop("rope_type", rope.get("type", "default"))
        kwargs["rope_scaling"] = None if kind == "default" else {**rope, "type": kind}
    if kwargs.get("rope_scaling") is not None:
        rs = dict(kwargs["rope_scaling"])
        kind = rs.pop("rope_type", None)
        rs.setdefault("type", kind)
        kwargs["rope_scaling"] = rs
    # keys whose other values would change the model in ways this implementation does not build
    supported = {"hidden_act": {"silu"}, "attention_bias": {False}, "moe_layer_freq": {1},
                 "topk_method": {"noaux_tc"}, "rope_interleave": {True}, "attention_dropout": {0.0},
                 "seq_aux": {True}, "initializer_range": {0.02},
                 "num_key_value_heads": {None, kwargs["num_attention_heads"]},
                 "qk_head_dim": {kwargs["qk_nope_head_dim"] + kwargs["qk_rope_head_dim"]},
                 "head_dim": {kwargs["qk_rope_head_dim"]}}
    for key, allowed in supported.items():
        if key in d and d.pop(key) not in allowed:
            raise ValueError(f"from_hf: {key}={config[key]!r} is not supported (allowed: {sorted(map(str, allowed))})")
    unknown = set(d) - HF_IGNORED_KEYS
    if unknown:
        raise ValueError(f"from_hf: unknown config keys {sorted(unknown)}; refusing to guess their meaning")
    return cls(**kwargs)


def config_to_hf(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["q_lora_rank"] = cfg.q_lora_rank or None
    d.pop("bias_update_speed")  # a training hyperparameter, not part of config.json
    d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
             num_key_value_heads=cfg.num_attention_heads, moe_layer_freq=1, topk_method="noaux_tc",
             attention_bias=False, rope_interleave=True, seq_aux=True)
    return d


def to_hf_state_dict(model: Transformer, expert_layout: str = "stacked") -> dict[str, torch.Tensor]:
    """Our weights under DeepseekV3ForCausalLM names. expert_layout "stacked" = transformers 5
    (experts.gate_up_proj (E, 2F, D), experts.down_proj (E, D, F)); "per_expert" = the hub checkpoints'
    experts.{e}.gate_proj/up_proj/down_proj.weight."""
    if expert_layout not in ("stacked", "per_expert"):
        raise ValueError(f"expert_layout={expert_layout!r}; allowed: 'stacked', 'per_expert'")
    out, sd = {}, model.state_dict()
    for name, t in sd.items():
        key = name if name.startswith("lm_head.") else "model." + name
        if ".mlp.router." in key:
            out[key.replace(".mlp.router.", ".mlp.gate.")] = t
        elif ".mlp.experts.w_gate" in key:
            prefix = key.split("experts.w_gate")[0] + "experts."
            w_up, w_down = sd[name.replace("w_gate", "w_up")], sd[name.replace("w_gate", "w_down")]
            if expert_layout == "stacked":
                out[prefix + "gate_up_proj"] = torch.cat([t, w_up], dim=1)  # (E, 2F, D): gate rows then up rows
                out[prefix + "down_proj"] = w_down  # (E, D, F)
            else:
                for e in range(t.shape[0]):
                    out[f"{prefix}{e}.gate_proj.weight"] = t[e]
                    out[f"{prefix}{e}.up_proj.weight"] = w_up[e]
                    out[f"{prefix}{e}.down_proj.weight"] = w_down[e]
        elif ".mlp.experts.w_up" in key or ".mlp.experts.w_down" in key:
            continue  # handled with w_gate
        else:
            out[key] = t
    return out


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DeepseekV3ForCausalLM state dict (stacked or per-expert experts) -> our names, for model.load_state_dict."""
    out, per_expert = {}, {}
    F_ = cfg.moe_intermediate_size
    for key, t in sd.items():
        if key.startswith("model.layers.") and int(key.split(".")[2]) >= cfg.num_hidden_layers:
            continue  # MTP layers of the hub checkpoint (layer 61 in DeepSeek-V3) are not built here
        name = key[len("model."):] if key.startswith("model.") else key
        if ".mlp.gate." in name:
            out[name.replace(".mlp.gate.", ".mlp.router.")] = t
        elif name.endswith("experts.gate_up_proj"):
            out[name.replace("gate_up_proj", "w_gate")] = t[:, :F_]
            out[name.replace("gate_up_proj", "w_up")] = t[:, F_:]
        elif name.endswith("experts.down_proj"):
            out[name.replace("down_proj", "w_down")] = t
        elif ".mlp.experts." in name:  # layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
            prefix, rest = name.split(".mlp.experts.")
            e, proj = rest.split(".")[:2]
            per_expert.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = t
        else:
            out[name] = t
    ours = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
    for prefix, projs in per_expert.items():
        for proj, by_e in projs.items():
            if sorted(by_e) != list(range(cfg.n_routed_experts)):
                raise ValueError(f"{prefix}: expected experts 0..{cfg.n_routed_experts - 1} for {proj}, got {len(by_e)}")
            out[f"{prefix}.mlp.experts.{ours[proj]}"] = torch.stack([by_e[e] for e in range(cfg.n_routed_experts)])
    return out


def hf_model(cfg: ModelConfig, model: Transformer | None = None, attn_implementation: str = "eager"):
    """transformers' DeepseekV3ForCausalLM for cfg, loaded (strictly) with our model's weights when given."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf(), attn_implementation=attn_implementation))
    if model is not None:
        hf.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf.to(next(model.parameters()).dtype if model is not None else torch.float32)


# ---- demo and bench ----

def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _timeit(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so background load hits all sides alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


PRESETS = {"tiny": ModelConfig.tiny, "kimi-k2": ModelConfig.kimi_k2, "deepseek-v3": ModelConfig.deepseek_v3}
PUBLISHED = {"kimi-k2": "1.04T / 32.6B (K2 report)", "deepseek-v3": "671B / 37B (DeepSeek-V3 report)"}


def param_breakdown(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{component: (total, activated per token)} of Transformer(cfg), from its parameter names (meta device).

    Activated counts as count_params does: all of every weight a token passes through, the whole embedding
    matrix included (a lookup reads one row of it), and num_experts_per_tok / n_routed_experts of the routed experts.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    parts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            part = "input embedding"
        elif "lm_head" in name:
            part = "output head"
        elif "self_attn" in name and "layernorm" not in name:
            part = "attention (MLA projections)"
        elif "mlp.experts" in name:
            part = "routed experts"
        elif "shared_experts" in name:
            part = "shared experts"
        elif "mlp.router" in name:
            part = "routers"
        elif ".mlp." in name:
            part = "dense FFN (first layers)"
        else:
            part = "RMSNorm weights"
        n = p.numel()
        act = n * cfg.num_experts_per_tok // cfg.n_routed_experts if part == "routed experts" else n
        t = parts.setdefault(part, [0, 0])
        t[0], t[1] = t[0] + n, t[1] + act
    return {k: (v[0], v[1]) for k, v in parts.items()}


def mtp_layer_params(cfg: ModelConfig, own_embedding_and_head: bool = False) -> tuple[int, int]:
    """(total, activated) of one multi-token-prediction (MTP) module of DeepSeek-V3's shape: a MoE decoder block,
    the projection eh_proj (D x 2D) of [norm(h); norm(embedding)] and three RMSNorms; with its own copies of the
    embedding and head if `own_embedding_and_head` (as DeepSeek-V3's checkpoint stores them). Not built here."""
    D = cfg.hidden_size
    with torch.device("meta"):
        block = Block(cfg, cfg.first_k_dense_replace)  # a MoE layer
    total = sum(p.numel() for p in block.parameters()) + 2 * D * D + 3 * D
    idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * D * cfg.moe_intermediate_size
    extra = 2 * cfg.vocab_size * D if own_embedding_and_head else 0
    return total + extra, total - idle + extra


def _both(n: int) -> str:
    return f"{n:,} ({_fmt(n)})"


def reconcile_table(console, preset: str) -> None:
    """The published total / activated next to what each counting convention gives, so the rounding is visible."""
    from rich.table import Table

    cfg = PRESETS[preset]()
    total, act = count_params(cfg)
    emb = head = cfg.vocab_size * cfg.hidden_size
    m_total, m_act = mtp_layer_params(cfg)
    t = Table(title=f"{preset}: published {PUBLISHED[preset]} vs counting conventions (weights, meta device)")
    for col in ("count", "total", "activated / token"):
        t.add_column(col, justify="right")
    t.add_row("as built from config.json (embedding and head included)", _both(total), _both(act))
    t.add_row("without the input embedding (a lookup, no matmul)", _both(total - emb), _both(act - emb))
    t.add_row("without input embedding and output head", _both(total - emb - head), _both(act - emb - head))
    t.add_row("+ 1 MTP layer (DeepSeek-V3 shape, embedding/head shared)", _both(total + m_total), _both(act + m_act))
    if preset == "deepseek-v3":  # its checkpoint stores the MTP layer with its own embedding and head copies
        mo_total, _ = mtp_layer_params(cfg, own_embedding_and_head=True)
        t.add_row("+ 1 MTP layer with its own embedding and head (the checkpoint)", _both(total + mo_total), "-")
    console.print(t)
    if preset == "kimi-k2":
        console.print("K2's config.json has num_nextn_predict_layers = 0 (no MTP layer) and the report does not say "
                      "what its figures include. 1.04T matches only the count with one MTP layer (without it the "
                      "total rounds to 1.03T); 32.6B matches none of these counts (nearest: 32.86B with embedding "
                      "and head, 31.69B without the input embedding).")
    else:
        console.print("DeepSeek-V3's 671B is the main model without its MTP layer; its checkpoint, published as 685B, "
                      "adds the MTP layer with its own embedding and head (684.49B counted here). 37B activated lies "
                      "between the counts with (37.55B) and without (36.63B) the input embedding.")


def breakdown_table(console, preset: str) -> None:
    from rich.table import Table

    cfg = PRESETS[preset]()
    parts = param_breakdown(cfg)
    total, act = count_params(cfg)
    t = Table(title=f"{preset}: parameters by component ({cfg.num_hidden_layers} layers, "
                    f"{cfg.first_k_dense_replace} dense; meta device: shapes only, no memory)")
    for col in ("component", "total", "activated / token"):
        t.add_column(col, justify="right")
    for name, (n, a) in sorted(parts.items(), key=lambda kv: -kv[1][0]):
        t.add_row(name, _both(n), _both(a))
    t.add_row("sum (count_params)", _both(total), _both(act))
    console.print(t)


def kv_table(console, models: list[tuple[str, ModelConfig]]) -> None:
    from rich.table import Table

    t = Table(title="KV cache per token (bf16 = 2 bytes/value; GQA = grouped-query attention, MHA = multi-head)")
    for col in ("model", "attention", "values / token / layer", "KiB / token (all layers)", "vs MLA"):
        t.add_column(col, justify="right")
    for name, cfg in models:
        mla = kv_cache_values_per_token(cfg)
        g = next(g for g in (8, 4, 2, 1) if cfg.num_attention_heads % g == 0)
        for kind, label, n_kv in (("mla", "MLA (c_kv + k_rope)", None), ("gqa", f"GQA, {g} kv heads", g),
                                  ("mha", f"MHA, {cfg.num_attention_heads} heads", None)):
            v = kv_cache_values_per_token(cfg, kind, n_kv)
            t.add_row(name, label, f"{v:,}", f"{v * 2 * cfg.num_hidden_layers / 1024:,.1f}", f"{v / mla:.1f}x")
    console.print(t)


FLOP_CONVENTIONS = ("chinchilla", "mla_prefill", "mla_absorbed_decode", "mla_naive_decode")


def demo_tables(console) -> None:
    from rich.table import Table

    k2, dsv3 = ModelConfig.kimi_k2(), ModelConfig.deepseek_v3()
    k2_128 = ModelConfig.kimi_k2(num_attention_heads=128)
    t = Table(title="Parameter counts (meta device: shapes only, no memory)")
    for col in ("model", "total", "activated", "activated excl. embedding", "published"):
        t.add_column(col, justify="right")
    for name, cfg, pub in (("Kimi K2", k2, "1.04T / 32.6B"), ("Kimi K2, 128 heads", k2_128, "-"),
                           ("DeepSeek-V3 (no MTP)", dsv3, "671B / 37B")):
        total, act = count_params(cfg)
        t.add_row(name, f"{total:,}", f"{act:,}", f"{act - cfg.vocab_size * cfg.hidden_size:,}", pub)
    console.print(t)
    reconcile_table(console, "kimi-k2")
    kv_table(console, [("Kimi K2", k2), ("DeepSeek-V3", dsv3)])

    t = Table(title="Inference FLOPs per token, Kimi K2 with 64 vs 128 heads (384 experts)")
    for col in ("context", "convention", "64 heads", "128 heads", "128 / 64"):
        t.add_column(col, justify="right")
    for seq in (4096, 32768, 131072):
        for conv in FLOP_CONVENTIONS:
            a, b = flops_per_token(k2, seq, conv), flops_per_token(k2_128, seq, conv)
            t.add_row(f"{seq // 1024}k", conv, _fmt(a), _fmt(b), f"{b / a:.3f}x (+{(b / a - 1) * 100:.0f}%)")
    console.print(t)
    console.print("K2 report: 128 heads cost +83% inference FLOPs at 128k context (the chinchilla rows). A decode "
                  "step counts more FLOPs than a prefill token (it scores every past key, in the 512-dim latent "
                  "space when absorbed) but far fewer than the naive decode that re-expands the cache; conventions: "
                  "see flops_per_token.")


def demo_preset(console, preset: str) -> None:
    """--preset: one configuration's parameters by component, KV cache and FLOPs per token."""
    from rich.table import Table

    cfg = PRESETS[preset]()
    breakdown_table(console, preset)
    if preset in PUBLISHED:
        reconcile_table(console, preset)
    kv_table(console, [(preset, cfg)])
    t = Table(title=f"{preset}: inference FLOPs per token (2 per multiply-add)")
    for col in ("context", "convention", "FLOPs / token"):
        t.add_column(col, justify="right")
    for seq in [s for s in (4096, 32768, 131072) if s <= cfg.max_position_embeddings] or [cfg.max_position_embeddings]:
        for conv in FLOP_CONVENTIONS:
            t.add_row(f"{seq // 1024}k", conv, _fmt(flops_per_token(cfg, seq, conv)))
    console.print(t)


def demo_tiny(console, context: int, steps: int) -> None:
    from rich.table import Table

    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 12))
    t = Table(title=f"Tiny model on CPU ({_fmt(count_params(cfg)[0])} params)")
    t.add_column("check")
    t.add_column("result", justify="right")
    with torch.no_grad():
        full = model(prompt).logits
        for absorbed in (False, True):
            cache = model.new_cache(2, 12, absorbed=absorbed)
            pre = model(prompt[:, :5], cache=cache).logits  # a 5-token prefill chunk, then one token at a time
            steps_ = [model(prompt[:, i:i + 1], start_pos=i, cache=cache).logits for i in range(5, 12)]
            diff = (torch.cat([pre, *steps_], 1) - full).abs().max().item()
            t.add_row(f"max |logits| diff, uncached vs cached ({'absorbed' if absorbed else 'naive'})", f"{diff:.2e}")
        g = torch.Generator().manual_seed(0)
        a = model.generate(prompt, 16, temperature=0)
        b = model.generate(prompt, 16, temperature=0, use_cache=False)
        c = model.generate(prompt, 16, temperature=0, absorbed=False)
        t.add_row("greedy 16 tokens: cached absorbed == uncached == cached naive", str(bool((a == b).all() and (a == c).all())))
        s = model.generate(prompt, 8, temperature=0.8, top_k=50, top_p=0.9, generator=g)
        t.add_row("sampled (T=0.8, top-k 50, top-p 0.9, seed 0), row 0", " ".join(map(str, s[0, 12:].tolist())))

        B = 4
        ctx = torch.randint(0, cfg.vocab_size, (B, context))
        cache = model.new_cache(B, context + steps, absorbed=True)
        model.prefill(ctx, cache)  # both paths then read the same latent cache
        tok = ctx[:, -1:]
        paths = {a: (lambda a=a: model(tok, start_pos=context, cache=cache.with_mode(a))) for a in (False, True)}
        med = _timeit(paths, steps)  # one decode step at position `context`, the two paths interleaved
        speed = {a: B / med[a] for a in paths}
        t.add_row(f"decode tokens/s, batch {B} at {context} context, naive (re-expand the latent cache)",
                  f"{speed[False]:.0f}")
        t.add_row(f"decode tokens/s, batch {B} at {context} context, absorbed (attend in latent space)",
                  f"{speed[True]:.0f}  ({speed[True] / speed[False]:.1f}x)")
    console.print(t)


def bench(console, repeats: int) -> None:
    from rich.table import Table

    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    ours = Transformer(cfg)
    t = Table(title=f"--bench: medians of {repeats} interleaved repeats, CPU fp32, {torch.get_num_threads()} threads")
    t.add_column("measurement")
    t.add_column("ours", justify="right")
    t.add_column("reference", justify="right")
    t.add_column("speed-up", justify="right")
    try:
        hf = hf_model(cfg, ours, attn_implementation="sdpa")
    except ImportError:
        hf = None
        console.print("transformers not installed: skipping the training-step comparison")
    x = torch.randint(0, cfg.vocab_size, (8, 256))
    if hf is not None:
        opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4)
        opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-4)

        def step_ours():
            out = ours(x[:, :-1], x[:, 1:])
            out.loss.backward()
            opt_a.step()
            opt_a.zero_grad(set_to_none=True)

        def step_hf():
            out = hf(input_ids=x[:, :-1], labels=x[:, :-1].clone())  # HF shifts labels itself
            out.loss.backward()
            opt_b.step()
            opt_b.zero_grad(set_to_none=True)

        step_ours(), step_hf()  # warm-up
        med = _timeit({"ours": step_ours, "hf": step_hf}, repeats)
        t.add_row("tiny training step, batch 8x255 (fwd+bwd+AdamW)", f"{med['ours'] * 1e3:.0f} ms",
                  f"{med['hf'] * 1e3:.0f} ms (transformers DeepseekV3)", f"{med['hf'] / med['ours']:.2f}x")

    ours.eval()
    context, B = 4096, 4
    with torch.no_grad():
        cache = ours.new_cache(B, context + 1)
        ours.prefill(torch.randint(0, cfg.vocab_size, (B, context)), cache)
        mla, layer0 = ours.layers[0].self_attn, cache.layers[0]
        h = torch.randn(B, 1, cfg.hidden_size)
        cos, sin = ours.rope(context, 1, h.dtype)
        step = {a: (lambda a=a: mla(h, cos, sin, start_pos=context, cache=LayerCache(layer0.c_kv, layer0.k_rope, a)))
                for a in (False, True)}
        med = _timeit({"naive": step[False], "absorbed": step[True]}, repeats * 5)
        tok = torch.randint(0, cfg.vocab_size, (B, 1))
        fm = {a: (lambda a=a: ours(tok, start_pos=context, cache=cache.with_mode(a))) for a in (False, True)}
        medm = _timeit({"naive": fm[False], "absorbed": fm[True]}, repeats * 2)
    t.add_row(f"MLA decode step at {context} context, batch {B} (one layer)", f"{med['absorbed'] * 1e3:.2f} ms absorbed",
              f"{med['naive'] * 1e3:.2f} ms naive re-expand", f"{med['naive'] / med['absorbed']:.1f}x")
    t.add_row(f"whole tiny model decode step at {context} context, batch {B}", f"{medm['absorbed'] * 1e3:.2f} ms absorbed",
              f"{medm['naive'] * 1e3:.2f} ms naive re-expand", f"{medm['naive'] / medm['absorbed']:.1f}x")
    console.print(t)


def main(argv=None) -> None:
    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--bench", action="store_true",
                      help="only time our training step vs transformers and absorbed vs naive decode")
    mode.add_argument("--preset", choices=list(PRESETS), default=None,
                      help="only print one configuration's parameters by component, KV cache and FLOPs (meta device)")
    p.add_argument("--repeats", type=cli.positive_int, default=7,
                   help="interleaved repeats per timing in --bench (median taken)")
    p.add_argument("--context", type=cli.positive_int, default=2048,
                   help="context length for the demo's decode-speed row")
    p.add_argument("--decode-steps", type=cli.positive_int, default=16,
                   help="decode steps timed per path (median) for the demo's speed row")
    p.add_argument("--threads", type=cli.nonneg_int, default=1,
                   help="torch CPU threads (tiny models run best on 1; 0 = torch's default)")
    args = p.parse_args(argv)
    limit = ModelConfig.tiny().max_position_embeddings
    if args.context + args.decode_steps > limit:
        p.error(f"argument --context: --context + --decode-steps = {args.context + args.decode_steps} exceeds the "
                f"tiny model's max_position_embeddings {limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(shutil.get_terminal_size().columns, 130))
    if args.bench:
        bench(console, args.repeats)
    elif args.preset:
        demo_preset(console, args.preset)
    else:
        demo_tables(console)
        demo_tiny(console, args.context, args.decode_steps)


if __name__ == "__main__":
    cli.run(main)
