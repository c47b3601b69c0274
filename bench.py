"""bench.py: every performance figure of the project, each a ratio measured side by side inside one run.

Each row times two or more variants of the same work (ours vs a reference, the fast path vs the naive one) with the
calls interleaved, A B A B ... (the order rotated every round), and reports the ratio of their medians, so the load
that other processes put on a shared machine hits every variant alike. Every figure sits beside its target, marked
met or missed. Each row runs in a fresh process (multiprocessing "spawn"), so its peak resident memory is its own:
`peak RSS` = the process's ru_maxrss high-water mark, `row RSS` = that minus the resident size after the imports
(what the row's models, caches and activations added).

Rows (`--only NAME` runs one; repeat the flag for several):
    moe           MoE layer forward+backward vs a dense SwiGLU of equal activated FLOPs, the input needing its
                  gradient and not needing it
    moe_dispatch  fast sorted dispatch vs the naive per-expert loop and transformers' DeepseekV3MoE
    moe_scaling   MoE forward+backward time at 1x, 2x, 4x tokens (2048, 4096, 8192)
    mla_decode    one MLA decode step at 4k context with K2's attention shapes: absorbed latent cache vs
                  re-expanding it, and vs a full per-head K/V cache (cache sizes printed)
    decode_scaling  absorbed decode time per token at 1k, 4k, 16k context
    muonclip      a training step with MuonClip (Newton-Schulz on every matrix and expert stack, S_max recording,
                  QK-Clip) vs the same step with AdamW
    pretrain      a pretraining step at the bench preset vs transformers' DeepseekV3ForCausalLM (same weights via
                  chapter 2's interop), and its MFU against a matmul peak measured in the same run
    engine        chapter 6's checkpoint engine (1 trainer, 2 workers on gloo): bucketed broadcast vs one buffer,
                  and vs one broadcast per tensor, at 2 model sizes
    train         `python train.py` wall clock (up to 10 min: only with --only train)

Bench preset (rows pretrain and muonclip): chapter 2's tiny() with hidden 256, dense FFN 672, expert width 64
(4 layers, 4 heads, 32 experts top-4 + 1 shared, vocab 512), batch 8 x 256 tokens.

Run:
    python bench.py --help
    python bench.py                      # every row but train: about 5 minutes on 2 quiet cores
    python bench.py --only moe --only mla_decode --json bench.json
    python bench.py --quick              # micro sizes, 2 repeats: checks the plumbing in well under a minute
    python bench.py --only train         # python train.py's wall clock (up to 10 minutes)
    python bench.py --keep-freed-memory  # the same with glibc keeping freed memory (see docs/01_moe.md)
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import cli

ROOT = Path(__file__).resolve().parent

# ---- measuring: interleaved medians, peak memory ----


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Opts:
    """How a row runs: micro sizes or real ones, timed rounds, and the clock (wall time, or this process's CPU
    time: with 1 thread on a loaded machine the steadier one, as it does not count time spent waiting for a core)."""

    quick: bool = False
    reps: int = 7
    clock: str = "wall"


def interleaved(fns: dict, o: Opts, reps: int | None = None, warmup: int = 1) -> dict[str, float]:
    """Median seconds (o.clock) per call of each fn. Round r calls every fn once, the order rotated by r (A B C,
    B C A, ...), so a burst of load from other processes lands on all variants alike; `warmup` rounds are not
    timed."""
    names, clock = list(fns), CLOCKS[o.clock]
    times = {k: [] for k in names}
    for r in range(warmup + (reps or o.reps)):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = clock()
            fns[k]()
            dt = clock() - t0
            if r >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class Line:
    """One figure of a row: `ratio` of two measured times (or a share), its target and whether it is met."""

    what: str
    against: str
    ratio: float
    target: str
    met: bool | None  # None: no target (a scaling line or an informative figure)
    detail: str = ""
    unit: str = "x"  # how the figure prints: "x" (a ratio), "%" (a share), "min"


@dataclass
class RowResult:
    name: str
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    available: bool = True
    peak_rss_mib: float = 0.0
    row_rss_mib: float = 0.0
    seconds: float = 0.0


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


# ---- the models each row measures ----


def bench_config(quick: bool):
    """The bench preset: chapter 2's tiny() at hidden 256 (micro sizes with --quick)."""
    mla = importlib.import_module("02_mla")
    if quick:
        return mla.ModelConfig.tiny(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                    moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2)
    return mla.ModelConfig.tiny(hidden_size=256, intermediate_size=672, moe_intermediate_size=64)


def k2_attention_config(quick: bool, max_len: int):
    """K2's attention shapes (64 heads, dn 128, dr 64, dv 128, kv_lora_rank 512, q_lora_rank 1536) on a narrow
    residual stream (hidden 1024), so one decode step's cost is the cache, as at K2 scale, not the projections."""
    mla = importlib.import_module("02_mla")
    if quick:
        return mla.ModelConfig.tiny(max_position_embeddings=max_len)
    return mla.ModelConfig.kimi_k2(hidden_size=1024, num_hidden_layers=1, first_k_dense_replace=1,
                                   intermediate_size=64, vocab_size=64, rope_scaling=None,
                                   max_position_embeddings=max_len)


# ---- rows: MoE ----


def _moe_pair(quick: bool):
    moe_lib = importlib.import_module("01_moe")
    T, D, E, K, Fd = (256, 64, 8, 2, 16) if quick else (4096, 512, 64, 8, 128)
    torch.manual_seed(0)
    moe = moe_lib.MoE(D, Fd, E, K, n_shared_experts=1)
    torch.nn.init.normal_(moe.router.weight, std=0.02)  # near-uniform routing, as early in training
    dense = moe_lib.SwiGLU(D, (K + 1) * Fd)  # same activated FLOPs: K routed + 1 shared expert of width F
    return moe, dense, (T, D, E, K, Fd)


def _fwd_bwd(module, x0: torch.Tensor, input_grad: bool):
    def step():
        x = x0.clone().requires_grad_(input_grad)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
    return step


def row_moe(o: Opts) -> RowResult:
    quick = o.quick
    moe, dense, (T, D, E, K, Fd) = _moe_pair(quick)
    x0 = torch.randn(1, T, D)
    fns = {}
    for grad in (True, False):
        fns[("dense", grad)] = _fwd_bwd(dense, x0, grad)
        fns[("moe", grad)] = _fwd_bwd(moe, x0, grad)
    med = interleaved(fns, o)
    res = RowResult("moe")
    with_grad = med[("moe", True)] / med[("dense", True)]
    no_grad = med[("moe", False)] / med[("dense", False)]
    res.lines.append(Line("MoE fwd+bwd, input needs grad (fast dispatch)", "dense SwiGLU, equal activated FLOPs",
                          with_grad, "<= 1.30x", with_grad <= 1.30,
                          f"{_ms(med[('moe', True)])} vs {_ms(med[('dense', True)])}"))
    res.lines.append(Line("MoE fwd+bwd, input needs no grad", "dense SwiGLU, same setting", no_grad,
                          f"<= row above ({with_grad:.2f}x)", no_grad <= with_grad,
                          f"{_ms(med[('moe', False)])} vs {_ms(med[('dense', False)])}"))
    res.notes.append(f"moe: {T} tokens, D={D}, {E} experts top-{K} of width {Fd} + 1 shared; dense width {(K + 1) * Fd}")
    return res


def row_moe_dispatch(o: Opts) -> RowResult:
    quick = o.quick
    moe, _, (T, D, E, K, Fd) = _moe_pair(quick)
    x0 = torch.randn(1, T, D)
    res = RowResult("moe_dispatch")
    moe_mod = importlib.import_module("01_moe")
    naive = moe_mod.MoE(D, Fd, E, K, n_shared_experts=1, dispatch="naive")
    naive.load_state_dict(moe.state_dict())
    fns = {"fast": _fwd_bwd(moe, x0, True), "naive loop": _fwd_bwd(naive, x0, True)}
    try:
        import transformers  # noqa: F401  (optional: DeepseekV3MoE for comparison)
    except ImportError:
        res.notes.append("moe_dispatch: transformers not installed, DeepseekV3MoE skipped")
    else:
        for impl in ("eager", "grouped_mm"):
            hf = moe_mod.hf_deepseek_moe(D, Fd, E, K, impl)
            try:
                _fwd_bwd(hf, x0[:, :8], True)()
            except Exception as err:  # an implementation this torch build cannot run on this device
                res.notes.append(f"moe_dispatch: DeepseekV3MoE ({impl}) skipped: {type(err).__name__}: {err}")
                continue
            fns[f"transformers DeepseekV3MoE ({impl})"] = _fwd_bwd(hf, x0, True)
    med = interleaved(fns, o)
    for name, t in med.items():
        if name != "fast":
            r = t / med["fast"]
            res.lines.append(Line("MoE fast dispatch (speed-up)", name, r, "> 1.00x", r > 1.0,
                                  f"{_ms(med['fast'])} vs {_ms(t)}"))
    return res


def row_moe_scaling(o: Opts) -> RowResult:
    quick = o.quick
    moe, _, (T, D, *_rest) = _moe_pair(quick)
    T //= 2  # 1x = half the moe row's tokens, so 4x stays within a few seconds a step
    xs = {m: torch.randn(1, m * T, D) for m in (1, 2, 4)}
    med = interleaved({m: _fwd_bwd(moe, x, True) for m, x in xs.items()}, o)
    res = RowResult("moe_scaling")
    for m in (2, 4):
        res.lines.append(Line(f"MoE fwd+bwd at {m}x tokens ({m * T})", f"1x tokens ({T})", med[m] / med[1],
                              f"~{m}x (linear)", None, f"{_ms(med[m])} vs {_ms(med[1])}"))
    return res


# ---- rows: MLA decode ----


@torch.no_grad()
def full_kv_decode(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: int) -> torch.Tensor:
    """One decode step of MLA with an ordinary full K/V cache: per-head keys (B, T, H, dn+dr) and values
    (B, T, H, dv) stored for every past token, as multi-head attention would (K2 shapes: 20,480 values per token
    per layer against MLA's 576). The baseline the latent cache is weighed against; same output as chapter 2's
    absorbed path (tests/test_bench.py)."""
    B, S, _ = x.shape  # S = 1 new token at position pos
    H, dn, dr, r = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))) if attn.q_lora_rank > 0 else attn.q_proj(x)
    q_nope, q_rope = q.view(B, S, H, dn + dr).split([dn, dr], dim=-1)  # (B, 1, H, dn), (B, 1, H, dr)
    mla = importlib.import_module("02_mla")
    q_rope = mla.apply_rope(q_rope, cos[:, None], sin[:, None])
    c_kv, k_rope = attn.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # (B, 1, r), (B, 1, dr)
    k_rope = mla.apply_rope(k_rope, cos, sin)
    k_nope, v = attn._expand(attn.kv_a_layernorm(c_kv))  # (B, 1, H, dn), (B, 1, H, dv): only the new token
    k_cache[:B, pos] = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, H, dr)], dim=-1)[:, 0]
    v_cache[:B, pos] = v[:, 0]
    k, v = k_cache[:B, : pos + 1].transpose(1, 2), v_cache[:B, : pos + 1].transpose(1, 2)  # (B, H, T, ·)
    qh = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, 1, dn+dr)
    o = F.scaled_dot_product_attention(qh, k, v, scale=attn.softmax_scale)  # one query sees every cached key
    return attn.o_proj(o.transpose(1, 2).reshape(B, S, -1))  # (B, 1, D)


def _decode_setup(quick: bool, context: int, batch: int = 1, full_kv: bool = False):
    """One MLA layer with K2's attention shapes and a latent cache holding `context` random past tokens (the values
    do not change the cost); the full K/V cache, when asked for, holds the same keys and values expanded."""
    mla = importlib.import_module("02_mla")
    cfg = k2_attention_config(quick, context + 1)
    torch.manual_seed(0)
    attn = mla.MLA(cfg).eval()
    for p in attn.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    c_kv = torch.randn(batch, context + 1, cfg.kv_lora_rank)
    k_rope = torch.randn(batch, context + 1, cfg.qk_rope_head_dim)
    kv = None
    if full_kv:
        with torch.no_grad():
            k_nope, v = attn._expand(c_kv)  # (B, T, H, dn), (B, T, H, dv)
            H = cfg.num_attention_heads
            kv = (torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, H, -1)], dim=-1).contiguous(), v.contiguous())
    inv_freq, factor = mla.rope_frequencies(cfg)
    angle = torch.tensor([float(context)])[:, None] * inv_freq[None]  # (1, dr/2)
    cos, sin = angle.cos() * factor, angle.sin() * factor
    x = torch.randn(batch, 1, cfg.hidden_size)
    return mla, cfg, attn, c_kv, k_rope, kv, x, cos, sin


def row_mla_decode(o: Opts) -> RowResult:
    quick = o.quick
    context = 256 if quick else 4096
    mla, cfg, attn, c_kv, k_rope, (k_full, v_full), x, cos, sin = _decode_setup(quick, context, full_kv=True)

    def latent(absorbed: bool):
        cache = mla.LayerCache(c_kv, k_rope, absorbed)
        return lambda: attn(x, cos, sin, start_pos=context, cache=cache)

    with torch.no_grad():
        med = interleaved({"absorbed": latent(True), "naive": latent(False),
                           "full": lambda: full_kv_decode(attn, x, cos, sin, k_full, v_full, context)}, o)
    res = RowResult("mla_decode")
    mla_vals = mla.kv_cache_values_per_token(cfg)
    mha_vals = mla.kv_cache_values_per_token(cfg, "mha")
    k2 = mla.ModelConfig.kimi_k2()
    r = med["naive"] / med["absorbed"]
    res.lines.append(Line(f"MLA decode step at {context} context, absorbed latent cache (speed-up)",
                          "re-expanding the latent cache each step", r, ">= 5.0x", r >= 5.0,
                          f"{_ms(med['absorbed'])} vs {_ms(med['naive'])}"))
    r = med["absorbed"] / med["full"]
    res.lines.append(Line(f"same, absorbed (time ratio; cache {mla_vals} vs {mha_vals} values/token/layer)",
                          "a full per-head K/V cache", r, "<= 2.0x slower", r <= 2.0,
                          f"{_ms(med['absorbed'])} vs {_ms(med['full'])}"))
    res.notes.append(f"mla_decode: one MLA layer, batch 1, {cfg.num_attention_heads} heads, dn {cfg.qk_nope_head_dim}, "
                     f"dr {cfg.qk_rope_head_dim}, dv {cfg.v_head_dim}, kv_lora_rank {cfg.kv_lora_rank}, hidden "
                     f"{cfg.hidden_size}; cache per token per layer: latent {mla_vals} vs full K/V {mha_vals} "
                     f"({mha_vals / mla_vals:.1f}x; K2: {mla.kv_cache_values_per_token(k2)} vs "
                     f"{mla.kv_cache_values_per_token(k2, 'mha')})")
    return res


def row_decode_scaling(o: Opts) -> RowResult:
    quick = o.quick
    contexts = (64, 256, 1024) if quick else (1024, 4096, 16384)
    steps = {}
    for n in contexts:
        mla, _, attn, c_kv, k_rope, _, x, cos, sin = _decode_setup(quick, n)
        cache = mla.LayerCache(c_kv, k_rope, True)
        steps[n] = (lambda attn=attn, x=x, cos=cos, sin=sin, cache=cache, n=n:
                    attn(x, cos, sin, start_pos=n, cache=cache))
    with torch.no_grad():
        med = interleaved(steps, o, o.reps * 3)
    res = RowResult("decode_scaling")
    base = contexts[0]
    for n in contexts[1:]:
        res.lines.append(Line(f"absorbed decode per token at {n} context", f"at {base} context", med[n] / med[base],
                              f"<= {n // base}x (linear)", None, f"{_ms(med[n])} vs {_ms(med[base])}"))
    return res


# ---- rows: optimizer and pretraining step ----


def _batch(cfg, quick: bool):
    g = torch.Generator().manual_seed(0)
    B, S = (2, 32) if quick else (8, 256)
    x = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def row_muonclip(o: Opts) -> RowResult:
    mla = importlib.import_module("02_mla")
    mc = importlib.import_module("03_muonclip")
    cfg = bench_config(o.quick)
    idx, targets = _batch(cfg, o.quick)
    torch.manual_seed(0)
    models = {k: mla.Transformer(cfg) for k in ("adamw", "muonclip", "muonclip_bf16")}
    for m in models.values():
        m.load_state_dict(models["adamw"].state_dict())
    opts = {"adamw": torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
            # MuonClip records S_max in every forward and runs QK-Clip after every step
            "muonclip": mc.MuonClip(models["muonclip"], lr=2e-3, adamw_lr=1e-3, tau=100.0),
            "muonclip_bf16": mc.MuonClip(models["muonclip_bf16"], lr=2e-3, adamw_lr=1e-3, tau=100.0,
                                         ns_dtype=torch.bfloat16)}
    split = {k: [] for k in models}

    def step(key):
        def run():
            t0 = CLOCKS[o.clock]()
            models[key](idx, targets).loss.backward()
            t1 = CLOCKS[o.clock]()
            opts[key].step()
            opts[key].zero_grad(set_to_none=True)
            split[key].append((t1 - t0, CLOCKS[o.clock]() - t1))
        return run

    med = interleaved({k: step(k) for k in models}, o)
    share = {k: statistics.median(b for _, b in v) / statistics.median(a + b for a, b in v) for k, v in split.items()}
    res = RowResult("muonclip")
    for key, label in (("muonclip", "fp32"), ("muonclip_bf16", "bf16")):
        overhead = med[key] / med["adamw"] - 1
        res.lines.append(Line(f"train step with MuonClip, {label} Newton-Schulz: overhead", "the same step with torch "
                              "AdamW", overhead, "<= 10%", overhead <= 0.10, f"{_ms(med[key])} vs {_ms(med['adamw'])}; "
                              f"optimizer {100 * share[key]:.0f}% vs {100 * share['adamw']:.0f}% of the step", "%"))
    ns = sum(mc.newton_schulz_flops(p.shape) for _, p in mc.split_params(models["adamw"])[0])
    fb = train_flops_per_step(cfg, *idx.shape)
    res.lines.append(Line("Newton-Schulz FLOPs per step", "forward+backward FLOPs", ns / fb, "-", None,
                          f"{ns / 1e9:.1f} vs {fb / 1e9:.1f} GFLOP ({idx.numel()} tokens per step)", "%"))
    return res


def train_flops_per_step(cfg, batch: int, seq: int) -> float:
    """Model FLOPs of one training step: 3 x (forward matmul FLOPs), forward = 2 x activated weights a token
    passes through as a matmul (the input embedding is a lookup, not counted) + causal attention
    2·(S+1)/2·H·(dn+dr+dv) per layer (chapter 2's mla_prefill convention)."""
    mla = importlib.import_module("02_mla")
    fwd = mla.flops_per_token(cfg, seq, "mla_prefill") - 2 * cfg.vocab_size * cfg.hidden_size
    return 3 * fwd * batch * seq


def row_pretrain(o: Opts) -> RowResult:
    quick = o.quick
    mla = importlib.import_module("02_mla")
    cfg = bench_config(quick)
    idx, targets = _batch(cfg, quick)
    torch.manual_seed(0)
    ours = mla.Transformer(cfg)
    res = RowResult("pretrain")
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    def step_ours():
        ours(idx, targets).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"ours": step_ours}
    try:
        hf = mla.hf_model(cfg, ours, attn_implementation="sdpa")
    except ImportError:
        res.notes.append("pretrain: transformers not installed, DeepseekV3ForCausalLM skipped")
    else:
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

        def step_hf():  # transformers shifts the labels itself: labels = the inputs
            hf(input_ids=idx, labels=idx).loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)

        fns["hf"] = step_hf
    n = 256 if quick else 1024  # the matmul peak is timed inside the same rounds as the steps
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns["matmul"] = lambda: [a @ b for _ in range(4)]
    med = interleaved(fns, o)
    B, S = idx.shape
    if "hf" in med:
        r = med["ours"] / med["hf"]
        res.lines.append(Line(f"pretraining step, batch {B}x{S} (fwd+bwd+AdamW)", "transformers DeepseekV3ForCausalLM",
                              r, "<= 0.70x", r <= 0.70, f"{_ms(med['ours'])} vs {_ms(med['hf'])}"))
    peak = 4 * 2 * n ** 3 / med["matmul"]
    mfu = train_flops_per_step(cfg, B, S) / med["ours"] / peak
    res.lines.append(Line("pretraining throughput (MFU)", f"fp32 {n}x{n} matmul peak, same run", mfu, ">= 50%",
                          mfu >= 0.50, f"{train_flops_per_step(cfg, B, S) / med['ours'] / 1e9:.1f} vs "
                          f"{peak / 1e9:.1f} GFLOP/s", "%"))
    if torch.cuda.is_available():
        res.notes.append("pretrain: a GPU is present but this row measured the CPU (fp32)")
    return res


# ---- rows: checkpoint engine, train.py ----


def _engine_rank(rank: int, world: int, init_file: str, widths: list[int], reps: int, clock: str, out: str) -> None:
    """One rank of the engine row (rank 0 the trainer, the rest rollout workers), over gloo."""
    import torch.distributed as dist

    rl = importlib.import_module("06_rl")
    mla = importlib.import_module("02_mla")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    for width in widths:
        cfg = mla.ModelConfig.tiny(hidden_size=width, intermediate_size=int(2.625 * width),
                                   moe_intermediate_size=width // 4)
        torch.manual_seed(0 if rank == 0 else 1000 + rank)  # workers start from other weights
        tensors = dict(mla.Transformer(cfg).state_dict())
        engine = rl.CheckpointEngine().register(tensors)
        fns = {"engine": engine.update, "flat": lambda t=tensors: rl._flat_update(t, 0, rank == 0),
               "per_tensor": lambda t=tensors: rl._per_tensor_update(t, 0)}
        times = {k: [] for k in fns}
        names = list(fns)
        for r in range(1 + reps):  # rotated order as in `interleaved`; barriers keep the ranks in step
            for k in names[r % 3:] + names[: r % 3]:
                dist.barrier()
                t0 = CLOCKS[clock]()
                fns[k]()
                dist.barrier()
                if r:
                    times[k].append(CLOCKS[clock]() - t0)
        engine.update(verify=True)  # raises on every rank if any tensor differs
        result[width] = dict(bytes=sum(t.numel() * t.element_size() for t in tensors.values()), n=len(tensors),
                             med={k: statistics.median(v) for k, v in times.items()})
    peaks = [None] * world
    dist.all_gather_object(peaks, _peak_rss_mib())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(result=result, peak=max(peaks)), f)
    dist.destroy_process_group()


def row_engine(o: Opts) -> RowResult:
    try:
        importlib.import_module("06_rl").CheckpointEngine  # noqa: B018
    except (ImportError, AttributeError):
        res = RowResult("engine", available=False)
        res.notes.append("engine: not yet available (chapter 6's CheckpointEngine is not on this branch)")
        return res
    import torch.multiprocessing as tmp_mp

    widths, world = ([64, 128] if o.quick else [256, 512]), 3
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "engine.json")
        # always wall time: a rank's CPU time leaves out the time it spends waiting on the wire
        tmp_mp.spawn(_engine_rank, args=(world, os.path.join(tmp, "store"), widths, o.reps, "wall", out),
                     nprocs=world)
        with open(out) as f:
            got = json.load(f)
    res = RowResult("engine", peak_rss_mib=got["peak"])
    for width in widths:
        r = got["result"][str(width)]
        med, mib = r["med"], r["bytes"] / 2**20
        size = f"{mib:.1f} MiB, {r['n']} tensors"
        ratio = med["flat"] / med["engine"]
        res.lines.append(Line(f"engine update, {size} (throughput ratio)", "one broadcast of a single buffer",
                              ratio, ">= 0.80x", ratio >= 0.80, f"{_ms(med['engine'])} vs {_ms(med['flat'])}"))
        ratio = med["per_tensor"] / med["engine"]
        res.lines.append(Line(f"engine update, {size} (speed-up)", "one broadcast per tensor", ratio, ">= 2.00x",
                              ratio >= 2.0, f"{_ms(med['engine'])} vs {_ms(med['per_tensor'])}"))
    w0, w1 = (got["result"][str(w)] for w in widths)
    res.lines.append(Line(f"engine update at {w1['bytes'] / 2**20:.0f} MiB", f"at {w0['bytes'] / 2**20:.1f} MiB",
                          w1["med"]["engine"] / w0["med"]["engine"], f"~{w1['bytes'] / w0['bytes']:.0f}x (bytes)", None,
                          f"{_ms(w1['med']['engine'])} vs {_ms(w0['med']['engine'])}"))
    res.notes.append(f"engine: 1 trainer -> {world - 1} rollout workers, gloo on CPU, 1 thread each, 4 MiB buckets, wall time; "
                     "tiny K2 at hidden " + " and ".join(map(str, widths)) + "; checksums verified after the timing")
    return res


def row_train(o: Opts) -> RowResult:
    if not (ROOT / "train.py").exists():
        res = RowResult("train", available=False)
        res.notes.append("train: not yet available (train.py is not on this branch)")
        return res
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), *(["--quick"] if o.quick else []), "--out", os.path.join(tmp, "run")]
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)  # the child's user + system CPU time
    took = wall if o.clock == "wall" else cpu
    res = RowResult("train")
    res.lines.append(Line(f"`python train.py{' --quick' if o.quick else ''}` ({o.clock} time)", "10 minutes",
                          took / 60, "<= 10 min", took <= 600, f"{wall:.0f} s wall, {cpu:.0f} s CPU", "min"))
    return res


ROWS = {
    "moe": row_moe,
    "moe_dispatch": row_moe_dispatch,
    "moe_scaling": row_moe_scaling,
    "mla_decode": row_mla_decode,
    "decode_scaling": row_decode_scaling,
    "muonclip": row_muonclip,
    "pretrain": row_pretrain,
    "engine": row_engine,
    "train": row_train,
}
DEFAULT_ROWS = [name for name in ROWS if name != "train"]  # train.py takes up to 10 minutes: --only train


def _run_row(name: str, o: Opts, threads: int | None) -> dict:
    """A row inside its own (spawned) process: peak RSS is the row's own."""
    if threads:
        torch.set_num_threads(threads)
    base = _rss_mib()
    t0 = time.perf_counter()
    res = ROWS[name](o)
    res.seconds = time.perf_counter() - t0
    res.peak_rss_mib = max(res.peak_rss_mib, _peak_rss_mib())  # a row with worker processes reports theirs
    res.row_rss_mib = max(res.peak_rss_mib - base, 0.0)
    return asdict(res)


def _row_process(name: str, o: Opts, threads: int | None, conn) -> None:
    try:
        conn.send(("ok", _run_row(name, o, threads)))
    except BaseException as err:  # noqa: BLE001 - reported by the parent, which raises
        import traceback

        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    conn.close()


def run_rows(names: list[str], o: Opts, threads: int | None, on_row=None) -> list[dict]:
    """Each row in a fresh spawned process (not a daemon: the engine row starts its own ranks)."""
    ctx = multiprocessing.get_context("spawn")
    out = []
    for name in names:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_row_process, args=(name, o, threads, send))
        proc.start()
        send.close()
        try:
            status, payload = recv.recv()
        except EOFError:
            status, payload = "error", f"the row's process died (exit code {proc.join() or proc.exitcode})"
        proc.join()
        if status == "error":
            raise RuntimeError(f"row {name} failed: {payload}")
        out.append(payload)
        if on_row:
            on_row(payload)
    return out


# glibc returns freed blocks above the mmap threshold to the OS, so each fresh large buffer pays page faults again
GLIBC_KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                    "MALLOC_TOP_PAD_": "1073741824"}

# ---- report ----


MEMORY_NOTE = ("peak RSS = ru_maxrss of the row's own spawned process (engine: the largest of its 3 ranks); row RSS = "
               "peak minus the process's resident size after the imports.")


def _fmt_ratio(line: dict) -> str:
    if line["unit"] == "%":
        return f"{100 * line['ratio']:.0f}%"
    if line["unit"] == "min":
        return f"{line['ratio']:.1f} min"
    return f"{line['ratio']:.2f}x"


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col, just in (("row", "left"), ("what", "left"), ("against", "left"), ("figure", "right"),
                      ("target", "right"), ("", "center"), ("times", "right"), ("peak / row RSS", "right")):
        t.add_column(col, justify=just)
    for row in rows:
        mem = f"{row['peak_rss_mib']:.0f} / {row['row_rss_mib']:.0f} MiB"
        if not row["lines"]:
            t.add_row(row["name"], "; ".join(row["notes"]) or "-", "", "-", "", "-", "", mem)
        for i, ln in enumerate(row["lines"]):
            mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[ln["met"]]
            t.add_row(row["name"] if i == 0 else "", ln["what"], ln["against"], _fmt_ratio(ln), ln["target"], mark,
                      ln["detail"], mem if i == 0 else "")
    return t


def markdown(rows: list[dict], title: str) -> str:
    """The same table as GitHub markdown (for README's Performance section)."""
    out = [f"{title}", "", "| row | what | against | figure | target | | times | peak / row RSS |",
           "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        mem = f"{row['peak_rss_mib']:.0f} / {row['row_rss_mib']:.0f} MiB"
        if not row["lines"]:
            out.append(f"| {row['name']} | {'; '.join(row['notes'])} | | - | | - | | {mem} |")
        for i, ln in enumerate(row["lines"]):
            mark = {True: "met", False: "**missed**", None: "-"}[ln["met"]]
            out.append(f"| {row['name'] if i == 0 else ''} | {ln['what']} | {ln['against']} | {_fmt_ratio(ln)} | "
                       f"{ln['target']} | {mark} | {ln['detail']} | {mem if i == 0 else ''} |")
    return "\n".join(out) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def machine() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), threads=torch.get_num_threads())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--only", action="append", choices=list(ROWS), default=None,
                   help="run only this row (repeat for several); without it every row but train")
    p.add_argument("--json", type=cli.out_file, default=None, help="also write the results to this JSON file")
    p.add_argument("--markdown", type=cli.out_file, default=None, help="also write the table as markdown here")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch CPU threads (unset: torch's default)")
    p.add_argument("--reps", type=cli.positive_int, default=None, help="timed rounds per row (unset: 7, 2 with --quick)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="what is timed: wall time, or the process's CPU time (steadier with --threads 1 under load)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="run the rows with glibc keeping freed memory (MALLOC_* variables, as chapter 1 explains): "
                        "no page faults for every fresh multi-MB buffer; applies to every variant alike")
    p.add_argument("--quick", action="store_true", help="micro sizes: checks the plumbing, the figures mean nothing")
    args = p.parse_args(argv)
    names = list(dict.fromkeys(args.only)) if args.only else DEFAULT_ROWS
    reps = args.reps or (2 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(shutil.get_terminal_size().columns, 150))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    o = Opts(quick=args.quick, reps=reps, clock=args.clock)
    if args.keep_freed_memory:  # read by glibc when each row's process starts
        os.environ.update(GLIBC_KEEP_FREED)

    def partial(r: dict) -> None:  # one line per row as it finishes
        figures = "; ".join(f"{ln['what']}: {_fmt_ratio(ln)}" for ln in r["lines"]) or "; ".join(r["notes"])
        console.print(f"{r['name']} ({r['seconds']:.0f} s): {figures}")

    rows = run_rows(names, o, args.threads, on_row=partial)
    load_after = os.getloadavg()[0]
    info = machine()
    flags = "".join(f" --{f}" for f, on in (("quick", args.quick), ("keep-freed-memory", args.keep_freed_memory)) if on)
    title = (f"bench.py{flags}: ratios of medians ({args.clock} time) of {reps} interleaved rounds, "
             f"torch threads {info['threads']} on {info['cores']} cores, load average {load_before:.1f} before, "
             f"{load_after:.1f} after, torch {info['torch']}")
    console.print(table(rows, title))
    for row in rows:
        for note in row["notes"]:
            if row["lines"]:
                console.print(note)
    console.print(MEMORY_NOTE)
    if args.json:
        payload = dict(command=" ".join(["python", "bench.py", *(argv if argv is not None else sys.argv[1:])]),
                       machine=info, quick=args.quick, reps=reps, clock=args.clock,
                       keep_freed_memory=args.keep_freed_memory,
                       load_average=[load_before, load_after], seconds=time.perf_counter() - t0, rows=rows)
        _write_atomic(args.json, json.dumps(payload, indent=1))
        console.print(f"wrote {args.json}")
    if args.markdown:
        notes = [n for r in rows if r["lines"] for n in r["notes"]]
        _write_atomic(args.markdown, markdown(rows, title) + "".join(f"\n{n}\n" for n in [*notes, MEMORY_NOTE]))
        console.print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    cli.run(main)
