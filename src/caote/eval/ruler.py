"""RULER-style synthetic long-context tasks, generated offline.

Follows the RULER reference generators (``scripts/data/synthetic/niah.py``, ``variable_tracking.py``,
``common_words_extraction.py``; task settings from ``scripts/synthetic.yaml``; prompt templates from
``scripts/data/synthetic/constants.py``; metric from ``scripts/eval/synthetic/constants.py``), with
these adaptations:

* Haystacks: the Paul Graham essays of :func:`caote.texts.paul_graham_essays` (as RULER), RULER's
  repeated "noise" sentences, or distractor needles. Sentences are split with a regular expression
  instead of NLTK.
* Word lists are self-made: needle keys are ``adjective-noun`` pairs from small built-in lists (RULER
  uses the wonderwords lists); the common-words task draws its words from the vocabulary of the
  essays and the Austen novels (:mod:`caote.eval.books`).
* Lengths: ``context_tokens`` is the length of the whole formatted prompt (chat template and answer
  prefix included), which is what the KV cache holds after prefill. As in RULER, the haystack size is
  found by binary search, but per sample (with the sample's random draws fixed), so each prompt lands
  just at or under the target. With ``include_generation=True`` the target also covers
  ``tokens_to_generate``, RULER's ``max_seq_length`` convention.
* Insertion positions are drawn once per sample as fractions of the haystack (RULER draws indices), so
  that the binary search varies only the haystack size.
* Chat models: the task text goes in a user turn and RULER's answer prefix opens the assistant turn.
  Few-shot examples (cwe, vt) are plain text inside the user turn.

Tasks (RULER names; aliases in :data:`ALIASES`): ``niah_single_{1,2,3}``, ``niah_multikey_{1,2,3}``,
``niah_multivalue``, ``niah_multiquery``, ``variable_tracking`` (``vt``) and
``common_words_extraction`` (``cwe``). ``niah_single`` means ``niah_single_2`` (essay haystack, word
key, number value) and ``niah_multikey`` means ``niah_multikey_1`` (four keys in the essays). Every task
is scored with RULER's ``string_match_all``.
"""

from __future__ import annotations

import heapq
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from caote.eval.books import austen_books
from caote.eval.metrics import ruler_postprocess_pred, string_match_all, string_match_part
from caote.eval.needle import count_tokens, essays, has_chat_template

# ----------------------------------------------------------------------------------------------
# templates (RULER scripts/data/synthetic/constants.py)

TEMPLATES: dict[str, dict] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": (
            "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
            "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
            "all the special magic {type_needle_v} for {query} mentioned in the provided text?"
        ),
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
        ),
        "answer_prefix": (
            " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
            "variables are assigned the value {query}, they are: "
        ),
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
            "common words in the above list?"
        ),
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
}

NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40) rounded

# task settings (RULER scripts/synthetic.yaml)
TASKS: dict[str, dict] = {
    "niah_single_1": dict(kind="niah", type_haystack="noise", type_needle_k="words", type_needle_v="numbers",
                          num_needle_k=1, num_needle_v=1, num_needle_q=1),
    "niah_single_2": dict(kind="niah", type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                          num_needle_k=1, num_needle_v=1, num_needle_q=1),
    "niah_single_3": dict(kind="niah", type_haystack="essay", type_needle_k="words", type_needle_v="uuids",
                          num_needle_k=1, num_needle_v=1, num_needle_q=1),
    "niah_multikey_1": dict(kind="niah", type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                            num_needle_k=4, num_needle_v=1, num_needle_q=1),
    "niah_multikey_2": dict(kind="niah", type_haystack="needle", type_needle_k="words", type_needle_v="numbers",
                            num_needle_k=1, num_needle_v=1, num_needle_q=1),
    "niah_multikey_3": dict(kind="niah", type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids",
                            num_needle_k=1, num_needle_v=1, num_needle_q=1),
    "niah_multivalue": dict(kind="niah", type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                            num_needle_k=1, num_needle_v=4, num_needle_q=1),
    "niah_multiquery": dict(kind="niah", type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                            num_needle_k=1, num_needle_v=1, num_needle_q=4),
    "variable_tracking": dict(kind="variable_tracking", type_haystack="noise", num_chains=1, num_hops=4,
                              add_fewshot=True, icl_tokens=500),
    "common_words_extraction": dict(kind="common_words_extraction", freq_cw=30, freq_ucw=3, num_cw=10,
                                    num_fewshot=1),
}
ALIASES = {
    "niah_single": "niah_single_2",
    "niah_multikey": "niah_multikey_1",
    "vt": "variable_tracking",
    "cwe": "common_words_extraction",
}
# the five tasks this project evaluates by default
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")

# RULER scripts/eval/synthetic/constants.py: every synthetic task here uses string_match_all
METRICS = {name: "string_match_all" for name in TASKS}

# ----------------------------------------------------------------------------------------------
# self-made word lists (needle keys are "adjective-noun", as RULER builds them from wonderwords)

ADJECTIVES = """
abundant acidic adorable aggressive agreeable alert amused ancient angry anxious aquatic arctic
ashamed awful bashful bitter bizarre black blue bold boring brave breezy brief bright broad broken
bumpy busy calm careful cautious charming cheerful chilly clean clever cloudy clumsy coherent cold
colossal cool crazy creepy crooked cuddly curious curly cute damp dark dazzling deep defiant delicate
delightful dense different dizzy dusty eager early elastic elderly elegant empty enchanting energetic
enormous envious even evil excited exotic faded faint fancy fearless festive fierce filthy flat fluffy
foggy foolish fragile frantic fresh friendly frosty funny fuzzy gentle giant gifted glamorous gleaming
glorious golden gorgeous graceful greasy green grumpy handsome happy harsh heavy helpful hollow honest
hungry icy idle immense jagged jolly juicy kind large lazy little lively lonely loud lucky luminous
magenta majestic massive mellow melodic mighty misty modern muddy mysterious narrow nervous nimble
noisy obedient odd old orange panicky peaceful plain polite powerful precious proud purple quaint
quick quiet rapid rare red rich robust rough round royal rustic salty scarlet scary shaggy shallow
sharp shiny short silent silky silly simple sleepy slimy slippery slow small smooth soft solid sparkling
spicy splendid spotless square steady steep sticky stormy strange striped strong sturdy subtle sunny
super sweet swift tall tame tangy tender tense thankful thick thin thirsty thoughtful tidy tiny tough
tranquil tricky ugly uneven upbeat vague vast velvet vibrant violet vivid wandering warm weary wet
whimsical wicked wide wild windy wise witty wooden worried yellow young zany zealous
""".split()

NOUNS = """
acorn actor airport album anchor angle ankle apple apricot arch archive arrow artist attic avocado
badge bagel bakery balloon bamboo banana band banjo barn basket battery beach beacon bean bear beard
bee bell bench berry bicycle bird blanket blossom boat bonnet book boot bottle boulder bowl box bracelet
branch bread brick bridge broom brook bubble bucket buffalo bugle butter button cabin cactus cake camel
camera canal candle canoe canyon captain carpet carrot castle cat cave cello chair chalk channel cheese
cherry chimney circle city cliff clock cloud coat cobweb coconut coffee comet compass cookie copper coral
cottage cotton cousin cradle crane crayon cricket crown crystal cup curtain cushion daisy dancer desert
diamond dinosaur doctor dolphin door dragon drawer dream drum duck eagle earring easel elbow elephant
elm engine envelope falcon feather fence fern ferry fiddle field fig finch fire flag flame flute fog
forest fountain fox frog garden garlic gate gazelle ghost giraffe glacier glove goat gondola goose grape
guitar hammer harbor harp hat hawk hazel helmet heron hill honey horizon horse hotel iceberg island ivy
jacket jaguar jam jar jelly jewel kettle key kite kitten ladder lagoon lake lamp lantern lemon leopard
letter library lily lion lizard lobster locket lute magnet mango maple marble meadow melon mirror
mitten monkey moon mountain mouse mushroom needle nest notebook nutmeg oak oasis ocean octopus olive
onion orchard orchid otter owl oyster paddle palace panda parrot peach pearl pebble pelican pencil
pepper piano pigeon pillow pine pirate planet plum pocket pond poppy potato puddle pumpkin puppet
quartz quilt rabbit raccoon radio rainbow raven ribbon river robin rocket rose saddle sailor salmon
sandal scarf scooter shadow shell ship shoe shovel silver sled snail sparrow spider spoon squirrel star
statue stone storm stream sugar sunflower swan sweater table teapot telescope tiger timber toad tomato
tower tractor trail train tulip tunnel turtle umbrella valley vase violin volcano wagon walnut wand
waterfall whale whistle willow window wizard wolf yacht zebra
""".split()


@lru_cache(maxsize=1)
def key_words() -> tuple[str, ...]:
    """All ``adjective-noun`` keys, sorted (RULER: ``f"{adj}-{noun}"`` over wonderwords lists)."""
    return tuple(sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS}))


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """The common-words task's pool: distinct lowercase words of 3-12 letters (no contraction
    fragments) from the essays and the Austen novels, sorted (~14k words)."""
    texts = [essays(), *austen_books().values()]
    found: set[str] = set()
    for text in texts:
        found.update(re.findall(r"(?<![\w'’])[a-z]{3,12}(?![\w'’])", text))
    return tuple(sorted(found))


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essays split on whitespace (RULER: ``re.sub(r'\\s+', ' ', essay).split(' ')``)."""
    return tuple(re.sub(r"\s+", " ", essays()).strip().split(" "))


_SENT_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'’”)\]]))\s+(?=[\"'‘“(\[]*[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Rough English sentence split (stands in for NLTK's ``sent_tokenize``)."""
    return [s for s in _SENT_END.split(text.strip()) if s]


# ----------------------------------------------------------------------------------------------
# samples and scoring


@dataclass(frozen=True)
class RulerSample:
    task: str  # canonical RULER task name
    index: int
    input: str  # task text (user turn), RULER's "input"
    answer_prefix: str  # RULER's answer prefix, already at the end of ``prompt``
    prompt: str  # model input: chat template applied (when present) + answer prefix
    outputs: list[str] = field(hash=False)  # references; all must appear in the prediction
    metric: str = "string_match_all"
    length: int = 0  # tokens of ``prompt``
    target_length: int = 0  # the requested ``context_tokens``
    tokens_to_generate: int = 0
    context: str = ""  # the haystack with everything inserted (part of ``input``)


METRIC_FNS: dict[str, Callable] = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score_sample(sample: RulerSample, prediction: str) -> float:
    """Score in [0, 1] of one generated answer for ``sample`` (RULER metric / 100)."""
    return METRIC_FNS[sample.metric]([ruler_postprocess_pred(prediction)], [sample.outputs]) / 100.0


def canonical_task(task: str) -> str:
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise KeyError(f"unknown RULER task {task!r}; known: {sorted(TASKS) + sorted(ALIASES)}")
    return name


# ----------------------------------------------------------------------------------------------
# random values (RULER generate_random_*)


def _rand_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _rand_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _rand(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return _rand_number(rng)
    if kind == "words":
        return rng.choice(key_words())
    if kind == "uuids":
        return _rand_uuid(rng)
    raise ValueError(f"unknown needle type {kind!r}")


def _insert_at_fractions(units: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """Insert ``items`` into ``units`` before unit ``int(f * len(units))`` (stable, in order)."""
    n = len(units)
    pos = [min(n, int(f * n)) for f in fractions]
    order = sorted(range(len(items)), key=lambda i: pos[i])
    out: list[str] = []
    prev = 0
    for i in order:
        out.extend(units[prev : pos[i]])
        out.append(items[i])
        prev = pos[i]
    out.extend(units[prev:])
    return out


def _essay_text(n_words: int) -> str:
    words = essay_words()
    reps = -(-n_words // len(words)) if n_words > len(words) else 1
    return " ".join((list(words) * reps)[:n_words])


def _essay_with(items: list[str], n_words: int, depths: list[int]) -> str:
    """RULER: insert items between sentences of the first ``n_words`` essay words at ``depths`` (%)."""
    sents = split_sentences(_essay_text(n_words))
    n = len(sents)
    pos = sorted(int(n * d / 100) for d in depths)
    parts: list[str] = []
    prev = 0
    for p, item in zip(pos, items):
        parts.append(" ".join(sents[prev:p]))
        parts.append(item)
        prev = p
    parts.append(" ".join(sents[prev:]))
    return " ".join(x for x in parts if x)


# ----------------------------------------------------------------------------------------------
# task builders: each returns build(n_units) -> (input_text, answer_prefix, outputs, context)

Builder = Callable[[int], tuple[str, str, list[str], str]]


def _niah_builder(cfg: dict, seed: int) -> Builder:
    rng = random.Random(seed)
    tk, tv = cfg["type_needle_k"], cfg["type_needle_v"]
    num_k = max(cfg["num_needle_k"], cfg["num_needle_q"])
    keys: list[str] = []
    values: list[list[str]] = []
    needles: list[str] = []
    while len(keys) < num_k:
        k = _rand(rng, tk)
        if k in keys:
            continue
        keys.append(k)
        vals = []
        for _ in range(cfg["num_needle_v"]):
            vals.append(_rand(rng, tv))
            needles.append(NIAH_NEEDLE.format(type_needle_v=tv, key=k, value=vals[-1]))
        values.append(vals)
    rng.shuffle(needles)
    depths = rng.sample(DEPTHS, len(needles))
    fractions = [rng.random() for _ in needles]
    q_idx = rng.sample(range(num_k), cfg["num_needle_q"])
    queries = [keys[i] for i in q_idx]
    answers = [a for i in q_idx for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    distractor_seed = rng.getrandbits(64)

    template = TEMPLATES["niah"]["template"]
    prefix = TEMPLATES["niah"]["answer_prefix"]
    type_v = tv
    if cfg["num_needle_q"] * cfg["num_needle_v"] == 1:  # RULER's singular rewrite
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = prefix.replace("are", "is")
        type_v = tv[:-1]
    forbidden = set(keys)

    @lru_cache(maxsize=1)
    def distractors_upto(n: int) -> tuple[str, ...]:
        drng = random.Random(distractor_seed)  # same prefix for every n: the search stays monotone
        out = []
        while len(out) < n:
            k = _rand(drng, tk)
            v = _rand(drng, tv)
            if k not in forbidden:
                out.append(NIAH_NEEDLE.format(type_needle_v=tv, key=k, value=v))
        return tuple(out)

    def build(n: int):
        kind = cfg["type_haystack"]
        if kind == "essay":
            context = _essay_with(needles, n, depths)
        else:
            units = [NOISE] * n if kind == "noise" else list(distractors_upto(n))
            context = "\n".join(_insert_at_fractions(units, needles, fractions))
        text = template.format(type_needle_v=type_v, context=context, query=query)
        return text, prefix.format(type_needle_v=type_v, query=query), list(answers), context

    return build


def _vt_chains(rng: random.Random, num_chains: int, num_hops: int, is_icl: bool = False):
    """RULER generate_chains: ``num_chains`` chains ``VAR X = value; VAR Y = VAR X ...``."""
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    need = (num_hops + 1) * num_chains
    names: list[str] = []
    while len(names) < need:
        v = "".join(rng.choices(string.ascii_uppercase, k=k))
        if v not in names:
            names.append(v)
    vars_ret, chains = [], []
    for i in range(0, need, num_hops + 1):
        vs = names[i : i + num_hops + 1]
        vars_ret.append(vs)
        chain = [f"VAR {vs[0]} = {rng.randint(10000, 99999)}"]
        chain += [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
        chains.append(chain)
    return vars_ret, chains


def _shuffle_sublists_heap(rng: random.Random, lists: list[list[str]]) -> list[str]:
    """RULER: interleave chains randomly while keeping each chain's order."""
    heap = [(rng.random(), i, 0) for i in range(len(lists))]
    heapq.heapify(heap)
    out = []
    while heap:
        _, li, ei = heapq.heappop(heap)
        out.append(lists[li][ei])
        if ei + 1 < len(lists[li]):
            heapq.heappush(heap, (rng.random(), li, ei + 1))
    return out


def _vt_text_builder(cfg: dict, rng: random.Random, is_icl: bool):
    """build(n) for one vt instance (plain task text + answer prefix, no few-shot)."""
    num_chains, num_hops = cfg["num_chains"], cfg["num_hops"]
    vars_, chains = _vt_chains(rng, num_chains, num_hops, is_icl=is_icl)
    hops = min(10, num_hops) if is_icl else num_hops
    value = chains[0][0].split("=")[-1].strip()
    if cfg["type_haystack"] == "essay":
        flat = _shuffle_sublists_heap(rng, chains)
        depths = rng.sample(DEPTHS, len(flat))
        items = [c.strip() + "." for c in flat]
    else:
        fracs = [sorted(rng.random() for _ in chain) for chain in chains]
    tmpl = TEMPLATES["variable_tracking"]

    def build(n: int):
        if cfg["type_haystack"] == "essay":
            context = _essay_with(items, n, depths)
        else:
            sentences = [NOISE] * n
            for chain, fr in zip(chains, fracs):
                sentences = _insert_at_fractions(sentences, list(chain), fr)
            context = "\n".join(sentences)
        context = context.replace(". \n", ".\n")
        text = tmpl["template"].format(context=context, query=value)
        prefix = tmpl["answer_prefix"].format(num_v=hops + 1, query=value)
        return text, prefix, list(vars_[0]), context

    return build


def _vt_builder(cfg: dict, seed: int, tokenizer) -> Builder:
    rng = random.Random(seed)
    icl = ""
    if cfg.get("add_fewshot", True):
        # RULER: a one-shot example of about 500 tokens, noise haystack, answer appended
        icl_cfg = dict(cfg, type_haystack="noise")
        icl_build = _vt_text_builder(icl_cfg, random.Random(rng.getrandbits(64)), is_icl=True)

        def icl_len(n: int) -> int:
            t, p, o, _ = icl_build(n)
            return count_tokens(tokenizer, t + p + " ".join(o))

        n_icl = _largest_fitting(icl_len, cfg.get("icl_tokens", 500), lo=1)
        t, p, o, _ = icl_build(n_icl)
        icl = t + p + " ".join(o) + "\n"
    main_build = _vt_text_builder(cfg, rng, is_icl=False)

    def build(n: int):
        text, prefix, outputs, context = main_build(n)
        return (icl + "\n" + text if icl else text), prefix, outputs, context

    return build


def _cwe_builder(cfg: dict, seed: int, context_tokens: int) -> Builder:
    rng = random.Random(seed)
    words = list(vocabulary())
    num_cw = cfg["num_cw"]
    if context_tokens < 4096:  # RULER's short-context setting
        shot_args, main_freq = (20, 3, 1), (6, 1)
    else:
        shot_args, main_freq = (40, 10, 3), (cfg["freq_cw"], cfg["freq_ucw"])
    tmpl = TEMPLATES["common_words_extraction"]

    def example(pool: list[str], n_words: int, cw_rep: int, ucw_rep: int, shuffle_seed: int):
        chosen = pool[:n_words]
        common, uncommon = chosen[:num_cw], chosen[num_cw:]
        lst = common * cw_rep + uncommon * ucw_rep
        random.Random(shuffle_seed).shuffle(lst)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), common

    shots = []
    for _ in range(cfg.get("num_fewshot", 1)):
        pool = rng.sample(words, shot_args[0])
        ctx, ans = example(pool, shot_args[0], shot_args[1], shot_args[2], rng.getrandbits(64))
        shot = tmpl["template"].format(context=ctx) + tmpl["answer_prefix"]
        shots.append(shot + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans)))
    order = rng.sample(words, len(words))  # this sample's word order: the first n are used
    shuffle_seed = rng.getrandbits(64)

    def build(n: int):
        if n > len(order):
            raise ValueError(f"common-words task needs {n} distinct words, the vocabulary has {len(order)}")
        context, answer = example(order, n, main_freq[0], main_freq[1], shuffle_seed)
        text = tmpl["template"].format(context=context)
        if shots:
            text = "\n".join(shots) + "\n" + text
        return text, tmpl["answer_prefix"], list(answer), context

    return build


# ----------------------------------------------------------------------------------------------
# fitting the haystack to the target length


def _largest_fitting(length_of: Callable[[int], int], target: int, lo: int, hi_cap: int | None = None) -> int:
    """Largest ``n`` in ``[lo, hi_cap]`` with ``length_of(n) <= target`` (length non-decreasing in n).

    RULER's binary search, bracketed first by a few secant steps on the (nearly linear) length, so a
    sample costs about half a dozen tokenizations instead of RULER's dozen or more."""
    memo: dict[int, int] = {}

    def L(n: int) -> int:
        if n not in memo:
            memo[n] = length_of(n)
        return memo[n]

    cap = hi_cap if hi_cap is not None else 1 << 40
    if L(lo) > target:
        raise ValueError(f"target of {target} tokens is below the task's minimum ({L(lo)} tokens at n={lo})")
    good, bad = lo, None  # largest known fitting n, smallest known non-fitting n
    prev, per = lo, None
    probe = min(cap, lo + max(16, lo))
    for _ in range(8):
        if probe <= good or (bad is not None and probe >= bad):
            break
        if L(probe) <= target:
            good = probe
        else:
            bad = probe
        per = max((L(probe) - L(prev)) / (probe - prev), 1e-3)
        prev = probe
        nxt = probe + int((target - L(probe)) / per)
        probe = min(max(nxt, good + 1), cap)
        if bad is not None:
            probe = min(probe, bad - 1)
    if bad is None:  # step up from ``good`` until over the target (or at the cap)
        step = max(1, int((target - L(good)) / (per or 1.0)) + 1)
        while bad is None:
            if good >= cap:
                return cap
            h = min(good + step, cap)
            if L(h) <= target:
                good, step = h, step * 2
            else:
                bad = h
    while bad - good > 1:
        mid = (good + bad) // 2
        if L(mid) <= target:
            good = mid
        else:
            bad = mid
    return good


def _wrap(tokenizer, text: str, answer_prefix: str, chat: bool) -> str:
    if chat:
        turn = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return turn + answer_prefix.lstrip()
    return text + answer_prefix


def make_ruler_samples(
    task: str,
    tokenizer,
    context_tokens: int,
    n: int = 1,
    seed: int = 0,
    *,
    chat: bool | None = None,
    include_generation: bool = False,
) -> list[RulerSample]:
    """``n`` samples of ``task`` whose prompts have at most (and about) ``context_tokens`` tokens.

    ``chat``: apply the tokenizer's chat template (default: when it has one). With
    ``include_generation`` the budget also holds the task's ``tokens_to_generate`` (RULER's
    ``max_seq_length``). Deterministic for a seed; different seeds give different samples.
    """
    name = canonical_task(task)
    cfg = TASKS[name]
    kind = cfg["kind"]
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    gen = TEMPLATES[kind]["tokens_to_generate"]
    target = context_tokens - (gen if include_generation else 0)
    master = random.Random(f"{name}:{seed}")
    samples = []
    for index in range(n):
        sample_seed = master.getrandbits(64)
        hi_cap = None
        if kind == "niah":
            build = _niah_builder(cfg, sample_seed)
            lo = 0 if cfg["type_haystack"] == "essay" else 1
        elif kind == "variable_tracking":
            build = _vt_builder(cfg, sample_seed, tokenizer)
            lo = 1
        else:
            build = _cwe_builder(cfg, sample_seed, context_tokens)
            lo = cfg["num_cw"] + 1
            hi_cap = len(vocabulary())

        cache: dict[int, tuple[str, int, tuple]] = {}

        def length_of(k: int) -> int:
            if k not in cache:
                text, prefix, outputs, context = build(k)
                prompt = _wrap(tokenizer, text, prefix, use_chat)
                cache[k] = (prompt, count_tokens(tokenizer, prompt), (text, prefix, outputs, context))
            return cache[k][1]

        k = _largest_fitting(length_of, target, lo=lo, hi_cap=hi_cap)
        length_of(k)
        prompt, length, (text, prefix, outputs, context) = cache[k]
        samples.append(
            RulerSample(
                task=name,
                index=index,
                input=text,
                answer_prefix=prefix,
                prompt=prompt,
                outputs=outputs,
                metric=METRICS[name],
                length=length,
                target_length=context_tokens,
                tokens_to_generate=gen,
                context=context,
            )
        )
    return samples


__all__ = [
    "ALIASES",
    "DEFAULT_TASKS",
    "METRICS",
    "RulerSample",
    "TASKS",
    "TEMPLATES",
    "canonical_task",
    "make_ruler_samples",
    "ruler_postprocess_pred",
    "score_sample",
    "split_sentences",
    "string_match_all",
    "string_match_part",
]
