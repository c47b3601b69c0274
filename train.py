"""The whole Kimi K2 recipe end to end: pretrain -> SFT -> RL, evaluated after every stage, on one CPU.

What it does
    1. Pretrain the tiny K2 (chapter 2: MLA + ultra-sparse MoE with the aux-loss-free bias of chapter 1) with
       MuonClip (chapter 3) on chapter 5's corpora: a fictional world's biographies, rephrased chunk-wise and
       fidelity-checked (N rephrasings x 1 epoch, K2 §2.2's best arm, with QA lines for half the people), and
       math word problems with worked solutions and their "learning note" rewrites.
    2. SFT (MuonClip again) on chapter 5's synthesized, judge-filtered agentic trajectories plus chapter 6's
       short sums and unit/date tool chats; the loss is on the assistant's tokens only.
    3. RL (chapter 6): K samples per prompt of sums and unit/date tool tasks, verifiable rewards with budget
       control, the Kimi k1.5 loss + PTX loss + the self-critic's closed-loop loss, a decaying temperature,
       weights handed to the rollout side through the checkpoint engine before every rollout.
    After every stage, on held-out data: validation loss (raw biographies, unseen math), SFT loss on unseen
    trajectories, knowledge QA (closed-book multiple choice on people whose QA never appears in training,
    chance 1/8), math word problems (greedy completion, exact answer), unseen sums, tool-use success on unseen
    unit/date tasks and on unseen tasks of all 7 kinds (the model is the agent against chapter 5's user
    simulator, tools and judge), and the self-critic's pairwise accuracy on held-out pairs.
    Everything lands in a run directory: config.json (resolved), metrics.jsonl (one line per step and per
    evaluation), ckpt/ (last.pt + last.json to resume, <stage>.pt weights), figures/.

Design choices
    - No concept code here: every model, optimizer, data, reward and rollout piece is a call into a chapter;
      this file wires them, keeps the books (metrics, checkpoints, figures) and checks its flags.
    - Resume is exact on CPU: a batch, an RL step's prompts and its sampling seed are pure functions of
      (seed, stage, step), so the data position is the step; a checkpoint holds model, optimizer, RNG
      states, the finished stages' results and the number of metrics.jsonl lines, and resuming truncates
      the file there. Checkpoints are written atomically and read with weights_only=True. One torch thread
      by default: a CPU reduction's last bits depend on the thread count (chapter 5's finding).
    - One MuonClip object per stage (Muon for matrices, AdamW for embeddings/head/norms, QK-Clip after each
      step), each stage with its own warmup + cosine schedule (chapter 3's lr_factor).
    - The model config travels as config.json keys (HF DeepseekV3 names): `--preset`, `--config FILE` and
      `--override key=value` all resolve through chapter 2's ModelConfig.from_hf, which rejects what it
      would not honour; `--export-hf` writes the same keys plus safetensors weights.
    - Under torchrun (`--pp`, `--ep`; dp = ranks / (pp x ep)) pretraining and SFT go through chapter 4:
      build_model, ZeRO-1 MuonClip clipping the global gradient norm, train_step on the step's micro-batch
      groups (the one-process loss: a 2-rank gloo run matches it to ~1e-6), DCP checkpoints (ckpt/last.dcp,
      layout-free: resume under any layout; the run's books travel inside as a JSON byte tensor). Rank 0
      prints, writes the shared files and evaluates the model assembled from every rank's part while the
      others wait. RL runs in one process for now: `--stages ...,rl` is refused under torchrun.
    - Tool schemas in the system prompt are chapter 6's one-line summaries: the full JSON schemas would be
      ~2,000 byte tokens per conversation, too long for a CPU run.

Simplified vs K2
    - 15.5T tokens, a 1.04T model, a 160k BPE vocabulary vs ~0.6M byte tokens, a 1.7M-parameter tiny K2, 268 ids.
    - One curriculum instead of K2's staged data mixture and long-context activation; warmup + cosine, not
      WSD; no MTP; fp32 on CPU; the router bias is updated in pretraining and SFT, not in RL.
    - RL in one process: the rollout side shares the trainer's weights (colocated), so the checkpoint engine
      only advances its version; K2 broadcasts 1T parameters to separate inference engines. Under torchrun
      evaluation runs on rank 0 alone (no sharded generation).
    - Tool use is measured on chapter 5's scripted world, not on real benchmarks.

References
    Kimi K2 (arXiv 2507.20534): §2.1 MuonClip, §2.2 rephrasing, §2.3 architecture, §2.4.2 checkpoint engine,
    §3.1 SFT and agentic data, §3.2 RL. Kimi k1.5 (arXiv 2501.12599) §2.3; Moonlight (arXiv 2502.16982);
    DeepSeek-V3 (arXiv 2412.19437).

Run:
    python train.py --help
    python train.py                                   # the default recipe (about 6 CPU-minutes, 1 thread)
    python train.py --quick --out runs/quick          # a micro run through every stage (seconds of compute)
    python train.py --out runs/a --resume             # continue a killed run: the same numbers, bit for bit
    python train.py --out runs/a --resume --export-hf hf/   # then AutoModelForCausalLM.from_pretrained("hf/")
    python train.py --config config.json --override num_hidden_layers=2 hidden_size=128 --stages pretrain
    torchrun --nproc_per_node=2 train.py --ep 2 --stages pretrain,sft --out runs/ep2   # chapter 4's EP + ZeRO-1
    torchrun --nproc_per_node=2 train.py --pp 2 --stages pretrain,sft --out runs/ep2 --resume   # as PP 2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import cli

moe_lib = importlib.import_module("01_moe")
mla = importlib.import_module("02_mla")
muonclip = importlib.import_module("03_muonclip")
par = importlib.import_module("04_parallel")
data = importlib.import_module("05_data")
rl = importlib.import_module("06_rl")

STAGES = ("pretrain", "sft", "rl")
CKPT_FORMAT = 1


# ---- the run's configuration ----

@dataclass
class TrainConfig:
    """Everything a run depends on; config.json in the run directory is this, resolved (model included)."""

    stages: list = field(default_factory=lambda: list(STAGES))
    seed: int = 0
    threads: int = 1
    model: dict = field(default_factory=dict)  # config.json keys of chapter 2's ModelConfig (HF names)
    # data (chapter 5; the RL splits come from chapter 6)
    entities: int = 64  # people in the knowledge world (half get QA lines in training, half are held out)
    attributes: int = 1  # facts per person (1 = hometown, one of 8 cities)
    rephrasings: int = 4  # N rephrasings of every biography (K2 Table 1's best arm: N rephrasings x 1 epoch each)
    math_problems: int = 800  # word problems generated; duplicates of a training question never reach the test
    math_test: int = 32
    math_per_round: int = 16  # problems (solution + learning note) interleaved with each knowledge epoch
    sft_tasks: int = 280  # tasks given to chapter 5's synthesis (judge-filtered trajectories are kept)
    sft_val_tasks: int = 28
    eval_tasks: int = 14  # held-out tool-use tasks of all 7 kinds, played after every stage
    max_operand: int = 20  # chapter 6's sums a + b: SFT / RL / held-out splits
    rl_tool_tasks: int = 24  # chapter 6's unit and date tasks per split (SFT / RL / held-out)
    # pretraining
    pretrain_steps: int = 150
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-2  # Muon's lr (hidden matrices)
    adamw_lr: float = 3e-3  # embeddings, head, norms
    weight_decay: float = 0.1
    tau: float = 30.0  # QK-Clip threshold (K2: 100; the tiny model's logits are smaller)
    # SFT: every step = one batch of agentic trajectories + one batch of short math chats
    sft_steps: int = 150
    sft_batch_size: int = 4
    sft_short_batch_size: int = 16
    sft_seq_len: int = 768
    sft_lr: float = 3e-3
    sft_adamw_lr: float = 1e-3
    # RL (chapter 6: k1.5 loss, budget control, PTX, temperature decay, self-critic closed loop)
    rl_steps: int = 20
    rl_prompts: int = 6  # per step, of which rl_tool_prompts are tool tasks and the rest sums
    rl_tool_prompts: int = 2
    rl_group: int = 4  # K samples per prompt
    rl_lr: float = 1e-3
    rl_tau: float = 0.1
    ptx_weight: float = 0.1
    critic_weight: float = 0.1
    t_start: float = 1.2
    t_end: float = 0.7
    critic_prompts: int = 24  # held-out prompts whose rollouts give the critic's evaluation pairs
    # evaluation
    val_batches: int = 4
    max_new_tokens: int = 96  # completion-format math
    # bookkeeping
    ckpt_every: int = 25

    def validate(self) -> None:
        for s in self.stages:
            if s not in STAGES:
                raise ValueError(f"stages: {s!r} is not one of {STAGES}")
        if list(self.stages) != sorted(set(self.stages), key=STAGES.index):
            raise ValueError(f"stages: {','.join(self.stages)} must be distinct and in the order {','.join(STAGES)}")
        if not self.stages:
            raise ValueError("stages: empty, nothing to do")
        if self.rl_tool_prompts > self.rl_prompts:
            raise ValueError(f"rl_tool_prompts={self.rl_tool_prompts} is more than rl_prompts={self.rl_prompts}")
        if self.math_test >= self.math_problems:
            raise ValueError(f"math_test={self.math_test} must be smaller than math_problems={self.math_problems}")


def quick_config() -> dict:
    """--quick: a micro run (2 layers of width 64, 8 experts) through every stage, for tests and smoke runs."""
    return dict(entities=16, rephrasings=2, math_problems=80, math_test=6, math_per_round=6, sft_tasks=28,
                sft_val_tasks=7, eval_tasks=7, max_operand=6, rl_tool_tasks=4, pretrain_steps=12, batch_size=4,
                seq_len=128, sft_steps=6, sft_batch_size=2, sft_short_batch_size=4, sft_seq_len=384, rl_steps=4,
                rl_prompts=3, rl_tool_prompts=1, rl_group=2, critic_prompts=4, val_batches=1, max_new_tokens=40,
                ckpt_every=2,
                model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                           intermediate_size=128, moe_intermediate_size=16, n_routed_experts=8,
                           num_experts_per_tok=2))


def resolve_model(preset: str, config_path: str | None, overrides: dict, vocab_size: int) -> mla.ModelConfig:
    """The model: a preset or a config.json, then `key=value` overrides, all read by ModelConfig.from_hf."""
    if config_path:
        with open(config_path) as f:
            base = json.load(f)
    else:
        cfg = {"tiny": lambda: mla.ModelConfig.tiny(vocab_size=vocab_size, max_position_embeddings=2048),
               "kimi-k2": mla.ModelConfig.kimi_k2, "deepseek-v3": mla.ModelConfig.deepseek_v3}[preset]()
        base = {**cfg.to_hf(), "bias_update_speed": cfg.bias_update_speed}
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        overrides = {**overrides, "num_key_value_heads": overrides["num_attention_heads"]}  # MLA: no GQA groups
    cfg = mla.ModelConfig.from_hf({**base, **overrides})
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} ids")
    return cfg


# ---- data: chapter 5's corpora, as token tensors ----

@dataclass
class Corpora:
    tok: data.Tokenizer
    world: data.KnowledgeWorld
    fmt: list  # people whose QA lines are in training
    held_out: list  # people whose knowledge is only in their biographies
    stream: torch.Tensor  # (n_tokens,) the pretraining stream
    val: torch.Tensor  # (n, seq_len + 1) held-out text: raw biographies, unseen math
    math_test: list  # chapter 5 word problems never seen in training
    sft: list  # [(ids, mask)] agentic trajectories, mask 1 on the assistant's tokens
    sft_short: list  # [(ids, mask)] chapter 6's sums answered in chat
    sft_val: list
    rl_envs: list  # [(env, reset seed)] chapter 6's RL prompts: sums, then unit/date tool tasks
    n_rl_sums: int
    test_envs: list  # held-out sums and unit/date tasks
    tool_envs: list  # held-out chapter 5 tasks of all 7 kinds
    counts: dict


def build_corpora(tc: TrainConfig) -> Corpora:
    tok = data.Tokenizer()
    rng = random.Random(tc.seed)
    world = data.KnowledgeWorld(tc.entities, seed=tc.seed, n_attributes=tc.attributes)
    # chunk-wise, fidelity-checked rephrasings; QA lines for half the people (chapter 5, K2 §2.2)
    arms, fmt, held_out, reph = data.build_experiment_arms(world, tc.rephrasings, seed=tc.seed, full_names=True)
    knowledge = arms["many"]  # N epochs, each a different rephrasing of every biography (+ QA lines)
    problems = data.make_math_problems(tc.math_problems, seed=tc.seed)
    train_p = problems[: tc.math_problems - tc.math_test]
    seen = {p.question for p in train_p}
    test_p = [p for p in problems[len(train_p):] if p.question not in seen]
    math_docs = []
    for p in train_p:  # each problem: its worked solution, and its learning-note rewrite when that passes fidelity
        note = data.math_learning_note(p, rng)
        math_docs.append([p.solution()] + ([note] if data.check_math_note(p, note) is None else []))
    # rounds: one knowledge epoch (cycling over the N rephrasings) + the next math_per_round problems
    need = tc.pretrain_steps * tc.batch_size * tc.seq_len + 1
    rounds, n_tok, r = [], 0, 0
    while n_tok < need:
        docs = list(knowledge[r % len(knowledge)])
        for i in range(r * tc.math_per_round, (r + 1) * tc.math_per_round):
            docs += math_docs[i % len(math_docs)]
        rounds.append(docs)
        n_tok += sum(len(tok.encode(d)) + 2 for d in docs)
        r += 1
    stream = torch.tensor(data.token_stream(rounds, tok, tc.seed)[:need])
    val_docs = [world.raw_document(e, full_names=True) for e in world.entities]
    val_docs += [p.solution() for p in test_p] + [data.math_learning_note(p, rng) for p in test_p]
    val_ids = torch.tensor(data.token_stream([val_docs], tok, tc.seed + 1))
    S1 = tc.seq_len + 1
    n_rows = min(len(val_ids) // S1, tc.val_batches * tc.batch_size)
    val = val_ids[: n_rows * S1].view(n_rows, S1)
    # agentic trajectories (chapter 5): synthesis -> judge, rendered with chapter 6's compact tool list
    kept, syn_counts = data.synthesize(tc.sft_tasks, seed=tc.seed)
    kept_val, _ = data.synthesize(tc.sft_val_tasks, seed=tc.seed + 1)
    # chapter 6's RL material: sums and unit/date tasks in disjoint SFT / RL / held-out splits
    sums_sft, sums_rl, sums_test = rl.split_sums(tc.max_operand, tc.seed)
    tools_sft, tools_rl, tools_test = rl.split_tool_tasks(tc.rl_tool_tasks, tc.seed + 7)
    sft = [chat_example(k, tok, tc.sft_seq_len) for k in kept] + rl.sft_examples(tok, [], tools_sft, tc.seed)
    rl_envs = ([(rl.MathEnv(sums_rl), i) for i in range(len(sums_rl))]
               + [(rl.ToolEnv(tools_rl), i) for i in range(len(tools_rl))])
    test_envs = ([(rl.MathEnv(sums_test), i) for i in range(len(sums_test))]
                 + [(rl.ToolEnv(tools_test), i) for i in range(len(tools_test))])
    eval_tasks = data.make_tasks(tc.eval_tasks, seed=tc.seed + 2)
    counts = {"pretraining tokens": len(stream), "knowledge epochs (rephrasings)": len(knowledge),
              "rephrased chunks accepted / attempted": f"{reph.get('chunks', 0)} / {reph.get('attempts', 0)}",
              "math problems train / test": f"{len(train_p)} / {len(test_p)}",
              "SFT trajectories kept / tasks": f"{syn_counts['kept']} / {syn_counts['tasks']}",
              "RL prompts sums / tools": f"{len(sums_rl)} / {len(tools_rl)}"}
    return Corpora(tok, world, fmt, held_out, stream, val, test_p, sft, rl.sft_examples(tok, sums_sft, [], tc.seed),
                   [chat_example(k, tok, tc.sft_seq_len) for k in kept_val], rl_envs, len(sums_rl), test_envs,
                   [(rl.ToolEnv(eval_tasks), i) for i in range(len(eval_tasks))], counts)


def chat_example(record: dict, tok: data.Tokenizer, max_len: int) -> tuple[list, list]:
    """A synthesized conversation as (ids, mask); the mask is 1 exactly on what the assistant writes."""
    msgs = [rl.compact_system_message(record["meta"]["agent"])] + record["messages"][1:]
    ids, mask = data.render_chat(msgs, tok)
    return ids[: max_len + 1], mask[: max_len + 1]


def targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and loss mask -> inputs (B, L-1) and next-token targets, -100 off the assistant's tokens."""
    return ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)


def pretrain_batch(c: Corpora, tc: TrainConfig, step: int) -> list:
    """Batch `step` of the stream: a pure function of the step (resume needs nothing else)."""
    n = tc.batch_size * tc.seq_len
    chunk = c.stream[step * n: step * n + n + 1]
    return [(chunk[:-1].view(tc.batch_size, tc.seq_len), chunk[1:].view(tc.batch_size, tc.seq_len))]  # (B, S)


def pick(examples: list, batch_size: int, step: int, seed: int) -> list:
    """Batch `step` of an epoch-wise shuffled list: the permutation of epoch e is seeded by (seed, e)."""
    n, out = len(examples), []
    for k in range(step * batch_size, (step + 1) * batch_size):
        order = list(range(n))
        random.Random(seed * 100_003 + k // n).shuffle(order)
        out.append(examples[order[k % n]])
    return out


def sft_batch(c: Corpora, tc: TrainConfig, step: int) -> list:
    """Two micro-batches (long trajectories, short chats: padding a sum to a trajectory's length is waste)."""
    return [targets(*rl.batch_of(pick(c.sft, tc.sft_batch_size, step, tc.seed), c.tok.pad_id)),
            targets(*rl.batch_of(pick(c.sft_short, tc.sft_short_batch_size, step, tc.seed + 1), c.tok.pad_id))]


# ---- evaluation on held-out data ----

@torch.no_grad()
def mean_loss(model, batches) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        out = model(x, y)
        k = int((y != -100).sum())
        total += float(out.loss - out.aux_loss) * k  # the language-model part only
        n += k
    return total / max(n, 1)


@torch.no_grad()
def math_accuracy(model, c: Corpora, max_new_tokens: int) -> float:
    """Completion format (what pretraining saw): greedy worked solution after "Solution:", exact final answer."""
    tok, by_len = c.tok, {}
    for p in c.math_test:  # batch prompts of equal length (generate takes equal-length prompts)
        ids = [tok.bos_id] + tok.encode(p.question + "\nSolution:")
        by_len.setdefault(len(ids), []).append((ids, p.answer))
    correct = 0
    for items in by_len.values():
        out = model.generate(torch.tensor([i for i, _ in items]), max_new_tokens, temperature=0,
                             stop_tokens=(tok.eos_id,), pad_token_id=tok.pad_id)
        for row, (ids, answer) in zip(out.tolist(), items):
            m = re.search(r"Answer:\s*(-?\d+)", tok.decode(row[len(ids):], skip_special=True))
            correct += bool(m) and int(m.group(1)) == answer
    return correct / max(len(c.math_test), 1)


def evaluate(model, c: Corpora, tc: TrainConfig, critic_pairs: list | None) -> dict:
    """Every held-out number, the same after every stage; rollouts are greedy (chapter 6's evaluate)."""
    model.eval()
    muonclip.set_record_s_max(model, False)  # recording costs a logits pass per layer; not needed here
    B = tc.batch_size
    val = [(c.val[i: i + B, :-1], c.val[i: i + B, 1:]) for i in range(0, len(c.val), B)]
    sft_val = [targets(*rl.batch_of(c.sft_val[i: i + tc.sft_batch_size], c.tok.pad_id))
               for i in range(0, len(c.sft_val), tc.sft_batch_size)]
    env = rl.evaluate(model, c.test_envs, c.tok)  # held-out sums ("math") and unit/date tasks ("tool")
    res = {"val_loss": mean_loss(model, val), "sft_val_loss": mean_loss(model, sft_val),
           "qa_held_out": data.qa_accuracy(model, c.world, c.held_out, c.tok),
           "qa_format": data.qa_accuracy(model, c.world, c.fmt, c.tok),
           "math": math_accuracy(model, c, tc.max_new_tokens), "sums": env.get("math", 0.0),
           "tool_units_dates": env.get("tool", 0.0), "tool_all_kinds": rl.evaluate(model, c.tool_envs, c.tok)["tool"]}
    if critic_pairs:
        res["critic_acc"] = rl.critic_accuracy(model, c.tok, critic_pairs)
    muonclip.set_record_s_max(model, True)
    model.train()
    return res


EVAL_ROWS = (("val_loss", "validation loss (raw bios, unseen math)", "{:.3f}"),
             ("sft_val_loss", "SFT loss, unseen trajectories (assistant tokens)", "{:.3f}"),
             ("qa_held_out", "knowledge QA, held-out people (chance 12.5%)", "{:.1%}"),
             ("qa_format", "knowledge QA, people with QA in training", "{:.1%}"),
             ("math", "math word problems, unseen (completion)", "{:.1%}"),
             ("sums", "sums a + b, unseen (chat, chapter 6)", "{:.1%}"),
             ("tool_units_dates", "tool use: unit/date tasks, unseen", "{:.1%}"),
             ("tool_all_kinds", "tool use: all 7 task kinds, unseen", "{:.1%}"),
             ("critic_acc", "self-critic pairwise accuracy, held-out pairs", "{:.1%}"))


# ---- checkpoints and the run directory ----

class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, truncated, or written by a different run."""


def atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str, state: dict) -> None:
    """The full state, atomically; a small last.json beside it says where the run stands (for people, tests)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    where = json.dumps({"stage": state["stage"], "step": state["step"], "finished": list(state["results"])})
    atomic_write(os.path.splitext(path)[0] + ".json", lambda tmp: open(tmp, "w").write(where))


def load_checkpoint(path: str, tc: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        if os.path.isdir(os.path.join(os.path.dirname(path), "last.dcp")):
            raise CheckpointError(f"{path}: none, the run was trained under torchrun: resume it under torchrun") from None
        raise CheckpointError(f"{path}: no checkpoint (the run never reached its first one)") from None
    except Exception as e:  # truncated zip, bad pickle, unexpected types
        raise CheckpointError(f"{path} is corrupted or truncated ({type(e).__name__}: {str(e)[:120]}); "
                              "delete it to restart the stage, or start over with --overwrite") from None
    check_state(path, state, tc)
    return state


def check_state(path: str, state: dict, tc: TrainConfig) -> None:
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not a train.py checkpoint of format {CKPT_FORMAT}")
    old, new = dict(state["config"]), dataclasses.asdict(tc)
    if new["stages"][: len(old["stages"])] == old["stages"]:  # a run may be extended by later stages
        old["stages"] = new["stages"]
    if old != new:
        diff = sorted(k for k in old if old[k] != new.get(k))
        raise CheckpointError(f"{path} was written by a run with a different config (differs in: {', '.join(diff)})")


def load_model_state(model, sd: dict, path: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit this model ({str(e).splitlines()[0][:160]})") from None


class Run:
    """The run directory: config.json, metrics.jsonl, ckpt/, figures/. Only this object writes files."""

    def __init__(self, out: str, writer: bool = True):
        self.out, self.writer = out, writer  # under torchrun only rank 0 writes (the others count lines)
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.ckpt_path = os.path.join(out, "ckpt", "last.pt")
        self.dcp_path = os.path.join(out, "ckpt", "last.dcp")  # under torchrun: chapter 4's sharded checkpoint
        self.lines = 0

    def start(self, tc: TrainConfig, resume: bool) -> None:
        if not self.writer:
            return
        os.makedirs(os.path.join(self.out, "ckpt"), exist_ok=True)
        text = json.dumps(dataclasses.asdict(tc), indent=1)
        atomic_write(os.path.join(self.out, "config.json"), lambda tmp: open(tmp, "w").write(text))
        if not resume:
            open(self.metrics_path, "w").close()

    def log(self, record: dict) -> None:
        if self.writer:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.lines += 1

    def truncate_metrics(self, n_lines: int) -> None:
        """Back to the checkpoint's view of metrics.jsonl (lines logged after it are logged again)."""
        self.lines = n_lines
        if not self.writer:
            return
        with open(self.metrics_path) as f:
            lines = f.readlines()[:n_lines]
        if len(lines) < n_lines:
            raise CheckpointError(f"{self.metrics_path} has {len(lines)} lines, the checkpoint expects {n_lines}")
        atomic_write(self.metrics_path, lambda tmp: open(tmp, "w").writelines(lines))
        self.lines = n_lines

    def records(self) -> list[dict]:
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f]


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


# ---- training: pretraining and SFT share one loop; RL is chapter 6's step ----

def stage_optimizer(model, tc: TrainConfig, stage: str):
    """MuonClip (chapter 3) for every stage, with the stage's learning rates."""
    lr, adamw_lr, wd = {"pretrain": (tc.lr, tc.adamw_lr, tc.weight_decay), "sft": (tc.sft_lr, tc.sft_adamw_lr, 0.0),
                        "rl": (tc.rl_lr, tc.rl_lr, 0.0)}[stage]
    opt = muonclip.MuonClip(model, lr=lr, adamw_lr=adamw_lr, weight_decay=wd, adamw_weight_decay=wd, tau=tc.tau)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def checkpoint(run: Run, state: dict, model, opt, step: int) -> None:
    state.update(step=step, model=model.state_dict(), optim=opt.state_dict() if opt else None, rng=rng_state(),
                 metrics_lines=run.lines)
    save_checkpoint(run.ckpt_path, state)


def train_step(model, opt, batches: list, step: int, steps: int) -> dict:
    """forward (S_max recorded) -> backward -> MuonClip step (QK-Clip inside) -> router bias update."""
    for g in opt.param_groups:  # chapter 3's schedule: linear warmup, cosine to 10%
        g["lr"] = g["initial_lr"] * muonclip.lr_factor(step, steps, warmup=max(1, steps // 20))
    opt.zero_grad(set_to_none=True)
    loss, aux, load, n_tok = 0.0, 0.0, 0, 0
    for x, y in batches:  # micro-batches of one step: gradients add up, loads too
        out = model(x, y)
        out.loss.backward()
        loss, aux = loss + float(out.loss.detach() - out.aux_loss.detach()), aux + float(out.aux_loss.detach())
        load, n_tok = load + out.expert_load, n_tok + int((y != -100).sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()  # Muon + AdamW, then QK-Clip on the step's S_max (K2 Algorithm 1)
    mla.update_router_biases_(model, load, model.cfg.bias_update_speed)  # aux-loss-free balance (chapter 1)
    vio = [moe_lib.load_balance_stats(layer_load)["max_vio"] for layer_load in load]
    clip = opt.clip_stats
    return {"loss": loss, "aux_loss": aux, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
            "s_max": clip["max_s_max"], "clipped_heads": clip["n_clipped"], "max_vio": sum(vio) / len(vio),
            "max_vio_worst": max(vio), "tokens": n_tok}


def rl_step(model, opt, c: Corpora, tc: TrainConfig, engine, step: int) -> dict:
    """One K2 RL step (chapter 6): weights to the rollout side, K samples per prompt, the k1.5 loss + PTX + critic.

    The prompts, the temperature and the sampling seed are functions of the step, so resume replays them.
    """
    rng = random.Random(tc.seed * 100_003 + step)
    sums, tools = c.rl_envs[: c.n_rl_sums], c.rl_envs[c.n_rl_sums:]
    prompts = rng.sample(sums, tc.rl_prompts - tc.rl_tool_prompts) + rng.sample(tools, tc.rl_tool_prompts)
    temperature = rl.temperature_schedule(step, tc.rl_steps, tc.t_start, tc.t_end)
    sync = engine.update()  # single process: the rollout side shares these weights; the version advances
    muonclip.set_record_s_max(model, False)
    rollouts = rl.collect_rollouts(model, prompts, c.tok, group_size=tc.rl_group, temperature=temperature,
                                   seed=tc.seed * 100_003 + step)
    muonclip.set_record_s_max(model, True)
    pairs = rl.critic_pairs(rollouts, tc.rl_group)  # the closed loop: verifiable pairs train the critic
    ptx = rl.batch_of(pick(c.sft_short, tc.sft_short_batch_size, step, tc.seed + 2), c.tok.pad_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the share of all-equal groups is logged instead
        m = rl.rl_step(model, opt, rollouts, group_size=tc.rl_group, tau=tc.rl_tau, pad_id=c.tok.pad_id, ptx=ptx,
                       ptx_weight=tc.ptx_weight, critic_weight=tc.critic_weight,
                       critic_batch=rl.critic_batch(c.tok, pairs[: tc.sft_short_batch_size]) if pairs else None)
    clip = opt.clip_stats
    return {"reward": m["reward_mean"], "all_equal_groups": m["all_equal_groups"], "logprob_gap": m["logprob_gap"],
            "response_len": m["response_len"], "truncated": m["truncated"], "policy_loss": m["policy_loss"],
            "temperature": temperature, "weights_version": sync["version"], "s_max": clip["max_s_max"],
            "clipped_heads": clip["n_clipped"]}


# ---- under torchrun: chapter 4's layout for pretraining and SFT ----

def dist_optimizer(pm, tc: TrainConfig, stage: str):
    """stage_optimizer's MuonClip under chapter 4's ZeRO-1, clipping the global gradient norm at 1 as one process."""
    lr, adamw_lr, wd = {"pretrain": (tc.lr, tc.adamw_lr, tc.weight_decay), "sft": (tc.sft_lr, tc.sft_adamw_lr, 0.0)}[stage]
    opt = par.make_optimizer(pm, lr=lr, adamw_lr=adamw_lr, weight_decay=wd, adamw_weight_decay=wd, tau=tc.tau,
                             max_grad_norm=1.0)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def dist_train_step(pm, opt, batches: list, step: int, steps: int) -> dict:
    """train_step under the layout: chapter 4's train_step on the step's micro-batches, the same record."""
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * muonclip.lr_factor(step, steps, warmup=max(1, steps // 20))
    lay, stats = pm.layout, {}
    amp = torch.bfloat16 if lay.device.type == "cuda" else None
    par.train_step(pm, opt, [x for x, _ in batches], [y for _, y in batches], autocast_dtype=amp, stats=stats)
    # MaxVio of every MoE layer (by global layer id, -1 where this rank holds none), S_max and clipped heads:
    # each stage knows its own layers; MAX over the world (replicas agree), clipped heads summed over stages
    vio = torch.full((pm.cfg.num_hidden_layers,), -1.0)
    for chunk, ids, load in zip(pm.chunks, pm.stage_layers, stats["loads"]):
        moe_ids = [i for i, layer in zip(ids, chunk.layers) if layer.is_moe]
        for i, layer_load in zip(moe_ids, load.cpu()):
            vio[i] = moe_lib.load_balance_stats(layer_load)["max_vio"]
    clip = opt.clip_stats
    s_max = torch.tensor([clip["max_s_max"]])
    n_clipped = torch.tensor([float(clip["n_clipped"])])
    if lay.world_group is not None:
        vio, s_max, n_clipped = (t.to(lay.device) for t in (vio, s_max, n_clipped))
        dist.all_reduce(vio, op=dist.ReduceOp.MAX)
        dist.all_reduce(s_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(n_clipped)
        vio, s_max, n_clipped = vio.cpu(), s_max.cpu(), n_clipped.cpu() / (lay.dims.dp * lay.dims.ep)
    vio = [v for v in vio.tolist() if v >= 0]
    n_tok = sum(int((y != -100).sum()) for _, y in batches)
    return {"loss": stats["ce"], "aux_loss": stats["aux"], "grad_norm": opt.grad_norm, "lr": opt.param_groups[0]["lr"],
            "s_max": float(s_max), "clipped_heads": round(float(n_clipped)), "max_vio": sum(vio) / len(vio),
            "max_vio_worst": max(vio), "tokens": n_tok}


def assemble(pm, model) -> None:
    """Rank 0's `model` <- every rank's part of pm (layout-free keys), for evaluation, stage weights and export."""
    lay = pm.layout
    part = {k: t.detach().cpu().clone() for k, t in pm.canonical_state().items()}
    parts = [None] * dist.get_world_size() if lay.rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    if lay.rank == 0:
        live = par.RankModel(model.cfg, par.Layout(par.ParallelDims()), [model],
                             [list(range(model.cfg.num_hidden_layers))]).canonical_state()
        filled = set()
        with torch.no_grad():
            for p_ in parts:
                for k, t in p_.items():
                    live[k].copy_(t)
                    filled.add(k)
        assert filled == set(live), f"assemble: {len(set(live) - filled)} tensors missing"


def dist_checkpoint(run: Run, state: dict, pm, opt, step: int, mid_stage: bool) -> None:
    """Chapter 4's DCP checkpoint (every rank writes its shard; temp dir + rename); the run's books travel in
    it as a JSON byte tensor, so they are as atomic as the weights."""
    state.update(step=step, metrics_lines=run.lines)
    books = {k: state[k] for k in ("format", "config", "stage", "step", "results", "metrics_lines")}
    books["optim"] = mid_stage
    blob = torch.tensor(list(json.dumps(books).encode()), dtype=torch.uint8)
    par.save_checkpoint(run.dcp_path, pm, opt, extra={"books": blob})
    if run.writer:
        where = json.dumps({"stage": state["stage"], "step": step, "finished": list(state["results"])})
        atomic_write(os.path.splitext(run.ckpt_path)[0] + ".json", lambda tmp: open(tmp, "w").write(where))


def dist_load(run: Run, pm, tc: TrainConfig, opt=None) -> dict:
    """The books of the DCP checkpoint, its weights into pm (and, given, the optimizer state into opt)."""
    path = run.dcp_path
    if not os.path.isdir(path):
        where = ("none, the run was trained in one process: resume it without torchrun"
                 if os.path.isfile(run.ckpt_path) else "no checkpoint (the run never reached its first one)")
        raise CheckpointError(f"{path}: {where}")
    try:
        extra = par.load_checkpoint(path, pm, opt)
        state = json.loads(bytes(extra["books"].tolist()).decode())
    except Exception as e:  # missing tensors, truncated files, bad metadata
        raise CheckpointError(f"{path} is corrupted, truncated or of another model ({type(e).__name__}: "
                              f"{str(e)[:120]}); start over with --overwrite") from None
    check_state(path, state, tc)
    return state


def dist_layout(p: argparse.ArgumentParser, args, tc: TrainConfig):
    """torchrun's ranks as chapter 4's (pp, dp, ep) grid, checked against the run before any process group."""
    if "rl" in tc.stages:
        p.error("argument --stages: rl runs in one process for now; under torchrun use --stages pretrain,sft")
    try:
        dims = par.ParallelDims.from_env(pp=args.pp, ep=args.ep, n_microbatches=args.pp)
        dims.check(mla.ModelConfig.from_hf(tc.model), dims.world_size)
    except ValueError as e:
        p.error(f"argument {'--ep' if str(e).startswith('ep') else '--pp'}: {e}")
    shards = dims.dp * dims.ep * dims.n_microbatches
    sizes = {"--batch-size": tc.batch_size} if "pretrain" in tc.stages else {}
    if "sft" in tc.stages:
        sizes.update({"SFT trajectories": tc.sft_batch_size, "SFT chats": tc.sft_short_batch_size})
    for what, b in sizes.items():
        if b % shards:
            p.error(f"argument --pp: {what} per step = {b} does not divide into dp x ep x micro-batches (= pp) = "
                    f"{dims.dp} x {dims.ep} x {dims.n_microbatches} = {shards}")
    return par.init_distributed(dims, mla.ModelConfig.from_hf(tc.model), timeout_s=3600)


# ---- export: a transformers-loadable directory ----

def export_hf(model, out_dir: str, tok: data.Tokenizer) -> None:
    """config.json (DeepseekV3 architecture) + model.safetensors under transformers' parameter names."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    conf = {**model.cfg.to_hf(), "torch_dtype": "float32", "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id}
    sd = {k: v.detach().contiguous() for k, v in mla.to_hf_state_dict(model).items()}
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(out_dir, "config.json"), lambda tmp: open(tmp, "w").write(json.dumps(conf, indent=1)))


# ---- figures ----

def write_figures(records: list[dict], out_dir: str, tau: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    if not steps:
        return []
    os.makedirs(out_dir, exist_ok=True)
    x = list(range(1, len(steps) + 1))
    bounds = [i + 1 for i in range(1, len(steps)) if steps[i]["stage"] != steps[i - 1]["stage"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    panels = (("loss", "train loss (assistant tokens in SFT)", None), ("s_max", "max attention logit S_max", tau),
              ("max_vio", "MaxVio (mean over MoE layers)", None))
    for ax, (key, title, line) in zip(axes, panels):
        ax.plot(x, [r[key] for r in steps], lw=1)
        if line:
            ax.axhline(line, color="gray", ls=":", lw=1, label=f"tau = {line:g}")
            ax.legend()
        for b in bounds:
            ax.axvline(b, color="k", lw=0.6, alpha=0.4)
        ax.set(xlabel="step (all stages)", title=title)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "train_curves.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    rewards = [r for r in records if "reward" in r]
    if rewards:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["step"] for r in rewards], [r["reward"] for r in rewards])
        ax.set(xlabel="RL step", ylabel="mean reward", title="RL rewards")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "train_rewards.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ---- the recipe ----

def train(tc: TrainConfig, out: str, resume: bool = False, export_dir: str | None = None, console=None,
          layout=None) -> dict:
    """Run (or continue) the recipe in `out`; returns {stage: evaluation} for every finished stage.
    layout: chapter 4's Layout under torchrun (pretraining and SFT on its RankModel; rank 0 prints, writes the
    shared files and evaluates the assembled model while the others wait); None in one process."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rank0 = layout is None or layout.rank == 0
    console = console or Console(width=None if sys.stdout.isatty() else 120, quiet=not rank0)
    torch.set_num_threads(tc.threads)
    t0 = time.perf_counter()
    run = Run(out, writer=rank0)
    cfg = mla.ModelConfig.from_hf(tc.model)
    state = {"format": CKPT_FORMAT, "config": dataclasses.asdict(tc), "stage": tc.stages[0], "step": 0,
             "results": {}, "critic_pairs": []}
    torch.manual_seed(tc.seed)
    model = mla.Transformer(cfg)  # chapter 2: MLA + MoE (chapter 1); under torchrun rank 0's assembled copy
    pm = par.build_model(cfg, layout, seed=tc.seed) if layout else None  # this rank's part (same init)
    if resume and layout:
        state = dist_load(run, pm, tc)
        assemble(pm, model)
        run.truncate_metrics(state["metrics_lines"])
    elif resume:
        state = load_checkpoint(run.ckpt_path, tc)
        load_model_state(model, state["model"], run.ckpt_path)
        run.truncate_metrics(state["metrics_lines"])
    if resume:
        console.print(f"resuming {out}: stage {state['stage']}, step {state['step']}, "
                      f"finished: {', '.join(state['results']) or 'none'}")
    run.start(tc, resume)
    total, active = mla.count_params(cfg)
    console.print(f"model: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M activated per token; "
                  f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; stages {','.join(tc.stages)}; "
                  f"{tc.threads} thread(s); run directory {out}")
    if layout:
        d = layout.dims
        console.print(f"torchrun: {d.world_size} ranks = pp {d.pp} x dp {d.dp} x ep {d.ep} ({d.n_microbatches} "
                      f"micro-batch(es), {layout.device.type}, {dist.get_backend()})")
    todo = [s for s in tc.stages if s not in state["results"]]
    if todo:
        with console.status("building chapter 5's corpora (rephrasing, math notes, agentic synthesis + judge)"):
            corp = build_corpora(tc)
        console.print("data: " + "; ".join(f"{k} {v}" for k, v in corp.counts.items()))
    steps = {"pretrain": tc.pretrain_steps, "sft": tc.sft_steps, "rl": tc.rl_steps}
    columns = (TextColumn("{task.description:8s}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as progress:
        for stage in todo:
            opt, start = (dist_optimizer(pm, tc, stage) if layout else stage_optimizer(model, tc, stage)), 0
            if resume and layout and state["stage"] == stage and state["optim"]:
                dist_load(run, pm, tc, opt)  # mid-stage: optimizer state (each rank the part it owns), step
                start = state["step"]
            elif resume and state["stage"] == stage and state.get("optim") is not None:
                opt.load_state_dict(state["optim"])  # mid-stage: optimizer state, RNG, step (= data position)
                set_rng_state(state["rng"])
                start = state["step"]
            state.update(stage=stage)
            engine = rl.CheckpointEngine().register(model.state_dict()) if stage == "rl" else None
            if engine is not None:
                engine.version = start  # one update per finished step, also across a resume
            task = progress.add_task(stage, total=steps[stage], completed=start, info="")
            for step in range(start, steps[stage]):
                if stage == "rl":
                    rec = rl_step(model, opt, corp, tc, engine, step)
                    info = (f"reward {rec['reward']:+.2f}  all-equal groups {rec['all_equal_groups']:.0%}  "
                            f"T {rec['temperature']:.2f}")
                else:
                    batch = pretrain_batch(corp, tc, step) if stage == "pretrain" else sft_batch(corp, tc, step)
                    step_fn = dist_train_step if layout else train_step
                    rec = step_fn(pm or model, opt, batch, step, steps[stage])
                    info = (f"loss {rec['loss']:.3f}  S_max {rec['s_max']:.1f}  clipped {rec['clipped_heads']}  "
                            f"MaxVio {rec['max_vio']:.2f}")
                run.log({"stage": stage, "step": step + 1, **rec})
                progress.update(task, advance=1, info=info)
                if (step + 1) % tc.ckpt_every == 0 and step + 1 < steps[stage]:
                    if layout:
                        dist_checkpoint(run, state, pm, opt, step + 1, mid_stage=True)
                    else:
                        checkpoint(run, state, model, opt, step + 1)
            if stage == "sft" and "rl" in tc.stages:  # held-out critic pairs: the SFT model's differing rollouts
                muonclip.set_record_s_max(model, False)
                held = rl.collect_rollouts(model, corp.test_envs[: tc.critic_prompts], corp.tok, group_size=4,
                                           temperature=1.0, seed=tc.seed + 1000)
                state["critic_pairs"] = rl.critic_pairs(held, 4)
            if layout:  # rank 0 evaluates the assembled model; the others wait for its numbers
                assemble(pm, model)
                res = [evaluate(model, corp, tc, None) if rank0 else None]
                dist.broadcast_object_list(res, src=0)
                res = res[0]
            else:
                res = evaluate(model, corp, tc, state["critic_pairs"] if stage != "pretrain" else None)
            run.log({"stage": stage, "eval": res})
            state["results"][stage] = res
            if layout:
                dist_checkpoint(run, state, pm, opt, steps[stage], mid_stage=False)
            else:
                checkpoint(run, state, model, None, steps[stage])
            if rank0:
                atomic_write(os.path.join(out, "ckpt", f"{stage}.pt"), lambda tmp: torch.save(model.state_dict(), tmp))
            console.print(f"{stage} done: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    print_results(console, state["results"], time.perf_counter() - t0)
    if not rank0:
        return state["results"]
    figs = write_figures(run.records(), os.path.join(out, "figures"), tc.tau)
    if figs:
        console.print("figures: " + ", ".join(figs))
    if export_dir:
        export_hf(model, export_dir, data.Tokenizer())
        console.print(f"exported the model to {export_dir} (AutoModelForCausalLM.from_pretrained)")
    return state["results"]


def print_results(console, results: dict, seconds: float) -> None:
    from rich.table import Table

    t = Table(title=f"Kimi K2 recipe in miniature: held-out evaluation after each stage ({seconds:.0f} s)")
    t.add_column("metric")
    for stage in results:
        t.add_column(f"after {stage}", justify="right")
    for key, label, fmt in EVAL_ROWS:
        if any(key in r for r in results.values()):
            t.add_row(label, *(fmt.format(r[key]) if key in r else "-" for r in results.values()))
    console.print(t)


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--stages", default=",".join(d.stages), help=f"comma-separated subset of {','.join(STAGES)}, in order")
    p.add_argument("--preset", choices=("tiny", "kimi-k2", "deepseek-v3"), default="tiny", help="model architecture")
    p.add_argument("--config", type=cli.in_file, help="a DeepseekV3-family config.json instead of --preset")
    p.add_argument("--override", type=cli.key_value, nargs="+", metavar="KEY=VALUE",
                   help="config.json keys to change, e.g. num_hidden_layers=2 hidden_size=128")
    p.add_argument("--seed", type=cli.nonneg_int, default=d.seed, help="seed of the data, init and evaluation")
    p.add_argument("--threads", type=cli.positive_int, default=d.threads, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="micro sizes and step counts (a smoke run, seconds)")
    q = quick_config()

    def sizes(key: str, what: str) -> str:
        return f"{what} ({getattr(d, key):g}; with --quick {q.get(key, getattr(d, key)):g})"

    p.add_argument("--pretrain-steps", type=cli.positive_int, help=sizes("pretrain_steps", "pretraining steps"))
    p.add_argument("--sft-steps", type=cli.positive_int, help=sizes("sft_steps", "SFT steps"))
    p.add_argument("--rl-steps", type=cli.positive_int, help=sizes("rl_steps", "RL steps"))
    p.add_argument("--batch-size", type=cli.positive_int, help=sizes("batch_size", "pretraining sequences per step"))
    p.add_argument("--seq-len", type=cli.positive_int, help=sizes("seq_len", "pretraining tokens per sequence"))
    p.add_argument("--tau", type=cli.positive_float, default=d.tau, help="QK-Clip threshold (K2: 100)")
    p.add_argument("--ckpt-every", type=cli.positive_int, help=sizes("ckpt_every", "steps between checkpoints"))
    p.add_argument("--out", type=cli.out_dir, help="run directory (a new runs/<date>-<time> when not given)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--export-hf", type=cli.out_dir, metavar="DIR",
                   help="write the final model as a transformers directory (config.json + model.safetensors)")
    p.add_argument("--pp", type=cli.positive_int, default=1,
                   help="under torchrun: pipeline stages (as many micro-batches per step); dp = ranks / (pp x ep)")
    p.add_argument("--ep", type=cli.positive_int, default=1, help="under torchrun: expert-parallel ranks")
    return p


TUNABLE = ("pretrain_steps", "sft_steps", "rl_steps", "batch_size", "seq_len", "tau", "ckpt_every")


def config_from_args(p: argparse.ArgumentParser, args) -> TrainConfig:
    base = dataclasses.asdict(TrainConfig())
    quick = quick_config() if args.quick else {}
    base.update({k: v for k, v in quick.items() if k != "model"})
    base.update({k: getattr(args, k) for k in TUNABLE if getattr(args, k) is not None})
    base.update(seed=args.seed, threads=args.threads, stages=[s.strip() for s in args.stages.split(",")])
    try:
        model = resolve_model(args.preset, args.config, {**quick.get("model", {}), **dict(args.override or [])},
                              data.Tokenizer().vocab_size)
    except ValueError as e:  # from_hf names the offending config.json key
        flag = "--override" if args.override else "--config" if args.config else "--preset"
        p.error(f"argument {flag}: {str(e).removeprefix('from_hf: ')}")
    base["model"] = {**model.to_hf(), "bias_update_speed": model.bias_update_speed}
    tc = TrainConfig(**base)
    try:
        tc.validate()
    except ValueError as e:
        cli.flag_error(p, e, {"stages": "--stages", "math_test": "--quick"})
    return tc


def check_fits(p: argparse.ArgumentParser, tc: TrainConfig) -> None:
    """A model that cannot fit this machine is refused before anything is built (e.g. --preset kimi-k2 on CPU)."""
    total, _ = mla.count_params(mla.ModelConfig.from_hf(tc.model))
    need = total * 16  # fp32 weights + gradients + two optimizer moments
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > avail / 2:
        p.error(f"the model has {total / 1e9:.2f}B parameters and needs ~{need / 2**30:.0f} GiB to train, this "
                f"machine has {avail / 2**30:.0f} GiB: shrink it with --override (e.g. num_hidden_layers=2 "
                "hidden_size=128 n_routed_experts=16) or run it on a cluster")


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other: continue the run, or replace it")
    if args.config and args.preset != "tiny":
        p.error("--config and --preset exclude each other: the config file defines the architecture")
    if args.resume and not args.out:
        p.error("--resume needs --out (the run directory to continue)")
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    tc = config_from_args(p, args)
    exists = os.path.isdir(out) and bool(os.listdir(out))
    if args.resume:
        stored = os.path.join(out, "config.json")
        if not os.path.isfile(stored):
            p.error(f"--resume: {out} holds no run (no config.json)")
        with open(stored) as f:
            old = json.load(f)
        explicit = explicit_keys(p, argv)
        new = dataclasses.asdict(tc)
        clash = sorted(k for k in new if k in explicit and old.get(k) != new[k] and not
                       (k == "stages" and new[k][: len(old.get(k, []))] == old.get(k)))
        if clash:
            p.error(f"--resume: {', '.join(clash)} differ from the run's config.json; drop those flags to continue it")
        stages = new["stages"] if "stages" in explicit else old["stages"]
        tc = TrainConfig(**{**old, "stages": stages})
    elif exists and not args.overwrite:
        p.error(f"--out {out} already holds a run: add --resume to continue it or --overwrite to replace it")
    elif exists and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(out)
    if args.resume and not args.export_hf:
        where = os.path.join(out, "ckpt", "last.json")
        if os.path.isfile(where) and set(tc.stages) <= set(json.load(open(where))["finished"]):
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{out}: every stage ({','.join(tc.stages)}) is finished; nothing to do "
                      "(add --export-hf DIR, or later stages with --stages)", file=sys.stderr)
            return 2
    check_fits(p, tc)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and (args.pp > 1 or args.ep > 1):
        p.error(f"argument {'--pp' if args.pp > 1 else '--ep'}: splits the model over torchrun's processes; "
                "launch with torchrun --nproc_per_node=N train.py (N a multiple of pp x ep)")
    layout = dist_layout(p, args, tc) if world > 1 else None  # every check above ran on every rank first
    try:
        train(tc, out, resume=args.resume, export_dir=args.export_hf, layout=layout)
    except CheckpointError as e:
        p.error(f"--resume: {e}")
    finally:
        if layout:
            par.close_distributed(layout)
    return 0


def explicit_keys(p: argparse.ArgumentParser, argv) -> set[str]:
    """TrainConfig keys the user set on the command line (so --resume can tell a clash from a default)."""
    defaults = [(a, a.default) for a in p._actions]
    for a, _ in defaults:  # parse again with every default suppressed: what is left was typed
        a.default = argparse.SUPPRESS
    try:
        given = set(vars(p.parse_args(argv)))
    finally:
        for a, d in defaults:
            a.default = d
    keys = {k for k in given if k in TUNABLE or k in ("seed", "threads", "stages")}
    if given & {"quick", "preset", "config", "override"}:
        keys.add("model")
    return keys


if __name__ == "__main__":
    cli.run(main)
