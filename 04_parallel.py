"""Chapter 4: pipeline, expert and ZeRO-1 data parallelism on torch.distributed.

What it is. One GPU holds neither Kimi K2's 1.04T parameters nor their optimizer state, so training splits
the work three ways (K2 report §2.4.1: 16-way pipeline parallelism with virtual stages, 16-way expert
parallelism, ZeRO-1 data parallelism):
- Pipeline parallelism (PP): the 61 decoder layers are cut into stages, one per rank of a pipeline; a batch is
  cut into micro-batches that flow through the stages, activations forward and their gradients backward, by
  point-to-point send/recv. The schedule decides the order: GPipe (all forwards, then all backwards: the peak
  holds every micro-batch's activations), 1F1B (after a warm-up, one forward then one backward: at most
  pp - stage micro-batches in flight), and interleaved 1F1B (each rank holds 2 non-adjacent "virtual" stages,
  which shrinks the bubble, the idle start and end of the pipeline, by the number of virtual stages).
- Expert parallelism (EP): the routed experts of each MoE layer are split over the ranks of an EP group
  (stacked weights sharded on dim 0); each token is sent to the rank holding its expert with an all_to_all
  (uneven splits: counts are exchanged first), and the results come back with the reverse all_to_all.
  Attention, router and shared expert are replicated; the EP ranks read different data.
- ZeRO-1 data parallelism (DP): replicas read different data and average their gradients; the optimizer state
  is partitioned, each rank owning whole parameters (balanced by size, so Muon's Newton-Schulz sees whole
  matrices); owners update and broadcast. Moonlight's Distributed Muon is the option `zero="distributed_muon"`:
  each rank keeps a 1/n slice of every parameter's state, gradients are reduce-scattered, the full momentum
  matrix is all-gathered for Newton-Schulz, each rank applies its slice of the update and parameters are
  all-gathered. Same result (a test checks both against one process).

The ranks form a (pp, dp, ep) grid, ep fastest: rank = (pp_rank · dp + dp_rank) · ep + ep_rank, so an EP group
(the heaviest traffic, all_to_all every MoE layer) sits on neighbouring ranks, i.e. inside a node.

    data shard of a rank = dp_rank · ep + ep_rank  (the dp x ep ranks of a stage read different sequences)
    loss of a micro-batch = CE_mean · n_valid / N_valid(global batch) + aux / (dp·ep·n_micro), so that
                            Σ over ranks and micro-batches = the one-process loss (also with -100 targets)
    non-expert gradient   = Σ over the dp x ep ranks of the stage
    expert gradient       = Σ over the dp ranks holding the same shard   (EP's all_to_all already summed tokens)
    router load, S_max    = Σ (resp. max) over micro-batches, then over the dp x ep ranks of the stage

Design choices
- Model code stays single-device; parallelism is applied from outside, in one order (the torchtitan way):
  1. `ParallelDims` checks the layout, `init_distributed` builds the process groups (or none in one process);
  2. `build_model` builds the full model from the seed, keeps this rank's pipeline chunk(s) (chapter 2's
     `Transformer(cfg, layer_ids=..., embed=..., head=...)`) and shards their experts (`ExpertParallelMoE`);
  3. `make_optimizer` wraps chapter 3's MuonClip in ZeRO-1 (`ZeroMuonClip`);
  4. `train_step` runs the pipeline schedule over micro-batches, then the optimizer (gradient averaging,
     update, broadcast, QK-Clip with S_max all-reduced by MAX) and the router bias update.
- Schedules are data: lists of (F|B, micro-batch, chunk) per rank, executed by one function that posts each
  send with the next receive in one batch_isend_irecv and waits only for receives (no deadlock for a schedule
  whose dependencies are acyclic; only gloo has been run here, NCCL is untested), and simulated
  to draw the rank x time tables below. Messages carry tags (gloo); the order of sends on each rank pair equals
  the order of receives (NCCL matches in order; a test checks it for every schedule).
- Every collective has the process group's timeout (`init_distributed(timeout_s=...)`): a dead rank turns into
  an error on the others instead of a hang. With world size 1 no process group is created at all.
- ZeRO-1 owner vs Distributed Muon: ownership needs no collective beyond the gradient all-reduce and one
  broadcast per parameter, and each Newton-Schulz runs once, on its owner; but whole parameters balance badly
  when one dominates (K2's embedding, 1.17B parameters, is twice the 0.59B non-expert weights of the 4 MoE
  layers a PP16 stage holds).
  Distributed Muon splits every parameter's state evenly (memory balanced whatever the sizes) at the cost of an
  all-gather of each momentum matrix and Newton-Schulz repeated on every rank.
- Checkpoints use torch.distributed.checkpoint (DCP) with layout-free keys (global layer ids, one key per
  expert), so a checkpoint saved under one layout loads under any other. Written to a temp dir, then renamed
  (multi-node: the directory must be on a filesystem every node sees).

API for train.py
    dims   = ParallelDims.from_env(pp=2, ep=2, schedule="1f1b", n_microbatches=4)   # dp = WORLD_SIZE / (pp·ep)
    layout = init_distributed(dims, cfg)                 # process groups (none when WORLD_SIZE is 1)
    model  = build_model(cfg, layout, seed=0)            # this rank's RankModel
    opt    = make_optimizer(model, lr=..., adamw_lr=..., tau=..., zero="owner", max_grad_norm=1.0)
    loss   = train_step(model, opt, idx, targets)        # same global batch on every rank; returns the mean loss
    loss   = train_step(model, opt, [idx1, idx2], [tgt1, tgt2], stats=stats)   # groups of one step, stats out
    val    = evaluate(model, idx, targets)               # forward only (no S_max, no bias update)
    save_checkpoint(path, model, opt) / load_checkpoint(path, model, opt)
    close_distributed(layout)
`train_step` slices this rank's share of the global batch (B must divide by dp·ep·n_microbatches), runs
forward/backward, averages gradients, steps the optimizer, applies QK-Clip and updates the router biases.

Schedules, pp = 4, 4 micro-batches, F and B one tick each (`python 04_parallel.py --schedules` prints them):
    GPipe (peak 4 micro-batches of activations on every rank)
        rank 0: F0  F1  F2  F3  .   .   .   .   .   .   B0  B1  B2  B3
        rank 3: .   .   .   F0  F1  F2  F3  B0  B1  B2  B3  .   .   .
    1F1B (peak pp - rank: 4, 3, 2, 1)
        rank 0: F0  F1  F2  F3  .   .   .   B0  .   B1  .   B2  .   B3
        rank 3: .   .   .   F0  B0  F1  B1  F2  B2  F3  B3  .   .   .
    interleaved 1F1B: a/b = the rank's two chunks (stages r and r + pp), each half as long, so 22 half-ticks
    = 11 ticks instead of 14: the bubble shrinks; more (half-size) micro-batches are in flight.

Simplified vs K2
- Tiny model on CPU (gloo) by default; NCCL + bf16 autocast on GPUs. No overlap of EP all_to_all with compute
  (K2 hides it behind extra warm-up micro-batches), no tensor parallelism, no activation recomputation or
  offloading, no FP8 storage of activations.
- `build_model` initialises the whole model on every rank and keeps its part (fine at the sizes trained here; a
  K2-size run initialises each stage on the meta device and loads a checkpoint).
- ZeRO-1 averages gradients with an all-reduce (ZeRO-1 partitions only the optimizer state; reduce-to-owner or
  ZeRO-2 would also cut gradient memory). The distributed-Muon option partitions each parameter evenly.

References
- Kimi K2 (arXiv:2507.20534) §2.4.1 (16-way PP with virtual stages, 16-way EP, ZeRO-1).
- Moonlight, "Muon is Scalable for LLM Training" (arXiv:2502.16982) §3 (Distributed Muon).
- Huang et al., GPipe (arXiv:1811.06965); Narayanan et al., PipeDream 1F1B (arXiv:1806.03377) and Megatron-LM
  interleaved schedule (arXiv:2104.04473) §2.2; Rajbhandari et al., ZeRO (arXiv:1910.02054);
  DeepSeek-V3 (arXiv:2412.19437) §3.2 (EP all-to-all); torchtitan (arXiv:2410.06511).

Run:
    python 04_parallel.py --help
    python 04_parallel.py                              # how to launch, schedule tables, K2 memory table
    torchrun --nproc_per_node=4 04_parallel.py         # every layout of 4 ranks vs one process (~1 min, 2 cores)
    torchrun --nproc_per_node=8 04_parallel.py         # on a GPU node (NCCL, bf16 autocast)
"""

import argparse
import datetime
import importlib
import math
import os
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

cli = importlib.import_module("cli")
moe_lib = importlib.import_module("01_moe")
mla = importlib.import_module("02_mla")
mc = importlib.import_module("03_muonclip")

SCHEDULES = ("gpipe", "1f1b", "interleaved")
ZERO_MODES = ("owner", "distributed_muon")

# ---- the layout: pp x dp x ep ranks ----


@dataclass(frozen=True)
class ParallelDims:
    """pp x ep x dp = world size; the schedule and micro-batches of the pipeline. Errors name the flags."""

    pp: int = 1
    ep: int = 1
    dp: int = 1
    schedule: str = "1f1b"
    n_microbatches: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.dp

    @property
    def virtual_stages(self) -> int:
        """Model chunks per rank: 2 for the interleaved schedule (as K2), else 1."""
        return 2 if self.schedule == "interleaved" else 1

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual_stages

    def __post_init__(self):
        for name, flag in (("pp", "--pp"), ("ep", "--ep"), ("dp", "--dp"), ("n_microbatches", "--microbatches")):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} ({flag}) must be a positive integer, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule (--schedule) must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.pp > 1 and self.n_microbatches < self.pp:
            raise ValueError(f"n_microbatches (--microbatches) = {self.n_microbatches} < pp (--pp) = {self.pp}: "
                             "the pipeline would never fill; use at least one micro-batch per stage")
        if self.schedule == "interleaved" and self.pp < 2:
            raise ValueError("schedule (--schedule) 'interleaved' needs pp (--pp) >= 2")
        if self.schedule == "interleaved" and self.n_microbatches % self.pp:
            raise ValueError(f"n_microbatches (--microbatches) = {self.n_microbatches} must be a multiple of "
                             f"pp (--pp) = {self.pp} for the interleaved schedule")

    @classmethod
    def from_env(cls, pp: int = 1, ep: int = 1, schedule: str = "1f1b", n_microbatches: int = 1) -> "ParallelDims":
        """dp from torchrun's WORLD_SIZE (1 without torchrun): dp = WORLD_SIZE / (pp · ep)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % (pp * ep):
            raise ValueError(f"pp (--pp) x ep (--ep) = {pp} x {ep} = {pp * ep} does not divide the world size "
                             f"{world} (torchrun --nproc_per_node x --nnodes)")
        return cls(pp=pp, ep=ep, dp=world // (pp * ep), schedule=schedule, n_microbatches=n_microbatches)

    def check(self, cfg, world_size: int) -> None:
        """Reject a layout that cannot run this model on this many ranks."""
        if self.world_size != world_size:
            raise ValueError(f"pp (--pp) x ep (--ep) x dp (--dp) = {self.pp} x {self.ep} x {self.dp} = "
                             f"{self.world_size} != world size {world_size} (torchrun --nproc_per_node x --nnodes)")
        if self.n_stages > cfg.num_hidden_layers:
            raise ValueError(f"pp (--pp) = {self.pp} x {self.virtual_stages} chunk(s) per rank = {self.n_stages} "
                             f"stages > num_hidden_layers = {cfg.num_hidden_layers}: every stage needs a layer")
        if self.ep > 1:
            if cfg.first_k_dense_replace >= cfg.num_hidden_layers:
                raise ValueError(f"ep (--ep) = {self.ep} but the model has no MoE layer to shard")
            if cfg.n_routed_experts % self.ep:
                raise ValueError(f"ep (--ep) = {self.ep} must divide n_routed_experts = {cfg.n_routed_experts}")
        if self.pp > 1 and cfg.tie_word_embeddings:
            raise ValueError("pp (--pp) > 1 needs tie_word_embeddings=False (embedding and head sit on different stages)")


@dataclass
class Layout:
    """This rank's place in the (pp, dp, ep) grid and the process groups it talks over (None = one rank)."""

    dims: ParallelDims
    rank: int = 0
    device: torch.device = torch.device("cpu")
    ep_group: object = None  # same (pp, dp): the experts of one layer are split over it
    dp_group: object = None  # same (pp, ep): replicas of the same expert shard
    replica_group: object = None  # same pp: dp x ep ranks holding the same non-expert weights of a stage
    world_group: object = None  # all ranks (loss, checkpoint barrier); None in one process

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dims.dp * self.dims.ep)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.ep % self.dims.dp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.dims.ep

    @property
    def data_shard(self) -> int:
        """Which of the dp·ep shards of the global batch this rank reads."""
        return self.dp_rank * self.dims.ep + self.ep_rank

    def grid_rank(self, pp_rank: int, dp_rank: int | None = None, ep_rank: int | None = None) -> int:
        d = self.dims
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        ep_rank = self.ep_rank if ep_rank is None else ep_rank
        return (pp_rank * d.dp + dp_rank) * d.ep + ep_rank


def init_distributed(dims: ParallelDims, cfg, backend: str | None = None, timeout_s: float = 120.0) -> Layout:
    """Join torchrun's process group (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and build the sub-groups.
    World size 1: no process group, every collective below is skipped. backend: nccl on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims.check(cfg, world)
    cuda = torch.cuda.is_available() and backend != "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Layout(dims, 0, device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    layout = Layout(dims, dist.get_rank(), device, world_group=dist.group.WORLD)
    d = dims

    def groups(members_of) -> object:  # every rank creates every group, in the same order; keeps its own
        mine = None
        for ranks in members_of:
            g = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
            if layout.rank in ranks:
                mine = g if len(ranks) > 1 else None
        return mine

    grid = [[[layout.grid_rank(p, q, e) for e in range(d.ep)] for q in range(d.dp)] for p in range(d.pp)]
    layout.ep_group = groups([grid[p][q] for p in range(d.pp) for q in range(d.dp)])
    layout.dp_group = groups([[grid[p][q][e] for q in range(d.dp)] for p in range(d.pp) for e in range(d.ep)])
    layout.replica_group = groups([[r for row in grid[p] for r in row] for p in range(d.pp)])
    dist.barrier()  # a first collective on the world group (NCCL wants one before batched p2p)
    return layout


def close_distributed(layout: Layout) -> None:
    if layout.world_group is not None and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


# ---- pipeline stages: a balanced split of the layers ----


def layer_costs(cfg) -> list[int]:
    """Parameters of each decoder layer, the embedding counted on layer 0 and norm + head on the last (meta)."""
    with torch.device("meta"):
        dense = sum(p.numel() for p in mla.Block(cfg, 0).parameters()) if cfg.first_k_dense_replace else 0
        moe = (sum(p.numel() for p in mla.Block(cfg, cfg.num_hidden_layers - 1).parameters())
               if cfg.first_k_dense_replace < cfg.num_hidden_layers else 0)
    costs = [dense if i < cfg.first_k_dense_replace else moe for i in range(cfg.num_hidden_layers)]
    costs[0] += cfg.vocab_size * cfg.hidden_size  # embedding
    costs[-1] += cfg.hidden_size + cfg.vocab_size * cfg.hidden_size  # norm + head
    return costs


def split_stages(costs: list[int], n_stages: int) -> list[list[int]]:
    """Contiguous split of layers into n_stages (each >= 1 layer) minimising the largest stage (exact DP)."""
    L = len(costs)
    if not 1 <= n_stages <= L:
        raise ValueError(f"n_stages must be in [1, {L} layers], got {n_stages}")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = [[math.inf] * (L + 1) for _ in range(n_stages + 1)]  # best[s][i]: first i layers in s stages
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for i in range(s, L + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    stages, i = [], L
    for s in range(n_stages, 0, -1):
        stages.append(list(range(cut[s][i], i)))
        i = cut[s][i]
    return stages[::-1]


# ---- expert parallelism: all_to_all dispatch and combine ----


class _AllToAll(torch.autograd.Function):
    """Rows of x go to the ranks of `group` (in_splits[r] rows to rank r); out_splits[r] rows come from rank r.
    The backward is the same exchange reversed: gradient rows travel back to where their tokens came from."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits = ctx.splits
        dx = dy.new_empty(sum(in_splits), *dy.shape[1:])
        dist.all_to_all_single(dx, dy.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


class ExpertParallelMoE(nn.Module):
    """Chapter 1's MoE with its routed experts split over an EP group: this rank holds experts
    [ep_rank·E/ep, (ep_rank+1)·E/ep). Router and shared expert are the MoE's own (replicated) modules."""

    def __init__(self, moe: nn.Module, ep_rank: int, ep_size: int, group):
        super().__init__()
        E = moe.experts.n_experts
        self.n_routed_experts, self.ep_size, self.group = E, ep_size, group
        self.n_local = E // ep_size
        self.expert_offset = ep_rank * self.n_local
        self.router, self.shared_experts, self.aux_loss_alpha = moe.router, moe.shared_experts, moe.aux_loss_alpha
        self.experts = moe.experts
        shard = slice(self.expert_offset, self.expert_offset + self.n_local)
        for name in ("w_gate", "w_up", "w_down"):  # shard dim 0: (E, ...) -> (E/ep, ...)
            setattr(self.experts, name, nn.Parameter(getattr(moe.experts, name).detach()[shard].clone()))

    def forward(self, x: torch.Tensor):
        # B batch, S seq, D model dim, T=B*S tokens, E experts, El = E/ep local experts, K top-k, R = ep ranks
        B, S, D = x.shape
        R, El, E = self.ep_size, self.n_local, self.n_routed_experts
        flat = x.reshape(B * S, D)  # (T, D)
        topk_idx, topk_weight, scores = self.router(flat)  # (T, K), (T, K), (T, E)
        K = topk_idx.shape[1]
        expert = topk_idx.flatten()  # (T*K,)
        order = expert.argsort(stable=True)  # slots grouped by expert, hence by destination rank
        token = order // K  # (T*K,)
        counts = torch.bincount(expert, minlength=E)  # (E,) rows this rank sends to each expert
        # 1. exchange counts: recv_counts[r, e] = rows rank r sends to my local expert e
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(R, El)  # (R, El)
        send_splits = counts.view(R, El).sum(1).tolist()  # rows to each rank
        recv_splits = recv_counts.sum(1).tolist()  # rows from each rank
        # 2. dispatch: rows arrive grouped by source rank, then by local expert
        x_recv = _AllToAll.apply(flat.index_select(0, token), recv_splits, send_splits, self.group)  # (N, D)
        g_recv = _AllToAll.apply(topk_weight.flatten()[order].to(x.dtype), recv_splits, send_splits,
                                 self.group)  # (N,) the gates travel with their rows
        expert_of_row = torch.arange(El).repeat(R).repeat_interleave(recv_counts.flatten().cpu())  # (N,)
        by_expert = expert_of_row.argsort(stable=True).to(x.device)  # (N,) source-major -> expert-major
        y = moe_lib.grouped_swiglu(x_recv.index_select(0, by_expert), recv_counts.sum(0), self.experts.w_gate,
                                   self.experts.w_up, self.experts.w_down,
                                   weight=g_recv.index_select(0, by_expert))  # (N, D), g_{t,i} · FFN_i(x_t)
        y = torch.empty_like(y).index_copy(0, by_expert, y)  # back to source-major order
        # 3. combine: the reverse all_to_all, then sum at the token's home rank
        y = _AllToAll.apply(y, send_splits, recv_splits, self.group)  # (T*K, D), in `order`
        out = torch.zeros_like(flat).index_add_(0, token, y)  # (T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        load = counts.float()  # (E,) tokens of this rank per expert (summed over ranks for the bias update)
        if self.aux_loss_alpha > 0:
            aux = moe_lib.sequence_balance_loss(scores.view(B, S, -1), topk_idx.view(B, S, -1), self.aux_loss_alpha)
        else:
            aux = x.new_zeros((), dtype=torch.float32)
        return out.view(B, S, D), moe_lib.MoEStats(load=load.detach(), aux_loss=aux)


# ---- this rank's part of the model ----


def is_expert_param(name: str) -> bool:
    return ".mlp.experts.w_" in name


class RankModel(nn.Module):
    """The chunk(s) of the model this rank holds (1, or 2 virtual stages), experts sharded over EP.
    chunks[c] is pipeline stage c·pp + pp_rank; stage_layers[c] its global layer ids."""

    def __init__(self, cfg, layout: Layout, chunks: list[nn.Module], stage_layers: list[list[int]]):
        super().__init__()
        self.cfg, self.layout, self.stage_layers = cfg, layout, stage_layers
        self.chunks = nn.ModuleList(chunks)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers under layout-free names: global layer ids and one entry per expert
        (`layers.3.mlp.experts.w_gate.17`). Views of the live tensors."""
        out = {}
        for chunk, ids in zip(self.chunks, self.stage_layers):
            for name, t in chunk.state_dict(keep_vars=True).items():
                out.update(_canonical(name, t, ids, chunk))
        return out

    def canonical_params(self) -> dict[nn.Parameter, list[tuple[str, slice | None]]]:
        """parameter -> its canonical key(s) (an expert stack maps to one key per expert)."""
        out = {}
        for chunk, ids in zip(self.chunks, self.stage_layers):
            for name, p in chunk.named_parameters():
                out[p] = list(_canonical(name, p, ids, chunk, keys_only=True))
        return out


def _canonical(name, t, ids, chunk, keys_only=False):
    if name.startswith("layers."):
        _, j, rest = name.split(".", 2)
        name = f"layers.{ids[int(j)]}.{rest}"
    if not is_expert_param(name):
        return [name] if keys_only else {name: t}
    layer = chunk.layers[ids.index(int(name.split(".")[1]))]
    offset = getattr(layer.mlp, "expert_offset", 0)
    keys = [f"{name}.{offset + e}" for e in range(t.shape[0])]
    return keys if keys_only else {k: t[e] for e, k in enumerate(keys)}


def build_model(cfg, layout: Layout, seed: int = 0) -> RankModel:
    """The full model from `seed` (identical on every rank), cut to this rank's stage(s), experts sharded."""
    d = layout.dims
    torch.manual_seed(seed)
    full = mla.Transformer(cfg)
    stages = split_stages(layer_costs(cfg), d.n_stages)
    chunks, ids = [], []
    for c in range(d.virtual_stages):
        v = c * d.pp + layout.pp_rank
        layer_ids = stages[v]
        with torch.device("meta"):
            chunk = mla.Transformer(cfg, layer_ids=layer_ids, embed=v == 0, head=v == d.n_stages - 1)
        chunk = chunk.to_empty(device="cpu")
        chunk.load_state_dict(_stage_state(full, layer_ids, v == 0, v == d.n_stages - 1), strict=True)
        inv_freq, _ = mla.rope_frequencies(cfg)
        chunk.rope_inv_freq.copy_(inv_freq)  # non-persistent buffer: not in the state dict
        if d.ep > 1:
            for layer in chunk.layers:
                if layer.is_moe:
                    layer.mlp = ExpertParallelMoE(layer.mlp, layout.ep_rank, d.ep, layout.ep_group)
        chunks.append(chunk.to(layout.device))
        ids.append(layer_ids)
    return RankModel(cfg, layout, chunks, ids)


def _stage_state(full, layer_ids, embed, head) -> dict:
    sd = {}
    for name, t in full.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if int(i) in layer_ids:
                sd[f"layers.{layer_ids.index(int(i))}.{rest}"] = t
        elif name.startswith("embed_tokens."):
            if embed:
                sd[name] = t
        elif head:
            sd[name] = t
    return sd


# ---- ZeRO-1: optimizer state partitioned over the replicas ----


def assign_owners(sizes: list[int], n: int) -> list[int]:
    """Whole-parameter ownership balanced by size: largest first, each to the least-loaded rank (ties: lowest)."""
    load, owner = [0] * n, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(n), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


class ZeroMuonClip(mc.MuonClip):
    """MuonClip (chapter 3) under ZeRO-1. `step()` = average gradients over replicas, update (owner: whole
    parameters this rank owns; distributed_muon: this rank's slice of every parameter), share the result,
    QK-Clip with S_max MAX-all-reduced over the replicas of each attention."""

    def __init__(self, model: RankModel, zero: str = "owner", max_grad_norm: float | None = None, **muonclip_kw):
        if zero not in ZERO_MODES:
            raise ValueError(f"zero (--zero) must be one of {ZERO_MODES}, got {zero!r}")
        if max_grad_norm is not None and (zero != "owner" or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 and needs zero='owner', got {max_grad_norm!r} with {zero!r}")
        self.max_grad_norm, self.grad_norm = max_grad_norm, None
        lay = model.layout
        reduce_max = None
        if lay.replica_group is not None:
            def reduce_max(s):
                dist.all_reduce(s, op=dist.ReduceOp.MAX, group=lay.replica_group)
        super().__init__(model, s_max_reduce=reduce_max, **muonclip_kw)
        self.zero, self.layout = zero, lay
        names = {p: n for n, p in model.named_parameters()}
        self.meta = {}  # param -> (group, group ranks (global), this rank's index in them)
        for p, name in names.items():
            group = lay.dp_group if is_expert_param(name) else lay.replica_group
            ranks = dist.get_process_group_ranks(group) if group is not None else [lay.rank]
            self.meta[p] = (group, ranks, ranks.index(lay.rank))
        by_group = {}
        for p, (_, ranks, _) in self.meta.items():
            by_group.setdefault(tuple(ranks), []).append(p)
        self.owner = {}  # param -> global rank of its owner
        for ranks, ps in by_group.items():
            for p, r in zip(ps, assign_owners([p.numel() for p in ps], len(ranks))):
                self.owner[p] = ranks[r]
        self.groups_of = list(by_group.values())

    def owns(self, p) -> bool:
        return self.zero == "distributed_muon" or self.owner[p] == self.layout.rank

    @torch.no_grad()
    def step(self, closure=None):
        if self.zero == "owner":
            self._sum_grads()
            if self.max_grad_norm is not None:
                self._clip_grad_norm()
            for group in self.param_groups:
                for p in group["params"]:
                    if self.owner[p] == self.layout.rank:
                        mc.step_param_(p, self.state[p], group)
            for p, (group, _, _) in self.meta.items():
                if group is not None:
                    dist.broadcast(p.data, src=self.owner[p], group=group)
        else:
            for group in self.param_groups:
                for p in group["params"]:
                    self._distributed_step(p, group)
        self.clip_stats = mc.qk_clip_(self.model, self.tau, apply=self.qk_clip, reduce_max=self.s_max_reduce)

    def _sum_grads(self) -> None:
        """g ← Σ_replicas g, one flat all-reduce per replica group (each rank's loss already carries its share
        of the global normalisation, see forward_backward)."""
        for ps in self.groups_of:
            group = self.meta[ps[0]][0]
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if group is None:
                continue
            flat = torch.cat([p.grad.flatten() for p in ps])
            dist.all_reduce(flat, group=group)
            for p, g in zip(ps, flat.split([p.numel() for p in ps])):
                p.grad.copy_(g.view_as(p))

    def _clip_grad_norm(self) -> None:
        """torch's clip_grad_norm_ over the whole model: ||g||² = Σ over parameters, each counted on one of its
        replicas (index 0 of its group), all-reduced over the world; g ← g · min(1, max_norm / (||g|| + 1e-6))."""
        sq = sum((p.grad.float().square().sum() for p, (_, _, i) in self.meta.items() if i == 0),
                 torch.zeros((), device=self.layout.device))
        norm = _all_reduce(sq, self.layout.world_group).sqrt()
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.meta:
            p.grad.mul_(coef)
        self.grad_norm = norm.item()

    def _distributed_step(self, p, group: dict) -> None:
        """Moonlight's Distributed Muon on one parameter, split into n equal flat slices (rank i holds slice i):
        reduce-scatter g; momentum on the slice; all-gather the full momentum matrix; Newton-Schulz on it;
        keep this slice of the update; all-gather the parameter. AdamW parameters update their slice."""
        pg, ranks, i = self.meta[p]
        n, N = len(ranks), p.numel()
        chunk = -(-N // n)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        flat_g = F.pad(p.grad.flatten(), (0, chunk * n - N))  # (n·chunk,)
        g = torch.empty(chunk, dtype=flat_g.dtype, device=p.device)
        if pg is None:
            g.copy_(flat_g)
        else:
            dist.reduce_scatter_single(g, flat_g, group=pg)
        lo = i * chunk
        state = self.state[p]
        p_flat = F.pad(p.detach().flatten(), (0, chunk * n - N))[lo: lo + chunk].clone()  # this rank's slice
        if group["use_muon"]:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros(chunk, dtype=torch.float32, device=p.device)
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(g)  # M ← μM + G (on the slice)
            m = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            full = torch.empty(chunk * n, dtype=m.dtype, device=p.device)
            if pg is None:
                full.copy_(m)
            else:
                dist.all_gather_single(full, m.contiguous(), group=pg)
            O = mc.zeropower_via_newtonschulz5(full[:N].view(p.shape), group["ns_steps"], group["ns_dtype"])
            O = F.pad(O.flatten(), (0, chunk * n - N))[lo: lo + chunk]  # keep this rank's slice of U·Vᵀ
            p_flat.mul_(1.0 - group["lr"] * group["weight_decay"])
            p_flat.add_(O, alpha=-group["lr"] * mc.update_scale(p.shape, group["scaling"]))
        else:
            if "step" not in state:
                state.update(step=0, exp_avg=torch.zeros(chunk, device=p.device),
                             exp_avg_sq=torch.zeros(chunk, device=p.device))
            mc.adamw_update_(p_flat, g, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                             weight_decay=group["weight_decay"])
        full_p = torch.empty(chunk * n, dtype=p.dtype, device=p.device)
        if pg is None:
            full_p.copy_(p_flat)
        else:
            dist.all_gather_single(full_p, p_flat, group=pg)
        p.data.copy_(full_p[:N].view_as(p))


def make_optimizer(model: RankModel, zero: str = "owner", **muonclip_kw) -> ZeroMuonClip:
    """Chapter 3's MuonClip (same keywords: lr, adamw_lr, tau, weight_decay, ...) under ZeRO-1."""
    return ZeroMuonClip(model, zero=zero, **muonclip_kw)


# ---- pipeline schedules: (F|B, micro-batch, chunk) per rank ----


def schedule_actions(kind: str, pp: int, n_micro: int) -> list[list[tuple[str, int, int]]]:
    """Per pipeline rank, its ordered actions ("F" or "B", micro-batch, chunk). Chunk c of rank r is stage c·pp + r."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    out = []
    for r in range(pp):
        if kind == "gpipe":  # all forwards, then all backwards
            acts = [("F", m, 0) for m in range(n_micro)] + [("B", m, 0) for m in range(n_micro)]
        elif kind == "1f1b":  # warm up with pp - r - 1 forwards, then alternate, then drain
            warm = min(pp - r - 1, n_micro)
            acts = [("F", m, 0) for m in range(warm)]
            for i in range(n_micro - warm):
                acts += [("F", warm + i, 0), ("B", i, 0)]
            acts += [("B", m, 0) for m in range(n_micro - warm, n_micro)]
        else:  # interleaved 1F1B (Megatron-LM §2.2), V = 2 chunks; the k-th forward of a rank is
            V, total = 2, 2 * n_micro  # micro-batch (k // (pp·V))·pp + k % pp of chunk (k // pp) % V
            fwd = [("F", (k // (pp * V)) * pp + k % pp, (k // pp) % V) for k in range(total)]
            bwd = [("B", (k // (pp * V)) * pp + k % pp, V - 1 - (k // pp) % V) for k in range(total)]
            warm = min((pp - r - 1) * 2 + (V - 1) * pp, total)
            acts = fwd[:warm]
            for i in range(total - warm):
                acts += [fwd[warm + i], bwd[i]]
            acts += bwd[total - warm:]
        out.append(acts)
    return out


def simulate_schedule(actions: list[list[tuple]], pp: int, n_stages: int) -> list[list[tuple | None]]:
    """Unit-time execution (F and B one tick each, free communication): the rank x time table. Raises on a
    deadlock (a schedule whose dependencies form a cycle)."""
    done = {}  # (kind, mb, stage) -> tick it finished
    pos, table, t = [0] * pp, [[] for _ in range(pp)], 0
    while any(pos[r] < len(actions[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if pos[r] == len(actions[r]):
                table[r].append(None)
                continue
            kind, m, c = actions[r][pos[r]]
            v = c * pp + r
            if kind == "F":
                need = [("F", m, v - 1)] if v > 0 else []
            else:
                need = [("B", m, v + 1)] if v < n_stages - 1 else [("F", m, v)]
            if all(done.get(n, math.inf) < t for n in need):
                done[(kind, m, v)] = t
                table[r].append(actions[r][pos[r]])
                pos[r] += 1
                progressed = True
            else:
                table[r].append(None)
        if not progressed:
            raise RuntimeError(f"schedule deadlocks at tick {t}")
        t += 1
    return table


def format_schedule(table: list[list[tuple | None]], chunks: int) -> str:
    names = "ab"
    rows = []
    for r, row in enumerate(table):
        cells = ["." if a is None else f"{a[0]}{a[1]}{names[a[2]] if chunks > 1 else ''}" for a in row]
        rows.append(f"rank {r}: " + " ".join(f"{c:<{3 + (chunks > 1)}}" for c in cells).rstrip())
    return "\n".join(rows)


def peak_in_flight(actions: list[tuple]) -> int:
    """Most chunk-micro-batches whose activations a rank holds at once (forwards done, backward not yet)."""
    live = peak = 0
    for kind, _, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def p2p_order_consistent(actions: list[list[tuple]], pp: int, n_stages: int) -> bool:
    """For every ordered rank pair, the sender's order of messages equals the receiver's order (NCCL needs it)."""
    sent, recvd = {}, {}
    for r in range(pp):
        for kind, m, c in actions[r]:
            v = c * pp + r
            if kind == "F":
                if v < n_stages - 1:
                    sent.setdefault((r, (v + 1) % pp), []).append(("F", m, v + 1))
                if v > 0:
                    recvd.setdefault(((v - 1) % pp, r), []).append(("F", m, v))
            else:
                if v > 0:
                    sent.setdefault((r, (v - 1) % pp), []).append(("B", m, v - 1))
                if v < n_stages - 1:
                    recvd.setdefault(((v + 1) % pp, r), []).append(("B", m, v))
    return sent == recvd


# ---- one training step ----


def _tag(kind: str, m: int, v: int, n_stages: int) -> int:
    return (m * n_stages + v) * 2 + (kind == "B")


def train_step(model: RankModel, opt: ZeroMuonClip, idx, targets, autocast_dtype: torch.dtype | None = None,
               stats: dict | None = None) -> float:
    """One optimizer step on the global batch idx, targets (B, S), identical on every rank. Returns the mean
    loss over the whole batch (CE + balance loss), the same number a single process would report.
    idx, targets may also be lists of batches (groups of one step with different shapes, e.g. long and short
    sequences): the step's loss is then the sum of the groups' mean losses, as in one process calling
    backward once per group. stats: if a dict, gets "ce", "aux" (the sums over groups) and "loads" (per
    chunk, (n_moe, E) expert loads summed over groups and over the dp x ep ranks of the stage)."""
    groups = list(zip(idx, targets)) if isinstance(idx, (list, tuple)) else [(idx, targets)]
    opt.zero_grad(set_to_none=True)
    loss, loads, ce, aux = 0.0, None, 0.0, 0.0
    for x, y in groups:
        parts = {}
        g_loss, g_loads = forward_backward(model, x, y, autocast_dtype, parts=parts)
        loss, ce, aux = loss + g_loss, ce + parts["ce"], aux + parts["aux"]
        loads = g_loads if loads is None else [a + b for a, b in zip(loads, g_loads)]
    opt.step()  # average gradients, (clip,) update, broadcast, QK-Clip
    lay = model.layout
    # aux-loss-free bias: loads summed over micro-batches and over the dp x ep ranks of the stage
    for chunk, load in zip(model.chunks, loads):
        if len(load):
            _all_reduce(load, lay.replica_group)
            for moe, l_ in zip(chunk.moe_layers(), load):
                moe_lib.update_router_bias_(moe.router, l_, model.cfg.bias_update_speed)
    if stats is not None:
        stats.update(ce=ce, aux=aux, loads=loads)
    return loss


@torch.no_grad()
def evaluate(model: RankModel, idx: torch.Tensor, targets: torch.Tensor,
             autocast_dtype: torch.dtype | None = None) -> float:
    """Mean loss of the global batch under the layout, forward only: no gradient, no S_max recorded (it would
    count toward the next step's QK-Clip), no bias update."""
    attns = [m for m in model.modules() if isinstance(m, mla.MLA)]
    flags = [m.record_s_max for m in attns]
    for m in attns:
        m.record_s_max = False
    try:
        return forward_backward(model, idx, targets, autocast_dtype, backward=False)[0]
    finally:
        for m, f in zip(attns, flags):
            m.record_s_max = f


def forward_backward(model: RankModel, idx: torch.Tensor, targets: torch.Tensor,
                     autocast_dtype: torch.dtype | None = None, memory: dict | None = None,
                     backward: bool = True, parts: dict | None = None) -> tuple[float, list[torch.Tensor]]:
    """This rank's share of the global batch through its schedule; gradients (of the mean loss) accumulate in
    .grad, not yet averaged over replicas. Returns (global mean loss, per chunk its (n_moe, E) expert loads).
    memory: if a dict, gets "activations", the peak bytes saved for backward (parameters excluded) over the
    schedule. parts: if a dict, gets "ce" and "aux", the two terms of the global mean loss."""
    lay, d = model.layout, model.layout.dims
    B, S = idx.shape
    shards = d.dp * d.ep * d.n_microbatches
    if B % shards:
        raise ValueError(f"batch of {B} sequences must divide into dp x ep x n_microbatches = {d.dp} x {d.ep} x "
                         f"{d.n_microbatches} = {shards} micro-batches (--batch-size, --microbatches)")
    rows = B // (d.dp * d.ep)
    mine = slice(lay.data_shard * rows, (lay.data_shard + 1) * rows)
    idx_mb = idx[mine].to(lay.device).chunk(d.n_microbatches)
    tgt_mb = targets[mine].to(lay.device).chunk(d.n_microbatches)
    M, n_stages = d.n_microbatches, d.n_stages
    n_shards = d.dp * d.ep
    n_targets = max(int((targets != -100).sum()), 1)  # over the global batch: every rank sees it
    loss_sum = torch.zeros(2, device=lay.device)  # (CE, balance loss)
    loads = [torch.zeros(len(c.moe_layers()), model.cfg.n_routed_experts, device=lay.device) for c in model.chunks]
    amp = torch.autocast(lay.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    saved_bytes = {}  # (micro-batch, chunk) -> bytes of activations its forward saved for backward
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def forward(m: int, c: int, x):
        nonlocal loss_sum
        v = c * d.pp + lay.pp_rank
        last = v == n_stages - 1
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.chunks[c](x, tgt_mb[m] if last else None)
        saved_bytes[(m, c)] = sum(seen.values())
        if out.expert_load is not None:
            loads[c] += out.expert_load
        aux = out.aux_loss / (M * n_shards)  # balance loss: a mean over the batch's sequences
        if last:  # CE: a mean over the batch's valid targets, so each micro-batch weighs by its count
            n_valid = int((tgt_mb[m] != -100).sum())
            ce = (out.loss - out.aux_loss) * (n_valid / n_targets) if n_valid else out.logits.sum() * 0.0
            loss_sum = loss_sum + torch.stack([ce.detach().float(), aux.detach().float()])
            return ce + aux, None
        loss_sum = loss_sum + torch.stack([torch.zeros_like(loss_sum[0]), aux.detach().float()])
        return out.hidden, aux

    if d.pp == 1:  # no pipeline: gradient accumulation over the micro-batches
        actions = [(k, m, 0) for m in range(M) for k in "FB"]
        for m in range(M):
            loss, _ = forward(m, 0, idx_mb[m])
            if backward:
                loss.backward()
    else:
        actions = schedule_actions(d.schedule, d.pp, M)[lay.pp_rank]
        if not backward:  # forwards only, in the schedule's order (so p2p messages keep their order)
            actions = [a for a in actions if a[0] == "F"]
        _run_pipeline(model, forward, idx_mb, actions)
    if memory is not None and backward:
        live = peak = 0
        for kind, m, c in actions:
            live += saved_bytes[(m, c)] if kind == "F" else -saved_bytes[(m, c)]
            peak = max(peak, live)
        memory["activations"] = peak
    _all_reduce(loss_sum, lay.world_group)  # Σ over stages (CE on the last, aux on each) and data shards
    ce, aux = loss_sum.tolist()
    if parts is not None:
        parts.update(ce=ce, aux=aux)
    return ce + aux, loads


def _run_pipeline(model: RankModel, forward, idx_mb, actions) -> None:
    """Execute this rank's schedule. The sends a compute produces are posted at the start of the next action,
    in one batch with that action's receive (Megatron's send_forward_recv_backward pairing): NCCL then never
    waits on a send queued behind a receive from the same peer. Only receives are waited for before computing;
    sends complete by the end of the step."""
    lay, d = model.layout, model.layout.dims
    n_stages, to_send, in_flight, saved = d.n_stages, [], [], {}
    shape = (idx_mb[0].shape[0], idx_mb[0].shape[1], model.cfg.hidden_size)

    def exchange(recv: tuple | None = None) -> torch.Tensor | None:
        """Post the pending sends and, if given, receive (kind, micro-batch, stage, source rank)."""
        ops = [dist.P2POp(dist.isend, t, dst, tag=tag) for t, dst, tag in to_send]
        buf = None
        if recv is not None:
            kind, m, v, src = recv
            buf = torch.empty(shape, device=lay.device)
            ops.append(dist.P2POp(dist.irecv, buf, src, tag=_tag(kind, m, v, n_stages)))
        if dist.get_backend() == "nccl":  # one NCCL group: the sends and the receive progress together
            works = dist.batch_isend_irecv(ops) if ops else []
            sends = works
        else:  # gloo: tagged, buffered p2p, one work per op (a gloo recv must be waited for exactly once)
            works = [op.op(op.tensor, op.peer, tag=op.tag) for op in ops]
            sends = works[: len(to_send)]
        in_flight.append((sends, list(to_send)))  # keep the tensors alive until sent
        to_send.clear()
        if recv is not None:
            works[-1].wait()
        return buf

    for kind, m, c in actions:
        v = c * d.pp + lay.pp_rank
        if kind == "F":
            if v == 0:
                exchange()
                x = idx_mb[m]
            else:
                x = exchange(("F", m, v, lay.grid_rank((v - 1) % d.pp))).requires_grad_()
            out, aux = forward(m, c, x)
            if torch.is_grad_enabled():
                saved[(m, c)] = (x, out, aux)
            if v < n_stages - 1:
                to_send.append((out.detach().float().contiguous(), lay.grid_rank((v + 1) % d.pp),
                                _tag("F", m, v + 1, n_stages)))
        else:
            x, out, aux = saved.pop((m, c))
            if v == n_stages - 1:
                exchange()
                out.backward()
            else:
                g = exchange(("B", m, v, lay.grid_rank((v + 1) % d.pp)))
                outs, grads = [out], [g.to(out.dtype)]
                if aux.requires_grad:
                    outs.append(aux)
                    grads.append(torch.ones_like(aux))
                torch.autograd.backward(outs, grads)
            if v > 0:
                to_send.append((x.grad.float().contiguous(), lay.grid_rank((v - 1) % d.pp),
                                _tag("B", m, v - 1, n_stages)))
    exchange()
    for works, _ in in_flight:
        for work in works:
            work.wait()


# ---- runs: a layout vs one process ----


def batches(cfg, n_steps: int, batch_size: int, seq_len: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same seeded toy-language batches (chapter 3) on every rank."""
    data = mc.toy_batches(cfg.vocab_size, batch_size, seq_len, seed=seed + 1)
    return [next(data) for _ in range(n_steps)]


def reference_run(cfg, data, seed: int, opt_kw: dict) -> tuple[list[float], dict, nn.Module]:
    """One process, whole batch per step: chapter 3's MuonClip loop. Returns losses, canonical state, model."""
    torch.manual_seed(seed)
    model = mla.Transformer(cfg)
    opt = mc.MuonClip(model, **opt_kw)
    losses = []
    for idx, targets in data:
        out = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        mla.update_router_biases_(model, out.expert_load, cfg.bias_update_speed)
        losses.append(out.loss.item())
    one = Layout(ParallelDims())
    return losses, RankModel(cfg, one, [model], [list(range(cfg.num_hidden_layers))]).canonical_state(), model


def run_layout(cfg, layout: Layout, data, seed: int, opt_kw: dict, zero: str = "owner",
               autocast_dtype=None) -> tuple[list[float], RankModel, ZeroMuonClip]:
    model = build_model(cfg, layout, seed)
    opt = make_optimizer(model, zero=zero, **opt_kw)
    losses = [train_step(model, opt, idx, tgt, autocast_dtype) for idx, tgt in data]
    return losses, model, opt


def max_diff_vs(model: RankModel, ref_state: dict) -> float:
    """max |ours - reference| over every parameter and buffer this rank holds, MAX over all ranks."""
    diff = max((t.detach().float().cpu() - ref_state[k].float()).abs().max().item()
               for k, t in model.canonical_state().items())
    out = torch.tensor(diff, device=model.layout.device)
    _all_reduce(out, model.layout.world_group, dist.ReduceOp.MAX)
    return out.item()


# ---- checkpoints: torch.distributed.checkpoint with layout-free keys ----

_STATE_NAMES = {True: ("momentum_buffer",), False: ("exp_avg", "exp_avg_sq", "step")}


def _optim_entries(model: RankModel, opt: ZeroMuonClip):
    """(canonical key, state name, expert index or None, param, group) for every parameter this rank owns."""
    if opt.zero != "owner":
        raise ValueError("checkpoints need zero (--zero) = 'owner': distributed_muon keeps flat slices of the "
                         "optimizer state that do not map to layout-free keys")
    keys = model.canonical_params()
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.owns(p):
                continue
            for e, key in enumerate(keys[p]):
                for s in _STATE_NAMES[group["use_muon"]]:
                    yield key, s, (e if is_expert_param(key) else None), p, group


def save_checkpoint(path: str, model: RankModel, opt: ZeroMuonClip, extra: dict | None = None) -> None:
    """Every rank writes its own parameters (replicas deduplicated by DCP) and the optimizer state it owns, under
    layout-free keys, into path (a directory), written as path.tmp and renamed when every rank is done.
    extra: tensors identical on every rank (e.g. the step counter)."""
    import torch.distributed.checkpoint as dcp

    lay = model.layout
    sd = {f"model/{k}": t.detach().contiguous() for k, t in model.canonical_state().items()}
    for key, s, e, p, _ in _optim_entries(model, opt):
        v = opt.state[p].get(s)
        if v is None:
            continue  # no step taken yet
        v = torch.tensor(float(v)) if s == "step" else (v[e] if e is not None else v)
        sd[f"optim/{key}/{s}"] = v.contiguous()
    for k, v in (extra or {}).items():
        sd[f"extra/{k}"] = torch.as_tensor(v)
    tmp = path.rstrip("/") + ".tmp"
    if lay.rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    _barrier(lay)
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(sd, checkpoint_id=tmp, no_dist=lay.world_group is None)
    _barrier(lay)
    if lay.rank == 0:
        old = path.rstrip("/") + ".old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(lay)


def load_checkpoint(path: str, model: RankModel, opt: ZeroMuonClip | None = None) -> dict:
    """Load a checkpoint written under any layout into this rank's model (and the optimizer state it owns under
    this layout). Returns the extra tensors."""
    import torch.distributed.checkpoint as dcp

    lay = model.layout
    if not os.path.isdir(path):
        raise ValueError(f"path: no checkpoint directory at {path!r}")
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    live = model.canonical_state()
    missing = [k for k in live if f"model/{k}" not in stored]
    if missing:
        raise ValueError(f"path: checkpoint {path!r} lacks {len(missing)} model tensors, e.g. {missing[:3]} "
                         "(a different model config?)")
    sd = {f"model/{k}": torch.empty_like(t.detach()).contiguous() for k, t in live.items()}
    entries = [en for en in _optim_entries(model, opt) if f"optim/{en[0]}/{en[1]}" in stored] if opt else []
    for key, s, e, p, _ in entries:
        sd[f"optim/{key}/{s}"] = torch.zeros(()) if s == "step" else torch.zeros(
            p.shape[1:] if e is not None else p.shape, dtype=torch.float32, device=p.device)
    extra_keys = [k for k in stored if k.startswith("extra/")]
    for k in extra_keys:
        sd[k] = torch.empty(stored[k].size, dtype=stored[k].properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=path, no_dist=lay.world_group is None)
    with torch.no_grad():
        for k, t in live.items():
            t.copy_(sd[f"model/{k}"])
        for key, s, e, p, _ in entries:
            v = sd[f"optim/{key}/{s}"]
            st = opt.state[p]
            if s == "step":
                st["step"] = int(v.item())
            else:
                st.setdefault(s, torch.zeros_like(p, dtype=torch.float32))
                (st[s][e] if e is not None else st[s]).copy_(v)
    return {k[len("extra/"):]: sd[k] for k in extra_keys}


def _barrier(layout: Layout) -> None:
    if layout.world_group is not None:
        dist.barrier()


# ---- memory per rank ----


def rank_memory(model: RankModel, opt: ZeroMuonClip, activations: int) -> dict[str, int]:
    """Bytes this rank holds: parameters, gradients (same size: ZeRO-1 keeps full gradients), the optimizer state it
    owns (as allocated), activations saved for backward at the schedule's peak (measured)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    return dict(params=params, grads=params, optimizer=state, activations=activations)


def k2_memory_rows(cfg, pp: int = 16, ep: int = 16, dp: int = 8, virtual_stages: int = 2) -> list[tuple]:
    """Per-rank GiB of the largest pipeline rank for the real config, layouts from one GPU up to K2's, counted on
    the meta device. bf16 weights and gradients (2 + 2 bytes); fp32 optimizer state with an fp32 master copy:
    Muon 4 + 4 bytes per weight, AdamW 4 + 4 + 4; ZeRO-1 splits it over the dp·ep (dp for experts) replicas."""
    with torch.device("meta"):
        kinds = {}
        for i in sorted({0, cfg.num_hidden_layers - 1}):
            block = mla.Block(cfg, i)
            expert = sum(p.numel() for n, p in block.named_parameters() if ".experts." in f".{n}")
            matrix = sum(p.numel() for n, p in block.named_parameters() if p.ndim == 2)
            vector = sum(p.numel() for n, p in block.named_parameters() if p.ndim == 1)
            kinds[i >= cfg.first_k_dense_replace] = (expert, matrix, vector)
    per_layer = [kinds[i >= cfg.first_k_dense_replace] for i in range(cfg.num_hidden_layers)]
    embed = head = cfg.vocab_size * cfg.hidden_size
    GiB = 2 ** 30
    rows = []
    for name, (p_, e_, d_, v_) in {"1 GPU": (1, 1, 1, 1), f"ZeRO-1 dp{pp * ep * dp}": (1, 1, pp * ep * dp, 1),
                                   f"PP{pp} (interleaved)": (pp, 1, 1, virtual_stages),
                                   f"PP{pp} x EP{ep}": (pp, ep, 1, virtual_stages),
                                   f"PP{pp} x EP{ep} x ZeRO-1 dp{dp} (K2)": (pp, ep, dp, virtual_stages)}.items():
        stages = split_stages(layer_costs(cfg), p_ * v_)
        worst = None
        for r in range(p_):
            held = [i for c in range(v_) for i in stages[c * p_ + r]]
            expert = sum(per_layer[i][0] for i in held)
            matrix = sum(per_layer[i][1] for i in held)
            vector = sum(per_layer[i][2] for i in held) + (embed if 0 in held else 0) + (
                head + cfg.hidden_size if cfg.num_hidden_layers - 1 in held else 0)
            weights = expert / e_ + matrix + vector
            optim = 8 * expert / e_ / d_ + 8 * matrix / (d_ * e_) + 12 * vector / (d_ * e_)
            row = (2 * weights / GiB, 2 * weights / GiB, optim / GiB)
            worst = row if worst is None or sum(row) > sum(worst) else worst
        rows.append((name, p_ * e_ * d_, *worst))
    return rows


# ---- demo ----


def demo_layouts(world: int, cfg) -> list[tuple[str, ParallelDims, str]]:
    """Every layout of `world` ranks this model admits: pp x ep x dp, 1F1B and interleaved for pp > 1."""
    out = []
    for pp in (p for p in range(1, world + 1) if world % p == 0):
        for ep in (e for e in range(1, world // pp + 1) if (world // pp) % e == 0):
            dp = world // (pp * ep)
            for schedule in (("1f1b", "interleaved") if pp > 1 else ("1f1b",)):
                try:
                    dims = ParallelDims(pp=pp, ep=ep, dp=dp, schedule=schedule, n_microbatches=2 * pp if pp > 1 else 1)
                    dims.check(cfg, world)
                except ValueError:
                    continue
                name = " x ".join(f"{k}{v}" for k, v in (("pp", pp), ("ep", ep), ("dp", dp)) if v > 1) or "1 rank"
                for zero in (ZERO_MODES if dp > 1 and pp == 1 and ep == 1 else ("owner",)):
                    out.append((name, dims, zero))
    return out


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--schedules", action="store_true", help="only print the schedule tables and exit")
    p.add_argument("--steps", type=cli.positive_int, default=3, help="MuonClip steps per layout")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="sequences per step (global batch)")
    p.add_argument("--seq-len", type=cli.positive_int, default=32, help="tokens per sequence")
    p.add_argument("--layers", type=cli.positive_int, default=4, help="decoder layers of the tiny model")
    p.add_argument("--pp", type=cli.positive_int, default=4, help="pipeline ranks in the schedule tables")
    p.add_argument("--microbatches", type=cli.positive_int, default=4, help="micro-batches in the schedule tables")
    p.add_argument("--k2-dp", type=cli.positive_int, default=8, help="ZeRO-1 replicas in the K2 memory table")
    p.add_argument("--tau", type=cli.positive_float, default=0.1, help="QK-Clip threshold (low: the clip acts)")
    p.add_argument("--timeout", type=cli.positive_float, default=300.0, help="seconds a collective may wait")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed for model init and data")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads per rank")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size().columns, 140))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or args.schedules:
        _print_schedules(console, args.pp, args.microbatches)
        if args.schedules:
            return
        t = Table(title="Kimi K2 per-rank memory, largest pipeline rank (meta device; bf16 weights and grads, fp32 "
                        "Muon/AdamW state with master copy; activations not counted)")
        for col in ("layout", "GPUs", "weights GiB", "grads GiB", "optimizer GiB", "total GiB"):
            t.add_column(col, justify="right")
        for name, gpus, w, g, o in k2_memory_rows(mla.ModelConfig.kimi_k2(), dp=args.k2_dp):
            t.add_row(name, str(gpus), f"{w:,.1f}", f"{g:,.1f}", f"{o:,.1f}", f"{w + g + o:,.1f}")
        console.print(t)
        console.print("Run the layouts on real process groups:  torchrun --nproc_per_node=4 04_parallel.py  "
                      "(CPU: gloo; GPUs: NCCL + bf16 autocast; multi-node: torchrun --nnodes N --rdzv-endpoint ...)")
        return
    cfg = mla.ModelConfig.tiny(num_hidden_layers=args.layers)
    data = batches(cfg, args.steps, args.batch_size, args.seq_len, args.seed)
    opt_kw = dict(lr=2e-2, adamw_lr=1e-2, tau=args.tau)
    ref_losses, ref_state, _ = reference_run(cfg, data, args.seed, opt_kw)
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    amp = torch.bfloat16 if cuda else None
    t = Table(title=f"{world} ranks ({'NCCL, bf16 autocast' if cuda else 'gloo, fp32'}): tiny K2 ({args.layers} "
                    f"layers), {args.steps} MuonClip steps of {args.batch_size} x {args.seq_len} tokens vs one process")
    for col in ("layout", "schedule", "ZeRO-1", "loss per step", "max |Δ loss|", "max |Δ| params",
                "MiB per rank: params (= grads)", "optimizer state", "activations (peak)"):
        t.add_column(col, justify="right")
    for name, dims, zero in demo_layouts(world, cfg):
        if args.batch_size % (dims.dp * dims.ep * dims.n_microbatches):
            continue
        layout = init_distributed(dims, cfg, timeout_s=args.timeout)
        model = build_model(cfg, layout, args.seed)
        opt = make_optimizer(model, zero=zero, **opt_kw)
        losses, mem = [], {}
        for idx, tgt in data:
            losses.append(train_step(model, opt, idx, tgt, amp))
        opt.zero_grad(set_to_none=True)
        forward_backward(model, *data[0], amp, memory=mem)  # measure the schedule's activation peak
        m = rank_memory(model, opt, mem["activations"])
        diff = max_diff_vs(model, ref_state)
        per_rank = torch.tensor([m["params"], m["optimizer"], m["activations"]], dtype=torch.float64,
                                device=layout.device)
        gathered = [torch.zeros_like(per_rank) for _ in range(world)]
        dist.all_gather(gathered, per_rank)
        cols = [" ".join(_mib(g[i].item()) for g in gathered) for i in range(3)]
        sched = dims.schedule if dims.pp > 1 else "-"
        t.add_row(name, f"{sched} ({dims.n_microbatches} mb)" if dims.pp > 1 else sched,
                  "dist. Muon" if zero == "distributed_muon" else zero, " ".join(f"{a:.4f}" for a in losses),
                  f"{max(abs(a - b) for a, b in zip(losses, ref_losses)):.1e}", f"{diff:.1e}", *cols)
    if rank == 0:
        console.print(f"one process: losses {' '.join(f'{a:.4f}' for a in ref_losses)}")
        console.print(t)
        console.print("Per-rank columns list ranks 0..n-1. PP divides the layers, EP the experts, ZeRO-1 the "
                      "optimizer state; 1F1B keeps pp - stage micro-batches of activations, GPipe all of them.")
    close_distributed(Layout(ParallelDims(), world_group=dist.group.WORLD))


def _print_schedules(console, pp: int, n_micro: int) -> None:
    for kind in SCHEDULES:
        V = 2 if kind == "interleaved" else 1
        try:
            ParallelDims(pp=pp, dp=1, schedule=kind, n_microbatches=n_micro)
        except ValueError as err:
            console.print(f"{kind}: {err}")
            continue
        acts = schedule_actions(kind, pp, n_micro)
        table = simulate_schedule(acts, pp, pp * V)
        peaks = [peak_in_flight(a) for a in acts]
        console.print(f"[bold]{kind}[/]: pp={pp}, {n_micro} micro-batches, {len(table[0])} ticks (F and B one tick "
                      f"each{'; a/b = the two chunks of a rank' if V > 1 else ''}); peak chunk-micro-batches in "
                      f"flight per rank: {peaks}")
        console.print(format_schedule(table, V), highlight=False)


if __name__ == "__main__":
    cli.run(main)
