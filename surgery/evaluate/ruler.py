"""RULER-style long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), generated in-process to RULER's definitions: nothing is
downloaded, and every prompt is assembled from token ids to exactly the requested length (optional
BOS, instruction, haystack slices with the needles inserted, question, answer prefix; no chat
template), so every model sharing a tokenizer sees identical ids before and after a patch.

Tasks (RULER's templates; a prompt's references are the strings its answer must contain):

- `niah_single`: one needle "One of the special magic numbers for {key} is: {value}." (key an
  adjective-noun pair, value a 7-digit number); the question asks for the key's number.
- `niah_multikey`: the queried needle plus 3 distractor needles with other keys (niah_multikey_1).
- `niah_multivalue`: one key with 4 needles (4 values); all 4 must be recalled.
- `niah_multiquery`: 4 keys with one value each, all 4 asked at once.
- `vt` (variable tracking): one chain of 4 hops, "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ...
  inserted in order through the haystack; the answer is all 5 names that hold the value.
- `cwe` (common words extraction): a numbered list in which 10 common words appear 30 times each
  and every other word 3 times (6 and 1 below 4096 tokens, as RULER does); the answer is the 10
  common words. The number of uncommon words fills the length; when the built-in word list runs
  out (beyond ~8k tokens), both frequencies are multiplied by the same factor instead.

Depth: the fraction of the haystack before the needle. For the multi-needle tasks it places the
queried (first) needle and the others follow at depth + j/4 (mod 1), evenly spread; for `vt` it
places the first assignment and the remaining hops follow in order, evenly spaced between it and
the end of the haystack; `cwe` has no haystack, so there depth only selects another random list.
Needles go between sentences: an insertion point snaps to the nearest sentence boundary of the
haystack within 5% of its length or 32 tokens (else the exact token position).

Exact length: the haystack (held-out text or the needle eval's filler sentences) is sliced to
fill whatever the fixed pieces leave. For `cwe` the list is built from per-entry pieces (" 12."
and " word") whose token counts add up exactly, uncommon occurrences are added while they fit and
the last few tokens are the start of one more uncommon entry.

Scoring is RULER's `string_match_all`: the fraction of references that occur in the greedy answer
(case-insensitive substring), averaged over prompts. Unlike RULER, the requested length is the
prompt's length (RULER counts the tokens to generate inside it); RULER's few-shot example for `vt`
and `cwe` is not included."""

from __future__ import annotations

import bisect
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from surgery.data import TextSource, load_text, token_stream
from surgery.errors import SurgeryError, did_you_mean
from surgery.evaluate.base import Eval, register
from surgery.evaluate.needle import FILLER, fractions
from surgery.evaluate.stats import Estimate, mean_interval, outcomes, samples_for_halfwidth
from surgery.io import progress
from surgery.lazy import torch

log = logging.getLogger(__name__)

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
MAX_NEW_TOKENS = {  # enough for the answers with some slack (RULER: 128 for niah, 30 vt, 120 cwe)
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 64,
    "niah_multiquery": 64,
    "vt": 40,
    "cwe": 120,
}
PROMPTS_PER_CELL = samples_for_halfwidth(0.15)  # 43: a Wilson interval at p=0.5 no wider than ±0.15

# RULER's templates (scripts/data/synthetic/constants.py); the answer prefix ends the prompt
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_INTRO = (
    "{some} special magic {numbers} {are} hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the {numbers} afterwards.\n"
)
NIAH_QUESTION = (
    "\nWhat {are_all} the special magic {numbers} for {query} mentioned in the provided text?"
    " The special magic {numbers} for {query} mentioned in the provided text {are}"
)
NIAH_NEEDLES = {  # task: (keys in the haystack, values per key, keys asked)
    "niah_single": (1, 1, 1),
    "niah_multikey": (4, 1, 1),
    "niah_multivalue": (1, 4, 1),
    "niah_multiquery": (4, 1, 4),
}
VT_HOPS = 4
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_LINE = " VAR {name} = {value}"
VT_QUESTION = (  # "assgined" is RULER's spelling
    "\nQuestion: Find all variables that are assigned the value {value} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above,"
    " {count} variables are assgined the value {value}, they are:"
)
CWE_COMMON = 10
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    "\nQuestion: What are the 10 most common words in the above list?"
    " Answer: The top 10 words that appear most often in the list are:"
)

# Plain English words (no word contains another, and none occurs in the templates' questions):
# niah keys are adjective-noun pairs as in RULER, cwe draws from all three lists.
ADJECTIVES = """
able ancient angry bitter bold brave bright broad brown busy calm cheap clean clever cold cozy crisp curly
damp dark deep dizzy dry dusty eager early empty fancy fierce flat fresh friendly funny gentle giant glad
golden grand green grumpy happy heavy hollow honest huge humble hungry jolly kind large lazy little lively
lonely lucky mellow messy mighty modern muddy neat nervous noble noisy odd orange polite proud purple quick
quiet rapid rare rich rough royal rusty sandy scary shiny short silent silly silver simple sleepy slim slow
smooth snowy soft solid sour steep sticky stormy strange strong sunny sweet swift tall tame tender thick tidy
tiny tough ugly vast violet warm wary weak wet whole wicked wide wild windy wise witty wooden young zesty
""".split()
NOUNS = """
acorn airport album anchor apple apron artist autumn badge balloon bamboo banana banjo barn basket beach
beaver blanket bottle bracelet breeze bridge bucket butter cabbage cabin cactus camera camel candle canoe
canyon carpet carrot castle cellar cherry chimney circus clock coconut compass copper cottage cousin crayon
cricket crown cupboard curtain daisy desert diamond dinner doctor dolphin donkey dragon eagle engine envelope
falcon farmer feather fence ferry finger flag flute forest fossil fountain garden garlic giraffe glacier glove
goat guitar hammer harbor helmet honey horse hospital island jacket jungle kettle kitten ladder lantern lemon
library lighthouse lizard lobster magnet mango marble meadow melon mirror monkey mountain mushroom napkin
needle notebook ocean office onion orchard oyster paddle palace panda parrot peach pebble pencil piano pillow
pirate planet plum pocket potato puzzle pyramid quilt rabbit radio railway raven ribbon river robot rocket
saddle sailor salmon sandal scarf scissors shadow shark shelf shovel sketch spider spoon squirrel stadium
statue stove suitcase sunflower teapot temple thunder tiger toaster tomato tractor trumpet tulip tunnel turtle
umbrella valley violin volcano wagon walnut walrus wardrobe whistle window wizard wolf yogurt zebra anthem
bishop blossom bonnet broom buffalo button canal cathedral cedar chapel cobra comet coral cotton cradle dagger
dune fabric fiddle galaxy gazelle glider granite harp hedge hornet iceberg ivory jasmine kayak kernel lagoon
leopard lilac llama locket mantle maple meteor mitten moose mosaic nectar nugget oasis olive orbit otter
pancake pasture peacock pelican pinecone pistachio plank pony prairie pudding pumpkin quartz raccoon reef
rhubarb saffron sapphire scooter sequoia shrimp skillet sled slipper snail sonnet spinach sponge sprout
stapler summit swan tambourine thimble thistle tortoise trolley tundra turnip vanilla velvet vinegar waffle
wren yacht
""".split()
VERBS = """
accept admire advise agree announce appear argue arrange arrive attach attract avoid balance bathe
behave belong blink boast borrow bounce breathe brush build calculate carve celebrate chase cheer chew choose
clap climb collect compare conclude confess consider copy cough dance decide deliver describe design destroy
develop discover divide dream drift educate encourage escape examine exercise explore fetch float fold forgive
gather giggle glow grab greet guard guess hover hurry imagine improve invent invite juggle kneel knit laugh
launch listen manage march melt mumble negotiate nibble notice obey observe paint pause persuade
plant polish pounce pray predict prepare pretend promise protect pull punish relax repair replace
rescue return scatter scribble search settle shiver sneeze spill squeeze stretch stumble surrender teach
tickle travel tremble twist uncover vanish wander whisper wiggle wonder worry yawn
""".split()
WORDS = ADJECTIVES + NOUNS + VERBS


class TooShort(SurgeryError):
    """A prompt does not fit the requested length; `need` is the length it needs."""

    def __init__(self, message: str, need: int):
        super().__init__(message)
        self.need = need


def score(prediction: str, references: list[str]) -> float:
    """RULER's string_match_all: the fraction of `references` found in `prediction`, ignoring case."""
    if not references:
        raise ValueError("score needs at least one reference")
    answer = prediction.lower()
    return sum(r.lower() in answer for r in references) / len(references)


def estimate(scores: list[float]) -> Estimate:
    """Mean score with a 95% interval: Wilson when every score is 0 or 1, else a bootstrap."""
    if all(s in (0.0, 1.0) for s in scores):
        return outcomes(scores)
    return mean_interval(scores, bounded=True)


@dataclass(frozen=True)
class Haystack:
    """Haystack token ids and the positions between sentences where a needle may go."""

    ids: torch.Tensor
    cuts: list[int]

    def place(self, depth: float, room: int) -> int:
        """Insertion point for `depth` in the first `room` ids: the nearest sentence boundary
        within 5% of `room` or 32 tokens (the ends count), else the exact position."""
        want, window = round(depth * room), max(32, room // 20)
        lo, hi = bisect.bisect_left(self.cuts, want - window), bisect.bisect_right(self.cuts, min(room, want + window))
        near = [p for p in [*self.cuts[lo:hi], 0, room] if abs(p - want) <= window]
        return min(near, key=lambda p: (abs(p - want), p)) if near else want


def sentence_cuts(tokenizer: Any, ids: torch.Tensor) -> list[int]:
    """Positions p where token p-1 ends a sentence or a line and token p starts with whitespace."""
    unique = sorted(set(ids.tolist()))
    text = dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]), strict=True))
    raw = dict(zip(unique, tokenizer.convert_ids_to_tokens(unique), strict=True))
    ends = {i for i, t in text.items() if t.endswith("\n") or t.rstrip(" ").endswith((".", "!", "?"))}
    spaced = {i for i, t in text.items() if t[:1].isspace() or str(raw[i])[:1] in ("Ġ", "▁", "Ċ")}
    seq = ids.tolist()
    return [p for p in range(1, len(seq)) if seq[p - 1] in ends and seq[p] in spaced]


def join_keys(keys: list[str]) -> str:
    """'a', 'a, b, and c' as RULER writes a query over several keys."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


@register
class Ruler(Eval):
    """RULER's synthetic long-context tasks (retrieval, multi-hop tracing, aggregation) by length and depth.

    Each task's score at a length has `trials * len(depths)` prompts; the defaults (9 x 5 = 45)
    give at least 43, so a Wilson interval at 50% recall is no wider than ±0.15."""

    name: ClassVar[str] = "ruler"
    higher_is_better: ClassVar[dict[str, bool]] = {**{t: True for t in TASKS}, "avg": True}

    tasks: list[str] = Field(list(TASKS), description="tasks to run: " + ", ".join(TASKS))
    lengths: list[int] = Field([4096], description="prompt lengths in tokens")
    depths: list[float] = Field(
        [0.1, 0.3, 0.5, 0.7, 0.9], description="positions of the (first) needle, 0 = start of the haystack"
    )
    trials: int = Field(9, ge=1, description="prompts per (task, length, depth) cell")
    haystack: Literal["text", "filler"] = Field(
        "text", description="the held-out text source, or the needle eval's repeated filler sentences"
    )
    text: TextSource = Field("pydoc", description="text source when haystack=text")
    seed: int = Field(0, description="seed for keys, values and word lists")
    batch: int = Field(5, ge=1, description="prompts per generate call")
    max_new_tokens: int | None = Field(
        None, ge=1, description="tokens generated per answer; default per task: " + str(MAX_NEW_TOKENS)
    )
    bos: bool = Field(True, description="prepend the tokenizer's BOS token when it has one")

    def metric_stems(self) -> list[str]:
        return ["avg", *self.tasks]

    @field_validator("tasks", "lengths", "depths", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float, str)) else v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("tasks must name at least one task: " + ", ".join(TASKS))
        for t in v:
            if t not in TASKS:
                raise ValueError(
                    f"unknown ruler task '{t}'{did_you_mean(t, list(TASKS))}; choose from {', '.join(TASKS)}"
                )
        return list(dict.fromkeys(v))

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("lengths must be positive token counts")
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        return fractions(v)

    def cells(self) -> list[tuple[str, int, float, int]]:
        """(task, length, depth, trial) of every prompt, in generation order."""
        return [
            (task, n, d, t)
            for n in self.lengths
            for task in self.tasks
            for d in self.depths
            for t in range(self.trials)
        ]

    def haystack_tokens(self, tokenizer: Any) -> Haystack:
        """The haystack stream (repeated to cover the longest prompt) and its sentence boundaries."""
        source = load_text(self.text, "heldout") if self.haystack == "text" else FILLER * 8
        once = token_stream(tokenizer, source)
        if len(once) == 0:
            raise SurgeryError(f"ruler: the haystack text {self.text} is empty")
        ids = once.repeat(max(self.lengths) // len(once) + 1)
        return Haystack(ids, sentence_cuts(tokenizer, ids))

    def sample(
        self, tokenizer: Any, task: str, length: int, depth: float, trial: int, hay: Haystack
    ) -> tuple[torch.Tensor, list[str]]:
        """One prompt of exactly `length` ids and its references, deterministic in the seed, task,
        depth and trial, so changing the grid does not shift the keys of the other cells. The length
        is left out on purpose: a cell has the same keys at every length (only the haystack grows),
        which pairs the lengths and makes a too-short error's minimum exact."""
        rng = random.Random(f"ruler/{self.seed}/{task}/{depth}/{trial}")
        if task == "vt":
            return self._vt(tokenizer, length, depth, rng, hay)
        if task == "cwe":
            return self._cwe(tokenizer, length, rng)
        return self._niah(tokenizer, task, length, depth, rng, hay)

    def _bos(self, tokenizer: Any) -> list[int]:
        return [tokenizer.bos_token_id] if self.bos and tokenizer.bos_token_id is not None else []

    def _too_short(self, task: str, length: int, need: int) -> TooShort:
        return TooShort(f"ruler: length {length} is too short for the {task} prompt; use at least {need} tokens", need)

    def _assemble(
        self,
        tokenizer: Any,
        task: str,
        length: int,
        head: str,
        tail: str,
        needles: list[str],
        depths: list[float],
        hay: Haystack,
    ) -> torch.Tensor:
        """BOS + head + haystack with `needles` at `depths` + tail, exactly `length` ids."""
        encode = lambda s: token_stream(tokenizer, s)  # noqa: E731
        bos = torch.tensor(self._bos(tokenizer), dtype=torch.long)
        head_ids, tail_ids, pieces = encode(head), encode(tail), [encode(s) for s in needles]
        room = length - len(bos) - len(head_ids) - len(tail_ids) - sum(len(p) for p in pieces)
        if room < 0:
            raise self._too_short(task, length, length - room)
        if len(hay.ids) < room:
            raise SurgeryError(f"ruler: the haystack has {len(hay.ids)} tokens, fewer than the {room} needed")
        at = [hay.place(d, room) for d in depths]
        parts, prev = [bos, head_ids], 0
        for j in sorted(range(len(pieces)), key=lambda j: (at[j], j)):
            parts += [hay.ids[prev : at[j]], pieces[j]]
            prev = at[j]
        parts += [hay.ids[prev:room], tail_ids]
        ids = torch.cat(parts)
        assert len(ids) == length, (len(ids), length)
        return ids

    def _niah(
        self, tokenizer: Any, task: str, length: int, depth: float, rng: random.Random, hay: Haystack
    ) -> tuple[torch.Tensor, list[str]]:
        n_keys, n_values, n_asked = NIAH_NEEDLES[task]
        pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n_keys)
        keys = [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]
        values = [str(v) for v in rng.sample(range(10**6, 10**7), n_keys * n_values)]
        needles = [(keys[j // n_values], values[j]) for j in range(n_keys * n_values)]
        references = values[: n_asked * n_values]  # keys[:n_asked]'s values
        one = len(references) == 1
        words = {
            "some": "A" if one else "Some",
            "numbers": "number" if one else "numbers",
            "are": "is" if one else "are",
            "are_all": "is" if one else "are all",
        }
        head = NIAH_INTRO.format(**words)
        tail = NIAH_QUESTION.format(query=join_keys(keys[:n_asked]), **words)
        texts = [NIAH_NEEDLE.format(key=k, value=v) for k, v in needles]
        depths = [(depth + j / len(texts)) % 1 for j in range(len(texts))]
        return self._assemble(tokenizer, task, length, head, tail, texts, depths, hay), references

    def _vt(
        self, tokenizer: Any, length: int, depth: float, rng: random.Random, hay: Haystack
    ) -> tuple[torch.Tensor, list[str]]:
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10000, 99999))
        lines = [VT_LINE.format(name=names[0], value=value)]
        lines += [VT_LINE.format(name=names[j + 1], value=f"VAR {names[j]}") for j in range(VT_HOPS)]
        depths = [depth + j * (1 - depth) / len(lines) for j in range(len(lines))]
        tail = VT_QUESTION.format(value=value, count=len(names))
        return self._assemble(tokenizer, "vt", length, VT_INTRO, tail, lines, depths, hay), names

    def _cwe(self, tokenizer: Any, length: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
        encode = lambda s: token_stream(tokenizer, s).tolist()  # noqa: E731
        batch = lambda ss: tokenizer(ss, add_special_tokens=False, return_attention_mask=False)["input_ids"]  # noqa: E731
        bos = self._bos(tokenizer)
        head, tail = encode(CWE_INTRO), encode(CWE_QUESTION)
        room = length - len(bos) - len(head) - len(tail)
        freq_common, freq_rare = (30, 3) if length >= 4096 else (6, 1)  # RULER's switch for short contexts
        pool = rng.sample(WORDS, len(WORDS))
        common, rare = pool[:CWE_COMMON], pool[CWE_COMMON:]
        word_ids = dict(zip(pool, batch([" " + w for w in pool]), strict=True))
        numbers: list[list[int]] = []  # numbers[i] = ids of entry i+1's number: "1.", " 2.", ...

        def number_costs(upto: int) -> None:
            if upto > len(numbers):
                start = len(numbers) + 1
                numbers.extend(batch([f"{'' if i == 1 else ' '}{i}." for i in range(start, max(upto, 2 * start) + 1)]))

        def rare_word(j: int, k: int) -> str:  # the word of the j-th rare occurrence at scale k
            return rare[min(j // (freq_rare * k), len(rare) - 1)]

        def cost(k: int, m: int) -> int:  # ids of the list with scale k and m rare occurrences
            entries = CWE_COMMON * freq_common * k + m
            number_costs(entries)
            common_cost = sum(len(word_ids[w]) for w in common) * freq_common * k
            return (
                sum(len(n) for n in numbers[:entries])
                + common_cost
                + sum(len(word_ids[rare_word(j, k)]) for j in range(m))
            )

        if cost(1, 0) > room:
            raise self._too_short("cwe", length, length - room + cost(1, 0))
        full = lambda k: freq_rare * k * len(rare)  # noqa: E731
        k = max(1, room // cost(1, full(1)))  # about the smallest scale whose longest list fills the room
        while cost(k, full(k)) < room:
            k += 1
        lo, hi = 0, full(k)  # the most rare occurrences that fit: cost(k, lo) <= room < cost(k, hi + 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(k, mid) <= room else (lo, mid - 1)
        if cost(k, lo) > room:  # the common words alone overflow at this scale
            raise SurgeryError(f"ruler: cannot fill {length} tokens with the cwe word list")
        words = common * (freq_common * k) + [rare_word(j, k) for j in range(lo)]
        rng.shuffle(words)
        ids = [i for n, w in zip(numbers, words, strict=False) for i in n + word_ids[w]]
        number_costs(len(words) + 1)
        extra = numbers[len(words)] + word_ids[rare_word(lo, k)]  # one more rare entry, cut to fit
        ids += extra[: room - len(ids)]
        assert len(ids) == room, (len(ids), room)
        return torch.tensor(bos + head + ids + tail, dtype=torch.long), common

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, float | Estimate], dict[str, Any]]:
        device = next(model.parameters()).device
        if self.trials * len(self.depths) < PROMPTS_PER_CELL:  # said when it runs, not each time it is built
            log.warning(
                "ruler: %d prompts per task and length (trials x depths); %d keep the 95%% interval within ±0.15",
                self.trials * len(self.depths),
                PROMPTS_PER_CELL,
            )
        hay = self.haystack_tokens(tokenizer)
        cells = self.cells()
        shortest = min(self.lengths)
        need = 0  # fail on a too-short length before generating anything, with the grid's minimum
        for task, n, d, t in cells:
            if n == shortest:
                try:
                    self.sample(tokenizer, task, n, d, t, hay)
                except TooShort as err:
                    need = max(need, err.need)
        if need:
            raise SurgeryError(f"ruler: length {shortest} is too short for these prompts; use at least {need} tokens")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        scores: dict[tuple[str, int, float, int], float] = {}
        answers: list[dict[str, Any]] = []
        keep = max(1, 200 // (len(self.tasks) * len(self.lengths)))  # stored answers per task and length
        bar = progress(len(cells), "ruler", "prompt")
        for length in self.lengths:
            for task in self.tasks:
                group = [c for c in cells if c[0] == task and c[1] == length]
                for s in range(0, len(group), self.batch):
                    chunk = group[s : s + self.batch]
                    built = [self.sample(tokenizer, *c[:4], hay) for c in chunk]
                    ids = torch.stack([b[0] for b in built]).to(device)
                    log.info("ruler: %d %s prompts of %d tokens", len(chunk), task, length)
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=self.max_new_tokens or MAX_NEW_TOKENS[task],
                        do_sample=False,
                        pad_token_id=pad,
                    )
                    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
                    for (_, n, d, t), (_, refs), text in zip(chunk, built, texts, strict=True):
                        scores[(task, n, d, t)] = score(text.strip(), refs)
                        if sum(a["task"] == task and a["length"] == n for a in answers) < keep and len(answers) < 200:
                            answers.append(
                                {
                                    "task": task,
                                    "length": n,
                                    "depth": d,
                                    "references": refs,
                                    "answer": text.strip()[:300],
                                    "score": scores[(task, n, d, t)],
                                }
                            )
                    bar.update(len(chunk))
        bar.close()
        metrics: dict[str, float | Estimate] = {}
        grid: dict[str, dict[str, dict[str, float]]] = {}
        for task in self.tasks:
            metrics[task] = estimate([v for c, v in scores.items() if c[0] == task])
            for n in self.lengths:
                metrics[f"{task}@{n}"] = estimate([v for c, v in scores.items() if c[0] == task and c[1] == n])
                grid.setdefault(task, {})[str(n)] = {
                    str(d): sum(scores[(task, n, d, t)] for t in range(self.trials)) / self.trials for d in self.depths
                }
        for n in self.lengths:  # every task has the same number of prompts, so this is the mean over tasks
            metrics[f"avg@{n}"] = estimate([v for c, v in scores.items() if c[1] == n])
        return metrics, {"grid": grid, "answers": answers}


def plot_ruler(grids: dict[str, dict], path: Path) -> Path | None:
    """Recall heatmaps (length x depth): one row per label, one panel per task; `grids` maps a label
    ("before", "after yarn x2") to a ruler details["grid"]. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {label: grid for label, grid in grids.items() if grid}
    if not grids:
        return None
    tasks = [t for t in TASKS if any(t in g for g in grids.values())]
    tasks += sorted({t for g in grids.values() for t in g} - set(tasks))
    fig, axes = plt.subplots(
        len(grids),
        len(tasks),
        figsize=(3.2 * len(tasks) + 1, 2.8 * len(grids) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    cmap = plt.get_cmap("cividis")
    image = None
    for r, (label, grid) in enumerate(grids.items()):
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            if task not in grid:
                ax.set_axis_off()
                continue
            lengths = sorted(grid[task], key=int)
            depths = sorted({d for row in grid[task].values() for d in row}, key=float)
            values = [[grid[task][n].get(d, float("nan")) for d in depths] for n in lengths]
            image = ax.imshow(values, vmin=0, vmax=1, cmap=cmap, aspect="auto")
            ax.set_xticks(range(len(depths)), [f"{float(d):.0%}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), lengths, fontsize=7)
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    color = "white" if v == v and v < 0.55 else "black"  # dark cells get white text
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
            ax.set_xlabel("depth (seed only)" if task == "cwe" else "depth", fontsize=8)
            if c == 0:
                ax.set_ylabel("context length (tokens)", fontsize=8)
            ax.set_title(f"{task} · {label}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="recall", shrink=0.9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
