"""Chapter 5: data. Rephrasing for token efficiency, agentic data synthesis, and a real execution sandbox.

K2 was pretrained on 15.5T tokens, and good tokens were the scarce resource. Two ideas from the report:

1. Rephrasing (K2 §2.2). Instead of reading the same knowledge text for ten epochs, rewrite it in different
   styles and perspectives and read each rewrite once. Long texts are rewritten chunk by chunk, each chunk
   with the already-rewritten text as context, then stitched; a fidelity check compares each rewrite with
   its source. Table 1 of the report (SimpleQA accuracy): raw text x 10 epochs 23.76, one rephrasing x 10
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
- The experiment follows "Physics of Language Models 3.1": QA format is taught on some entities and tested
  on the others, so the model must extract knowledge from documents, not recall QA text.
- The tool-use "expert" is scripted and knows the plan, but makes the mistakes models make (bad JSON,
  wrong argument types, unknown tools, giving up after a transient failure, arithmetic slips); errors
  come back as schema-validated tool messages, and the judge decides what is kept.
- The sandbox uses what Linux gives a root process: namespaces (net, pid, mount), an unprivileged uid,
  rlimits, a process group and a wall-clock timer. Without root it degrades and says so in the result.

Simplified vs K2
- Rewriter: K2 uses a large LM with tuned prompts; ours is a template paraphraser (or a tiny LM via the
  adapter). Fidelity: K2 checks semantic alignment with a model; ours parses facts exactly.
- Scale: K2 synthesised 3000+ real MCP tools and 20,000+ synthetic tools; here 16 tools in 6 domains.
- Judge: K2 uses an LLM judge against rubrics; ours checks rubrics programmatically.
- Sandbox: K2 runs Kubernetes-scale containers; ours is one process tree on one machine.

References
- Kimi K2: Open Agentic Intelligence, arXiv:2507.20534, §2.2 (rephrasing, Table 1), §3.1.1 (agentic data).
- Allen-Zhu & Li, Physics of Language Models Part 3.1, arXiv:2309.14316 (knowledge extraction needs augmentation).
- Maini et al., Rephrasing the Web (WRAP), arXiv:2401.16380. ACEBench, arXiv:2501.12851 (tool-use synthesis).

Run:
    python 05_data.py --help
    python 05_data.py                          # pipeline counts + one trajectory (seconds)
    python 05_data.py --rephrase-experiment    # Table 1 in miniature (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

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
        if role == "tool":
            body = json.dumps({"name": msg.get("name"), "content": msg.get("content", "")}, ensure_ascii=False)
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
        m = re.match(r'\s*\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*(.*)\}\s*$', body, flags=re.S)
        if m:
            name, args = m.group(1), m.group(2).strip()
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

    def __init__(self, n_entities: int = 64, seed: int = 0):
        if not 1 <= n_entities <= len(FIRST) * len(LAST):
            raise ValueError(f"n_entities: {n_entities} not in [1, {len(FIRST) * len(LAST)}]")
        rng = random.Random(seed)
        names = rng.sample([f"{a} {b}" for a in FIRST for b in LAST], n_entities)
        self.entities = [Entity(n, {a: rng.choice(vs) for a, vs in ATTRIBUTES.items()}) for n in names]
        self.by_name = {e.name: e for e in self.entities}
        self.value_attr = {v: a for a, vs in ATTRIBUTES.items() for v in vs}
        self._name_re = re.compile("|".join(re.escape(n) for n in sorted(self.by_name, key=len, reverse=True)))
        self._value_re = re.compile(r"\b(" + "|".join(map(re.escape, self.value_attr)) + r")\b")

    def raw_document(self, e: Entity) -> str:
        return " ".join(_articles(RAW_TEMPLATES[a].format(S=e.name, v=v)) for a, v in e.facts.items())

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

    def __init__(self, world: KnowledgeWorld, seed: int = 0, error_rate: float = 0.0):
        self.world, self.rng, self.error_rate = world, random.Random(seed), error_rate

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
            back_ref = e == last and rng.random() < 0.7
            if st.intro and not back_ref:
                out.append(st.intro.format(name=e))
                back_ref = True
            for a, v in av:
                subj = st.ref if back_ref else e
                t = rng.choice(st.templates[a])
                sent = t.format(S=subj, s=subj if subj == "I" else (e if not back_ref else subj.lower()), v=v)
                out.append(_articles(sent[0].upper() + sent[1:]))
                back_ref = True
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

# Runs inside the new namespaces as their PID 1, still root: hide writable and private directories behind
# empty read-only tmpfs mounts, bind back only the work dir and the Python install, set rlimits, drop to
# the unprivileged uid, then exec a fresh isolated interpreter on main.py (which becomes PID 1).
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
if cfg["mount"]:
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: s.encode() if s else None
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            sys.exit(f"sandbox setup: mount {dst}: {os.strerror(err)}")
    MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
    keep = [(p, os.open(p, os.O_PATH), ro) for p, ro in cfg["keep"]]
    for d in cfg["hide"]:
        mount("tmpfs", d, "tmpfs", 0, "size=64k,mode=0755")
    for p, fd, ro in keep:
        os.makedirs(p, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", p, None, MS_BIND)
        if ro:
            mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.close(fd)
    for d in cfg["hide"]:
        mount(None, d, None, MS_REMOUNT | MS_RDONLY)
os.chdir(cfg["workdir"])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG=SIGKILL again: changing uid cleared unshare's setting
os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", "main.py"], cfg["env"])
"""
SANDBOX_UID = 65534  # "nobody": owns no files, so it can write only where everything may write


@dataclass
class SandboxResult:
    ok: bool                  # exited 0, in time, within limits
    exit_code: int | None     # negative = killed by that signal (as subprocess reports it)
    timed_out: bool
    killed_for_memory: bool
    output_truncated: bool
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple = ()     # the layers actually applied
    degraded: str = ""        # why a layer is missing, "" when all were applied


_PROBE: dict = {}


def _namespaces_available() -> tuple[bool, str]:
    """Root + util-linux unshare that can really create the namespaces (probed once, on first use)."""
    if "ns" not in _PROBE:
        unshare = shutil.which("unshare")
        if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
            _PROBE["ns"] = (False, "not root: no namespaces, no uid drop (same-uid processes can be signalled, "
                                   "parent env readable via /proc, network open)")
        elif not unshare:
            _PROBE["ns"] = (False, "unshare not found: no network/pid/mount namespaces")
        else:
            r = subprocess.run([unshare, "--mount", "--net", "--pid", "--fork", "true"], capture_output=True)
            _PROBE["ns"] = (r.returncode == 0, "" if r.returncode == 0 else
                            f"unshare failed ({r.stderr.decode(errors='replace').strip()}): no namespaces")
    return _PROBE["ns"]


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _kill_tree(pid: int) -> None:
    """SIGKILL the namespace init (the kernel then kills every process in its PID namespace) and the group."""
    for kid in _children(pid):
        try:
            os.kill(kid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_sandboxed(code: str, timeout_s: float = 5.0, memory_mb: int = 256, *, files: dict | None = None,
                  max_output: int = 65536, max_procs: int = 32, max_files: int = 64, file_mb: int = 16,
                  uid: int = SANDBOX_UID) -> SandboxResult:
    """Run untrusted Python `code` as main.py in a fresh directory, isolated as far as this machine allows.

    Guarantees (as root with util-linux `unshare`; `isolation` lists what was applied):
    - a separate `python -I -S -B` process (no site-packages, no user site, no PYTHON* env vars honoured);
    - a fresh temporary working directory, deleted afterwards; `files` are written into it first;
    - an empty environment apart from PATH/LANG/HOME/TMPDIR (the parent's secrets are not inherited);
    - network namespace: only a loopback that is down, so no connection to anything, localhost included;
    - PID namespace: when main.py (its PID 1) exits or is killed, the kernel kills every descendant,
      including daemons that double-forked or called setsid;
    - mount namespace: /tmp, /var/tmp, /dev/shm, /root, /home and $HOME become empty read-only tmpfs;
      only the work dir and the Python install are bound back, so files can be written only in the work dir;
    - an unprivileged uid (nobody), so RLIMIT_NPROC applies and root-only files and /proc/<pid>/environ of
      other users are unreadable;
    - rlimits: CPU seconds, address space (memory_mb), file size, process count, open files, no core dumps;
    - a wall-clock timeout that SIGKILLs the namespace init and the whole process group;
    - stdout/stderr capped at max_output bytes each; a flood beyond that kills the program (truncated=True).

    Not protected against (a process sandbox is not a VM or a container runtime):
    - kernel exploits and anything else that attacks the shared kernel (no seccomp filter, no gVisor);
    - reading world-readable files (the rest of the file system is visible, read-only to it in effect);
    - CPU and memory contention with the host (rlimits cap one process; no cgroup caps the whole tree,
      and RLIMIT_AS limits virtual, not resident, memory); RLIMIT_NPROC counts every process of the
      sandbox uid, so concurrent sandboxes share one budget;
    - side channels, timing, and resource exhaustion of shared kernel objects.
    Without root or unshare it degrades to rlimits + process group + scrubbed env (see `degraded`).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb: must be >= 32 (the interpreter itself needs it), got {memory_mb}")
    use_ns, why = _namespaces_available()
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    python = os.path.realpath(sys.executable)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    rlimits = {"RLIMIT_CPU": math.ceil(timeout_s) + 1, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": file_mb << 20,
               "RLIMIT_NOFILE": max_files, "RLIMIT_CORE": 0}
    hide = [d for d in dict.fromkeys(["/tmp", "/var/tmp", "/dev/shm", "/root", "/home", os.path.expanduser("~")])
            if os.path.isdir(d) and d != "/"]
    keep = [(workdir, False)] + [(p, True) for p in dict.fromkeys([sys.base_prefix, os.path.dirname(python)])
                                 if any(p.startswith(h + "/") for h in hide)]
    keep = [(p, ro) for p, ro in keep if not any(p != q and p.startswith(q + "/") for q, _ in keep)]
    cfg = {"mount": use_ns, "hide": hide, "keep": keep, "workdir": workdir, "python": python, "env": env,
           "rlimits": rlimits, "uid": uid if use_ns else None}
    if use_ns:
        cfg["rlimits"]["RLIMIT_NPROC"] = max_procs  # applies to the uid we switch to (root would ignore it)
        os.chown(workdir, uid, uid)
        cmd = [shutil.which("unshare"), "--mount", "--net", "--pid", "--fork", "--kill-child"]
        isolation = ("process", "env", "rlimits", "pgroup", "netns", "pidns", "mountns", f"uid={uid}")
    else:
        cmd, isolation = [], ("process", "env", "rlimits", "pgroup")
    with open(os.path.join(workdir, "main.py"), "w") as f:
        f.write(code)
    for name, text in (files or {}).items():
        path = os.path.realpath(os.path.join(workdir, name))
        if not path.startswith(workdir + "/"):
            raise ValueError(f"files: {name!r} would land outside the work dir")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if use_ns:
        for root, dirs, fs in os.walk(workdir):
            for n in dirs + fs:
                os.chown(os.path.join(root, n), uid, uid)

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd + [python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    flood = threading.Event()
    outs = {"stdout": bytearray(), "stderr": bytearray()}

    def reader(stream, buf):
        while chunk := stream.read1(65536):
            take = max(0, max_output - len(buf))
            buf.extend(chunk[:take])
            if len(chunk) > take:
                flood.set()
                _kill_tree(proc.pid)  # the process group is proc.pid (start_new_session)

    threads = [threading.Thread(target=reader, args=(getattr(proc, k), outs[k]), daemon=True) for k in outs]
    for t in threads:
        t.start()
    timed_out = False
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:  # exited, not reaped
        if time.monotonic() - t0 > timeout_s:
            timed_out = True
            _kill_tree(proc.pid)
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            break
        time.sleep(0.005)
    _kill_tree(proc.pid)  # leftovers in the group; safe: the unreaped leader keeps the group id ours
    code_ = proc.wait()
    for t in threads:
        t.join(timeout=2.0)
    wall = time.monotonic() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    out, err = (outs[k].decode("utf-8", "replace") for k in ("stdout", "stderr"))
    oom = any(s in err for s in ("MemoryError", "Cannot allocate memory", "std::bad_alloc"))
    ok = code_ == 0 and not (timed_out or flood.is_set() or oom)
    return SandboxResult(ok, code_, timed_out, oom, flood.is_set(), out, err, wall, isolation, why)
