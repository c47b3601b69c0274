"""Chapter 2: MLA and the K2 decoder. Tiny configs, CPU fp32; transformers tests skip when it is absent."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import load

m = load("02_mla")
ModelConfig, Transformer = m.ModelConfig, m.Transformer

# The real Kimi K2 config.json, as published at https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json
K2_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 131072, "model_type": "kimi_k2", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
}

DSV3_CONFIG_JSON = {
    **K2_CONFIG_JSON, "model_type": "deepseek_v3", "ep_size": 1, "first_k_dense_replace": 3,
    "max_position_embeddings": 163840, "n_group": 8, "n_routed_experts": 256, "num_attention_heads": 128,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "topk_group": 4, "vocab_size": 129280, "bos_token_id": 0, "eos_token_id": 1,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls run fastest (and steadiest on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(**kw):
    """Smaller than tiny(): 3 layers (1 dense, 2 MoE), 8 experts top-2, so every test runs in about a second."""
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128,
                moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
    return ModelConfig.tiny(**{**base, **kw})


def yarn(factor=4.0, **kw):
    return dict(type="yarn", factor=factor, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                original_max_position_embeddings=64, **kw)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


# ---- counting ----

@pytest.mark.parametrize("name,cfg_fn,total,activated", [
    ("kimi_k2", lambda: ModelConfig.kimi_k2(), 1_026_408_209_408, 32_861_477_888),
    ("kimi_k2_128_heads", lambda: ModelConfig.kimi_k2(num_attention_heads=128), 1_031_653_186_560, 38_106_455_040),
    ("deepseek_v3", lambda: ModelConfig.deepseek_v3(), 671_026_404_352, 37_552_282_624),
])
def test_param_counts_exact(name, cfg_fn, total, activated):
    cfg = cfg_fn()
    assert m.count_params(cfg) == (total, activated)


def test_count_params_matches_a_real_model():
    cfg = small_cfg()
    model = make(cfg)
    total, act = m.count_params(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    idle = 2 * (8 - 2) * 3 * 64 * 32  # 2 MoE layers, 6 idle experts each
    assert act == total - idle


def test_kv_cache_and_flops():
    k2 = ModelConfig.kimi_k2()
    assert m.kv_cache_values_per_token(k2) == 576
    assert m.kv_cache_values_per_token(k2, "mha") == 64 * (192 + 128)
    assert m.kv_cache_values_per_token(k2, "gqa", 8) == 8 * 320
    k2_128 = ModelConfig.kimi_k2(num_attention_heads=128)
    ratio = m.flops_per_token(k2_128, 131072) / m.flops_per_token(k2, 131072)
    assert round(ratio - 1, 2) == 0.83  # the report's +83% at 128k
    assert m.flops_per_token(k2, 4096) < m.flops_per_token(k2, 131072)
    with pytest.raises(ValueError, match="convention"):
        m.flops_per_token(k2, 10, convention="kaplan")


# ---- config ----

def test_from_hf_real_configs_give_presets(tmp_path):
    assert ModelConfig.from_hf(K2_CONFIG_JSON) == ModelConfig.kimi_k2()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DSV3_CONFIG_JSON))
    assert ModelConfig.from_hf(str(path)) == ModelConfig.deepseek_v3()
    for cfg in (ModelConfig.tiny(), ModelConfig.kimi_k2(), small_cfg(q_lora_rank=0, rope_scaling=yarn())):
        back = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
        assert back == dataclasses.replace(cfg, bias_update_speed=back.bias_update_speed)


def test_from_hf_absent_keys_mean_what_transformers_reads():
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v3"})
    assert (cfg.q_lora_rank, cfg.num_attention_heads, cfg.n_routed_experts, cfg.rope_theta) == (1536, 128, 256, 1e4)
    assert ModelConfig.from_hf({"q_lora_rank": None}).q_lora_rank == 0  # null = no query bottleneck
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config()
    for key, value in m.HF_DEFAULTS.items():
        if key == "rope_theta":
            assert hf.rope_parameters["rope_theta"] == value
        elif key == "rope_scaling":
            assert hf.rope_parameters["rope_type"] == "default"
        else:
            assert getattr(hf, key) == value, key
    small = {k: v for k, v in small_cfg().to_hf().items() if k not in ("q_lora_rank", "num_attention_heads")}
    small["num_key_value_heads"] = None
    ours = ModelConfig.from_hf(small)
    theirs = transformers.DeepseekV3Config(**small)
    assert (ours.q_lora_rank, ours.num_attention_heads) == (theirs.q_lora_rank, theirs.num_attention_heads)


def test_from_hf_rejects_what_it_cannot_build():
    for key, value in (("hidden_act", "gelu"), ("topk_method", "greedy"), ("rope_interleave", False),
                       ("num_key_value_heads", 8), ("some_new_key", 1), ("attention_dropout", 0.1),
                       ("initializer_range", 0.01), ("seq_aux", False), ("qk_head_dim", 64), ("head_dim", 128)):
        with pytest.raises(ValueError, match=key):
            ModelConfig.from_hf({**K2_CONFIG_JSON, key: value})


@pytest.mark.parametrize("field,value", [
    ("num_attention_heads", 0), ("qk_rope_head_dim", 7), ("kv_lora_rank", -1), ("q_lora_rank", -2),
    ("first_k_dense_replace", 5), ("num_experts_per_tok", 9), ("n_group", 3), ("topk_group", 2),
    ("scoring_func", "relu"), ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_scaling", {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}),
    ("hidden_size", 64.0),
])
def test_bad_configs_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        small_cfg(**{field: value})


# ---- RoPE / YaRN ----

def test_yarn_factor_one_is_plain_rope():
    plain, scaled = small_cfg(), small_cfg(rope_scaling=yarn(factor=1.0))
    f0, a0 = m.rope_frequencies(plain)
    f1, a1 = m.rope_frequencies(scaled)
    torch.testing.assert_close(f0, f1, rtol=0, atol=0)
    assert a0 == a1 == 1.0 and m.softmax_scale(plain) == m.softmax_scale(scaled) == 24 ** -0.5
    x = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(make(plain)(x).logits, make(scaled)(x).logits, rtol=0, atol=0)


def test_yarn_stretches_low_frequencies_only():
    cfg = small_cfg(rope_scaling=yarn(factor=8.0))
    plain, _ = m.rope_frequencies(small_cfg())
    inv, attn = m.rope_frequencies(cfg)
    assert inv[0] == plain[0]  # fastest pair: many rotations inside the original window, kept
    torch.testing.assert_close(inv[-1], plain[-1] / 8)  # slowest pair: interpolated by the factor
    assert attn == 1.0  # mscale == mscale_all_dim
    assert math.isclose(m.softmax_scale(cfg), 24 ** -0.5 * (0.1 * math.log(8) + 1) ** 2)


def test_yarn_matches_transformers():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for cfg in (ModelConfig.kimi_k2(), ModelConfig.deepseek_v3()):
        hf_cfg = DeepseekV3Config(**cfg.to_hf())
        inv_hf, attn_hf = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
        inv, attn = m.rope_frequencies(cfg)
        torch.testing.assert_close(inv, inv_hf)
        assert math.isclose(attn, attn_hf)


def test_rope_is_a_relative_rotation():
    """q·k after RoPE depends only on the distance between positions."""
    cfg = small_cfg()
    model = make(cfg)
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = model.rope(0, 40, torch.float32)
    dot = lambda i, j: (m.apply_rope(q, cos[i], sin[i]) @ m.apply_rope(k, cos[j], sin[j])).item()  # noqa: E731
    assert math.isclose(dot(3, 1), dot(30, 28), rel_tol=1e-4)


# ---- MLA paths agree ----

def run_cached(model, x, chunks, absorbed, noise_future=False):
    """Feed x in the given chunk lengths through a latent cache; return the concatenated logits."""
    B, S = x.shape
    cache = model.new_cache(B, S + 3, absorbed=absorbed)
    if noise_future:  # slots not yet written must never be read
        for c in cache.layers:
            c.c_kv.normal_()
            c.k_rope.normal_()
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(x[:, pos:pos + n], start_pos=pos, cache=cache).logits)
        pos += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("cfg_kw", [{}, {"q_lora_rank": 0, "rope_scaling": yarn()}])
def test_cached_equals_uncached_and_absorbed_equals_naive(cfg_kw):
    cfg = small_cfg(**cfg_kw)
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(x).logits
        naive = run_cached(model, x, [5, 1, 4, 1, 1, 1, 1, 1, 1], absorbed=False)
        absorbed = run_cached(model, x, [5, 1, 4, 1, 1, 1, 1, 1, 1], absorbed=True)
        one_by_one = run_cached(model, x, [1] * 16, absorbed=True)
    for got in (naive, absorbed, one_by_one):
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(absorbed, naive, rtol=1e-4, atol=1e-5)


def test_decode_ignores_unwritten_cache_slots():
    cfg = small_cfg()
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        for absorbed in (False, True):
            clean = run_cached(model, x, [4, 1, 1, 3], absorbed)
            noisy = run_cached(model, x, [4, 1, 1, 3], absorbed, noise_future=True)
            assert torch.equal(clean, noisy)


def perturb_last(x, vocab):
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % vocab
    return y


PATHS = {"training": None, "prefill_naive": [12], "prefill_absorbed": [12],
         "decode_naive": [7, 5], "decode_absorbed": [7, 5]}  # decode: a 5-token chunk after a 7-token prefix


def logits_along(model, x, path):
    if PATHS[path] is None:
        return model(x).logits
    return run_cached(model, x, PATHS[path], absorbed=path.endswith("absorbed"))


@pytest.mark.parametrize("path", list(PATHS))
def test_causality_bit_exact(path):
    """Changing the last token never changes an earlier position's logits, to the bit (all attention paths).

    Dense FFNs here: an MoE's expert GEMMs change shape when the last token's routing changes, and a GEMM's
    rows can differ in the last ulp between M=1..3 and M>=4 kernels; that is covered exactly by the test below."""
    cfg = small_cfg(first_k_dense_replace=3)
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 12))
    with torch.no_grad():
        a, b = logits_along(model, x, path), logits_along(model, perturb_last(x, cfg.vocab_size), path)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])  # the test can fail: the last position did change


@pytest.mark.parametrize("path", list(PATHS))
def test_causality_whole_model_with_moe(path):
    """With MoE layers: d(earlier logits)/d(last token's embedding) is exactly zero, and a changed last token
    moves earlier logits by at most GEMM rounding (see above) while the last position changes a lot."""
    cfg = small_cfg()
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 12))
    emb = []
    hook = model.embed_tokens.register_forward_hook(lambda mod, inp, out: emb.append(out) or out.retain_grad())
    logits = logits_along(model, x, path)
    hook.remove()
    if len(emb) == 1:  # one forward (training, or a single prefill chunk): check the gradient
        h = emb[0]
        (logits[:, :-1] * torch.randn_like(logits[:, :-1])).sum().backward()
        assert torch.equal(h.grad[:, -1], torch.zeros_like(h.grad[:, -1]))
        assert h.grad[:, :-1].abs().sum() > 0
    with torch.no_grad():
        a, b = logits_along(model, x, path), logits_along(model, perturb_last(x, cfg.vocab_size), path)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


# ---- S_max for QK-Clip ----

def brute_force_s_max(mla, x, cos, sin):
    """max_{b, i, j <= i} q_i^h · k_j^h * scale, from the weights, one head at a time with explicit loops."""
    H, dn, dr, dv = mla.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    B, S, _ = x.shape
    c_q = mla.q_a_layernorm(mla.q_a_proj(x))
    q = (c_q @ mla.q_b_proj.weight.T).view(B, S, H, dn + dr)
    kv = x @ mla.kv_a_proj_with_mqa.weight.T
    c_kv, k_rope = mla.kv_a_layernorm(kv[..., :mla.kv_lora_rank]), kv[..., mla.kv_lora_rank:]
    w_kc = mla.kv_b_proj.weight.view(H, dn + dv, -1)[:, :dn]  # rows that make k_nope (W_kc)
    out = torch.full((H,), -math.inf)
    for h in range(H):
        qn, qr = q[:, :, h, :dn], m.apply_rope(q[:, :, h, dn:], cos, sin)
        kn, kr = c_kv @ w_kc[h].T, m.apply_rope(k_rope, cos, sin)
        for i in range(S):
            for j in range(i + 1):
                s = ((qn[:, i] * kn[:, j]).sum(-1) + (qr[:, i] * kr[:, j]).sum(-1)) * mla.softmax_scale
                out[h] = max(out[h], s.max().item())
    return out


def test_s_max_recording_is_exact_and_changes_nothing():
    cfg = small_cfg(rope_scaling=yarn())
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    seen = {}
    model.layers[1].self_attn.register_forward_pre_hook(lambda mod, args: None if seen else seen.update(x=args[0]))
    with torch.no_grad():
        ref = model(x).logits
        model.set_record_s_max(True)
        rec = model(x).logits
        s_train = model.s_max()
        rec_cached = run_cached(model, x, [6, 4], absorbed=True)
        s_cached_last = model.s_max()  # from the last chunk only
        model.set_record_s_max(False)
    assert torch.equal(ref, rec)
    torch.testing.assert_close(rec_cached, ref, rtol=1e-4, atol=1e-5)
    assert s_train.shape == (3, 4)
    cos, sin = model.rope(0, 10, torch.float32)
    brute = brute_force_s_max(model.layers[1].self_attn, seen["x"], cos, sin)
    torch.testing.assert_close(s_train[1], brute, rtol=1e-4, atol=1e-5)
    assert (s_cached_last[1] <= s_train[1] + 1e-4).all()  # the last chunk's queries are a subset


# ---- the decoder ----

def test_training_two_steps_every_param_gets_a_gradient():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg)
    names_before = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, cfg.vocab_size, (4, 17))
    losses = []
    for _ in range(2):
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert [n for n, _ in model.named_parameters()] == names_before  # nothing created lazily
    assert out.expert_load.shape == (2, 8) and out.expert_load.sum().item() == 2 * 4 * 16 * 2
    assert out.aux_loss.item() > 0
    assert losses[1] < losses[0]
    # generation uses an explicit cache: the module's state is unchanged by it
    keys = set(model.state_dict())
    model.generate(x[:, :3], 4, temperature=0)
    assert set(model.state_dict()) == keys


def test_targets_ignore_index_and_router_bias_update():
    cfg = small_cfg(aux_loss_alpha=0.0)
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    t = x.clone()
    t[:, :4] = -100
    out = model(x, t)
    ref = torch.nn.functional.cross_entropy(out.logits[:, 4:].flatten(0, 1), x[:, 4:].flatten())
    torch.testing.assert_close(out.loss, ref)
    m.update_router_biases_(model, out.expert_load, 0.1)
    b = model.moe_layers()[0].router.e_score_correction_bias
    assert b.abs().sum() > 0 and "e_score_correction_bias" in str(list(model.state_dict()))
    with pytest.raises(ValueError, match="MoE layers"):
        m.update_router_biases_(model, out.expert_load[:1], 0.1)


def test_pipeline_stage_slices_compose():
    cfg = small_cfg()
    full = make(cfg)
    first = Transformer(cfg, layer_ids=range(0, 2), head=False)
    last = Transformer(cfg, layer_ids=range(2, 3), embed=False)
    sd = full.state_dict()
    first.load_state_dict({k: v for k, v in sd.items() if k.startswith(("embed_tokens", "layers.0.", "layers.1."))})
    last.load_state_dict({k.replace("layers.2.", "layers.0."): v for k, v in sd.items()
                          if k.startswith(("layers.2.", "norm", "lm_head"))})
    x = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        h = first(x).hidden
        torch.testing.assert_close(last(h).logits, full(x).logits, rtol=0, atol=0)
    assert last.layers[0].is_moe and not first.layers[0].is_moe


def test_generate_batched_sampling_and_stop_tokens():
    cfg = small_cfg()
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 5))
    greedy = model.generate(x, 6, temperature=0)
    assert greedy.shape == (3, 11) and torch.equal(greedy[:, :5], x)
    assert torch.equal(greedy, model.generate(x, 6, temperature=0, use_cache=False))
    assert torch.equal(greedy, model.generate(x, 6, temperature=0, absorbed=False))
    assert torch.equal(greedy, model.generate(x, 6, temperature=1.0, top_k=1))
    assert torch.equal(greedy, model.generate(x, 6, temperature=1.0, top_p=1e-6))
    s1 = model.generate(x, 6, temperature=1.5, generator=torch.Generator().manual_seed(1))
    s2 = model.generate(x, 6, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)
    stop = int(greedy[0, 6])  # row 0 emits this at its 2nd new token
    out = model.generate(x, 6, temperature=0, stop_tokens=[stop], pad_token_id=0)
    assert out[0, 6] == stop and (out[0, 7:] == 0).all()
    with pytest.raises(ValueError, match="top_p"):
        model.generate(x, 2, top_p=1.5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 300, dtype=torch.long))


# ---- transformers interop ----

def test_hf_parity_logits_and_greedy_tokens():
    pytest.importorskip("transformers")
    cfg = small_cfg(n_group=2, topk_group=1, rope_scaling=yarn(), max_position_embeddings=256)
    model = make(cfg)
    for moe in model.moe_layers():  # a non-zero correction bias must travel with the export
        moe.router.e_score_correction_bias.normal_(0, 0.05)
    hf = m.hf_model(cfg, model).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(input_ids=x).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        hf_tokens = hf.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, 5, temperature=0), hf_tokens)
    # zeroing the bias on our side only must change routing, so the parity above really covered it
    for moe in model.moe_layers():
        moe.router.e_score_correction_bias.zero_()
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, theirs, atol=1e-5)


def test_hf_state_dict_round_trips_both_expert_layouts():
    cfg = small_cfg()
    model = make(cfg, seed=1)
    ref = model.state_dict()
    for layout in ("stacked", "per_expert"):
        hf_sd = m.to_hf_state_dict(model, expert_layout=layout)
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in hf_sd
        if layout == "stacked":
            assert hf_sd["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
        else:
            assert hf_sd["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 32)
        other = make(cfg, seed=2)
        other.load_state_dict(m.from_hf_state_dict(cfg, hf_sd), strict=True)
        for k, v in other.state_dict().items():
            assert torch.equal(v, ref[k]), k


def test_s_max_long_sequence_training_path_matches_cached_path():
    """Past 256 tokens the training path recomputes logits in query chunks; it must equal the one-shot logits."""
    cfg = small_cfg(max_position_embeddings=512)
    model = make(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 300))
    model.set_record_s_max(True)
    with torch.no_grad():
        model(x)
        s_train = model.s_max()
        run_cached(model, x, [300], absorbed=False)
        s_cached = model.s_max()
    torch.testing.assert_close(s_train, s_cached, rtol=1e-4, atol=1e-5)


# ---- mixed precision ----

def test_rope_and_s_max_stay_fp32_under_bf16():
    cfg = small_cfg(rope_scaling=yarn())
    ref = make(cfg)
    model = make(cfg).to(torch.bfloat16)
    assert model.rope_inv_freq.dtype == torch.float32 and torch.equal(model.rope_inv_freq, ref.rope_inv_freq)
    pos = torch.tensor(4096.0)
    k2_freq, _ = m.rope_frequencies(m.ModelConfig.kimi_k2())
    err = (pos * k2_freq.bfloat16().float() - pos * k2_freq).abs().max().item()
    assert err > 1.0  # K2's frequencies rounded to bf16 put the angle at position 4096 off by radians
    cos, sin = model.rope(0, 8, torch.float32)
    cos_ref, sin_ref = ref.rope(0, 8, torch.float32)
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    ref.set_record_s_max(True)
    model.set_record_s_max(True)
    with torch.no_grad():
        ref(x)
        out = model(x)
        s16 = model.s_max()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref(x)
            s_auto = ref.s_max()
        ref(x)
    assert out.logits.dtype == torch.bfloat16 and s16.dtype == s_auto.dtype == torch.float32
    torch.testing.assert_close(s16, ref.s_max(), rtol=0.1, atol=0.05)  # bf16 weights, same logits up to rounding
    torch.testing.assert_close(s_auto, ref.s_max(), rtol=0.1, atol=0.05)
