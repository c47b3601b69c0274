"""Chapter 6: reinforcement learning with verifiable and self-critique rewards, and the checkpoint engine.

What it is
    After SFT, K2 is trained with RL in a gym-like framework (K2 report §3.2). Each environment hands the
    policy a prompt, lets it act (possibly over several turns, with tool calls executed by the environment),
    and returns a reward: verifiable where an answer can be checked (math: exact answer; code: the share of
    tests that pass in a sandbox; tool use: the task's rubric and the final state of the tools), and a
    self-critique rubric reward where it cannot (the policy itself, prompted as a critic, compares responses
    pairwise; the critic is refined on the verifiable rollouts, closing the loop). The policy is optimised
    with the Kimi k1.5 objective: for each prompt x sample K responses y_1..y_K from π_old and minimise

        L(θ) = E_x [ 1/K Σ_i ( r(x, y_i) - mean_j r(x, y_j) - τ · log(π_θ(y_i|x) / π_old(y_i|x)) )² ]

    plus three K2 additions: a per-task token budget (responses that run over it are truncated and
    penalised), a PTX loss on curated SFT data (against forgetting), and a sampling temperature that decays
    from exploration to exploitation. New weights reach the inference engines through a checkpoint engine:
    bucketed broadcasts, two alternating buffers, each worker loading what it needs by name (K2 §2.4.2:
    a full update of the 1T model takes under 30 s), with training and inference colocated on the same GPUs.

Design choices
    - An environment is two methods: `reset(seed) -> observation` (the messages the policy sees) and
      `step(assistant_message) -> (observation, reward, done, info)` (the new messages: tool results or the
      user's reply). The rollout loop is the only place that knows about tokens; environments speak messages.
    - Rollouts keep the exact token ids the policy sampled (never a re-rendering of decoded text) and the
      log-probability of each at sampling time, so the trainer's log-probs can be compared one to one.
    - Sampling uses chapter 2's latent KV cache; rows that share a context length decode as one batch (the
      tiny model has no padding mask), so the K samples of a prompt are batched on their first turn.
    - `policy_loss` is a pure function of tensors; the mean-reward baseline is taken per group of K.
    - The critic's preference is P("A") vs P("B") at the answer position, averaged over both orders, so
      pref(a, b) + pref(b, a) = 1 and position bias cancels; a group's rewards are round-robin win rates.
    - CheckpointEngine packs raw bytes (any dtype mix) into fixed-size uint8 buckets; a tensor larger than a
      bucket spans several. Errors are collected locally, every rank keeps draining the broadcasts, and one
      MAX all-reduce makes every rank raise together; a dead peer surfaces as gloo's timeout instead.

Simplified vs K2
    - Model: chapter 2's tiny K2 (2 layers, 8 experts top-2, 0.46M parameters, fp32, CPU); K2 has 1.04T.
    - Demo tasks: sums a + b (a, b <= 20) whose SFT data answers each sum in three styles (checkable
      `Answer: N`; right but uncheckable; over the token budget), so what RL can find in minutes is the
      verifiable, within-budget behaviour (and some arithmetic); and chapter 5's unit/date tool tasks with a
      one-line tool list. K2 uses competition math, real repositories and thousands of tools.
    - PTX data is the SFT tool trajectories; K2 uses curated high-quality SFT data.
    - One rollout worker process per inference engine, gloo broadcasts on CPU; K2 moves weights GPU to GPU
      with a checkpoint engine beside each inference engine. Colocated offload here moves optimizer state
      and gradients CPU -> CPU (the mechanism runs and is timed; on CUDA it frees device memory).
    - The critic sees two short rubric lists; K2's rubrics and critic are far richer.
    - One gradient step per batch of rollouts, no partial rollouts (K2 resumes long unfinished trajectories).

API for train.py
    envs = make_envs(n_math=8, n_tool=2, n_code=0, n_rubric=0, seed=0)  # [(Env, reset seed)], one per prompt
    rollouts = collect_rollouts(model, envs, tok, group_size=4, temperature=T, seed=s, critic=SelfCritic(model, tok))
    metrics = rl_step(model, optimizer, rollouts, group_size=4, tau=0.1, pad_id=tok.pad_id,
                      ptx=(ids, mask), critic_batch=critic_batch(tok, critic_pairs(rollouts, 4)))
    success = evaluate(model, envs, tok)                  # greedy success rate per env name
    critic_accuracy(model, tok, pairs)                     # pairwise accuracy of the self-critic
    engine = CheckpointEngine(bucket_bytes=...).register(dict(model.state_dict())); engine.update(verify=True)
    move_training_state(model, optimizer, "cpu")           # colocation: offload during rollouts, timed

References
    Kimi K2 (arXiv 2507.20534) §3.2 (RL: verifiable rewards, self-critique rubric reward, budget control,
    PTX loss, temperature decay), §2.4.2 (checkpoint engine, colocation);
    Kimi k1.5 (arXiv 2501.12599) §2.3.2 (policy optimisation objective), §2.3.3 (length penalty);
    Constitutional AI (arXiv 2212.08073) and pairwise LLM judges (arXiv 2306.05685) for critic prompting.

Run:
    python 06_rl.py --help
    python 06_rl.py                                        # SFT a tiny K2, then RL; seeds 0, 1 (~2.5 CPU-min each)
    torchrun --nproc_per_node=3 06_rl.py --engine-demo     # trainer + 2 rollout workers; bucketed vs flat vs per-tensor
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli

mla = importlib.import_module("02_mla")        # chapter 2: Transformer, ModelConfig, sample_next
muonclip = importlib.import_module("03_muonclip")  # chapter 3: MuonClip
data = importlib.import_module("05_data")      # chapter 5: Tokenizer, render_chat, tools, tasks, sandbox


# ---- the k1.5 objective, budget control, PTX, temperature ----

def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                group_size: int, tau: float) -> tuple[torch.Tensor, dict]:
    """Kimi k1.5's policy loss (k1.5 §2.3.2). N = P·K sequences, the K samples of a prompt contiguous.

    logp, logp_old, mask: (N, T) per-token log π_θ, log π_old and 1 on policy tokens; rewards (N,).
    ℓ_i = Σ_t mask·(log π_θ - log π_old)        (sequence log-ratio)
    L   = 1/N Σ_i (r_i - r̄_g(i) - τ ℓ_i)²       (r̄_g = mean reward of the group: the baseline τ·log Z)
    ∂L/∂ℓ_i = -2τ/N (r_i - r̄ - τ ℓ_i): at ℓ = 0 an above-mean sample gains probability, a below-mean one loses.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the {rewards.numel()} rewards")
    if not tau > 0:
        raise ValueError(f"tau={tau} must be > 0")
    mask = mask.to(logp.dtype)
    log_ratio = ((logp - logp_old) * mask).sum(-1)  # (N,)
    r = rewards.to(logp.dtype).view(-1, group_size)  # (P, K)
    advantage = (r - r.mean(dim=1, keepdim=True)).flatten()  # (N,)
    loss = (advantage - tau * log_ratio).pow(2).mean()
    return loss, {"advantage_abs": advantage.abs().mean().item(), "log_ratio_abs": log_ratio.abs().mean().item()}


def budget_penalty(lengths: torch.Tensor, budgets: torch.Tensor, truncated: torch.Tensor,
                   penalty: float = 0.5) -> torch.Tensor:
    """K2 budget control (§3.2): a response truncated at, or longer than, its task's token budget gets -penalty."""
    if penalty < 0:
        raise ValueError(f"penalty={penalty} must be >= 0")
    over = truncated.bool() | (lengths > budgets)
    return torch.where(over, -penalty, 0.0).to(torch.float32)


def temperature_schedule(step: int, total_steps: int, t_start: float = 1.2, t_end: float = 0.6) -> float:
    """Cosine decay of the sampling temperature from exploration (t_start) to exploitation (t_end) (K2 §3.2)."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    if not (t_start >= 0 and t_end >= 0):
        raise ValueError(f"t_start={t_start} and t_end={t_end} must be >= 0")
    p = min(max(step / total_steps, 0.0), 1.0)
    return t_end + (t_start - t_end) * 0.5 * (1 + math.cos(math.pi * p))  # T(0) = t_start, T(total) = t_end


def masked_ce(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on positions with mask 1 (the PTX loss on SFT data; critic training)."""
    logits = model(ids[:, :-1]).logits.float()  # (B, S-1, V)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, S-1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def group_metrics(rewards: torch.Tensor, group_size: int, warn_above: float = 0.5) -> dict:
    """Reward mean and the share of groups whose K rewards are all equal (zero advantage: they teach nothing)."""
    r = rewards.view(-1, group_size)
    all_equal = (r == r[:, :1]).all(dim=1).float().mean().item()
    if all_equal > warn_above:
        warnings.warn(f"{all_equal:.0%} of the groups have all-equal rewards and give no learning signal "
                      f"(raise the temperature or group_size, or drop prompts that are too easy or too hard)",
                      stacklevel=2)
    return {"reward_mean": r.mean().item(), "all_equal_groups": all_equal}


# ---- environments ----

class Env:
    """A gym-like environment that speaks chat messages.

    reset(seed) -> observation (list of messages the policy sees first)
    step(assistant_message) -> (observation: new messages, reward, done, info)
    `token_budget` caps the tokens the policy may write in one episode (budget control).
    """

    name = "env"
    token_budget = 64

    def reset(self, seed: int) -> list[dict]:
        raise NotImplementedError

    def step(self, assistant_message: dict) -> tuple[list[dict], float, bool, dict]:
        raise NotImplementedError


ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


def make_sums(n: int, seed: int = 0, max_operand: int = 20) -> list[tuple[str, int]]:
    """Small arithmetic questions (question, answer) a tiny model can learn to answer in minutes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append((f"What is {a} + {b}?", a + b))
    return out


class MathEnv(Env):
    """One question, one answer; reward 1 if the last `Answer: <int>` equals the expected integer, else 0."""

    name = "math"

    def __init__(self, problems: list, token_budget: int = 24):
        if not problems:
            raise ValueError("problems must not be empty")
        # accepts (question, answer) pairs or chapter 5's MathProblem objects
        self.problems = [(p.question, p.answer) if hasattr(p, "question") else tuple(p) for p in problems]
        self.token_budget = token_budget

    def reset(self, seed: int) -> list[dict]:
        self.question, self.answer = self.problems[seed % len(self.problems)]
        return [{"role": "user", "content": self.question}]

    def step(self, assistant_message: dict):
        if assistant_message.get("tool_calls"):
            return [], 0.0, True, {"error": "tool call in a tool-free environment"}
        found = ANSWER_RE.findall(assistant_message.get("content") or "")
        got = int(found[-1]) if found else None
        return [], float(got == self.answer), True, {"answer": got, "expected": self.answer}


def compact_system_message(agent: str) -> dict:
    """Chapter 5's agent as one line of tool signatures (no JSON schemas), for a context a tiny model can afford."""
    tools = data.AGENTS[agent][1]
    return {"role": "system", "content": "Tools: " + "; ".join(
        f"{t}({', '.join(data.TOOLS[t]['parameters']['properties'])})" for t in tools)}


class ToolEnv(Env):
    """A chapter 5 agentic task: tool calls run in a ToolRuntime, a user simulator answers, the judge scores.

    reward = 1 when the final message meets the rubric (required calls succeeded, answer, final state, tests),
    else 0; info["reasons"] says what failed. Malformed calls become tool errors the policy can read.
    """

    name = "tool"

    def __init__(self, tasks: list, token_budget: int = 160, max_turns: int = 6, compact: bool = True):
        if not tasks:
            raise ValueError("tasks must not be empty")
        self.tasks, self.token_budget, self.max_turns, self.compact = tasks, token_budget, max_turns, compact

    def reset(self, seed: int) -> list[dict]:
        self.task = copy.deepcopy(self.tasks[seed % len(self.tasks)])
        self.runtime = data.ToolRuntime(data.AGENTS[self.task.agent][1], self.task.world, self.task.failures)
        self.user, self.turns = data.UserSimulator(self.task), 0
        system = compact_system_message(self.task.agent) if self.compact else data.system_message(self.task.agent)
        self.messages = [system, {"role": "user", "content": self.user.opening()}]
        return list(self.messages)

    def step(self, assistant_message: dict):
        self.messages.append(assistant_message)
        self.turns += 1
        obs: list[dict] = []
        if assistant_message.get("tool_calls"):
            for call in assistant_message["tool_calls"]:
                obs.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                            "content": self.runtime.execute(call)})
        elif (reply := self.user.reply(assistant_message.get("content") or "")) is not None:
            obs.append({"role": "user", "content": reply})
        else:
            reasons = data.judge(self.task, self.messages, self.runtime)
            return [], float(not reasons), True, {"reasons": reasons}
        self.messages += obs
        if self.turns >= self.max_turns:
            return obs, 0.0, True, {"reasons": ["turn limit"]}
        return obs, 0.0, False, {}


class CodeEnv(Env):
    """Write a function; reward = share of the problem's asserts that pass, each run alone in the sandbox."""

    name = "code"

    def __init__(self, problems: dict | None = None, token_budget: int = 256, timeout_s: float = 2.0):
        self.problems = sorted((problems or data.CODE_PROBLEMS).items())
        self.token_budget, self.timeout_s = token_budget, timeout_s

    def reset(self, seed: int) -> list[dict]:
        self.problem, (request, _, _, tests) = self.problems[seed % len(self.problems)]
        self.tests = [t for t in tests.splitlines() if t.strip()]
        return [{"role": "user", "content": request + " Reply with the code in a ```python block."}]

    def step(self, assistant_message: dict):
        text = assistant_message.get("content") or ""
        m = re.search(r"```python\n(.*?)```", text, flags=re.S)
        code = m.group(1) if m else text
        results = data.run_many([code + "\n" + t + "\n" for t in self.tests], timeout_s=self.timeout_s,
                                 memory_mb=256)  # each assert alone, concurrently, in the sandbox
        passed = [r.ok for r in results]
        return [], sum(passed) / len(passed), True, {"passed": passed,
                                                      "timed_out": [r.timed_out for r in results]}


RUBRIC_PROMPTS = [  # (prompt, task-specific rubric): no checkable answer, rewarded by the self-critic
    ("Say hello to a new colleague.", "Warm and short."),
    ("Explain what a sum is.", "Correct and simple."),
    ("Give one tip for learning to code.", "Concrete and actionable."),
    ("Describe the sea in one sentence.", "Vivid, one sentence."),
]


class RubricEnv(Env):
    """A prompt without a verifiable answer: reward 0 here, replaced by the critic's group win rates."""

    name = "rubric"

    def __init__(self, prompts: list | None = None, token_budget: int = 48):
        self.prompts, self.token_budget = prompts or RUBRIC_PROMPTS, token_budget

    def reset(self, seed: int) -> list[dict]:
        self.prompt, self.rubric = self.prompts[seed % len(self.prompts)]
        return [{"role": "user", "content": self.prompt}]

    def step(self, assistant_message: dict):
        return [], 0.0, True, {"critic": True, "prompt": self.prompt, "rubric": self.rubric}


TOOL_KINDS = ("convert", "dates")


def make_envs(n_math: int = 8, n_tool: int = 0, n_code: int = 0, n_rubric: int = 0, seed: int = 0,
              max_operand: int = 20) -> list[tuple[Env, int]]:
    """RL prompts as (env, reset seed) pairs: sums, chapter 5 tool tasks (units, dates), code, rubric prompts."""
    for name, v in (("n_math", n_math), ("n_tool", n_tool), ("n_code", n_code), ("n_rubric", n_rubric)):
        if v < 0:
            raise ValueError(f"{name}={v} must be >= 0")
    out: list[tuple[Env, int]] = []
    if n_math:
        out += [(MathEnv(make_sums(n_math, seed, max_operand)), i) for i in range(n_math)]
    if n_tool:
        tasks = [t for t in data.make_tasks(7 * n_tool, seed + 1, failure_rate=0.0) if t.kind in TOOL_KINDS][:n_tool]
        out += [(ToolEnv(tasks), i) for i in range(len(tasks))]
    out += [(CodeEnv(), seed + i) for i in range(n_code)]
    out += [(RubricEnv(), seed + i) for i in range(n_rubric)]
    return out


# ---- rollouts: batched sampling with the latent cache, tools between turns ----

@dataclass
class Rollout:
    env: str
    group: int                # index of the prompt; the K rollouts of a prompt share it
    ids: list[int]            # the whole conversation as the policy saw and wrote it
    mask: list[int]           # 1 on the tokens the policy sampled
    logp: list[float]         # log π_old of each sampled token at sampling time (0 where mask is 0)
    reward: float = 0.0       # environment reward + budget penalty (+ critic win rate for rubric prompts)
    n_tokens: int = 0         # tokens the policy wrote
    truncated: bool = False   # hit the token budget before finishing
    messages: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def assistant_message(text: str) -> dict:
    """Generated text (with special markers) -> an OpenAI-style assistant message with parsed tool calls."""
    calls = data.parse_tool_calls(text)
    content = re.sub(r"<\|tool_call\|>.*?(<\|/tool_call\|>|$)", "", text, flags=re.S)
    content = re.sub(r"<\|(end|eos)\|>$", "", content)
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


@torch.no_grad()
def sample_batch(model, ctx: torch.Tensor, max_new: int, stop: set, temperature: float,
                 generator: torch.Generator) -> list[tuple[list[int], list[float], bool]]:
    """Decode rows of equal-length contexts (B, S0) with the latent cache until a stop token or max_new.

    Returns per row (tokens, log π(token) at temperature 1, stopped). The log-prob is the policy's, not the
    tempered sampling distribution's: it is what the trainer recomputes.
    """
    B, S0 = ctx.shape
    cache = model.new_cache(B, S0 + max_new)
    logits = model.prefill(ctx, cache)  # (B, V)
    toks = [[] for _ in range(B)]
    lps = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new):
        nxt = mla.sample_next(logits, temperature, generator=generator)  # (B,)
        lp = torch.log_softmax(logits.float(), -1).gather(1, nxt[:, None]).squeeze(1)  # (B,)
        for b in range(B):
            if not done[b]:
                toks[b].append(int(nxt[b]))
                lps[b].append(float(lp[b]))
                done[b] = int(nxt[b]) in stop
        if all(done) or step == max_new - 1:
            break
        logits = model(nxt[:, None], start_pos=S0 + step, cache=cache).logits[:, -1]
    return [(toks[b], lps[b], done[b]) for b in range(B)]


def render_suffix(messages: list[dict], tok) -> list[int]:
    """Tokens that append `messages` to a conversation and open the next assistant turn (no <|bos|>)."""
    ids, _ = data.render_chat(messages, tok, add_generation_prompt=True)
    return ids[1:]


@torch.no_grad()
def collect_rollouts(model, envs: list[tuple[Env, int]], tok, *, group_size: int = 4, temperature: float = 1.0,
                     seed: int = 0, penalty: float = 0.5, critic=None, max_turns: int = 8) -> list[Rollout]:
    """K = group_size episodes per (env, reset seed); rows with equal context length decode as one batch.

    Each turn: sample until <|end|> (stop at end of turn) or the remaining token budget; parse tool calls;
    the env executes them and answers; repeat until done. Over-budget episodes are truncated and penalised.
    Rubric prompts get the critic's round-robin win rates (critic=None: reward stays 0).
    """
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    stop = {tok.end_id, tok.eos_id}
    rows = []  # one dict per episode
    for g, (env, env_seed) in enumerate(envs):
        for _ in range(group_size):
            e = copy.deepcopy(env)
            obs = e.reset(env_seed)
            ids, _ = data.render_chat(obs, tok, add_generation_prompt=True)
            rows.append(dict(env=e, r=Rollout(e.name, g, ids, [0] * len(ids), [0.0] * len(ids), messages=list(obs)),
                             done=False))
    for _ in range(max_turns):
        active = [x for x in rows if not x["done"]]
        if not active:
            break
        buckets: dict[tuple[int, int], list[dict]] = {}
        for x in active:
            left = x["env"].token_budget - x["r"].n_tokens
            buckets.setdefault((len(x["r"].ids), left), []).append(x)
        for (_, left), xs in sorted(buckets.items(), key=lambda kv: kv[0]):
            ctx = torch.tensor([x["r"].ids for x in xs])  # (B, S0)
            for x, (toks, lps, stopped) in zip(xs, sample_batch(model, ctx, left, stop, temperature, gen)):
                r = x["r"]
                r.ids += toks
                r.mask += [1] * len(toks)
                r.logp += lps
                r.n_tokens += len(toks)
                msg = assistant_message(tok.decode(toks))
                r.messages.append(msg)
                if not stopped:  # ran out of budget mid-turn: truncated
                    r.truncated, x["done"] = True, True
                    r.info = {"reasons": ["truncated"]}
                    continue
                obs, reward, done, info = x["env"].step(msg)
                r.reward, r.info, x["done"] = reward, info, done
                if not done:
                    r.messages += obs
                    suffix = render_suffix(obs, tok)
                    r.ids += suffix
                    r.mask += [0] * len(suffix)
                    r.logp += [0.0] * len(suffix)
    out = [x["r"] for x in rows]
    for x in rows:
        if not x["done"]:
            x["r"].truncated = True
    budgets = torch.tensor([x["env"].token_budget for x in rows])
    pen = budget_penalty(torch.tensor([r.n_tokens for r in out]), budgets, torch.tensor([r.truncated for r in out]),
                         penalty)
    if critic is not None:
        for g in range(len(envs)):
            group = out[g * group_size:(g + 1) * group_size]
            if group[0].info.get("critic") and group_size > 1:
                wins = critic.win_rates(group[0].info["prompt"], [_response_text(r) for r in group],
                                        group[0].info["rubric"])
                for r, w in zip(group, wins.tolist()):
                    r.reward = w
    for r, p in zip(out, pen.tolist()):
        r.reward += p
    model.train(was_training)
    return out


def _response_text(r: Rollout) -> str:
    return " ".join((m.get("content") or "") for m in r.messages if m["role"] == "assistant")


def pad_rollouts(rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to (N, L) ids, mask and rollout log-probs (the causal model never sees the padding)."""
    L = max(len(r.ids) for r in rollouts)
    ids = torch.tensor([r.ids + [pad_id] * (L - len(r.ids)) for r in rollouts])  # (N, L)
    mask = torch.tensor([r.mask + [0] * (L - len(r.mask)) for r in rollouts], dtype=torch.float32)
    old = torch.tensor([r.logp + [0.0] * (L - len(r.logp)) for r in rollouts], dtype=torch.float32)
    return ids, mask, old


def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Trainer-side log π_θ(ids[t] | ids[<t]) in one training forward: (N, L) -> (N, L), column 0 = 0."""
    logits = model(ids[:, :-1]).logits.float()  # (N, L-1, V)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (N, L-1)
    return F.pad(lp, (1, 0))


def rl_step(model, optimizer, rollouts: list[Rollout], *, group_size: int, tau: float = 0.05, pad_id: int = 0,
            ptx: tuple[torch.Tensor, torch.Tensor] | None = None, ptx_weight: float = 0.1,
            critic_batch: tuple[torch.Tensor, torch.Tensor] | None = None, critic_weight: float = 0.1,
            max_grad_norm: float = 1.0, warn_above: float = 0.5) -> dict:
    """One optimiser step on the k1.5 loss (+ PTX + critic loss). Returns the step's metrics.

    logprob_gap = max |log π_trainer - log π_rollout| over policy tokens, before the update: 0 up to fp32
    rounding when the weights are the ones that sampled (a larger value means the engines disagree).
    """
    ids, mask, old = pad_rollouts(rollouts, pad_id)
    rewards = torch.tensor([r.reward for r in rollouts])
    metrics = group_metrics(rewards, group_size, warn_above)
    logp = token_logprobs(model, ids)  # (N, L)
    metrics["logprob_gap"] = ((logp.detach() - old).abs() * mask).max().item()
    loss, stats = policy_loss(logp, old, mask, rewards, group_size, tau)
    metrics.update(policy_loss=loss.item(), **stats)
    if ptx is not None and ptx_weight > 0:
        lp = masked_ce(model, *ptx)
        loss = loss + ptx_weight * lp
        metrics["ptx_loss"] = lp.item()
    if critic_batch is not None and critic_weight > 0:
        lc = masked_ce(model, *critic_batch)
        loss = loss + critic_weight * lc
        metrics["critic_loss"] = lc.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lengths = [r.n_tokens for r in rollouts]
    metrics.update(response_len=sum(lengths) / len(lengths),
                   truncated=sum(r.truncated for r in rollouts) / len(rollouts))
    return metrics


@torch.no_grad()
def evaluate(model, envs: list[tuple[Env, int]], tok, temperature: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Success rate (reward >= 1, no penalty) per env name, one greedy episode per prompt."""
    rs = collect_rollouts(model, envs, tok, group_size=1, temperature=temperature, seed=seed)
    out: dict[str, list[float]] = {}
    for r in rs:
        out.setdefault(r.env, []).append(float(r.reward >= 1.0))
    return {k: sum(v) / len(v) for k, v in out.items()}


# ---- self-critique rubric reward and the closed loop ----

CORE_RUBRICS = ("clear and relevant", "fluent", "objective and grounded")  # K2 §3.2 core rubrics
PRESCRIPTIVE_RUBRICS = ("no initial praise", "no self-justification")    # K2 §3.2 prescriptive rubrics


def critic_messages(prompt: str, a: str, b: str, rubric: str = "") -> list[dict]:
    rubrics = "; ".join(CORE_RUBRICS + PRESCRIPTIVE_RUBRICS + ((rubric,) if rubric else ()))
    return [{"role": "system", "content": f"Judge. Rubrics: {rubrics}. Reply A or B."},
            {"role": "user", "content": f"Prompt: {prompt}\nA: {a}\nB: {b}\nBetter?"}]


class SelfCritic:
    """The policy model as a pairwise critic: P(A better) from its own next-token probabilities of "A" vs "B".

    pref(a, b) = ½ (P_ab("A") + P_ba("B")) asks both orders, so pref(a, b) + pref(b, a) = 1 (no position bias).
    """

    def __init__(self, model, tok, batch_size: int = 16):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.a_id, self.b_id = tok.encode("A")[0], tok.encode("B")[0]

    def _p_first(self, items: list[tuple[str, str, str, str]]) -> torch.Tensor:
        """P("A") / (P("A") + P("B")) for each (prompt, a, b, rubric) in one order."""
        out = []
        for i in range(0, len(items), self.batch_size):
            seqs = [data.render_chat(critic_messages(*it), self.tok, add_generation_prompt=True)[0]
                    for it in items[i:i + self.batch_size]]
            L = max(len(s) for s in seqs)
            ids = torch.tensor([s + [self.tok.pad_id] * (L - len(s)) for s in seqs])  # (B, L)
            logits = self.model(ids).logits.float()  # (B, L, V)
            last = logits[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])]  # (B, V)
            out.append(torch.softmax(last[:, [self.a_id, self.b_id]], -1)[:, 0])
        return torch.cat(out)

    @torch.no_grad()
    def prefer(self, pairs: list[tuple[str, str, str, str]]) -> torch.Tensor:
        """pref(a, b) for each (prompt, a, b, rubric), averaged over both orders: (n,)."""
        was = self.model.training
        self.model.eval()
        ab = self._p_first(pairs)
        ba = self._p_first([(p, b, a, r) for p, a, b, r in pairs])
        self.model.train(was)
        return 0.5 * (ab + (1 - ba))

    def win_rates(self, prompt: str, responses: list[str], rubric: str = "") -> torch.Tensor:
        """Round-robin: w_i = 1/(K-1) Σ_{j≠i} pref(y_i, y_j); each unordered pair is asked once (both orders)."""
        K = len(responses)
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
        p = self.prefer([(prompt, responses[i], responses[j], rubric) for i, j in pairs])
        w = torch.zeros(K)
        for (i, j), pij in zip(pairs, p.tolist()):
            w[i] += pij
            w[j] += 1 - pij
        return w / max(K - 1, 1)


def critic_pairs(rollouts: list[Rollout], group_size: int) -> list[tuple[str, str, str, str]]:
    """Closed loop: (prompt, better, worse, "") from verifiable groups whose ground-truth rewards differ."""
    pairs = []
    for g in range(0, len(rollouts), group_size):
        group = [r for r in rollouts[g:g + group_size] if not r.info.get("critic")]
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a.reward != b.reward:
                    hi, lo = (a, b) if a.reward > b.reward else (b, a)
                    prompt = next(m["content"] for m in hi.messages if m["role"] == "user")
                    pairs.append((prompt, _response_text(hi), _response_text(lo), ""))
    return pairs


def critic_batch(tok, pairs: list[tuple[str, str, str, str]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Critic training examples in both orders: the target is the letter of the better response (None if no pairs)."""
    if not pairs:
        return None
    seqs = []
    for p, good, bad, rub in pairs:
        for msgs, letter in ((critic_messages(p, good, bad, rub), "A"), (critic_messages(p, bad, good, rub), "B")):
            ids, _ = data.render_chat(msgs, tok, add_generation_prompt=True)
            seqs.append((ids + tok.encode(letter), [0] * len(ids) + [1]))
    L = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [tok.pad_id] * (L - len(s)) for s, _ in seqs])  # (2n, L)
    mask = torch.tensor([m + [0] * (L - len(m)) for _, m in seqs])
    return ids, mask


def critic_accuracy(model, tok, pairs: list[tuple[str, str, str, str]]) -> float:
    """Share of (prompt, better, worse) pairs where the self-critic prefers the better response."""
    if not pairs:
        raise ValueError("pairs must not be empty")
    return (SelfCritic(model, tok).prefer(pairs) > 0.5).float().mean().item()


# ---- checkpoint engine: trainer -> rollout workers ----

class CheckpointEngineError(RuntimeError):
    """Raised on every rank when any rank failed during an update."""


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)


class CheckpointEngine:
    """Broadcast named tensors from the trainer (rank `src`) to rollout workers in fixed-size buckets.

    Every rank calls `register(named_tensors)` (the trainer: what it publishes; a worker: what it holds,
    any subset, possibly nothing) and then `update()` together. The trainer's metadata (name, dtype, shape,
    nbytes) is broadcast once per update; every rank derives the same bucket plan from it. Buckets go out
    one after another through two alternating buffers: while bucket g is on the wire, bucket g+1 is packed
    (trainer) and bucket g-1 is loaded by name (workers). verify=True then compares a SHA-256 per tensor.
    With world size 1 (no process group) an update only advances the version.
    """

    def __init__(self, group=None, src: int = 0, bucket_bytes: int = 1 << 22, timeout_s: float = 60.0):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed and group is None:  # its own group, so every collective below obeys timeout_s
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.group, self.src, self.bucket_bytes, self.timeout_s = group, src, bucket_bytes, timeout_s
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1
        if not 0 <= src < self.world:
            raise ValueError(f"src={src} must be a rank in [0, {self.world})")
        self.src_global = dist.get_global_rank(group, src) if self.distributed else src
        self.tensors: dict[str, torch.Tensor] = {}
        self.version = 0
        self.buffers = [torch.empty(bucket_bytes, dtype=torch.uint8) for _ in range(2)]
        self.fail_at_bucket: int | None = None  # tests: raise while loading this bucket (error injection)

    def register(self, named_tensors: dict[str, torch.Tensor]) -> CheckpointEngine:
        self.tensors = dict(named_tensors)
        return self

    def plan(self, meta: list[tuple[str, str, tuple, int]]) -> list[list[tuple[str, int, int, int]]]:
        """Buckets as lists of (name, tensor byte offset, bucket offset, length); a big tensor spans buckets."""
        buckets, cur, used = [], [], 0
        for name, _, _, nbytes in meta:
            done = 0
            while done < nbytes:
                n = min(nbytes - done, self.bucket_bytes - used)
                cur.append((name, done, used, n))
                done, used = done + n, used + n
                if used == self.bucket_bytes:
                    buckets.append(cur)
                    cur, used = [], 0
        if cur:
            buckets.append(cur)
        return buckets

    def _meta(self) -> list:
        return [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size())
                for n, t in self.tensors.items()]

    def _any_error(self, err: str | None) -> None:
        """Every rank raises if any rank reports an error (MAX all-reduce of a flag, then gather the text)."""
        flag = torch.tensor([0 if err is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item():
            errs = [None] * self.world
            dist.all_gather_object(errs, err, group=self.group)
            raise CheckpointEngineError("; ".join(f"rank {r}: {e}" for r, e in enumerate(errs) if e))

    def update(self, verify: bool = False) -> dict:
        """One weight update, collective over the group. Returns bytes, buckets, seconds, version."""
        t0 = time.perf_counter()
        if not self.distributed or self.world == 1:
            self.version += 1
            return {"bytes": 0, "buckets": 0, "seconds": 0.0, "version": self.version}
        src = self.rank == self.src
        header = [self._meta(), self.version + 1] if src else [None, None]
        dist.broadcast_object_list(header, src=self.src_global, group=self.group)
        meta, version = header
        err = None
        if not src:
            info = {n: (d, s) for n, d, s, _ in meta}
            for n, t in self.tensors.items():
                if n in info and (str(t.dtype).removeprefix("torch."), tuple(t.shape)) != info[n]:
                    err = f"{n}: trainer sends {info[n]}, this rank holds {(str(t.dtype), tuple(t.shape))}"
                    break
            if version <= self.version:
                err = err or f"version {version} is not newer than {self.version}"
        self._any_error(err)
        buckets = self.plan(meta)
        pending: list[tuple] = []  # (work, bucket index, buffer) in flight, at most 2

        def load(g: int, buf: torch.Tensor) -> None:
            nonlocal err
            if err is not None:
                return
            try:
                if self.fail_at_bucket == g:
                    raise RuntimeError(f"injected failure while loading bucket {g}")
                for name, t_off, b_off, n in buckets[g]:
                    if name in self.tensors:  # each worker loads only what it holds
                        _as_bytes(self.tensors[name])[t_off:t_off + n].copy_(buf[b_off:b_off + n])
            except Exception as e:  # noqa: BLE001 - reported to every rank below, never swallowed
                err = f"{type(e).__name__}: {e}"

        def pack(bucket: list, buf: torch.Tensor) -> None:  # bucket g while bucket g-1 is on the wire
            nonlocal err
            try:
                for name, t_off, b_off, n in bucket:
                    buf[b_off:b_off + n].copy_(_as_bytes(self.tensors[name])[t_off:t_off + n])
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                err = err or f"{type(e).__name__}: {e}"

        for g, bucket in enumerate(buckets):
            buf = self.buffers[g % 2]
            if len(pending) == 2:  # the buffer is free once its broadcast finished and it was loaded
                work, gg, b = pending.pop(0)
                work.wait(timeout=timedelta(seconds=self.timeout_s))
                if not src:
                    load(gg, b)
            size = bucket[-1][2] + bucket[-1][3]
            if src:
                pack(bucket, buf)
            pending.append((dist.broadcast(buf[:size], src=self.src_global, group=self.group, async_op=True), g, buf))
        for work, gg, b in pending:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
            if not src:
                load(gg, b)
        self._any_error(err)
        self.version = version
        if verify:
            self.verify()
        return {"bytes": sum(m[3] for m in meta), "buckets": len(buckets), "seconds": time.perf_counter() - t0,
                "version": self.version}

    def verify(self) -> None:
        """Per-tensor SHA-256: every tensor a worker holds must equal the trainer's bit for bit."""
        hashes = [{n: tensor_sha256(t) for n, t in self.tensors.items()} if self.rank == self.src else None]
        dist.broadcast_object_list(hashes, src=self.src_global, group=self.group)
        err = None
        if self.rank != self.src:
            missing = [n for n in self.tensors if n not in hashes[0]]
            bad = [n for n, t in self.tensors.items() if n in hashes[0] and tensor_sha256(t) != hashes[0][n]]
            if missing or bad:
                err = f"missing on the trainer: {missing[:5]}; checksum differs: {bad[:5]}"
        self._any_error(err)


def move_training_state(model, optimizer, device: str | torch.device) -> dict:
    """Colocation (K2 §2.4.2): move optimizer state and gradients to `device` (CPU during rollouts) and back.

    Returns bytes moved and seconds. On CUDA this frees device memory for the inference engine; on a CPU-only
    machine the copies still run (copy=True), so the mechanism is exercised and timed.
    """
    t0, moved = time.perf_counter(), 0
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.numel() > 1:
                state[k] = v.to(device, copy=True)
                moved += v.numel() * v.element_size()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.to(device, copy=True)
            moved += p.grad.numel() * p.grad.element_size()
    return {"bytes": moved, "seconds": time.perf_counter() - t0}


# ---- demo: SFT a tiny K2, then RL ----

def demo_config(tok) -> mla.ModelConfig:
    """Chapter 2's tiny K2, narrowed to train in about a minute on one CPU thread."""
    return mla.ModelConfig.tiny(vocab_size=tok.vocab_size, num_hidden_layers=2, n_routed_experts=8,
                                num_experts_per_tok=2)


def split_sums(max_operand: int, seed: int) -> tuple[list, list, list]:
    """All sums a + b (a, b <= max_operand) split 40/40/20 into disjoint SFT, RL and held-out sets."""
    items = [(f"What is {a} + {b}?", a + b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(items)
    n = len(items)
    return items[: 2 * n // 5], items[2 * n // 5: 4 * n // 5], items[4 * n // 5:]


def split_tool_tasks(n: int, seed: int) -> tuple[list, list, list]:
    """Chapter 5 unit and date tasks, disjoint SFT / RL / held-out sets (n each)."""
    tasks = [t for t in data.make_tasks(21 * n, seed, failure_rate=0.0) if t.kind in TOOL_KINDS]
    for t in tasks:
        t.persona = data.PERSONAS[0]  # terse: the request alone
    return tasks[:n], tasks[n:2 * n], tasks[2 * n:3 * n]


SUM_STYLES = (  # how the SFT data answers a sum; only the first is verifiable within the math budget
    "Answer: {c}",                                                             # short, checkable
    "The sum is {c}.",                                                         # right, but no `Answer:` line
    "Let me add {a} and {b} carefully, digit by digit, to be sure: Answer: {c}",  # runs past the token budget
)


Example = tuple[list[int], list[int]]  # (token ids, loss mask)


def sft_examples(tok, sums: list, tasks: list, seed: int, styles: tuple = SUM_STYLES[:1]) -> list[Example]:
    """Chat-rendered SFT data: each sum answered in each of `styles` (the demo passes all of SUM_STYLES, so SFT
    leaves the style to chance and RL must find the verifiable, within-budget one), and tool trajectories from
    chapter 5's expert."""
    out = []
    for q, c in sums:
        a, b = (int(x) for x in re.findall(r"\d+", q))
        out += [data.render_chat([{"role": "user", "content": q},
                                  {"role": "assistant", "content": style.format(a=a, b=b, c=c)}], tok)
                for style in styles]
    expert = data.ScriptedExpert(seed, p_slip=0.0, p_fatal=0.0)
    for t in tasks:
        msgs, _ = data.simulate(t, expert)
        msgs[0] = compact_system_message(t.agent)
        out.append(data.render_chat(msgs, tok))
    return out


def batch_of(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(i) for i, _ in examples)
    ids = torch.tensor([i + [pad_id] * (L - len(i)) for i, _ in examples])  # (B, L)
    mask = torch.tensor([m + [0] * (L - len(m)) for _, m in examples])  # (B, L)
    return ids, mask


def make_optimizer(model, lr: float):
    return muonclip.MuonClip(model, lr=lr, adamw_lr=lr, weight_decay=0.0, adamw_weight_decay=0.0)


def sample_sft(rng: random.Random, examples: list, batch_size: int, n_long: int, pad_id: int, long_from: int = 128):
    """A short-example batch and a long-example batch (padding a sum to a tool trajectory's length is waste)."""
    short = [e for e in examples if len(e[0]) < long_from]
    long = [e for e in examples if len(e[0]) >= long_from]
    out = [batch_of(rng.sample(short, min(batch_size, len(short))), pad_id)] if short else []
    if long and n_long:
        out.append(batch_of(rng.sample(long, min(n_long, len(long))), pad_id))
    return out


def sft(model, examples: list, steps: int, batch_size: int, lr: float, seed: int, pad_id: int, n_long: int = 2,
        progress=None, task=None) -> float:
    """Masked next-token SFT with MuonClip (chapter 3); returns the mean loss of the last 10 steps."""
    rng, opt, losses = random.Random(seed), make_optimizer(model, lr), []
    for step in range(steps):
        for g in opt.param_groups:  # linear warm-up, then cosine to 10%
            g["lr"] = lr * min(1.0, (step + 1) / 10) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        loss = sum(masked_ce(model, *b) for b in sample_sft(rng, examples, batch_size, n_long, pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress.advance(task)
    return sum(losses[-10:]) / len(losses[-10:])


def run_seed(seed: int, args, progress=None) -> dict:
    """SFT, then RL, for one seed; held-out success and critic accuracy before and after RL."""
    tok = data.Tokenizer()
    random.seed(seed)
    torch.manual_seed(seed)
    sums_sft, sums_rl, sums_test = split_sums(args.max_operand, seed)
    tools_sft, tools_rl, tools_test = split_tool_tasks(args.tool_tasks, seed)
    examples = sft_examples(tok, sums_sft, tools_sft, seed, SUM_STYLES)
    model = mla.Transformer(demo_config(tok))
    t_sft = progress.add_task(f"seed {seed}: SFT", total=args.sft_steps) if progress else None
    sft_loss = sft(model, examples, args.sft_steps, args.batch_size, args.lr, seed, tok.pad_id, args.tool_batch,
                   progress, t_sft)
    test_envs = ([(MathEnv(sums_test), i) for i in range(len(sums_test))]
                 + [(ToolEnv(tools_test), i) for i in range(len(tools_test))])
    rl_envs = ([(MathEnv(sums_rl), i) for i in range(len(sums_rl))]
               + [(ToolEnv(tools_rl), i) for i in range(len(tools_rl))])
    model.set_record_s_max(False)
    before = evaluate(model, test_envs, tok)
    # held-out critic pairs: on-policy rollouts of held-out prompts whose verifiable rewards differ
    critic_envs = test_envs[: min(args.critic_prompts, len(sums_test))]  # held-out sums only
    held_pairs = critic_pairs(collect_rollouts(model, critic_envs, tok, group_size=4, temperature=1.0,
                                               seed=seed + 1000), 4)
    critic_before = critic_accuracy(model, tok, held_pairs) if held_pairs else float("nan")
    opt = make_optimizer(model, args.rl_lr)
    rng, history = random.Random(seed), []
    n_math = args.prompts - args.tool_prompts
    tool_examples = [e for e in examples if len(e[0]) >= 128]  # PTX: the curated tool trajectories

    def ptx_batch(rng):
        return batch_of(rng.sample(tool_examples, min(args.tool_batch, len(tool_examples))), tok.pad_id) \
            if tool_examples and args.tool_batch else None

    t_rl = progress.add_task(f"seed {seed}: RL", total=args.rl_steps) if progress else None
    for step in range(args.rl_steps):
        prompts = (rng.sample(rl_envs[:len(sums_rl)], n_math) + rng.sample(rl_envs[len(sums_rl):], args.tool_prompts))
        temperature = temperature_schedule(step, args.rl_steps, args.t_start, args.t_end)
        model.set_record_s_max(False)
        rollouts = collect_rollouts(model, prompts, tok, group_size=args.group_size, temperature=temperature,
                                    seed=seed * 100_003 + step)
        model.set_record_s_max(True)
        pairs = critic_pairs(rollouts, args.group_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the share of all-equal groups is reported in the table instead
            m = rl_step(model, opt, rollouts, group_size=args.group_size, tau=args.tau, pad_id=tok.pad_id,
                        ptx=ptx_batch(rng), ptx_weight=args.ptx_weight,
                        critic_batch=critic_batch(tok, pairs[: args.batch_size]),
                        critic_weight=args.critic_weight)
        m["temperature"] = temperature
        history.append(m)
        if progress is not None:
            progress.update(t_rl, advance=1, description=f"seed {seed}: RL (reward {m['reward_mean']:+.2f})")
    model.set_record_s_max(False)
    after = evaluate(model, test_envs, tok)
    critic_after = critic_accuracy(model, tok, held_pairs) if held_pairs else float("nan")
    return {"seed": seed, "sft_loss": sft_loss, "before": before, "after": after, "history": history,
            "critic_before": critic_before, "critic_after": critic_after, "critic_pairs": len(held_pairs),
            "n_test": {"math": len(sums_test), "tool": len(tools_test)}}


# ---- demo: the checkpoint engine under torchrun ----

def _flat_update(tensors: dict, src: int, is_src: bool) -> None:
    """Baseline 1: pack everything into one flat buffer, one broadcast, unpack."""
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    flat = (torch.cat([_as_bytes(t) for t in tensors.values()]) if is_src
            else torch.empty(sum(sizes), dtype=torch.uint8))
    dist.broadcast(flat, src=src)
    if not is_src:
        for t, piece in zip(tensors.values(), flat.split(sizes)):
            _as_bytes(t).copy_(piece)


def _per_tensor_update(tensors: dict, src: int) -> None:
    """Baseline 2: one broadcast per tensor (no packing; many small messages)."""
    for t in tensors.values():
        dist.broadcast(t, src=src)


def engine_demo(args, console) -> None:
    """Trainer rank 0 sends a tiny-K2-shaped model to the other ranks three ways; times and checksums."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tok = data.Tokenizer()
    cfg = mla.ModelConfig.tiny(vocab_size=tok.vocab_size, hidden_size=args.engine_width, num_hidden_layers=4)
    torch.manual_seed(0 if rank == 0 else 1000 + rank)  # workers start from different (random) weights
    model = mla.Transformer(cfg)
    tensors = dict(model.state_dict())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    engine = CheckpointEngine(bucket_bytes=args.bucket_mb << 20).register(tensors)
    methods = {"bucketed engine (2 buffers)": lambda: engine.update(),
               "one flat buffer": lambda: _flat_update(tensors, 0, rank == 0),
               "one broadcast per tensor": lambda: _per_tensor_update(tensors, 0)}
    times: dict[str, list[float]] = {name: [] for name in methods}
    digests: dict[str, list] = {}
    for _ in range(args.repeats):  # the methods take turns, so machine load hits them alike
        for name, fn in methods.items():
            if rank != 0:  # receivers reset to random weights before every update
                for t in tensors.values():
                    t.copy_(torch.randn(t.shape).to(t.dtype) if t.is_floating_point() else torch.zeros_like(t))
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
            digest = hashlib.sha256("".join(tensor_sha256(t) for t in tensors.values()).encode()).hexdigest()[:12]
            digests[name] = [None] * world
            dist.all_gather_object(digests[name], digest)
    rows = [(name, sorted(ts)[len(ts) // 2], digests[name]) for name, ts in times.items()]
    engine.update(verify=True)  # raises on every rank if any tensor differs
    if rank == 0:
        from rich.table import Table
        table = Table(title=f"weight update: {nbytes / 2**20:.1f} MiB, {len(tensors)} tensors, 1 trainer -> "
                            f"{world - 1} workers (gloo, CPU), median of {args.repeats}")
        for col in ("method", "seconds", "MiB/s per worker", "SHA-256 (trainer)", "workers equal"):
            table.add_column(col)
        for name, s, dg in rows:
            table.add_row(name, f"{s:.3f}", f"{nbytes / 2**20 / s:.0f}", dg[0],
                          f"{sum(d == dg[0] for d in dg[1:])}/{world - 1}")
        console.print(table)
        console.print(f"bucket {args.bucket_mb} MiB; engine version {engine.version}; verification passed "
                      f"(per-tensor SHA-256 on every worker)")
        opt = torch.optim.AdamW(model.parameters())  # colocation: the trainer's state leaves during rollouts
        model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[2, 3, 4]])).loss.backward()
        opt.step()
        home = next(model.parameters()).device
        out, back = move_training_state(model, opt, "cpu"), move_training_state(model, opt, home)
        console.print(f"colocated offload: optimizer state + gradients {out['bytes'] / 2**20:.1f} MiB, "
                      f"out {out['seconds']:.3f} s, back {back['seconds']:.3f} s (CPU -> CPU copies here)")
    dist.destroy_process_group()


# ---- command line ----

def print_rl_results(console, results: list[dict]) -> None:
    from rich.table import Table
    t = Table(title="held-out success (greedy), before -> after RL")
    for col in ("seed", "SFT loss", "math before", "math after", "tool before", "tool after",
                "critic acc before", "critic acc after", "critic pairs"):
        t.add_column(col)
    for r in results:
        b, a = r["before"], r["after"]
        t.add_row(str(r["seed"]), f"{r['sft_loss']:.3f}", f"{b.get('math', 0):.1%}", f"{a.get('math', 0):.1%}",
                  f"{b.get('tool', 0):.1%}", f"{a.get('tool', 0):.1%}", f"{r['critic_before']:.1%}",
                  f"{r['critic_after']:.1%}", str(r["critic_pairs"]))
    console.print(t)
    h = Table(title="during RL (mean over the steps of each quarter; seed 0)")
    for col in ("steps", "reward", "all-equal groups", "response tokens", "log-prob gap", "temperature"):
        h.add_column(col)
    hist = results[0]["history"]
    q = max(1, len(hist) // 4)
    for i in range(0, len(hist), q):
        part = hist[i:i + q]
        mean = {k: sum(m[k] for m in part) / len(part) for k in ("reward_mean", "all_equal_groups", "response_len",
                                                                 "temperature")}
        h.add_row(f"{i}-{i + len(part) - 1}", f"{mean['reward_mean']:+.3f}", f"{mean['all_equal_groups']:.0%}",
                  f"{mean['response_len']:.1f}", f"{max(m['logprob_gap'] for m in part):.1e}",
                  f"{mean['temperature']:.2f}")
    console.print(h)
    for env in ("math", "tool"):
        gains = [r["after"].get(env, 0) - r["before"].get(env, 0) for r in results]
        afters = [r["after"].get(env, 0) for r in results]
        spread = max(afters) - min(afters)
        verdict = "beats" if min(gains) > spread else "does not beat"
        console.print(f"{env}: RL gain per seed {', '.join(f'{g:+.1%}' for g in gains)}; spread of the final "
                      f"success over seeds {spread:.1%}: the gain {verdict} the seed spread")
    gains = [r["critic_after"] - r["critic_before"] for r in results]
    afters = [r["critic_after"] for r in results]
    spread = max(afters) - min(afters)
    console.print(f"critic: accuracy gain per seed {', '.join(f'{g:+.1%}' for g in gains)}; spread of the final "
                  f"accuracy over seeds {spread:.1%}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--engine-demo", action="store_true",
                   help="checkpoint engine demo (run under torchrun --nproc_per_node=3)")
    p.add_argument("--seeds", type=cli.nonneg_int_list, default=[0, 1], help="one SFT + RL run per seed")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch intra-op threads")
    p.add_argument("--max-operand", type=cli.positive_int, default=20, help="sums a + b with a, b <= this")
    p.add_argument("--tool-tasks", type=cli.positive_int, default=40, help="tool tasks per split (SFT, RL, test)")
    p.add_argument("--sft-steps", type=cli.positive_int, default=200, help="SFT steps")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="SFT / PTX / critic batch")
    p.add_argument("--tool-batch", type=cli.nonneg_int, default=2, help="tool trajectories per SFT step")
    p.add_argument("--lr", type=cli.positive_float, default=3e-3, help="SFT learning rate (MuonClip)")
    p.add_argument("--rl-steps", type=cli.positive_int, default=30, help="RL steps")
    p.add_argument("--rl-lr", type=cli.positive_float, default=1e-3, help="RL learning rate (MuonClip)")
    p.add_argument("--prompts", type=cli.positive_int, default=8, help="prompts per RL step")
    p.add_argument("--tool-prompts", type=cli.nonneg_int, default=2, help="of which tool tasks")
    p.add_argument("--group-size", type=cli.positive_int, default=4, help="K samples per prompt")
    p.add_argument("--tau", type=cli.positive_float, default=0.1, help="k1.5 regulariser τ")
    p.add_argument("--ptx-weight", type=cli.nonneg_float, default=0.1, help="weight of the PTX loss")
    p.add_argument("--critic-weight", type=cli.nonneg_float, default=0.1, help="weight of the critic loss")
    p.add_argument("--critic-prompts", type=cli.positive_int, default=48, help="held-out sums whose rollouts give the critic pairs")
    p.add_argument("--t-start", type=cli.nonneg_float, default=1.0, help="sampling temperature at step 0")
    p.add_argument("--t-end", type=cli.nonneg_float, default=0.6, help="sampling temperature at the last step")
    p.add_argument("--engine-width", type=cli.positive_int, default=512, help="engine demo: hidden size")
    p.add_argument("--bucket-mb", type=cli.positive_int, default=4, help="engine demo: bucket size in MiB")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="engine demo: timed updates per method")
    p.add_argument("--json", type=cli.out_file, default=None, help="write the RL results to this file")
    args = p.parse_args(argv)
    if args.tool_prompts > args.prompts:
        p.error(f"argument --tool-prompts: {args.tool_prompts} is more than --prompts={args.prompts}")
    from rich.console import Console
    console = Console(width=120)
    torch.set_num_threads(args.threads)
    if args.engine_demo:
        if "RANK" not in os.environ:
            p.error("argument --engine-demo: run it under torchrun --nproc_per_node=3 06_rl.py --engine-demo")
        engine_demo(args, console)
        return 0
    from rich.progress import Progress
    t0 = time.time()
    with Progress(console=console, transient=True) as progress:
        results = [run_seed(s, args, progress) for s in args.seeds]
    print_rl_results(console, results)
    console.print(f"done in {time.time() - t0:.0f} s ({args.threads} thread(s))")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    cli.run(main)
