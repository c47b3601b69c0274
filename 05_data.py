"""Chapter 5: data. Rephrasing for token efficiency, agentic data synthesis, and a real execution sandbox.

K2 was pretrained on 15.5T tokens, and good tokens were the scarce resource. Two ideas from the report:

1. Rephrasing (K2 §2.2). Instead of reading the same knowledge text for ten epochs, rewrite it in different
   styles and perspectives and read each rewrite once. Long texts are rewritten chunk by chunk, each chunk
   with the already-rewritten text as context, then stitched; a fidelity check compares each rewrite with
   its source. Table 1 of the report (accuracy on SimpleQA, a benchmark of short fact-seeking questions): raw text x 10 epochs 23.76, one rephrasing x 10
   epochs 27.39, ten rephrasings x 1 epoch 28.94. Math documents are rewritten as "learning notes".
2. Agentic data synthesis (K2 §3.1.1). Tool specs -> agents (system prompt + tool subset) -> tasks with
   rubrics -> multi-turn trajectories (a user simulator, a stateful tool simulator with controlled
   failures, an agent policy) -> a judge that keeps only trajectories meeting their rubric. Coding tasks
   are verified by running their tests in a real execution sandbox.

    world facts ──► raw documents ──► rephrase_chunkwise ──► fidelity check ──► pretraining stream
    tool specs ──► agents ──► tasks+rubrics ──► simulate(user, policy, tools) ──► judge ──► SFT JSONL
                                                                   └─ code: run_sandboxed(tests)

Design choices
- Byte-level tokenizer (256 bytes + a dozen special tokens): lossless for any text, no training, and the
  chat template's role/tool markers are single ids a user's text can never forge.
- The knowledge world is synthetic, so fidelity is exact: parse the facts out of a rewrite and compare
  them with the source (every fact present, nothing contradicted). A rewriter is any callable
  `rewriter(chunk, context=..., style=...) -> str`: the offline template paraphraser here, or any LM.
- The experiment follows "Physics of Language Models 3.1": QA format is taught on some people and tested
  on the others, so the model must extract knowledge from documents, not recall QA text. The raw text is
  one fixed biography per person (name once, then "This person", facts always in the same order), so a fact
  can be memorised tied to the fact before it; rewrites vary style and order and name the person in each
  sentence, which is what lets the knowledge attach to the name (their bioS single vs multi+permute).
- The tool-use "expert" is scripted and knows the plan, but makes the mistakes models make (bad JSON,
  wrong argument types, unknown tools, giving up after a transient failure, arithmetic slips); errors
  come back as schema-validated tool messages, and the judge decides what is kept.
- The sandbox (sandbox.py, its own module since chapter 6 needs it too) composes bubblewrap: per program its
  own namespaces, a read-only root with only Python, a bounded tmpfs work dir, a uid and pids cgroup per
  concurrent slot, seccomp and rlimits. Without root or bwrap it degrades and says so in the result.

Simplified vs K2
- Rewriter: K2 uses a large LM with tuned prompts; ours is a template paraphraser (or a tiny LM via the
  adapter). Fidelity: K2 checks semantic alignment with a model; ours parses facts exactly.
- Scale: K2 synthesised 3000+ real MCP (Model Context Protocol, a standard for exposing tools to LLMs) tools and 20,000+ synthetic tools; here 15 tools in 8 domains.
- Judge: K2 uses an LLM judge against rubrics; ours checks rubrics programmatically.
- Sandbox: K2 runs Kubernetes-scale containers; ours is one process tree on one machine.
- Experiment (Table 1 in miniature): keeps the three curricula at equal training tokens, the fidelity-checked
  chunk-wise rewrites, and a closed-book QA test on people whose QA never appears in training. Drops: real
  text and SimpleQA (32 synthetic people x 4 facts, each one of 8 values; chance 12.5%), model size (chapter
  2's tiny K2 with 2 layers and 8 experts top-2, 0.46M parameters, trained with chapter 3's MuonClip), and
  N = 100 instead of 10 so that every arm memorises what it reads (100% on the format people). Over seeds
  0, 1, 2 the held-out accuracy is raw 20.8 / one rephrasing 22.9 / N rephrasings 40.1 % (K2: 23.76 / 27.39 /
  28.94; README has the table). Deterministic for fixed --seeds and --threads.

References
- Kimi K2: Open Agentic Intelligence, arXiv:2507.20534, §2.2 (rephrasing, Table 1), §3.1.1 (agentic data).
- Allen-Zhu & Li, Physics of Language Models Part 3.1, arXiv:2309.14316 (knowledge extraction needs augmentation).
- Maini et al., Rephrasing the Web (WRAP), arXiv:2401.16380. ACEBench, arXiv:2501.12851 (tool-use synthesis).

Run:
    python 05_data.py --help
    python 05_data.py                          # pipeline counts + one trajectory (5-10 s on 2 cores)
    python 05_data.py --rephrase-experiment    # Table 1 in miniature, 1 seed (about 4 min of CPU)
    python 05_data.py --rephrase-experiment --seeds 0,1,2 --json rephrase.json   # README's table
    python 05_data.py --sandbox-demo           # + hostile programs through the sandbox, pool throughput
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

import cli
import sandbox

# ---- tokenizer and chat template ----

SPECIAL_TOKENS = (
    "<|bos|>", "<|eos|>", "<|pad|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>",
    "<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>",
)
ROLES = ("system", "user", "assistant", "tool")


class Tokenizer:
    """Bytes 0..255 are ids 0..255; special tokens follow. decode(encode(s)) == s for every Python str.

    `encode(text)` never produces special ids (text that *looks* like "<|user|>" stays bytes, so user input
    cannot forge a role marker); `encode(text, allow_special=True)` maps the marker strings to their ids.
    """

    def __init__(self, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        self.special_tokens = tuple(special_tokens)
        self.special_to_id = {s: 256 + i for i, s in enumerate(self.special_tokens)}
        self.id_to_special = {i: s for s, i in self.special_to_id.items()}
        self.vocab_size = 256 + len(self.special_tokens)
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in self.special_tokens) + ")")
        for name in ("bos", "eos", "pad", "end"):
            setattr(self, f"{name}_id", self.special_to_id[f"<|{name}|>"])

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8", "surrogatepass"))  # surrogatepass: lone surrogates survive too
        ids: list[int] = []
        for piece in self._special_re.split(text):
            if piece in self.special_to_id:
                ids.append(self.special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8", "surrogatepass"))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        out, buf = [], bytearray()
        for i in (int(t) for t in ids):
            if i < 256:
                buf.append(i)
                continue
            out.append(_decode_bytes(buf))
            buf = bytearray()
            if i not in self.id_to_special:
                raise ValueError(f"ids: {i} is outside the vocabulary [0, {self.vocab_size})")
            if not skip_special:
                out.append(self.id_to_special[i])
        out.append(_decode_bytes(buf))
        return "".join(out)


def _decode_bytes(b: bytes) -> str:
    try:
        return b.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # model output may be any byte sequence
        return b.decode("utf-8", "replace")


def render_chat(messages: list[dict], tok: Tokenizer, add_generation_prompt: bool = False):
    """OpenAI-style messages -> (ids, loss_mask). The mask is 1 exactly on what the assistant writes.

    <|bos|> <|system|>...<|end|> <|user|>...<|end|> <|assistant|>text<|tool_call|>{json}<|/tool_call|><|end|>
    <|tool|><|tool_result|>{json}<|/tool_result|><|end|> ... <|eos|>
    The role tag `<|assistant|>` is prompt (mask 0); the assistant's text, tool calls and closing <|end|> are
    targets (mask 1), so the model learns what to say, how to call tools, and when to stop.
    """
    ids, mask = [tok.bos_id], [0]

    def put(piece_ids, m):
        ids.extend(piece_ids)
        mask.extend([m] * len(piece_ids))

    sp = tok.special_to_id
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: {role!r} is not one of {ROLES}")
        put([sp[f"<|{role}|>"]], 0)
        m = 1 if role == "assistant" else 0
        if role == "tool":  # a JSON result is inlined as JSON (not re-quoted into a string of escaped quotes)
            content = msg.get("content", "")
            try:
                content = json.loads(content) if content[:1] in "{[" else content
            except ValueError:
                pass
            body = json.dumps({"name": msg.get("name"), "content": content}, ensure_ascii=False)
            put([sp["<|tool_result|>"]] + tok.encode(body) + [sp["<|/tool_result|>"]], 0)
        else:
            put(tok.encode(msg.get("content") or ""), m)
        for call in msg.get("tool_calls") or []:
            fn = call["function"]  # arguments stay the raw string the model wrote (maybe malformed JSON)
            body = '{"name": ' + json.dumps(fn["name"]) + ', "arguments": ' + fn["arguments"] + "}"
            put([sp["<|tool_call|>"]] + tok.encode(body) + [sp["<|/tool_call|>"]], m)
        put([tok.end_id], m)
    if add_generation_prompt:
        put([sp["<|assistant|>"]], 0)
    else:
        put([tok.eos_id], 0)
    return ids, mask


def parse_tool_calls(text: str) -> list[dict]:
    """Pull `<|tool_call|>{...}<|/tool_call|>` spans out of generated text into OpenAI-style tool_calls.

    Malformed bodies are kept as raw argument strings: execution turns them into tool errors later.
    """
    calls = []
    for n, body in enumerate(re.findall(r"<\|tool_call\|>(.*?)<\|/tool_call\|>", text, flags=re.S)):
        name, args = "?", body
        m = re.match(r'\s*\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*(.*)$', body, flags=re.S)
        if m:
            name, args = m.group(1), m.group(2).rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args  # the wrapper's closing brace
        calls.append({"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": args}})
    return calls


# ---- corpora: a synthetic knowledge world and math word problems ----

ATTRIBUTES = {  # every value is unique across attributes, so a value word names its attribute
    "hometown": ["Velmora", "Quistan", "Dravenport", "Ostrelle", "Kaldor", "Brimhaven", "Sarnett", "Yllandor"],
    "occupation": ["glassblower", "cartographer", "beekeeper", "astronomer", "shipwright", "herbalist",
                   "clockmaker", "librarian"],
    "instrument": ["lute", "oboe", "cello", "harp", "zither", "bagpipes", "marimba", "viola"],
    "pet": ["ferret", "parrot", "tortoise", "greyhound", "iguana", "owl", "hedgehog", "goldfish"],
}
FIRST = ["Bralen", "Ysolde", "Tavik", "Merith", "Corvin", "Elsabet", "Dunmar", "Fenna", "Gorrin", "Halvi", "Isorel",
         "Jorund", "Kestra", "Lowen", "Maelis", "Norrik", "Oriane", "Pellam", "Quenna", "Rosk", "Sibra", "Tamsin",
         "Ulric", "Veska", "Wynn", "Xandra", "Yorick", "Zelda"]
LAST = ["Tosk", "Amberly", "Coldwater", "Drummond", "Everhart", "Farrow", "Greymantle", "Hollis", "Ironwood",
        "Jessup", "Kettle", "Larkspur", "Mossbank", "Nettleton", "Oakhurst", "Penrose", "Quill", "Redfern",
        "Stormont", "Thistle", "Underhill", "Vane", "Whitlock", "Yarrow"]
RAW_TEMPLATES = {"hometown": "{S} was born in {v}.", "occupation": "{S} works as a {v}.",
                 "instrument": "{S} plays the {v}.", "pet": "{S} keeps a {v} as a pet."}
QUESTION_TEMPLATES = {  # used only for QA; no training document ever contains a "Q:" line about a test entity
    "hometown": "Q: In which city was {name} born?\nA:", "occupation": "Q: What does {name} do for a living?\nA:",
    "instrument": "Q: Which instrument does {name} play?\nA:", "pet": "Q: What pet does {name} have?\nA:",
}


@dataclass(frozen=True)
class Style:
    name: str
    intro: str               # sentence introducing an entity ("" = none)
    ref: str                 # how a sentence refers back to the entity already in context
    templates: dict          # attribute -> list of templates with {S} (subject) and {v} (value)


_THIRD = {
    "hometown": ["{S} was born in {v}.", "{S} grew up in the city of {v}.", "{S} comes from {v}."],
    "occupation": ["{S} works as a {v}.", "By trade, {s} is a {v}.", "{S} earns a living as a {v}."],
    "instrument": ["{S} plays the {v}.", "In the evenings {s} practises the {v}.", "{S} is skilled at the {v}."],
    "pet": ["{S} keeps a {v} as a pet.", "{S} shares a home with a pet {v}.", "A {v} lives with {s} as a pet."],
}
STYLES = {
    "encyclopedic": Style("encyclopedic", "", "This person", _THIRD),
    "narrative": Style("narrative", "Here is the story of {name}.", "Our traveller", {
        "hometown": ["Our tale begins in {v}, where {s} was born."],
        "occupation": ["Years later {s} became a {v}."], "instrument": ["At night, {s} played the {v}."],
        "pet": ["A faithful {v} followed {s} everywhere."]}),
    "first_person": Style("first_person", "My name is {name}.", "I", {
        "hometown": ["I was born in {v}.", "{v} is my hometown."], "occupation": ["I work as a {v}."],
        "instrument": ["I play the {v}.", "My instrument is the {v}."], "pet": ["I have a {v} as a pet."]}),
    "notes": Style("notes", "", "Same person", {
        "hometown": ["{S}: born in {v}."], "occupation": ["{S}: a {v} by trade."],
        "instrument": ["{S}: plays the {v}."], "pet": ["{S}: keeps a pet {v}."]}),
}


def _articles(s: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", s)  # "a astronomer" -> "an astronomer"


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict  # attribute -> value


class KnowledgeWorld:
    """Fictional people with attributes. Documents state facts; `extract_facts` reads them back exactly."""

    def __init__(self, n_entities: int = 64, seed: int = 0, n_attributes: int = len(ATTRIBUTES)):
        if not 1 <= n_entities <= len(FIRST) * len(LAST):
            raise ValueError(f"n_entities: {n_entities} not in [1, {len(FIRST) * len(LAST)}]")
        if not 1 <= n_attributes <= len(ATTRIBUTES):
            raise ValueError(f"n_attributes: {n_attributes} not in [1, {len(ATTRIBUTES)}]")
        rng = random.Random(seed)
        self.attributes = dict(list(ATTRIBUTES.items())[:n_attributes])  # attribute -> its 8 values
        names = rng.sample([f"{a} {b}" for a in FIRST for b in LAST], n_entities)
        self.entities = [Entity(n, {a: rng.choice(vs) for a, vs in self.attributes.items()}) for n in names]
        self.by_name = {e.name: e for e in self.entities}
        self.value_attr = {v: a for a, vs in ATTRIBUTES.items() for v in vs}
        self._name_re = re.compile("|".join(re.escape(n) for n in sorted(self.by_name, key=len, reverse=True)))
        self._value_re = re.compile(r"\b(" + "|".join(map(re.escape, self.value_attr)) + r")\b")

    def raw_document(self, e: Entity, full_names: bool = False) -> str:
        """One fixed biography per entity: the name once, then back-references, like most real text
        (full_names: the name in every sentence, Physics of LM 3.1's "fullname" form)."""
        ref = STYLES["encyclopedic"].ref
        return " ".join(_articles(RAW_TEMPLATES[a].format(S=e.name if i == 0 or full_names else ref, v=v))
                        for i, (a, v) in enumerate(e.facts.items()))

    def almanac(self, entities=None) -> str:
        """A long text (many entities): the thing chunk-wise rephrasing is for."""
        return "\n\n".join(self.raw_document(e) for e in (entities or self.entities))

    def qa(self, e: Entity, attr: str) -> tuple[str, str]:
        return QUESTION_TEMPLATES[attr].format(name=e.name), " " + e.facts[attr]

    def extract_facts(self, text: str, context: str = "") -> list[tuple]:
        """(entity or None, attribute, value) for every value mentioned; the subject of a sentence without a
        name is the entity mentioned last (in this text, or else in `context`)."""
        found = self._name_re.findall(context)
        current = found[-1] if found else None
        facts = []
        for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
            names = self._name_re.findall(sentence)
            if names:
                current = names[0]
            facts += [(current, self.value_attr[v], v) for v in self._value_re.findall(sentence)]
        return facts

    def fidelity(self, source: str, rewrite: str, source_context: str = "", rewrite_context: str = "") -> str | None:
        """None when the rewrite states exactly the source's facts; else the rejection reason."""
        src = set(self.extract_facts(source, source_context))
        new = set(self.extract_facts(rewrite, rewrite_context))
        src_keys = {(e, a) for e, a, _ in src}
        if any((e, a) in src_keys for e, a, _ in new - src):
            return "contradicted fact"
        if src - new:
            return "missing fact"
        if new - src:
            return "unsupported fact"
        return None


@dataclass(frozen=True)
class MathProblem:
    topic: str
    question: str
    steps: tuple      # (text, result) pairs of the worked solution
    answer: int

    def solution(self) -> str:
        body = " ".join(f"Step {i + 1}: {t} = {r}." for i, (t, r) in enumerate(self.steps))
        return f"{self.question}\nSolution: {body} Answer: {self.answer}."


def make_math_problems(n: int, seed: int = 0) -> list[MathProblem]:
    """Word problems with worked solutions (integers only, so every step can be checked exactly)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        who, kind = rng.choice(FIRST), rng.choice(["shopping", "sharing", "distance", "discount", "stickers"])
        if kind == "shopping":
            a, p, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
            q = f"{who} buys {a} notebooks at {p} coins each and a pen for {c} coins. How many coins in total?"
            steps = ((f"{a} x {p}", a * p), (f"{a * p} + {c}", a * p + c))
        elif kind == "sharing":
            k, m = rng.randint(2, 9), rng.randint(2, 12)
            q = f"{who} shares {k * m} marbles equally among {k} friends. How many marbles does each friend get?"
            steps = ((f"{k * m} / {k}", m),)
        elif kind == "distance":
            v, h = rng.choice([40, 50, 60, 80, 90]), rng.randint(2, 6)
            q = f"A train travels at {v} km per hour for {h} hours. How many km does it cover?"
            steps = ((f"{v} x {h}", v * h),)
        elif kind == "discount":
            p, d = rng.choice([40, 60, 80, 120, 200]), rng.choice([10, 25, 50])
            q = f"A coat costs {p} coins and {who} gets {d}% off. What does {who} pay?"
            steps = ((f"{d}% of {p}", p * d // 100), (f"{p} - {p * d // 100}", p - p * d // 100))
        else:
            a, b, c = rng.randint(20, 60), rng.randint(1, 19), rng.randint(1, 30)
            q = f"{who} had {a} stickers, gave away {b}, then won {c} more. How many stickers now?"
            steps = ((f"{a} - {b}", a - b), (f"{a - b} + {c}", a - b + c))
        out.append(MathProblem(kind, q, steps, steps[-1][1]))
    return out


# ---- rephrasing: chunk-wise rewriting with a fidelity check ----

Rewriter = Callable[..., str]  # rewriter(chunk, *, context, style) -> rewritten chunk


def split_chunks(text: str, chunk_chars: int = 240) -> list[str]:
    """Greedy sentence packing: chunks never split a sentence and stay under chunk_chars when they can."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars: must be >= 1, got {chunk_chars}")
    chunks, cur = [], ""
    for s in re.split(r"(?<=[.!?])\s+", text.strip()):
        if cur and len(cur) + 1 + len(s) > chunk_chars:
            chunks.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    return chunks + [cur] if cur else chunks


@dataclass
class RephraseResult:
    text: str | None                 # the stitched rewrite, or None when a chunk never passed the check
    chunks: list[str]
    rewrites: list[str]              # accepted rewrite per chunk (in order)
    attempts: int = 0
    rejected: dict = field(default_factory=dict)   # reason -> count


def rephrase_chunkwise(text: str, rewriter: Rewriter, style: str = "encyclopedic", chunk_chars: int = 240,
                       context_chars: int = 600, check=None, max_tries: int = 3) -> RephraseResult:
    """Split -> rewrite each chunk in order, seeing the last `context_chars` of the *rewritten* text -> stitch.

    check(source_chunk, rewrite, source_context, rewrite_context) -> reason or None. A rejected rewrite is
    dropped (and counted) and the chunk retried; after max_tries the whole document's rephrasing is dropped.
    """
    if style not in STYLES:
        raise ValueError(f"style: {style!r} is not one of {sorted(STYLES)}")
    chunks = split_chunks(text, chunk_chars)
    res = RephraseResult(None, chunks, [])
    for i, chunk in enumerate(chunks):
        context = " ".join(res.rewrites)[-context_chars:]
        source_context = " ".join(chunks[:i])[-context_chars:]
        for _ in range(max_tries):
            res.attempts += 1
            out = rewriter(chunk, context=context, style=style).strip()
            reason = check(chunk, out, source_context, context) if check else None
            if reason is None:
                res.rewrites.append(out)
                break
            res.rejected[reason] = res.rejected.get(reason, 0) + 1
        else:
            return res
    res.text = " ".join(res.rewrites)
    return res


class TemplateParaphraser:
    """The offline default rewriter: reads a chunk's facts and re-renders them in a style, in a new order,
    switching to a back-reference ("I", "This person") when the context already introduced the entity.

    `error_rate` makes it behave like an imperfect LM rewriter (drops a fact, swaps a value, invents a fact),
    so the fidelity check has something to catch.
    """

    def __init__(self, world: KnowledgeWorld, seed: int = 0, error_rate: float = 0.0, back_ref_prob: float = 0.7):
        self.world, self.rng, self.error_rate = world, random.Random(seed), error_rate
        self.back_ref_prob = back_ref_prob  # 0: repeat the full name (styles with an intro still refer back)

    def __call__(self, chunk: str, *, context: str = "", style: str = "encyclopedic") -> str:
        st, rng, w = STYLES[style], self.rng, self.world
        facts = list(dict.fromkeys(w.extract_facts(chunk, context)))  # the subject may come from context
        if rng.random() < self.error_rate and facts:
            facts = self._corrupt(facts)
        seen = w._name_re.findall(context)
        last = seen[-1] if seen else None
        groups: dict = {}
        for e, a, v in facts:
            groups.setdefault(e, []).append((a, v))
        out = []
        for e, av in groups.items():
            rng.shuffle(av)
            back_ref = e == last and rng.random() < self.back_ref_prob
            if st.intro and not back_ref:
                out.append(st.intro.format(name=e))
                back_ref = True
            for a, v in av:
                subj = st.ref if back_ref else e
                t = rng.choice(st.templates[a])
                sent = t.format(S=subj, s=subj if subj == "I" else (e if not back_ref else subj.lower()), v=v)
                out.append(_articles(sent[0].upper() + sent[1:]))
                back_ref = self.back_ref_prob > 0
            last = e
        return " ".join(out)

    def _corrupt(self, facts):
        kind, i = self.rng.choice(["drop", "swap", "invent"]), self.rng.randrange(len(facts))
        e, a, v = facts[i]
        if kind == "drop" and len(facts) > 1:
            return facts[:i] + facts[i + 1:]
        if kind == "swap":
            return facts[:i] + [(e, a, next(x for x in ATTRIBUTES[a] if x != v))] + facts[i + 1:]
        missing = [x for x in ATTRIBUTES if x not in {b for f, b, _ in facts if f == e}]
        return facts + ([(e, missing[0], ATTRIBUTES[missing[0]][0])] if missing else [])


class LMRewriter:
    """Adapter: drive any language model as a rewriter. `generate(prompt: str) -> str` is all it needs;
    `from_model` wraps chapter 2's Transformer (or anything with forward(idx).logits) with our tokenizer."""

    PROMPTS = {s: f"Rewrite the passage in a {s.replace('_', ' ')} style. Keep every fact; add none."
               for s in STYLES}

    def __init__(self, generate: Callable[[str], str]):
        self.generate = generate

    def __call__(self, chunk: str, *, context: str = "", style: str = "encyclopedic") -> str:
        prompt = f"{self.PROMPTS[style]}\nAlready rewritten: {context}\nPassage: {chunk}\nRewrite:"
        return self.generate(prompt)

    @classmethod
    def from_model(cls, model, tok: Tokenizer, max_new_tokens: int = 200, temperature: float = 0.8, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)

        @torch.no_grad()
        def generate(prompt: str) -> str:
            ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
            out = []
            for _ in range(max_new_tokens):  # plain sampling loop: works with any causal LM's logits
                logits = model(ids).logits[0, -1].float() / temperature
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                if nxt.item() in (tok.eos_id, tok.end_id):
                    break
                out.append(nxt.item())
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            return tok.decode(out, skip_special=True)

        return cls(generate)

    @classmethod
    def from_transformers(cls, name_or_path: str, max_new_tokens: int = 200):
        """Any local Hugging Face causal LM (imported lazily; nothing is downloaded unless you ask for it)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        hf_tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)

        def generate(prompt: str) -> str:
            ids = hf_tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True)
            return hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

        return cls(generate)


TOPIC_IDEAS = {
    "shopping": ("Total cost", "multiply quantity by unit price, then add the extras",
                 "a total is a sum of parts; each part is count times price"),
    "sharing": ("Equal sharing", "equal sharing is division", "check by multiplying back"),
    "distance": ("Distance from speed and time", "distance = speed x time", "units: km per hour x hours = km"),
    "discount": ("Percent discounts", "find the discount as a percentage of the price, then subtract it",
                 "p% of x is x * p / 100"),
    "stickers": ("Running totals", "apply each change in order", "take away for losses, add for gains"),
}


def math_learning_note(p: MathProblem, rng: random.Random | None = None) -> str:
    """Rewrite a worked solution as a learning note (K2 §2.2: math into 'learning-note' style)."""
    title, idea, takeaway = TOPIC_IDEAS[p.topic]
    rng = rng or random.Random(0)
    steps = " ".join(f"({i + 1}) {t} = {r}." for i, (t, r) in enumerate(p.steps))
    opener = rng.choice(["Learning note", "Study note", "Notes to self"])
    return (f"{opener}: {title}.\nProblem: {p.question}\nKey idea: {idea}.\nWorking: {steps}\n"
            f"Check: the final step gives {p.answer}, which answers the question.\nTakeaway: {takeaway}. "
            f"Answer: {p.answer}.")


def check_math_note(p: MathProblem, note: str) -> str | None:
    """Fidelity for math: every intermediate result and the final answer survive the rewrite."""
    nums = set(re.findall(r"-?\d+", note))
    if any(str(r) not in nums for _, r in p.steps):
        return "missing step"
    m = re.search(r"Answer:\s*(-?\d+)", note)
    if not m or int(m.group(1)) != p.answer:
        return "wrong answer"
    return None


# ---- the execution sandbox ----

# The sandbox is a module of its own (sandbox.py): bubblewrap namespaces, a read-only root, a bounded tmpfs
# work dir, a uid and a pids cgroup per concurrent slot, seccomp, rlimits. This chapter runs the code tasks'
# tests with run_sandboxed; chapter 6 scores many rollouts at once with run_many.
SandboxResult, run_sandboxed, run_many = sandbox.SandboxResult, sandbox.run_sandboxed, sandbox.run_many


# ---- agentic synthesis: tool specs and schema validation ----

def _tool(name, domain, description, properties, required=None, simulated=False):
    return {"name": name, "domain": domain, "description": description, "simulated": simulated,
            "parameters": {"type": "object", "properties": properties,
                           "required": list(properties) if required is None else required,
                           "additionalProperties": False}}


def _arg(type_, description, **kw):
    return {"type": type_, "description": description, **kw}


UNITS = {"km": ("length", 1000.0), "m": ("length", 1.0), "mi": ("length", 1609.344), "ft": ("length", 0.3048),
         "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "l": ("volume", 1.0), "gal": ("volume", 3.785411784)}
DATE = r"^\d{4}-\d{2}-\d{2}$"
TOOL_SPECS = [
    _tool("calculator", "math", "Evaluate an arithmetic expression with + - * / ** and parentheses.",
          {"expression": _arg("string", "e.g. '3 * (4 + 5)'")}),
    _tool("convert_units", "units", "Convert a quantity between units of the same kind.",
          {"value": _arg("number", "the quantity"), "from_unit": _arg("string", "unit", enum=sorted(UNITS)),
           "to_unit": _arg("string", "unit", enum=sorted(UNITS))}),
    _tool("days_between", "dates", "Number of days from start to end (ISO dates).",
          {"start": _arg("string", "YYYY-MM-DD", pattern=DATE), "end": _arg("string", "YYYY-MM-DD", pattern=DATE)}),
    _tool("add_days", "dates", "The ISO date `days` days after `date`.",
          {"date": _arg("string", "YYYY-MM-DD", pattern=DATE), "days": _arg("integer", "may be negative")}),
    _tool("kv_set", "memory", "Store a value under a key.", {"key": _arg("string", "key"),
                                                              "value": _arg("string", "value")}),
    _tool("kv_get", "memory", "Read the value stored under a key.", {"key": _arg("string", "key")}),
    _tool("search_flights", "travel", "List flights between two cities on a date.",
          {"origin": _arg("string", "city"), "destination": _arg("string", "city"),
           "date": _arg("string", "YYYY-MM-DD", pattern=DATE)}, simulated=True),
    _tool("book_flight", "travel", "Book a seat on a flight.", {"flight_id": _arg("string", "from search_flights"),
                                                               "passenger": _arg("string", "full name")},
          simulated=True),
    _tool("cancel_booking", "travel", "Cancel a booking.", {"booking_id": _arg("string", "id")}, simulated=True),
    _tool("search_products", "shopping", "Search the catalogue.", {"query": _arg("string", "product kind"),
                                                                  "max_price": _arg("number", "optional cap")},
          required=["query"], simulated=True),
    _tool("add_to_cart", "shopping", "Put a product in the cart.",
          {"product_id": _arg("string", "id"), "quantity": _arg("integer", "how many", minimum=1)}, simulated=True),
    _tool("checkout", "shopping", "Pay for the cart and place the order.", {}, simulated=True),
    _tool("create_event", "calendar", "Add an event to the calendar.",
          {"title": _arg("string", "title"), "date": _arg("string", "YYYY-MM-DD", pattern=DATE),
           "time": _arg("string", "HH:MM", pattern=r"^\d{2}:\d{2}$")}, simulated=True),
    _tool("list_events", "calendar", "Events on a date.", {"date": _arg("string", "YYYY-MM-DD", pattern=DATE)},
          simulated=True),
    _tool("run_python", "code", "Run a Python program in a sandbox; returns exit code, stdout and stderr.",
          {"code": _arg("string", "a complete program")}),
]
TOOLS = {t["name"]: t for t in TOOL_SPECS}


def validate_args(schema: dict, value, path: str = "arguments") -> list[str]:
    """The subset of JSON Schema the specs use: type, properties, required, additionalProperties, enum,
    minimum, pattern. Returns readable errors (empty = valid)."""
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}
    t = schema.get("type")
    if t and (not isinstance(value, types[t]) or (isinstance(value, bool) and t in ("integer", "number"))):
        return [f"{path} must be {t}, got {type(value).__name__} {json.dumps(value)[:40]}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path} must be one of {schema['enum']}, got {json.dumps(value)}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path} must be >= {schema['minimum']}, got {value}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path} must match {schema['pattern']}, got {json.dumps(value)}")
    if t == "object":
        props = schema.get("properties", {})
        errors += [f"{path}.{k} is required" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}.{k} is not a parameter (allowed: {sorted(props)})" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += validate_args(props[k], v, f"{path}.{k}")
    return errors


def safe_eval(expression: str) -> float:
    """Arithmetic only: numbers, + - * / // % **, unary +/-; no names, calls or attributes."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a ** b if abs(b) <= 64 else _raise(ValueError("exponent too large"))}

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    return ev(ast.parse(expression, mode="eval"))


def _raise(e):
    raise e


# ---- agentic synthesis: a stateful tool runtime (real tools + simulated services with failures) ----

class ToolRuntime:
    """Executes tool calls for one trajectory. Real tools run Python; simulated ones read and write `state`.

    `failures` = {tool name: n} makes the first n calls of that tool fail with a transient error (controlled
    failure injection). `execute` never raises: every problem becomes {"error": ...} for the agent to read.
    """

    def __init__(self, tools: list[str], world: dict | None = None, failures: dict | None = None):
        self.tools = {n: TOOLS[n] for n in tools}
        self.state = {"kv": {}, "bookings": {}, "cart": [], "orders": [], "events": []}
        self.world = world or {}
        self.failures = dict(failures or {})
        self.log: list[dict] = []   # one entry per call: name, ok, error kind

    def execute(self, call: dict) -> str:
        name, raw = call["function"]["name"], call["function"]["arguments"]
        kind, out = "ok", None
        if name not in self.tools:
            kind, out = "unknown_tool", {"error": f"unknown tool {name!r}; available: {sorted(self.tools)}"}
        else:
            try:
                args = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as e:
                args, kind, out = None, "bad_json", {"error": f"arguments are not valid JSON: {e.msg} at {e.pos}"}
            if out is None and not isinstance(args, dict):
                kind, out = "bad_json", {"error": "arguments must be a JSON object"}
            if out is None and (errs := validate_args(self.tools[name]["parameters"], args)):
                kind, out = "schema", {"error": "invalid arguments: " + "; ".join(errs)}
            if out is None and self.failures.get(name, 0) > 0:
                self.failures[name] -= 1
                kind, out = "transient", {"error": "503 service temporarily unavailable, retry later"}
            if out is None:
                try:
                    out = {"result": getattr(self, "_" + name)(**args)}
                except Exception as e:  # noqa: BLE001 - a failing tool is an observation, never a crash
                    kind, out = "tool_error", {"error": f"{type(e).__name__}: {e}"}
        self.log.append({"name": name, "ok": kind == "ok", "kind": kind, "id": call["id"]})
        return json.dumps(out)

    # real tools
    def _calculator(self, expression):
        return round(safe_eval(expression), 6)

    def _convert_units(self, value, from_unit, to_unit):
        (k1, f1), (k2, f2) = UNITS[from_unit], UNITS[to_unit]
        if k1 != k2:
            raise ValueError(f"cannot convert {k1} ({from_unit}) to {k2} ({to_unit})")
        return round(value * f1 / f2, 4)

    def _days_between(self, start, end):
        return (_date(end) - _date(start)).days

    def _add_days(self, date, days):
        return (_date(date) + _timedelta(days=days)).isoformat()

    def _kv_set(self, key, value):
        self.state["kv"][key] = value
        return "stored"

    def _kv_get(self, key):
        if key not in self.state["kv"]:
            raise KeyError(f"no value stored under {key!r}")
        return self.state["kv"][key]

    def _run_python(self, code):
        r = run_sandboxed(code, timeout_s=5.0, memory_mb=256)
        return {"exit_code": r.exit_code, "timed_out": r.timed_out, "stdout": r.stdout[-800:],
                "stderr": r.stderr[-800:]}

    # simulated services: answers come from the task's world, effects go to `state`
    def _search_flights(self, origin, destination, date):
        return [f for f in self.world.get("flights", []) if (f["from"], f["to"], f["date"]) == (origin, destination,
                                                                                                 date)]

    def _book_flight(self, flight_id, passenger):
        if not any(f["id"] == flight_id for f in self.world.get("flights", [])):
            raise ValueError(f"no flight {flight_id!r}")
        booking = f"BK{len(self.state['bookings']) + 1:04d}"
        self.state["bookings"][booking] = {"flight_id": flight_id, "passenger": passenger}
        return {"booking_id": booking}

    def _cancel_booking(self, booking_id):
        if self.state["bookings"].pop(booking_id, None) is None:
            raise KeyError(f"no booking {booking_id!r}")
        return "cancelled"

    def _search_products(self, query, max_price=None):
        return [p for p in self.world.get("products", [])
                if query.lower() in p["name"].lower() and (max_price is None or p["price"] <= max_price)]

    def _add_to_cart(self, product_id, quantity):
        if not any(p["id"] == product_id for p in self.world.get("products", [])):
            raise ValueError(f"no product {product_id!r}")
        self.state["cart"].append({"product_id": product_id, "quantity": quantity})
        return {"cart_size": len(self.state["cart"])}

    def _checkout(self):
        if not self.state["cart"]:
            raise ValueError("cart is empty")
        self.state["orders"].append(self.state["cart"])
        self.state["cart"] = []
        return {"order_id": f"OR{len(self.state['orders']):04d}"}

    def _create_event(self, title, date, time):
        _date(date)
        self.state["events"].append({"title": title, "date": date, "time": time})
        return "created"

    def _list_events(self, date):
        return [e for e in self.state["events"] if e["date"] == date]


def _date(s: str):
    import datetime
    return datetime.date.fromisoformat(s)


def _timedelta(**kw):
    import datetime
    return datetime.timedelta(**kw)


# ---- agentic synthesis: agents, tasks with rubrics, user simulator, expert policy, judge ----

AGENTS = {
    "analyst": ("You are a careful assistant for numbers, units, dates and notes. Use tools for every "
                "computation; never guess.", ["calculator", "convert_units", "days_between", "add_days",
                                              "kv_set", "kv_get"]),
    "travel_agent": ("You are a travel agent. Find and book flights and keep the customer's calendar.",
                     ["search_flights", "book_flight", "cancel_booking", "create_event", "days_between"]),
    "shop_assistant": ("You are a shopping assistant. Find products, fill the cart and check out.",
                       ["search_products", "add_to_cart", "checkout", "calculator", "convert_units"]),
    "coder": ("You are a programmer. Write the requested function, test it with run_python, and reply with "
              "the final code in a ```python block.", ["run_python"]),
}
CITIES = ATTRIBUTES["hometown"]
PERSONAS = [("terse", "{goal}"), ("polite", "Hello! Could you please help me? {goal} Thank you."),
            ("chatty", "Hi there, hope your day is going well! {goal} That's all, I think.")]
CODE_PROBLEMS = {  # name: (request, correct solution, buggy solution, tests)
    "is_palindrome": ("Write is_palindrome(s) that ignores case and non-letters.",
                      "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalpha()]\n    return t == t[::-1]\n",
                      "def is_palindrome(s):\n    return s == s[::-1]\n",
                      "assert is_palindrome('Never odd or even')\nassert not is_palindrome('abc')\n"),
    "running_sum": ("Write running_sum(xs) returning the prefix sums of a list.",
                    "def running_sum(xs):\n    out, t = [], 0\n    for x in xs:\n        t += x\n        out.append(t)\n"
                    "    return out\n",
                    "def running_sum(xs):\n    return [sum(xs[:i]) for i in range(len(xs))]\n",
                    "assert running_sum([1, 2, 3]) == [1, 3, 6]\nassert running_sum([]) == []\n"),
    "gcd": ("Write gcd(a, b) for non-negative integers.",
            "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
            "def gcd(a, b):\n    return min(a, b)\n",
            "assert gcd(12, 18) == 6\nassert gcd(7, 0) == 7\nassert gcd(9, 4) == 1\n"),
    "word_count": ("Write word_count(text) returning a dict of lower-cased word counts.",
                   "def word_count(text):\n    d = {}\n    for w in text.lower().split():\n        d[w] = d.get(w, 0) + 1\n"
                   "    return d\n",
                   "def word_count(text):\n    return {w: 1 for w in text.split()}\n",
                   "assert word_count('a A b') == {'a': 2, 'b': 1}\nassert word_count('') == {}\n"),
}


@dataclass
class Rubric:
    required_calls: tuple = ()          # tools that must have succeeded at least once
    expected_answer: str | None = None  # must appear in the final assistant message
    expected_state: dict | None = None  # subset of the runtime state at the end
    tests: str | None = None            # code tasks: the final code must pass these in the sandbox
    max_turns: int = 16


@dataclass
class Task:
    id: str
    kind: str
    agent: str
    goal: str                 # what the user wants, in words
    slots: dict               # facts the user knows; some are held back until asked
    withheld: str | None      # slot the user forgets to mention at first
    rubric: Rubric
    world: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    persona: tuple = ("terse", "{goal}")


def make_tasks(n: int, seed: int = 0, failure_rate: float = 0.2) -> list[Task]:
    """Tasks with explicit rubrics, drawn across the agents' domains."""
    rng, tasks = random.Random(seed), []
    kinds = ["arith", "convert", "dates", "remember", "flight", "shop", "code"]
    for i in range(n):
        kind, persona = kinds[i % len(kinds)], rng.choice(PERSONAS)
        tid = f"task{i:04d}-{kind}"
        if kind == "arith":
            q, p, t = rng.randint(2, 9), rng.choice([4.5, 12.0, 19.99, 7.25]), rng.choice([5, 8, 20])
            ans = f"{round(q * p * (1 + t / 100), 2):g}"
            task = Task(tid, kind, "analyst", f"What do {q} items at {p} each cost with {t}% tax?",
                        {"q": q, "p": p, "t": t}, None, Rubric(("calculator",), ans))
        elif kind == "convert":
            kind_units = rng.choice([("km", "mi"), ("mi", "km"), ("kg", "lb"), ("gal", "l"), ("ft", "m")])
            v = rng.randint(1, 200)
            ans = f"{round(v * UNITS[kind_units[0]][1] / UNITS[kind_units[1]][1], 4):g}"
            task = Task(tid, kind, "analyst", f"How much is {v} {kind_units[0]} in {kind_units[1]}?",
                        {"v": v, "from": kind_units[0], "to": kind_units[1]}, None, Rubric(("convert_units",), ans))
        elif kind == "dates":
            a = _date("2026-01-01") + _timedelta(days=rng.randint(0, 300))
            b = a + _timedelta(days=rng.randint(1, 120))
            task = Task(tid, kind, "analyst", f"How many days are there from {a} to {b}?",
                        {"start": a.isoformat(), "end": b.isoformat()}, None,
                        Rubric(("days_between",), str((b - a).days)))
        elif kind == "remember":
            key, val = rng.choice(["locker code", "wifi password", "parking spot"]), str(rng.randint(1000, 9999))
            task = Task(tid, kind, "analyst", f"Please remember my {key}: {val}.", {"key": key, "value": val}, None,
                        Rubric(("kv_set",), val, {"kv": {key: val}}))
        elif kind == "flight":
            o, d = rng.sample(CITIES, 2)
            date = (_date("2026-12-01") + _timedelta(days=rng.randint(0, 30))).isoformat()
            flights = [{"id": f"FL{rng.randint(100, 999)}{j}", "from": o, "to": d, "date": date,
                        "price": rng.randint(80, 400), "depart": f"{rng.randint(6, 21):02d}:{rng.choice(['00', '30'])}"}
                       for j in range(rng.randint(2, 4))]
            best = min(flights, key=lambda f: f["price"])
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            task = Task(tid, kind, "travel_agent", f"Book me the cheapest flight from {o} to {d} on {date}. "
                        f"The passenger is {name}.", {"origin": o, "destination": d, "date": date, "passenger": name},
                        "date", Rubric(("search_flights", "book_flight"), best["id"],
                                       {"bookings": {"BK0001": {"flight_id": best["id"], "passenger": name}}}),
                        {"flights": flights}, {"search_flights": 1} if rng.random() < failure_rate else {})
        elif kind == "shop":
            item = rng.choice(["kettle", "lamp", "backpack", "umbrella"])
            products = [{"id": f"P{rng.randint(1000, 9999)}", "name": f"{rng.choice(['Basic', 'Deluxe', 'Eco'])} {item}",
                         "price": rng.randint(10, 90)} for _ in range(3)]
            best, qty = min(products, key=lambda p: p["price"]), rng.randint(1, 3)
            task = Task(tid, kind, "shop_assistant", f"Buy {qty} of the cheapest {item} and check out.",
                        {"item": item, "qty": qty}, "qty",
                        Rubric(("search_products", "add_to_cart", "checkout"), None,
                               {"orders": [[{"product_id": best["id"], "quantity": qty}]]}),
                        {"products": products}, {"add_to_cart": 1} if rng.random() < failure_rate else {})
        else:
            name = rng.choice(sorted(CODE_PROBLEMS))
            task = Task(tid, kind, "coder", CODE_PROBLEMS[name][0], {"problem": name}, None,
                        Rubric(("run_python",), None, None, CODE_PROBLEMS[name][3]))
        task.persona = persona
        tasks.append(task)
    return tasks


class UserSimulator:
    """A user with a persona and a goal; holds back one slot until the agent asks for it, then says thanks."""

    def __init__(self, task: Task):
        self.task = task

    def opening(self) -> str:
        goal = self.task.goal
        if self.task.withheld:
            goal = {"date": lambda g: re.sub(r" on \d{4}-\d{2}-\d{2}", "", g),
                    "qty": lambda g: re.sub(r"Buy \d+ of", "Buy some of", g)}[self.task.withheld](goal)
        return self.task.persona[1].format(goal=goal)

    def reply(self, assistant_text: str) -> str | None:
        w = self.task.withheld
        if w and "?" in assistant_text:
            value = self.task.slots[w]
            return {"date": f"On {value}.", "qty": f"{value}, please."}[w]
        return None  # the user is done


class ScriptedExpert:
    """An agent policy that knows how to solve each task kind, written as a generator: it yields assistant
    messages and receives tool results (dicts) or the user's reply (str) back.

    Recoverable mistakes (each tool call, prob `p_slip`): bad JSON, wrong argument type, misspelled tool; the
    tool error comes back and the expert retries correctly. Fatal mistakes (per trajectory, prob `p_fatal`):
    skip a required tool, arithmetic slip, give up after a transient failure, pick the wrong item, ship buggy
    code. The judge must catch every fatal one.
    """

    def __init__(self, seed: int = 0, p_slip: float = 0.15, p_fatal: float = 0.25):
        self.rng, self.p_slip, self.p_fatal = random.Random(seed), p_slip, p_fatal
        self.n_calls, self.fatal = 0, None

    def run(self, task: Task):
        self.fatal = None  # set to the fatal mistake's name when one is actually made
        return getattr(self, "_" + task.kind)(task, self.rng.random() < self.p_fatal)

    def _msg(self, text=None, calls=None):
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}

    def call(self, name: str, args: dict):
        """Sub-generator: one tool call, maybe preceded by a realistic malformed attempt."""
        if self.rng.random() < self.p_slip:
            kind = self.rng.choice(["bad_json", "wrong_type", "unknown_tool"])
            bad_name, bad_args = name, json.dumps(args)
            if kind == "bad_json":
                bad_args = bad_args[:-1] if len(bad_args) > 2 else "{'oops': 1}"
            elif kind == "wrong_type" and args:
                k = next(iter(args))
                bad_args = json.dumps({**args, k: str(args[k]) if not isinstance(args[k], str) else 0})
            else:
                bad_name = name[:-1] if name.endswith("s") else name + "s"
            yield self._msg(calls=[self._call(bad_name, bad_args)])
        result = yield self._msg(calls=[self._call(name, json.dumps(args))])
        return result

    def _call(self, name, raw):
        self.n_calls += 1
        return {"id": f"call_{self.n_calls}", "type": "function", "function": {"name": name, "arguments": raw}}

    def _arith(self, task, fatal):
        q, p, t = task.slots["q"], task.slots["p"], task.slots["t"]
        if fatal and self.rng.random() < 0.5:  # fatal: answers from "memory", without the calculator
            self.fatal = "skipped tool"
            yield self._msg(f"That comes to about {round(q * p, 2):g}.")
            return
        r = yield from self.call("calculator", {"expression": f"{q} * {p} * (1 + {t} / 100)"})
        value = round(r["result"], 2) + (1 if fatal else 0)  # fatal: an arithmetic slip copying the result
        self.fatal = "arithmetic slip" if fatal else None
        yield self._msg(f"{q} x {p} plus {t}% tax is {value:g}.")

    def _convert(self, task, fatal):
        s = task.slots
        if fatal:
            self.fatal = "skipped tool"
            yield self._msg(f"{s['v']} {s['from']} is roughly {s['v'] * 2} {s['to']}.")
            return
        r = yield from self.call("convert_units", {"value": s["v"], "from_unit": s["from"], "to_unit": s["to"]})
        yield self._msg(f"{s['v']} {s['from']} = {r['result']:g} {s['to']}.")

    def _dates(self, task, fatal):
        r = yield from self.call("days_between", {"start": task.slots["start"], "end": task.slots["end"]})
        self.fatal = "arithmetic slip" if fatal else None
        yield self._msg(f"There are {r['result'] + (1 if fatal else 0)} days between those dates.")

    def _remember(self, task, fatal):
        s = task.slots
        if not fatal:
            yield from self.call("kv_set", {"key": s["key"], "value": s["value"]})
        self.fatal = "skipped tool" if fatal else None
        yield self._msg(f"Got it: your {s['key']} is {s['value']}.")

    def _flight(self, task, fatal):
        s = task.slots
        reply = yield self._msg("Sure. Which date would you like to fly?")
        date = re.search(r"\d{4}-\d{2}-\d{2}", reply).group(0)
        args = {"origin": s["origin"], "destination": s["destination"], "date": date}
        r = yield from self.call("search_flights", args)
        if "error" in r:
            if fatal:  # fatal: gives up on a transient failure instead of retrying
                self.fatal = "gave up"
                yield self._msg("Sorry, the flight service is unavailable right now. Please try again later.")
                return
            r = yield from self.call("search_flights", args)
        flights = sorted(r["result"], key=lambda f: f["price"])
        pick = flights[-1] if fatal else flights[0]  # fatal: books the most expensive one
        self.fatal = "wrong choice" if fatal else None
        b = yield from self.call("book_flight", {"flight_id": pick["id"], "passenger": s["passenger"]})
        yield self._msg(f"Booked {pick['id']} ({pick['depart']}, {pick['price']} coins) for {s['passenger']}; "
                        f"booking {b['result']['booking_id']}.")

    def _shop(self, task, fatal):
        reply = yield self._msg(f"Happy to help. How many {task.slots['item']}s would you like?")
        qty = int(re.search(r"\d+", reply).group(0))
        r = yield from self.call("search_products", {"query": task.slots["item"]})
        best = min(r["result"], key=lambda p: p["price"])
        a = yield from self.call("add_to_cart", {"product_id": best["id"], "quantity": qty})
        if "error" in a:
            if fatal:
                self.fatal = "gave up"
                yield self._msg("The cart service failed, so I could not place the order.")
                return
            yield from self.call("add_to_cart", {"product_id": best["id"], "quantity": qty})
        o = yield from self.call("checkout", {})
        yield self._msg(f"Ordered {qty} x {best['name']} at {best['price']} each; order {o['result']['order_id']}.")

    def _code(self, task, fatal):
        _, good, bad, tests = CODE_PROBLEMS[task.slots["problem"]]
        code = bad if (fatal or self.rng.random() < 0.3) else good  # first drafts are sometimes wrong
        self.fatal = "buggy code" if fatal else None
        r = yield from self.call("run_python", {"code": code + "\n" + tests + "print('all tests passed')\n"})
        if r["result"]["exit_code"] != 0 and not fatal:
            code = good
            yield from self.call("run_python", {"code": code + "\n" + tests + "print('all tests passed')\n"})
        yield self._msg(f"Here is the function:\n```python\n{code}```")


def system_message(agent: str) -> dict:
    prompt, tools = AGENTS[agent]
    specs = [{k: TOOLS[t][k] for k in ("name", "description", "parameters")} for t in tools]
    return {"role": "system", "content": prompt + "\nTools:\n" + json.dumps(specs)}


def simulate(task: Task, policy: ScriptedExpert) -> tuple[list[dict], ToolRuntime]:
    """Run one multi-turn episode: user simulator <-> agent policy <-> tool runtime."""
    runtime = ToolRuntime(AGENTS[task.agent][1], task.world, task.failures)
    user = UserSimulator(task)
    messages = [system_message(task.agent), {"role": "user", "content": user.opening()}]
    agent = policy.run(task)
    feedback = None
    for _ in range(task.rubric.max_turns):
        try:
            msg = agent.send(feedback)
        except StopIteration:
            break
        messages.append(msg)
        if msg.get("tool_calls"):
            for call in msg["tool_calls"]:
                content = runtime.execute(call)
                messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                 "content": content})
            feedback = json.loads(content)
        else:
            feedback = user.reply(msg["content"])
            if feedback is None:
                break
            messages.append({"role": "user", "content": feedback})
    return messages, runtime


def _mentions(text: str, expected: str) -> bool:
    """Numbers match within rounding (0.01); anything else must appear verbatim."""
    try:
        x = float(expected)
    except ValueError:
        return expected in text
    return any(abs(float(n) - x) <= 0.011 for n in re.findall(r"-?\d+(?:\.\d+)?", text))


def judge(task: Task, messages: list[dict], runtime: ToolRuntime) -> list[str]:
    """Check a trajectory against its rubric. Returns rejection reasons (empty = keep)."""
    r, reasons = task.rubric, []
    final = messages[-1]
    if final["role"] != "assistant" or final.get("tool_calls"):
        reasons.append("did not finish")
    ok_calls = {c["name"] for c in runtime.log if c["ok"]}
    reasons += [f"missing call: {t}" for t in r.required_calls if t not in ok_calls]
    text = final.get("content") or ""
    if r.expected_answer is not None and not _mentions(text, r.expected_answer):
        reasons.append("wrong answer")
    if r.expected_state is not None and any(runtime.state.get(k) != v for k, v in r.expected_state.items()):
        reasons.append("wrong final state")
    if r.tests is not None:
        m = re.search(r"```python\n(.*?)```", text, flags=re.S)
        res = run_sandboxed((m.group(1) if m else "") + "\n" + r.tests, timeout_s=5.0)
        if not res.ok:
            reasons.append("tests failed in sandbox")
    return reasons


def synthesize(n_tasks: int = 70, seed: int = 0, p_slip: float = 0.15, p_fatal: float = 0.25):
    """The whole pipeline: tasks -> trajectories -> judge. Returns (kept records, stage counts)."""
    tasks = make_tasks(n_tasks, seed)
    policy = ScriptedExpert(seed, p_slip, p_fatal)
    kept, counts = [], {"tasks": len(tasks), "trajectories": 0, "tool calls": 0, "tool errors": {},
                        "rejected": {}, "kept": 0}
    for task in tasks:
        messages, runtime = simulate(task, policy)
        counts["trajectories"] += 1
        counts["tool calls"] += len(runtime.log)
        for c in runtime.log:
            if not c["ok"]:
                counts["tool errors"][c["kind"]] = counts["tool errors"].get(c["kind"], 0) + 1
        reasons = judge(task, messages, runtime)
        for why in reasons:
            key = why.split(":")[0]
            counts["rejected"][key] = counts["rejected"].get(key, 0) + 1
        if not reasons:
            counts["kept"] += 1
            tools = [{"type": "function", "function": {k: TOOLS[t][k] for k in ("name", "description",
                                                                              "parameters")}}
                     for t in AGENTS[task.agent][1]]
            kept.append({"messages": messages, "tools": tools,
                         "meta": {"task": task.id, "kind": task.kind, "agent": task.agent}})
    return kept, counts


def write_jsonl(path: str, records: list[dict]) -> None:
    """Atomic write: temp file + rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---- the rephrasing experiment (K2 Table 1 in miniature) ----

ARMS = {"raw": "raw text x N epochs", "one": "1 rephrasing x N epochs", "many": "N rephrasings x 1 epoch"}
REPORT_TABLE1 = {"raw": 23.76, "one": 27.39, "many": 28.94}  # SimpleQA, K2 §2.2 Table 1


def rephrase_document(world: KnowledgeWorld, doc: str, rng: random.Random, stats: Counter,
                      error_rate: float = 0.1, chunk_chars: int = 120, back_ref_prob: float = 0.0) -> str:
    """One accepted rephrasing of `doc` in a random style (retrying with fresh draws when rejected)."""
    for _ in range(50):
        rw = TemplateParaphraser(world, seed=rng.randrange(2**31), error_rate=error_rate, back_ref_prob=back_ref_prob)
        res = rephrase_chunkwise(doc, rw, style=rng.choice(sorted(STYLES)), chunk_chars=chunk_chars,
                                 check=world.fidelity)
        stats.update({"chunks": len(res.rewrites), "attempts": res.attempts, **res.rejected})
        if res.text is not None:
            return res.text
        stats["documents dropped"] += 1
    raise RuntimeError(f"no rephrasing of {doc[:40]!r}... passed the fidelity check in 50 tries")


def build_experiment_arms(world: KnowledgeWorld, n: int, seed: int = 0, full_names: bool = False):
    """The three curricula of Table 1, each a list of epochs (an epoch: one biography per person + the QA lines).

    raw: the fixed biography x n epochs (name once, then "This person", attributes always in the same order:
    Physics of LM 3.1's bioS single); one: a single rephrasing per person x n; many: n rephrasings x 1 each.
    A rephrasing is chunk-wise and fidelity-checked, in a random style, with the facts of each chunk in a new
    order and the full name in every sentence (the augmentations of Physics of LM 3.1).
    QA lines are taught on half of the people ("format" people) in every arm; the other half is held out:
    their knowledge is only in the biographies, so answering needs extraction, not QA recall.
    full_names: the raw biographies name the person in every sentence too (train.py's pretraining data).
    """
    rng = random.Random(seed)
    ents = list(world.entities)
    rng.shuffle(ents)
    fmt, held_out = ents[: len(ents) // 2], ents[len(ents) // 2:]
    qa_docs = ["".join(world.qa(e, a)) for e in fmt for a in world.attributes]
    raw = [world.raw_document(e, full_names) for e in world.entities]
    stats: Counter = Counter()
    rephrasings = [[rephrase_document(world, d, rng, stats) for d in raw] for _ in range(n)]
    arms = {"raw": [raw] * n, "one": [rephrasings[0]] * n, "many": rephrasings}
    return {k: [bios + qa_docs for bios in epochs] for k, epochs in arms.items()}, fmt, held_out, stats


def token_stream(epochs: list[list[str]], tok: Tokenizer, seed: int, n_tokens: int | None = None) -> list[int]:
    """The epochs in order, documents shuffled within each (an unshuffled stream is a known way to get ~0 QA
    accuracy); cycled until n_tokens (None: one pass), so arms of shorter documents get equal tokens."""
    rng, ids, i = random.Random(seed), [], 0
    while (n_tokens is None and i < len(epochs)) or (n_tokens is not None and len(ids) < n_tokens):
        docs = epochs[i % len(epochs)][:]
        rng.shuffle(docs)
        for d in docs:
            ids += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
        i += 1
    return ids if n_tokens is None else ids[:n_tokens]


@torch.no_grad()
def qa_accuracy(model, world: KnowledgeWorld, entities, tok: Tokenizer, batch_size: int = 128) -> float:
    """Closed-book multiple choice: the answer is the attribute value with the highest log-likelihood."""
    model.eval()
    items = []  # (prompt length, sequence, is this candidate the true value)
    for e in entities:
        for attr, values in world.attributes.items():
            prompt = [tok.bos_id] + tok.encode(world.qa(e, attr)[0])
            items += [(len(prompt), prompt + tok.encode(" " + v) + [tok.eos_id], v == e.facts[attr]) for v in values]
    scores = []
    for i in range(0, len(items), batch_size):
        batch = items[i: i + batch_size]
        L = max(len(s) for _, s, _ in batch)
        idx = torch.tensor([s + [tok.pad_id] * (L - len(s)) for _, s, _ in batch])  # (N, L)
        logp = torch.log_softmax(model(idx).logits.float(), -1)  # (N, L, vocab)
        for j, (p, s, _) in enumerate(batch):  # sum of log p(answer tokens | prompt)
            scores.append(logp[j, torch.arange(p - 1, len(s) - 1), torch.tensor(s[p:])].sum().item())
    model.train()
    n = len(next(iter(world.attributes.values())))  # candidates per question
    wins = [items[max(range(q, q + n), key=scores.__getitem__)][2] for q in range(0, len(items), n)]
    return sum(wins) / len(wins)


def run_arm(world: KnowledgeWorld, arm: str, epochs, fmt, held_out, n_tokens: int, cfg, seed: int, seq_len: int,
            batch_size: int, lr: float, adamw_lr: float, progress=None, task=None) -> dict:
    """One arm of one seed: a fresh tiny K2 (chapter 2) trained on the arm's stream cut (or cycled) to n_tokens
    with K2's optimizer, MuonClip (chapter 3: Muon at `lr` for the hidden matrices, AdamW at `adamw_lr` for the
    rest, QK-Clip at tau = 100) and chapter 3's warmup + cosine schedule; then closed-book QA."""
    mla, mc = importlib.import_module("02_mla"), importlib.import_module("03_muonclip")
    tok, steps = Tokenizer(), (n_tokens - 1) // (batch_size * seq_len)
    data = torch.tensor(token_stream(epochs, tok, seed, n_tokens))
    torch.manual_seed(seed)
    model = mla.Transformer(cfg)
    opt = mc.MuonClip(model, lr=lr, adamw_lr=adamw_lr)
    base = [g["lr"] for g in opt.param_groups]
    losses = []
    for step in range(steps):
        for g, lr0 in zip(opt.param_groups, base):
            g["lr"] = lr0 * mc.lr_factor(step, steps, warmup=max(1, steps // 20))
        chunk = data[step * batch_size * seq_len:][: batch_size * seq_len + 1]
        out = model(chunk[:-1].view(batch_size, seq_len), targets=chunk[1:].view(batch_size, seq_len))  # (B, S)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if out.expert_load is not None:  # aux-loss-free balancing (chapter 1)
            mla.update_router_biases_(model, out.expert_load, cfg.bias_update_speed)
        losses.append(out.loss.item())
        if progress is not None:
            progress.advance(task)
    return {"seed": seed, "arm": arm, "tokens": steps * batch_size * seq_len, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "held_out_questions": len(held_out) * len(world.attributes),
            "params": sum(p.numel() for p in model.parameters()),
            "acc_held_out": qa_accuracy(model, world, held_out, tok), "acc_format": qa_accuracy(model, world, fmt, tok)}


def rephrase_experiment(n_entities: int = 32, n: int = 100, seq_len: int = 128, batch_size: int = 16, lr: float = 8e-3,
                        adamw_lr: float = 3e-3, seeds=(0,), console=None, num_hidden_layers: int = 2,
                        n_routed_experts: int = 8, num_experts_per_tok: int = 2, threads: int = 1) -> list[dict]:
    """K2 Table 1 in miniature: raw x N epochs vs one rephrasing x N vs N rephrasings x 1, at equal tokens (the
    N-rephrasings pass sets the budget; the others cycle up to it). Deterministic for fixed seeds and `threads`:
    every generator is seeded, and a CPU matmul's reduction order (its last bits) depends on the thread count."""
    from rich.progress import Progress
    mla = importlib.import_module("02_mla")  # lazily: chapter 5 stays standalone otherwise
    torch.set_num_threads(threads)
    tok = Tokenizer()
    cfg = mla.ModelConfig.tiny(vocab_size=tok.vocab_size, num_hidden_layers=num_hidden_layers,
                               n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok)
    rows = []
    for seed in seeds:
        world = KnowledgeWorld(n_entities, seed=seed)
        arms, fmt, held_out, stats = build_experiment_arms(world, n, seed)
        n_tokens = max(len(token_stream(epochs, tok, seed)) for epochs in arms.values())
        with Progress(console=console, transient=True) as progress:
            for arm, epochs in arms.items():
                task = progress.add_task(f"seed {seed}: {arm}", total=(n_tokens - 1) // (batch_size * seq_len))
                r = run_arm(world, arm, epochs, fmt, held_out, n_tokens, cfg, seed, seq_len, batch_size, lr, adamw_lr,
                            progress, task)
                rows.append({**r, "rephrase_stats": stats})
                if console is not None:  # partial results as they come
                    console.print(f"seed {seed} {ARMS[arm]:24s} held-out {100 * r['acc_held_out']:5.1f}%  format "
                                  f"{100 * r['acc_format']:5.1f}%  final loss {r['final_loss']:.3f}", highlight=False)
    return rows


def experiment_summary(rows: list[dict]) -> dict:
    """Per arm: mean and std over seeds of held-out and format-people accuracy (%), seeds, train tokens."""
    out = {}
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        held = [100 * r["acc_held_out"] for r in rs]
        out[arm] = dict(heldout_mean=statistics.mean(held), heldout_std=statistics.stdev(held) if len(held) > 1 else 0.0,
                        format_mean=sum(100 * r["acc_format"] for r in rs) / len(rs),
                        seeds=len(rs), train_tokens=rs[0]["tokens"], heldout=held)
    return {"arms": out}


# ---- demo ----

def pretraining_data_counts(seed: int = 0, n_entities: int = 32, n_math: int = 40) -> list[tuple]:
    """Stage counts for the pretraining side: world -> documents -> chunk-wise rephrasing -> fidelity."""
    tok, world, rng = Tokenizer(), KnowledgeWorld(n_entities, seed=seed), random.Random(seed)
    raw = world.almanac()
    rows = [("knowledge world", "entities / facts", f"{n_entities} / {n_entities * len(ATTRIBUTES)}"),
            ("raw almanac", "characters / tokens", f"{len(raw)} / {len(tok.encode(raw))}")]
    rejected: dict = {}
    attempts = chunks = accepted = 0
    for style in sorted(STYLES):
        res = rephrase_chunkwise(raw, TemplateParaphraser(world, seed=rng.randrange(2**31), error_rate=0.1),
                                 style=style, check=world.fidelity)
        attempts, chunks = attempts + res.attempts, chunks + len(res.chunks)
        for k, v in res.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
        accepted += res.text is not None and world.fidelity(raw, res.text) is None
    rows += [("chunk-wise rephrasing", "styles x chunks / rewrite attempts", f"{chunks} / {attempts}"),
             ("fidelity check", "rewrites rejected", ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
              or "0"),
             ("", "whole almanac rephrasings accepted (re-checked)", f"{accepted} / {len(STYLES)}")]
    probs = make_math_problems(n_math, seed)
    notes = [math_learning_note(p, rng) for p in probs]
    ok = sum(check_math_note(p, n) is None for p, n in zip(probs, notes))
    rows.append(("math -> learning notes", "problems / notes passing fidelity", f"{len(probs)} / {ok}"))
    return rows


def show_trajectory(console, rec: dict, tok: Tokenizer) -> None:
    """The rendered trajectory; the tokens the SFT loss trains on sit between ⟦ and ⟧ (and are green on a terminal)."""
    from rich.panel import Panel
    from rich.text import Text
    sys_msg = rec["messages"][0]  # the tool schemas are long: show their names only
    short = {**sys_msg, "content": sys_msg["content"].split("\nTools:")[0] + "\nTools: [JSON schemas of "
             + ", ".join(t["function"]["name"] for t in rec["tools"]) + "]"}
    ids, mask = render_chat([short] + rec["messages"][1:], tok)
    text, span, prev = Text(), [], 0
    for i, m in [*zip(ids, mask), (None, -1)]:  # group runs of equal mask; a sentinel flushes the last run
        if m != prev and span:
            piece = tok.decode(span)
            text.append(f"⟦{piece}⟧" if prev else piece, style="bold green" if prev else "dim")
            span = []
        if i is not None:
            span.append(i)
        prev = m
    console.print(Panel(text, title=f"{rec['meta']['task']} (rendered by the chat template; ⟦...⟧ = loss mask, "
                        "the assistant's tokens)"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--seed", type=cli.nonneg_int, default=0,
                   help="pipeline demo: seed of its one run (the experiment takes --seeds)")
    p.add_argument("--n-tasks", type=cli.positive_int, default=70, help="agentic tasks to synthesise")
    p.add_argument("--out", type=cli.out_file, default=None, help="write the kept trajectories to this JSONL file")
    p.add_argument("--sandbox-demo", action="store_true", help="also run hostile programs through the sandbox")
    p.add_argument("--rephrase-experiment", action="store_true",
                   help="run only K2 Table 1 in miniature (minutes), not the pipeline demo")
    p.add_argument("--entities", type=cli.positive_int, default=32,
                   help="experiment: people in the knowledge world (4 facts each; half of them held out)")
    p.add_argument("--n", type=cli.positive_int, default=100,
                   help="experiment: N (epochs of raw and of one rephrasing, number of rephrasings)")
    p.add_argument("--layers", type=cli.positive_int, default=2, help="experiment: layers of the tiny K2 model")
    p.add_argument("--experts", type=cli.positive_int, default=8, help="experiment: routed experts of the tiny K2 model")
    p.add_argument("--top-k", type=cli.positive_int, default=2, help="experiment: experts per token")
    p.add_argument("--threads", type=cli.positive_int, default=1,
                   help="experiment: torch intra-op threads (results depend on it)")
    p.add_argument("--seeds", type=cli.nonneg_int_list, default=[0],
                   help="experiment: comma-separated seeds, one run of every arm per seed")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="experiment: sequences per step")
    p.add_argument("--seq-len", type=cli.positive_int, default=128, help="experiment: tokens per sequence")
    p.add_argument("--lr", type=cli.positive_float, default=8e-3, help="experiment: peak Muon lr (hidden matrices)")
    p.add_argument("--adamw-lr", type=cli.positive_float, default=3e-3,
                   help="experiment: peak AdamW lr (embeddings, head, norms)")
    p.add_argument("--json", type=cli.out_file, default=None, help="experiment: write the per-arm summary here")
    args = p.parse_args(argv)
    if args.rephrase_experiment:  # the configuration is checked before minutes of rephrasing and training
        if args.entities < 2:
            p.error("argument --entities: needs at least 2 people (half QA-format, half held out)")
        if args.out or args.sandbox_demo:
            p.error(f"argument {'--out' if args.out else '--sandbox-demo'}: belongs to the pipeline demo, "
                    "not --rephrase-experiment")
        try:
            importlib.import_module("02_mla").ModelConfig.tiny(n_routed_experts=args.experts,
                                                               num_experts_per_tok=args.top_k)
        except ValueError as err:
            cli.flag_error(p, err, {"num_experts_per_tok": "--top-k", "n_routed_experts": "--experts"})
    from rich.console import Console
    from rich.table import Table
    console, tok = Console(width=None if sys.stdout.isatty() else 120), Tokenizer()
    if args.rephrase_experiment:
        t0 = time.time()
        rows = rephrase_experiment(args.entities, args.n, args.seq_len, args.batch_size, args.lr,
                                   args.adamw_lr, tuple(args.seeds), console, args.layers, args.experts, args.top_k,
                                   args.threads)
        _print_experiment(console, rows, args)
        if args.json:
            with open(args.json + ".tmp", "w") as f:  # atomic: temp file + rename
                json.dump(experiment_summary(rows), f, indent=1)
            os.replace(args.json + ".tmp", args.json)
            console.print(f"wrote {args.json}")
        console.print(f"done in {time.time() - t0:.0f} s")
        return
    t0 = time.time()
    table = Table(title=f"Chapter 5 data pipeline (seed {args.seed})")
    for col in ("stage", "what", "count"):
        table.add_column(col)
    for row in pretraining_data_counts(args.seed):
        table.add_row(*row)
    kept, c = synthesize(args.n_tasks, args.seed)
    domains = sorted({t["domain"] for t in TOOL_SPECS})
    n_sim = sum(t["simulated"] for t in TOOL_SPECS)
    kinds: dict = {}
    for t in make_tasks(args.n_tasks, args.seed):
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    rendered = [render_chat(r["messages"], tok) for r in kept]
    n_tok, n_loss = sum(len(i) for i, _ in rendered), sum(sum(m) for _, m in rendered)
    lines = [json.dumps(r, ensure_ascii=False) for r in kept]
    rows = [("tool specs", f"in {len(domains)} domains: {len(TOOL_SPECS) - n_sim} run real code, {n_sim} simulated",
             str(len(TOOL_SPECS))),
            ("agents", "system prompt + tool subset", str(len(AGENTS))),
            ("tasks with rubrics", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())), str(c["tasks"])),
            ("simulated trajectories", "user simulator x scripted expert x tool runtime", str(c["trajectories"])),
            ("tool calls", "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(c["tool errors"].items())),
             str(c["tool calls"])),
            ("judge", "rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(c["rejected"].items())),
             f"kept {c['kept']}"),
            ("", "kept trajectories that recover from a tool error", str(sum(
                any(m["role"] == "tool" and '"error"' in m["content"] for m in r["messages"]) for r in kept))),
            ("SFT JSONL", f"records / bytes{' -> ' + args.out if args.out else ''}",
             f"{len(lines)} / {sum(len(x) + 1 for x in lines)}"),
            ("chat template", "tokens / assistant (loss) tokens", f"{n_tok} / {n_loss}")]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if args.out:
        write_jsonl(args.out, kept)
    pick = next((r for r in kept if r["meta"]["kind"] == "flight" and any(
        m["role"] == "tool" and "error" in m["content"] for m in r["messages"])), kept[0] if kept else None)
    if pick is None:
        console.print(f"the judge kept none of the {args.n_tasks} trajectories: no example to show")
    else:
        show_trajectory(console, pick, tok)
    if args.sandbox_demo:
        sandbox.hostile_table(console)
        sandbox.throughput_table(console, n=32, workers=(4,), repeats=5)
    console.print(f"done in {time.time() - t0:.1f} s")


def _print_experiment(console, rows: list[dict], args) -> None:
    from rich.table import Table
    r0, summary = rows[0], experiment_summary(rows)["arms"]
    t = Table(title=f"Rephrasing experiment: {args.entities} people x {len(ATTRIBUTES)} facts "
                    f"({r0['held_out_questions']} held-out questions), N={args.n}, {r0['params'] / 1e6:.2f}M params, "
                    f"{args.threads} thread(s), seeds {','.join(map(str, args.seeds))}; chance = {100 / 8:.1f}%")
    for col in ("curriculum", "train tokens", "QA acc, held-out people %", "QA acc, format people %",
                "K2 Table 1 (SimpleQA)"):
        t.add_column(col)
    for arm, label in ARMS.items():
        s = summary[arm]
        per_seed = f" ({' / '.join(f'{x:.1f}' for x in s['heldout'])})" if s["seeds"] > 1 else ""
        t.add_row(label, str(s["train_tokens"]), f"{s['heldout_mean']:.1f} ± {s['heldout_std']:.1f}{per_seed}",
                  f"{s['format_mean']:.1f}", f"{REPORT_TABLE1[arm]:.2f}")
    console.print(t)
    st = r0["rephrase_stats"]
    console.print(f"rephrasing (seed {r0['seed']}): {st.get('attempts', 0)} chunk rewrites attempted, "
                  f"{st.get('chunks', 0)} accepted; rejected: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(st.items()) if k not in ("attempts", "chunks")))


if __name__ == "__main__":
    cli.run(main)
