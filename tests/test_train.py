"""train.py: the whole recipe at micro size (--quick), exact resume after SIGKILL, HF export, flags, checkpoints."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import load

train = load("train")
data = load("05_data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--quick", "--pretrain-steps", "30"]  # long enough to be killed in the middle of a stage


def run_main(argv, capsys=None):
    """train.main in this process; returns (exit code, stderr)."""
    n = torch.get_num_threads()
    try:
        code = train.main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(n)
    return code, capsys.readouterr().err if capsys else ""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted micro run, the reference for the other tests."""
    out = str(tmp_path_factory.mktemp("runs") / "ref")
    assert run_main(QUICK + ["--out", out]) == (0, "")
    return out


def step_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out, stage):
    return torch.load(os.path.join(out, "ckpt", f"{stage}.pt"), weights_only=True)


@pytest.mark.slow
def test_quick_pipeline_trains_evaluates_and_writes_the_run_directory(quick_run):
    recs = step_records(quick_run)
    steps = [r for r in recs if "step" in r]
    evals = {r["stage"]: r["eval"] for r in recs if "eval" in r}
    assert [(r["stage"], r["step"]) for r in steps] == (
        [("pretrain", i) for i in range(1, 31)] + [("sft", i) for i in range(1, 7)] + [("rl", i) for i in range(1, 5)])
    assert list(evals) == ["pretrain", "sft", "rl"]
    pre = [r["loss"] for r in steps if r["stage"] == "pretrain"]
    assert sum(pre[-5:]) / 5 < sum(pre[:5]) / 5 - 0.5  # pretraining learns (byte-level: starts near ln 268)
    for r in steps:  # QK-Clip is logged every step, MoE balance every pretraining/SFT step
        assert r["s_max"] > 0 and r["clipped_heads"] >= 0 and (r["stage"] == "rl" or r["max_vio"] >= 0)
    rl_steps = [r for r in steps if r["stage"] == "rl"]
    assert [r["weights_version"] for r in rl_steps] == [1, 2, 3, 4]  # one engine update per RL step
    assert all(r["logprob_gap"] < 1e-3 for r in rl_steps)  # rollout and trainer log-probs agree (same weights)
    rates = ("qa_held_out", "qa_format", "math", "sums", "tool_units_dates", "tool_all_kinds")
    for stage, res in evals.items():
        assert set(res) == {"val_loss", "sft_val_loss", *rates} | ({"critic_acc"} if stage != "pretrain" else set())
        assert all(0 <= res[k] <= 1 for k in rates)
    assert evals["sft"]["sft_val_loss"] < evals["pretrain"]["sft_val_loss"]  # SFT fits unseen trajectories better
    with open(os.path.join(quick_run, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["pretrain_steps"] == 30 and cfg["model"]["hidden_size"] == 64
    for name in ("ckpt/last.pt", "ckpt/pretrain.pt", "ckpt/sft.pt", "ckpt/rl.pt", "figures/train_curves.png",
                 "figures/train_rewards.png"):
        assert os.path.isfile(os.path.join(quick_run, name)), name


def test_sft_targets_are_exactly_the_assistant_tokens():
    tok = data.Tokenizer()
    kept, _ = data.synthesize(7, seed=0)
    rec = kept[0]
    ids, mask = train.chat_example(rec, tok, max_len=10_000)
    x, y = train.targets(torch.tensor([ids]), torch.tensor([mask]))
    assert x[0].tolist() == ids[:-1]
    assert [t != -100 for t in y[0].tolist()] == [bool(m) for m in mask[1:]]
    assert tok.decode([t for t in y[0].tolist() if t != -100]).count("<|end|>") == sum(
        m["role"] == "assistant" for m in rec["messages"])


def test_batches_are_pure_functions_of_the_step():
    tc = train.TrainConfig(**{**train.quick_config(), "model": {}})
    c = train.build_corpora(tc)
    a, b = train.sft_batch(c, tc, 5), train.sft_batch(c, tc, 5)
    assert len(a) == 2 and all(torch.equal(u, v) for p, q in zip(a, b) for u, v in zip(p, q))
    [(x, y)] = train.pretrain_batch(c, tc, 3)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert torch.equal(x.flatten()[:5], c.stream[3 * x.numel(): 3 * x.numel() + 5])  # step 3 reads its own slice


def _start(out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *QUICK, "--out", out, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, out, stage):
    """SIGKILL the run as soon as it has checkpointed inside `stage` (so it dies mid-stage, between checkpoints)."""
    where = os.path.join(out, "ckpt", "last.json")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(where) as f:
                w = json.load(f)
        except (OSError, ValueError):
            w = None
        if w and w["stage"] == stage and stage not in w["finished"]:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return w
        time.sleep(0.01)
    raise AssertionError(f"the run ended before it could be killed in {stage}: {proc.communicate()[1][-2000:]}")


@pytest.mark.slow
def test_resume_after_sigkill_gives_bit_identical_results(quick_run, tmp_path):
    out = str(tmp_path / "killed")
    killed_at = [_kill_when(_start(out), out, "pretrain")]
    killed_at.append(_kill_when(_start(out, "--resume"), out, "rl"))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", out, "--resume"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert killed_at[0]["step"] < 30 and killed_at[1]["finished"] == ["pretrain", "sft"]
    assert step_records(out) == step_records(quick_run)  # every step's loss, S_max, MaxVio and the evaluations
    for stage in ("pretrain", "sft", "rl"):
        a, b = weights(out, stage), weights(quick_run, stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_resumed_without_work_says_so(quick_run, capsys):
    code, err = run_main(["--out", quick_run, "--resume"], capsys)
    assert code == 2 and "nothing to do" in err


def test_hf_export_round_trip(quick_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    export = str(tmp_path / "hf")
    assert run_main(["--out", quick_run, "--resume", "--export-hf", export]) == (0, "")
    with open(os.path.join(quick_run, "config.json")) as f:
        cfg = train.mla.ModelConfig.from_hf(json.load(f)["model"])
    ours = train.mla.Transformer(cfg)
    ours.load_state_dict(weights(quick_run, "rl"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    back = train.mla.ModelConfig.from_hf(os.path.join(export, "config.json"))
    assert back == dataclasses.replace(cfg, bias_update_speed=back.bias_update_speed)  # a training setting
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, ours.eval()(idx).logits, atol=2e-5, rtol=1e-4)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"  # the aux-loss-free bias travels too
    assert torch.equal(hf.state_dict()[bias], ours.state_dict()["layers.1.mlp.router.e_score_correction_bias"])


@pytest.mark.parametrize("argv,message", [
    (["--stages", "sft,pretrain"], "order"),
    (["--stages", "pretrain,eval"], "stages"),
    (["--pretrain-steps", "0"], "--pretrain-steps"),
    (["--resume", "--overwrite", "--out", "x"], "exclude"),
    (["--resume"], "needs --out"),
    (["--override", "attention_dropout=0.1"], "attention_dropout"),
    (["--override", "not_a_key=1"], "not_a_key"),
    (["--override", "hidden_size"], "key=value"),
    (["--preset", "kimi-k2"], "GiB"),
    (["--preset", "deepseek-v3", "--config", "README.md"], "exclude"),
])
def test_bad_flags_are_refused_with_the_flag_named(argv, message, capsys):
    code, err = run_main(argv, capsys)
    assert code == 2 and message in err, err


def test_existing_run_is_not_overwritten_and_resume_refuses_other_settings(quick_run, capsys):
    code, err = run_main(QUICK + ["--out", quick_run], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, err = run_main(["--out", quick_run, "--resume", "--seed", "3"], capsys)
    assert code == 2 and "seed" in err
    empty = os.path.join(os.path.dirname(quick_run), "empty")
    os.makedirs(empty, exist_ok=True)
    code, err = run_main(["--out", empty, "--resume"], capsys)
    assert code == 2 and "no run" in err


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return os.path.join(dst, "ckpt", "last.pt")


@pytest.mark.parametrize("damage,message", [
    ("truncate", "corrupted or truncated"), ("garbage", "corrupted or truncated"),
    ("other_config", "different config (differs in: pretrain_steps)"), ("wrong_weights", "do not fit"),
])
def test_damaged_checkpoints_are_refused(quick_run, tmp_path, capsys, damage, message):
    out = str(tmp_path / "run")
    ckpt = _copy_run(quick_run, out)
    if damage == "truncate":
        with open(ckpt, "rb") as f:
            blob = f.read()
        with open(ckpt, "wb") as f:
            f.write(blob[: len(blob) // 2])
    elif damage == "garbage":
        with open(ckpt, "wb") as f:
            f.write(os.urandom(4096))
    else:
        state = torch.load(ckpt, weights_only=True)
        if damage == "other_config":
            state["config"]["pretrain_steps"] = 99
        else:
            state["model"].pop(next(iter(state["model"])))
        torch.save(state, ckpt)
    code, err = run_main(["--out", out, "--resume", "--export-hf", str(tmp_path / "hf")], capsys)
    assert code == 2 and message in err, err


def test_config_file_with_overrides_resolves_through_from_hf(tmp_path):
    path = tmp_path / "config.json"
    k2 = train.mla.ModelConfig.kimi_k2().to_hf()
    path.write_text(json.dumps({**k2, "vocab_size": 163840}))
    p = train.build_parser()
    args = p.parse_args(["--config", str(path), "--override", "num_hidden_layers=2", "hidden_size=128",
                         "n_routed_experts=16", "num_attention_heads=4"])
    cfg = train.mla.ModelConfig.from_hf(train.config_from_args(p, args).model)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.n_routed_experts, cfg.num_attention_heads) == (2, 128, 16, 4)
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.routed_scaling_factor) == (512, 1536, 2.827)  # from the file
    assert cfg.rope_scaling == k2["rope_scaling"]


def _torchrun(out, *extra, nproc=2):
    """train.py under torch.distributed.run (gloo, one thread per rank) on a free port; returns the process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           os.path.join(ROOT, "train.py"), "--quick", "--pretrain-steps", "4", "--sft-steps", "2", "--out", out, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_ranks_give_the_one_process_losses_and_resume_under_another_layout(tmp_path, capsys):
    """2 gloo ranks (EP 2 for pretraining; resumed from its DCP checkpoint as PP 2 for SFT) vs one process."""
    ref = str(tmp_path / "one")
    assert run_main(["--quick", "--pretrain-steps", "4", "--sft-steps", "2", "--stages", "pretrain,sft",
                     "--out", ref])[0] == 0
    out = str(tmp_path / "two")
    first = _torchrun(out, "--stages", "pretrain", "--ep", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert os.path.isdir(os.path.join(out, "ckpt", "last.dcp"))
    second = _torchrun(out, "--stages", "pretrain,sft", "--pp", "2", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("torchrun: 2 ranks = pp 2 x dp 1 x ep 1") == 1  # only rank 0 prints
    one, two = step_records(ref), step_records(out)
    assert [(r["stage"], r.get("step")) for r in one] == [(r["stage"], r.get("step")) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "aux_loss", "grad_norm", "s_max", "max_vio"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (a["stage"], a["step"], key, a[key], b[key])
        if "eval" in a:  # rank 0's assembled model is evaluated by the same code
            assert abs(a["eval"]["val_loss"] - b["eval"]["val_loss"]) < 1e-5
    for stage in ("pretrain", "sft"):
        w1, w2 = weights(ref, stage), weights(out, stage)
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    code, err = run_main(["--quick", "--pretrain-steps", "4", "--sft-steps", "2", "--stages", "pretrain,sft,rl",
                          "--out", out, "--resume"], capsys)
    assert code == 2 and "resume it under torchrun" in err  # a torchrun run (DCP) is not resumed in one process


def test_bad_layouts_and_rl_under_torchrun_are_refused(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_main(["--quick", "--stages", "pretrain", "--pp", "3", "--out", out], capsys)
    assert code == 2 and "argument --pp" in err and "does not divide the world size 2" in err
    code, err = run_main(["--quick", "--stages", "pretrain", "--ep", "2", "--pp", "2", "--out", out], capsys)
    assert code == 2 and "does not divide the world size 2" in err
    code, err = run_main(["--quick", "--out", out], capsys)
    assert code == 2 and "argument --stages: rl runs in one process for now" in err
    monkeypatch.setenv("WORLD_SIZE", "4")  # pp 2 x dp 2: SFT's 2 trajectories per step cannot split 4 ways
    code, err = run_main(["--quick", "--stages", "pretrain,sft", "--pp", "2", "--out", out], capsys)
    assert code == 2 and "SFT trajectories per step = 2 does not divide" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    code, err = run_main(["--quick", "--stages", "pretrain", "--ep", "2", "--out", out], capsys)
    assert code == 2 and "argument --ep" in err and "torchrun" in err
    assert not os.path.exists(out)  # nothing was written
