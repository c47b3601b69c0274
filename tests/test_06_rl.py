"""Chapter 6: k1.5 loss, budget, temperature, rewards, rollouts, self-critic and the checkpoint engine on gloo."""

import multiprocessing as mp
import os
import socket
import traceback

import pytest
import torch
from conftest import load

rl = load("06_rl")
mla, data = rl.mla, rl.data


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return data.Tokenizer()


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = mla.ModelConfig.tiny(vocab_size=tok.vocab_size, num_hidden_layers=2, hidden_size=64, n_routed_experts=4,
                               num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=32, intermediate_size=128)
    return mla.Transformer(cfg)


# ---- policy loss, budget, temperature, metrics ----

def test_policy_loss_value_by_hand():
    # 2 prompts x K=2; log-ratios ℓ = (0.5, 0, 0, -1) from per-token values; rewards (1, 0, 1, 1); τ = 0.1
    logp = torch.tensor([[0.2, 0.3], [0.0, 0.0], [0.0, 0.0], [-0.5, -0.5]])
    mask = torch.ones(4, 2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss, _ = rl.policy_loss(logp, torch.zeros(4, 2), mask, rewards, group_size=2, tau=0.1)
    # advantages (0.5, -0.5, 0, 0); residuals 0.5-0.05, -0.5, 0, 0+0.1
    expected = (0.45 ** 2 + 0.5 ** 2 + 0.0 + 0.1 ** 2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # masked tokens do not count
    mask2 = torch.tensor([[1.0, 0.0], [1, 1], [1, 1], [1, 1]])
    loss2, _ = rl.policy_loss(logp, torch.zeros(4, 2), mask2, rewards, group_size=2, tau=0.1)
    assert loss2.item() == pytest.approx(((0.5 - 0.02) ** 2 + 0.25 + 0.01) / 4, rel=1e-6)


def test_policy_loss_gradient_sign():
    """At ℓ = 0 a gradient step raises the log-prob of above-mean samples and lowers below-mean ones."""
    logp = torch.zeros(3, 4, requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.5])  # one group, mean 0.5
    loss, _ = rl.policy_loss(logp, torch.zeros(3, 4), torch.ones(3, 4), rewards, group_size=3, tau=0.2)
    loss.backward()
    g = logp.grad.sum(1)
    assert g[0] < 0 and g[1] > 0 and g[2] == 0  # descent: -grad raises sample 0, lowers sample 1
    # ∂L/∂ℓ_i = -2τ/N (A_i - τℓ_i) = -2·0.2/3·0.5, and ℓ_i sums the tokens: each token gets all of it
    torch.testing.assert_close(logp.grad[0], torch.full((4,), -2 * 0.2 / 3 * 0.5))


def test_policy_loss_rejects_bad_input():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="group_size"):
        rl.policy_loss(x, x, x, torch.zeros(3), group_size=2, tau=0.1)
    with pytest.raises(ValueError, match="tau"):
        rl.policy_loss(x, x, x, torch.zeros(3), group_size=3, tau=0.0)


def test_budget_penalty():
    lengths = torch.tensor([10, 32, 40, 5])
    budgets = torch.tensor([32, 32, 32, 8])
    truncated = torch.tensor([False, True, False, False])
    pen = rl.budget_penalty(lengths, budgets, truncated, penalty=0.5)
    assert pen.tolist() == [0.0, -0.5, -0.5, 0.0]


def test_temperature_schedule_decays():
    ts = [rl.temperature_schedule(s, 10, 1.2, 0.6) for s in range(11)]
    assert ts[0] == pytest.approx(1.2) and ts[-1] == pytest.approx(0.6) and ts[5] == pytest.approx(0.9)
    assert all(a >= b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="total_steps"):
        rl.temperature_schedule(0, 0)


def test_group_metrics_warns_on_all_equal_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # groups of 2: equal, mixed, equal
    with pytest.warns(UserWarning, match="all-equal"):
        m = rl.group_metrics(r, 2, warn_above=0.5)
    assert m["all_equal_groups"] == pytest.approx(2 / 3) and m["reward_mean"] == pytest.approx(0.5)


# ---- rewards on known-good and known-bad answers ----

def answer(text, calls=None):
    return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


def test_math_reward():
    env = rl.MathEnv([("What is 2 + 3?", 5)])
    env.reset(0)
    assert env.step(answer("2 + 3 = 5. Answer: 5"))[1] == 1.0
    env.reset(0)
    assert env.step(answer("Answer: 6"))[1] == 0.0
    env.reset(0)
    assert env.step(answer("five"))[1] == 0.0
    env.reset(0)
    assert env.step(answer("Answer: 4. No wait, Answer: 5"))[1] == 1.0  # the last answer counts


def _call(name, args, i=0):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}


def test_tool_reward_good_and_malformed():
    task = next(t for t in data.make_tasks(14, 3, failure_rate=0.0) if t.kind == "convert")
    env = rl.ToolEnv([task])
    s = task.slots
    env.reset(0)
    obs, r, done, _ = env.step(answer("", [_call("convert_units", f'{{"value": {s["v"]}, "from_unit": "{s["from"]}", '
                                                                  f'"to_unit": "{s["to"]}"}}')]))
    assert not done and obs[0]["role"] == "tool" and "result" in obs[0]["content"]
    value = json_result(obs[0]["content"])
    obs, r, done, info = env.step(answer(f"That is {value:g} {s['to']}."))
    assert done and r == 1.0, info
    # malformed JSON, then an answer without a successful call: rejected
    env.reset(0)
    obs, r, done, _ = env.step(answer("", [_call("convert_units", '{"value": 3, "from_unit": ')]))
    assert "not valid JSON" in obs[0]["content"]
    _, r, done, info = env.step(answer(f"That is {value:g} {s['to']}."))
    assert done and r == 0.0 and "missing call: convert_units" in info["reasons"]
    # tool calls parsed from raw generated text, including a broken one
    text = '<|tool_call|>{"name": "convert_units", "arguments": {"value": 1}<|/tool_call|><|end|>'
    msg = rl.assistant_message(text)
    assert msg["tool_calls"][0]["function"]["name"] == "convert_units" and msg["content"] == ""


def json_result(content):
    import json
    return json.loads(content)["result"]


@pytest.mark.slow
def test_code_reward_good_crash_hang_fork():
    env = rl.CodeEnv(timeout_s=1.0)
    env.reset(1)  # sorted problems: gcd, is_palindrome, running_sum, word_count
    assert env.problem == "is_palindrome"
    _, good, buggy, _ = data.CODE_PROBLEMS["is_palindrome"]
    assert env.step(answer(f"```python\n{good}```"))[1] == 1.0
    assert env.step(answer(f"```python\n{buggy}```"))[1] == 0.5  # s == s[::-1] passes only 'abc'
    assert env.step(answer("```python\ndef is_palindrome(s) return\n```"))[1] == 0.0  # syntax error
    assert env.step(answer("```python\nimport sys\nsys.exit(3)\n```"))[1] == 0.0  # crashes
    _, r, _, info = env.step(answer("```python\nwhile True:\n    pass\n```"))
    assert r == 0.0 and all(info["timed_out"])  # hangs: killed by the timeout
    fork = "```python\nimport os\nwhile True:\n    os.fork()\n```"
    assert env.step(answer(fork))[1] == 0.0


def test_rubric_env_defers_to_critic():
    env = rl.RubricEnv()
    env.reset(1)
    _, r, done, info = env.step(answer("A sum adds numbers."))
    assert r == 0.0 and done and info["critic"]


# ---- rollouts ----

def test_rollout_logprobs_equal_trainer_at_step_zero(tok):
    """Log-probs recorded while sampling (latent cache, absorbed decode) == the trainer's one-forward values."""
    model = tiny_model(tok)
    envs = rl.make_envs(n_math=2, n_tool=1, seed=0)
    for env, _ in envs:
        env.token_budget = min(env.token_budget, 24)
    rs = rl.collect_rollouts(model, envs, tok, group_size=2, temperature=1.0, seed=0)
    assert len(rs) == 6 and [r.group for r in rs] == [0, 0, 1, 1, 2, 2]
    ids, mask, old = rl.pad_rollouts(rs, tok.pad_id)
    with torch.no_grad():
        new = rl.token_logprobs(model, ids)
    gap = ((new - old).abs() * mask).max().item()
    assert mask.sum() == sum(r.n_tokens for r in rs) and gap < 1e-5, gap
    # every sampled token is in the sequence exactly where its log-prob is
    for r in rs:
        assert len(r.ids) == len(r.mask) == len(r.logp) and sum(r.mask) == r.n_tokens


def test_rollout_tool_turns_and_budget(tok):
    """A multi-turn tool episode: tool results are inserted as prompt tokens (mask 0) between turns."""
    model = tiny_model(tok)
    envs = rl.make_envs(n_math=0, n_tool=1, seed=0)
    envs[0][0].token_budget = 40
    rs = rl.collect_rollouts(model, envs, tok, group_size=2, temperature=1.0, seed=1, penalty=0.5)
    for r in rs:
        assert r.n_tokens <= 40
        if r.truncated:
            assert r.reward == -0.5
        ids, _ = data.render_chat(r.messages[:2], tok, add_generation_prompt=True)
        assert r.ids[:len(ids)] == ids


def test_rl_step_raises_above_mean_samples(tok):
    """One k1.5 step on fixed rollouts raises the log-prob of the rewarded sample relative to the others."""
    model = tiny_model(tok)
    envs = rl.make_envs(n_math=1, seed=0)
    envs[0][0].token_budget = 8
    rs = rl.collect_rollouts(model, envs, tok, group_size=4, temperature=1.0, seed=0)
    for i, r in enumerate(rs):
        r.reward = float(i == 0)
    ids, mask, old = rl.pad_rollouts(rs, tok.pad_id)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    m = rl.rl_step(model, opt, rs, group_size=4, tau=1.0, pad_id=tok.pad_id, max_grad_norm=0)
    assert m["logprob_gap"] < 1e-5
    with torch.no_grad():
        delta = ((rl.token_logprobs(model, ids) - old) * mask).sum(1)
    assert delta[0] > 0 and delta[0] > delta[1:].max()


# ---- self-critic ----

def test_critic_symmetric_and_win_rates(tok):
    model = tiny_model(tok)
    critic = rl.SelfCritic(model, tok)
    pairs = [("What is 2 + 2?", "Answer: 4", "Answer: 5", ""), ("Hi", "Hello there.", "Go away.", "Warm.")]
    ab = critic.prefer(pairs)
    ba = critic.prefer([(p, b, a, r) for p, a, b, r in pairs])
    torch.testing.assert_close(ab + ba, torch.ones(2))
    w = critic.win_rates("Hi", ["Hello.", "Hey!", "Go away."])
    assert w.shape == (3,) and w.sum().item() == pytest.approx(1.5, abs=1e-5)  # K/2: each pair hands out 1


def test_closed_loop_critic_learns_pairs(tok):
    """Training the critic on verifiable pairs (both orders) raises its pairwise accuracy on them."""
    model = tiny_model(tok)
    pairs = [(f"What is {a} + 1?", f"Answer: {a + 1}", "I do not know.", "") for a in range(6)]
    before = rl.critic_accuracy(model, tok, pairs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask = rl.critic_batch(tok, pairs)
    for _ in range(15):
        loss = rl.masked_ce(model, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert rl.critic_accuracy(model, tok, pairs) == 1.0 and before < 1.0


def test_critic_pairs_from_verifiable_groups():
    def ro(g, reward, text, env="math"):
        msgs = [{"role": "user", "content": f"q{g}"}, {"role": "assistant", "content": text}]
        return rl.Rollout(env, g, [], [], [], reward=reward, messages=msgs)
    rs = [ro(0, 1.0, "good"), ro(0, 0.0, "bad"), ro(1, 1.0, "x"), ro(1, 1.0, "y")]
    assert rl.critic_pairs(rs, 2) == [("q0", "good", "bad", "")]


# ---- checkpoint engine on gloo ----

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, scenario, q):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world)
        q.put((rank, scenario(rank, world)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - the parent asserts on what each rank saw
        q.put((rank, ("error", f"{type(e).__name__}: {e}", traceback.format_exc())))


def run_ranks(scenario, world, timeout=180):
    """Run scenario(rank, world) on `world` spawned gloo processes; {rank: result}. Generous timeouts: the
    point is that nothing hangs forever, not speed (starting torch in a process is slow on a busy machine)."""
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _free_port()
    ps = [ctx.Process(target=_worker, args=(r, world, port, scenario, q)) for r in range(world)]
    for p in ps:
        p.start()
    out = {}
    for _ in range(world):
        rank, res = q.get(timeout=timeout)
        out[rank] = res
    for p in ps:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            raise AssertionError("a rank hung")
    return out


def _params(seed, big=True):
    g = torch.Generator().manual_seed(seed)
    d = {"w.f32": torch.randn(64, 33, generator=g), "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
         "i.int64": torch.randint(0, 1000, (5, 3), generator=g), "h.f16": torch.randn(3, 3, generator=g).half(),
         "mask.bool": torch.rand(11, generator=g) > 0.5}
    if big:
        d["big"] = torch.randn(1000, generator=g)  # 4000 bytes > bucket of 1024
    return d


def scenario_update(rank, world):
    trainer = _params(0)
    if rank == 0:
        tensors = trainer
    elif rank == 1:
        tensors = _params(rank + 10)  # receiver reset to random weights
    else:
        tensors = {}  # an empty model part
    eng = rl.CheckpointEngine(bucket_bytes=1024, timeout_s=20).register(tensors)
    s1 = eng.update(verify=True)
    if rank == 0:
        trainer["w.f32"].add_(1.0)  # a training step
    s2 = eng.update(verify=True)
    same = all(torch.equal(t, _params(0)[n] + (1.0 if n == "w.f32" else 0)) for n, t in tensors.items()) \
        if rank == 1 else True
    return s1["version"], s2["version"], s2["buckets"], same


@pytest.mark.dist
@pytest.mark.slow
def test_engine_bit_identical_mixed_dtypes_big_tensor_empty_part():
    out = run_ranks(scenario_update, 3)
    assert all(res[:2] == (1, 2) for res in out.values()), out
    assert out[1][3] and out[0][2] >= 5  # big tensor spans several 1 KiB buckets


def scenario_missing(rank, world):
    tensors = _params(0, big=False) if rank == 0 else _params(5)  # the worker holds "big"; trainer lacks it
    eng = rl.CheckpointEngine(bucket_bytes=512, timeout_s=20).register(tensors)
    eng.update(verify=False)  # without verification the stale tensor goes unnoticed
    try:
        eng.update(verify=True)
    except rl.CheckpointEngineError as e:
        return "caught: " + str(e)
    return "not caught"


def scenario_injected(rank, world):
    tensors = _params(0) if rank == 0 else _params(rank)
    eng = rl.CheckpointEngine(bucket_bytes=1024, timeout_s=10).register(tensors)
    if rank == 2:
        eng.fail_at_bucket = 2
    try:
        eng.update()
    except rl.CheckpointEngineError as e:
        return "raised: " + str(e)
    return "no error"


@pytest.mark.dist
@pytest.mark.slow
def test_engine_catches_missing_tensor_and_injected_failure():
    out = run_ranks(scenario_missing, 2)
    assert all(v.startswith("caught") and "big" in v for v in out.values()), out
    out = run_ranks(scenario_injected, 3)
    assert all(v.startswith("raised") and "rank 2" in v and "injected" in v for v in out.values()), out


def scenario_peer_gone(rank, world):
    eng = rl.CheckpointEngine(bucket_bytes=1024, timeout_s=5).register(_params(rank))
    if rank == 2:
        return "left"  # this worker never joins the update and exits
    try:
        eng.update()
    except (RuntimeError, rl.CheckpointEngineError) as e:
        return "raised: " + type(e).__name__
    return "no error"


@pytest.mark.dist
@pytest.mark.slow
def test_engine_peer_gone_raises_within_timeout():
    out = run_ranks(scenario_peer_gone, 3)
    assert out[2] == "left" and out[0].startswith("raised") and out[1].startswith("raised"), out


def test_engine_world_size_one_and_offload(tok):
    eng = rl.CheckpointEngine().register({"x": torch.zeros(3)})
    assert eng.update()["version"] == 1 and eng.update()["version"] == 2
    assert [len(b) for b in eng.plan([("a", "float32", (3,), 12), ("b", "float32", (1,), 4)])] == [2]
    model = tiny_model(tok)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[2, 3, 4]])).loss.backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    off = rl.move_training_state(model, opt, "cpu")
    assert off["bytes"] > 0 and off["seconds"] >= 0
    for k, v in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
