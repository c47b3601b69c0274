"""bench.py: the plumbing, not the speed. A --quick run of two rows writes JSON of the documented schema with positive,
finite ratios (no timing is asserted); the full-K/V-cache baseline computes the same attention as chapter 2's paths."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
bench = importlib.import_module("bench")
mla = importlib.import_module("02_mla")


def test_quick_rows_write_the_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--threads", "1", "--only", "moe", "--only",
                           "mla_decode", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {"command", "machine", "quick", "reps", "clock", "load_average", "seconds", "rows"} <= set(data)
    assert data["quick"] is True and data["machine"]["threads"] == 1
    assert [r["name"] for r in data["rows"]] == ["moe", "mla_decode"]
    for row in data["rows"]:
        assert row["available"] is True and len(row["lines"]) == 2
        assert row["peak_rss_mib"] > 0 and row["row_rss_mib"] >= 0
        for line in row["lines"]:
            assert {"what", "against", "ratio", "target", "met", "detail"} <= set(line)
            assert math.isfinite(line["ratio"]) and line["ratio"] > 0, line
            assert line["met"] in (True, False)


def test_unavailable_row_says_so():
    row = bench._run_row("engine", bench.Opts(quick=True, reps=1), threads=1)
    if not row["available"]:
        assert row["lines"] == [] and "not yet available" in row["notes"][0]


def test_full_kv_cache_decode_equals_the_latent_paths():
    torch.manual_seed(0)
    cfg = mla.ModelConfig.tiny()
    model = mla.Transformer(cfg).eval()
    attn = model.layers[0].self_attn
    B, T = 2, 9
    h = torch.randn(B, T, cfg.hidden_size)
    cos, sin = model.rope(0, T, torch.float32)
    cache = model.new_cache(B, T).layers[0]
    H = cfg.num_attention_heads
    k_full = torch.zeros(B, T, H, cfg.qk_head_dim)
    v_full = torch.zeros(B, T, H, cfg.v_head_dim)
    with torch.no_grad():
        for pos in range(T):  # token by token: every path fills its own cache
            x = h[:, pos:pos + 1]
            c, s = cos[pos:pos + 1], sin[pos:pos + 1]
            full = bench.full_kv_decode(attn, x, c, s, k_full, v_full, pos)
            absorbed = attn(x, c, s, start_pos=pos, cache=cache)
            naive = attn(x, c, s, start_pos=pos, cache=mla.LayerCache(cache.c_kv, cache.k_rope, False))
            torch.testing.assert_close(full, absorbed, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(full, naive, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attn(h, cos, sin)[:, -1:], full, rtol=1e-5, atol=1e-6)  # and the training path
