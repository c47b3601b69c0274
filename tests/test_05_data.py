"""Chapter 5: tokenizer, chat template, corpora, chunk-wise rephrasing, agentic synthesis (the sandbox: test_sandbox.py)."""

import itertools
import json
import random

import pytest
import torch
from conftest import load

d = load("05_data")


# ---- tokenizer and chat template ----

def _random_text(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xD800, 0xDFFF),
             (0x10000, 0x10FFFF), (0x0300, 0x036F)]
    return "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(n))


def test_tokenizer_round_trip_arbitrary_unicode():
    tok, rng = d.Tokenizer(), random.Random(0)
    fixed = ["", "héllo wörld", "日本語のテキスト", "🧑‍🚀🚀👍🏽", "\x00\x01\x7f\t\r\n", "e\u0301", "<|user|> <|eos|>",
             "\ufeff\u200b\U0010ffff"]
    for s in fixed + [_random_text(rng, rng.randint(1, 64)) for _ in range(300)]:
        ids = tok.encode(s)
        assert all(0 <= i < 256 for i in ids), "plain text must never produce special ids"
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode(s, allow_special=True)) == s
    assert tok.encode("<|user|>hi", allow_special=True)[0] == tok.special_to_id["<|user|>"]
    assert tok.vocab_size == 256 + len(d.SPECIAL_TOKENS)
    tok.decode([0xC3, 0x28, 0xFF])  # invalid UTF-8 from a model never raises
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])


def _conversation():
    return [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Add 2 and 3 <|assistant|> please"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": '{"result": 5}'},
        {"role": "assistant", "content": "It is 5."},
    ]


def test_chat_template_and_assistant_only_loss_mask():
    tok = d.Tokenizer()
    ids, mask = d.render_chat(_conversation(), tok)
    assert len(ids) == len(mask)
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|system|>Be helpful.<|end|><|user|>Add 2 and 3 <|assistant|> please<|end|>")
    assert text.endswith("<|assistant|>It is 5.<|end|><|eos|>")
    assert '<|tool_result|>{"name": "calculator", "content": {"result": 5}}<|/tool_result|>' in text  # not re-quoted
    # the user's literal "<|assistant|>" stays bytes: exactly two assistant role ids, one per assistant message
    assert ids.count(tok.special_to_id["<|assistant|>"]) == 2
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ('<|tool_call|>{"name": "calculator", "arguments": {"expression": "2+3"}}<|/tool_call|><|end|>'
                       "It is 5.<|end|>")
    for role in ("<|system|>", "<|user|>", "<|tool|>", "<|assistant|>", "<|bos|>", "<|eos|>"):
        assert all(m == 0 for i, m in zip(ids, mask) if i == tok.special_to_id[role])
    ids2, mask2 = d.render_chat(_conversation()[:2], tok, add_generation_prompt=True)
    assert ids2[-1] == tok.special_to_id["<|assistant|>"] and sum(mask2) == 0
    calls = d.parse_tool_calls(text)
    assert calls[0]["function"]["name"] == "calculator"
    assert json.loads(calls[0]["function"]["arguments"]) == {"expression": "2+3"}
    with pytest.raises(ValueError, match="role"):
        d.render_chat([{"role": "robot", "content": "x"}], tok)


# ---- corpora ----

def test_corpora_deterministic_per_seed():
    a, b, c = d.KnowledgeWorld(20, seed=3), d.KnowledgeWorld(20, seed=3), d.KnowledgeWorld(20, seed=4)
    assert a.almanac() == b.almanac() and a.almanac() != c.almanac()
    assert d.make_math_problems(10, seed=1) == d.make_math_problems(10, seed=1) != d.make_math_problems(10, seed=2)
    s1 = json.dumps(d.synthesize(14, seed=5)[0])
    assert s1 == json.dumps(d.synthesize(14, seed=5)[0]) != json.dumps(d.synthesize(14, seed=6)[0])
    with pytest.raises(ValueError, match="n_entities"):
        d.KnowledgeWorld(0)


def test_held_out_questions_never_in_training_and_qa_only_on_format_entities():
    world = d.KnowledgeWorld(16, seed=0)
    arms, fmt, held_out, _ = d.build_experiment_arms(world, n=3, seed=0)
    assert not {e.name for e in fmt} & {e.name for e in held_out}
    for epochs in arms.values():
        assert len(epochs) == 3
        corpus = "\n".join(doc for docs in epochs for doc in docs)
        for e in held_out:
            for attr in d.ATTRIBUTES:
                assert world.qa(e, attr)[0] not in corpus
            assert e.name in corpus  # ... but their biographies are there
        for e in fmt:
            assert "".join(world.qa(e, "pet")) in corpus
    # raw: the one fixed biography (name once, then "This person"); one rephrasing x N repeats the same
    # documents; N rephrasings are N different versions, which name the person instead of "This person"
    assert arms["raw"][0][0] == world.raw_document(world.entities[0]) and "This person" in arms["raw"][0][0]
    assert arms["one"][0] == arms["one"][2] != arms["raw"][0]
    assert arms["many"][0] != arms["many"][1]
    assert not any("This person" in doc or "Same person" in doc for docs in arms["many"] for doc in docs)


def test_math_learning_notes_keep_every_step():
    rng = random.Random(0)
    for p in d.make_math_problems(30, seed=0):
        note = d.math_learning_note(p, rng)
        assert d.check_math_note(p, note) is None
        assert "Key idea" in note
    p = d.make_math_problems(1, seed=0)[0]
    bad = d.math_learning_note(p).replace(f"Answer: {p.answer}", f"Answer: {p.answer + 1}")
    assert d.check_math_note(p, bad) is not None


# ---- rephrasing ----

def test_every_accepted_rephrasing_passes_fidelity_and_rejections_happen():
    world = d.KnowledgeWorld(12, seed=1)
    raw = world.almanac()
    rejected = accepted = 0
    for seed in range(12):
        rw = d.TemplateParaphraser(world, seed=seed, error_rate=0.3)
        res = d.rephrase_chunkwise(raw, rw, style=sorted(d.STYLES)[seed % len(d.STYLES)], check=world.fidelity)
        rejected += sum(res.rejected.values())
        if res.text is not None:
            accepted += 1
            assert world.fidelity(raw, res.text) is None
            assert res.text != raw.replace("\n\n", " ")
    assert rejected > 0 and accepted > 0


def test_corrupted_rewrites_are_rejected():
    world = d.KnowledgeWorld(4, seed=0)
    e = world.entities[0]
    src = world.raw_document(e)
    other = {a: next(v for v in vs if v != e.facts[a]) for a, vs in d.ATTRIBUTES.items()}
    assert world.fidelity(src, src) is None
    assert world.fidelity(src, src.replace(e.facts["pet"], other["pet"])) == "contradicted fact"
    assert world.fidelity(src, src.split(". ", 1)[1]) == "missing fact"
    two = world.raw_document(world.entities[1])
    assert world.fidelity(src, src + " " + two) == "unsupported fact"
    # back-references resolve through context: "This person" is the entity named last
    rewrite = f"This person was born in {e.facts['hometown']}."
    assert world.extract_facts(rewrite, context=f"About {e.name}.") == [(e.name, "hometown", e.facts["hometown"])]


def test_chunkwise_covers_every_chunk_in_order_with_rewritten_context():
    world = d.KnowledgeWorld(10, seed=2)
    text = world.almanac()
    calls = []

    def rewriter(chunk, *, context, style):
        calls.append((chunk, context, style))
        return f"<{len(calls)}>{chunk.upper()}"

    res = d.rephrase_chunkwise(text, rewriter, style="notes", chunk_chars=150, context_chars=200)
    chunks = d.split_chunks(text, 150)
    assert len(chunks) > 5 and [c for c, _, _ in calls] == chunks
    assert " ".join(chunks) == " ".join(text.split())  # chunks tile the text, in order, no sentence split
    outputs = [f"<{i + 1}>{c.upper()}" for i, c in enumerate(chunks)]
    for i, (_, context, style) in enumerate(calls):
        assert context == " ".join(outputs[:i])[-200:] and style == "notes"
    assert res.text == " ".join(outputs)
    with pytest.raises(ValueError, match="style"):
        d.rephrase_chunkwise(text, rewriter, style="limerick")


def test_rejected_chunk_is_retried_then_document_dropped():
    world = d.KnowledgeWorld(3, seed=0)
    text = world.almanac()
    res = d.rephrase_chunkwise(text, lambda c, **kw: "Nothing to see here.", check=world.fidelity, max_tries=2)
    assert res.text is None and res.attempts == 2 and res.rejected == {"missing fact": 2}


def test_lm_rewriter_adapter():
    seen = []
    rw = d.LMRewriter(lambda prompt: seen.append(prompt) or "rewritten")
    assert rw("A chunk.", context="Earlier.", style="first_person") == "rewritten"
    assert "first person" in seen[0] and "Earlier." in seen[0] and "A chunk." in seen[0]

    class Bigram(torch.nn.Module):  # any module returning .logits works
        def __init__(self, vocab):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, vocab)

        def forward(self, idx):
            return type("Out", (), {"logits": self.emb(idx)})()

    tok = d.Tokenizer()
    out = d.LMRewriter.from_model(Bigram(tok.vocab_size), tok, max_new_tokens=8)("x", context="", style="notes")
    assert isinstance(out, str)


# ---- agentic synthesis ----

def test_schema_validation():
    spec = d.TOOLS["add_to_cart"]["parameters"]
    assert d.validate_args(spec, {"product_id": "P1", "quantity": 2}) == []
    errs = d.validate_args(spec, {"product_id": 7, "quantity": "2", "color": "red"})
    assert any("product_id must be string" in e for e in errs)
    assert any("quantity must be integer" in e for e in errs)
    assert any("color is not a parameter" in e for e in errs)
    assert d.validate_args(spec, {"product_id": "P1", "quantity": 0})[0].endswith("got 0")
    assert d.validate_args(spec, {"product_id": "P1", "quantity": True})  # bool is not an integer
    assert "required" in d.validate_args(spec, {"quantity": 1})[0]
    assert d.validate_args(d.TOOLS["convert_units"]["parameters"], {"value": 1, "from_unit": "parsec",
                                                                     "to_unit": "km"})


def test_malformed_tool_calls_come_back_as_tool_messages():
    rt = d.ToolRuntime(["calculator", "convert_units", "kv_get", "add_days"])

    def call(name, raw):
        out = json.loads(rt.execute({"id": "x", "type": "function", "function": {"name": name, "arguments": raw}}))
        return out.get("error", "")

    assert "not valid JSON" in call("calculator", '{"expression": "1+1"')
    assert "must be a JSON object" in call("calculator", "[1, 2]")
    assert "unknown tool 'calculater'" in call("calculater", '{"expression": "1"}')
    assert "unknown tool" in call("run_python", '{"code": "1"}')  # exists, but not in this agent's subset
    assert "expression must be string" in call("calculator", '{"expression": 12}')
    assert "value must be number" in call("convert_units", '{"value": "3", "from_unit": "km", "to_unit": "mi"}')
    assert "is required" in call("convert_units", '{"value": 3}')
    assert "cannot convert" in call("convert_units", '{"value": 3, "from_unit": "km", "to_unit": "kg"}')
    assert "KeyError" in call("kv_get", '{"key": "nope"}')
    assert "ValueError" in call("add_days", '{"date": "2026-02-31", "days": 1}')
    assert "unsupported" in call("calculator", '{"expression": "__import__(\'os\').system(\'id\')"}')
    assert "too large" in call("calculator", '{"expression": "9 ** 9 ** 9"}')
    assert call("calculator", '{"expression": "(2 + 3) * 4"}') == ""
    assert [c["kind"] for c in rt.log][:5] == ["bad_json", "bad_json", "unknown_tool", "unknown_tool", "schema"]
    tok = d.Tokenizer()
    calls = d.parse_tool_calls('<|tool_call|>{"name": "calculator", "arguments": {"expression": "1+"<|/tool_call|>')
    assert "not valid JSON" in json.loads(rt.execute(calls[0]))["error"]
    assert tok.decode(tok.encode("ok")) == "ok"


def test_synthesized_trajectories_validate_against_schemas_and_rubrics():
    kept, counts = d.synthesize(28, seed=1)
    assert counts["kept"] == len(kept) > 0 and counts["trajectories"] == 28
    tok = d.Tokenizer()
    for rec in kept:
        msgs, specs = rec["messages"], {t["function"]["name"]: t["function"] for t in rec["tools"]}
        calls = {}
        for m in msgs:
            for c in m.get("tool_calls") or []:
                calls[c["id"]] = c
            if m["role"] == "tool":
                c = calls[m["tool_call_id"]]
                if "result" in json.loads(m["content"]):  # every successful call is schema-valid
                    args = json.loads(c["function"]["arguments"])
                    assert d.validate_args(specs[c["function"]["name"]]["parameters"], args) == []
        assert msgs[-1]["role"] == "assistant" and not msgs[-1].get("tool_calls")
        ids, mask = d.render_chat(msgs, tok)
        assert 0 < sum(mask) < len(ids)
    # the judge keeps exactly the trajectories without a fatal mistake
    policy = d.ScriptedExpert(seed=2, p_fatal=0.4)
    verdicts = []
    for task in d.make_tasks(42, seed=2):
        messages, runtime = d.simulate(task, policy)
        reasons = d.judge(task, messages, runtime)
        verdicts.append(policy.fatal)
        assert bool(reasons) == (policy.fatal is not None), (task.id, policy.fatal, reasons)
    assert any(verdicts) and not all(verdicts)


def test_write_jsonl_round_trip(tmp_path):
    kept, _ = d.synthesize(7, seed=0)
    path = str(tmp_path / "sft.jsonl")
    d.write_jsonl(path, kept)
    with open(path) as f:
        assert [json.loads(line) for line in f] == kept


# ---- the sandbox (sandbox.py; its own tests are tests/test_sandbox.py) ----

def test_chapter_re_exports_the_sandbox():
    import sandbox
    assert d.run_sandboxed is sandbox.run_sandboxed and d.run_many is sandbox.run_many
    assert d.SandboxResult is sandbox.SandboxResult


# ---- the experiment's training loop (smoke) ----

def test_token_stream_shuffles_epochs_and_cycles_to_equal_tokens():
    tok = d.Tokenizer()
    epochs = [["a b", "c d", "e f"], ["g h", "i j", "k l"]]
    one_pass = d.token_stream(epochs, tok, seed=0)
    assert one_pass.count(tok.bos_id) == 6 and one_pass == d.token_stream(epochs, tok, seed=0)
    first = tok.decode(one_pass[:15], skip_special=True)
    assert first in {"".join(p) for p in itertools.permutations(["a b", "c d", "e f"])}  # epoch 0 first, shuffled
    longer = d.token_stream(epochs, tok, seed=0, n_tokens=50)
    assert len(longer) == 50 and longer[:30] == one_pass  # cycled past the last epoch


def test_full_names_and_attribute_subset():
    world = d.KnowledgeWorld(12, seed=0, n_attributes=2)
    assert all(list(e.facts) == ["hometown", "occupation"] for e in world.entities)
    e = world.entities[0]
    assert world.raw_document(e, full_names=True).count(e.name) == 2 and world.raw_document(e).count(e.name) == 1
    with pytest.raises(ValueError, match="n_attributes"):
        d.KnowledgeWorld(4, n_attributes=5)


@pytest.mark.slow
def test_rephrase_experiment_runs_and_is_deterministic():
    try:
        load("02_mla")
    except Exception as e:
        pytest.skip(f"02_mla not importable: {e}")
    threads = torch.get_num_threads()
    kw = dict(n_entities=6, n=2, seq_len=32, batch_size=4, seeds=(0,), threads=1)
    try:
        a, b = d.rephrase_experiment(**kw), d.rephrase_experiment(**kw)
    finally:
        torch.set_num_threads(threads)
    assert [r["arm"] for r in a] == ["raw", "one", "many"]
    assert len({r["tokens"] for r in a}) == 1 and a[0]["tokens"] > 0  # equal training tokens per arm
    assert [(r["final_loss"], r["acc_held_out"], r["acc_format"]) for r in a] == \
        [(r["final_loss"], r["acc_held_out"], r["acc_format"]) for r in b]  # bit-identical for a fixed seed
    s = d.experiment_summary(a)["arms"]
    assert set(s) == {"raw", "one", "many"} and all(
        set(v) >= {"heldout_mean", "heldout_std", "format_mean", "seeds", "train_tokens"} for v in s.values())
    assert s["raw"]["seeds"] == 1 and s["raw"]["heldout_mean"] == 100 * a[0]["acc_held_out"]
