"""Benchmark decontamination: 100,000 problems against 10,000 benchmark items.

Generates seeded word problems of 20-60 words (two to five sentences drawn from templates
with a name, a place, an object or a number every few words, then a question), makes
10,000 of them the benchmark, and plants copies of 400 benchmark items among the 100,000
problems: 100 with case, spacing and punctuation changed, 100 wrapped inside a longer
prompt, 100 with one number changed, 100 with a letter changed in a word after every five
or so (no run of 8 words left whole: only the fuzzy method can catch those). Then times, each alone:
  index     the benchmark index: normalisation, n-gram postings, character counts
  normalise the problems' texts (lowercased, punctuation dropped)
  ngram     n-gram matching of every problem (inverted index of n-gram hashes)
  fuzzy     fuzzy matching of the problems the n-gram method left (length and
            character-count bounds, then rapidfuzz's ratio on the pairs left)
  total     `find_contamination` end to end: normalise, ngram and fuzzy (what a run pays
            besides the index and reading its problems back)
and prints how many problems each method set aside, how many planted copies were found, and
how many other problems were set aside: those share a run of 8 words with a benchmark item
by chance, as generated problems drawn from the same templates sometimes do ("a rectangle
of side 873 centimeters has height"); a sample of them is printed.

Run: .venv/bin/python bench/bench_decontamination.py [--problems 100000] [--items 10000]
"""

from __future__ import annotations

import argparse
import random
import time

from flows.inputs.decontamination import (
    BenchmarkItem,
    build_index,
    find_contamination,
    fuzzy_matches,
    ngram_match,
    normalise,
)
from schemas.recipe import DecontaminateSpec
from schemas.records import Problem

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemi", "Liam", "Mona",
         "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoe",
         "Aiko", "Bruno", "Carla", "Dmitri", "Elena", "Felix", "Gita", "Hamid", "Ines", "Jamal", "Kira", "Lars",
         "Maya", "Noor", "Oscar", "Priya", "Rafael", "Sofia", "Tomas", "Valeria", "Wanda", "Yara", "Amir", "Bianca",
         "Chen", "Dalia", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Leila"]
PLACES = ["bakery", "library", "garden", "school", "farm", "market", "museum", "harbor", "zoo", "stadium", "cafe",
          "workshop", "warehouse", "orchard", "theater", "pharmacy", "station", "gym", "hotel", "factory", "bookshop",
          "cinema", "dairy", "greenhouse", "kitchen", "laundry", "mall", "nursery", "office", "pier", "quarry",
          "ranch", "salon", "studio", "tailor", "vineyard", "village", "bazaar", "clinic", "depot"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "cards", "shells", "cupcakes", "tickets",
         "bottles", "boxes", "plants", "stamps", "balloons", "candles", "shirts", "notebooks", "oranges", "tiles",
         "bricks", "buttons", "carrots", "cookies", "crayons", "eggs", "erasers", "flowers", "gloves", "hats",
         "jars", "keys", "lemons", "magnets", "mangoes", "muffins", "napkins", "nails", "pears", "pebbles",
         "pies", "plates", "posters", "puzzles", "ribbons", "rings", "rocks", "scarves", "seeds", "socks",
         "spoons", "toys", "towels", "trays", "tulips", "vases", "wallets", "whistles", "yoyos", "zippers"]
UNITS = ["meters", "feet", "kilometers", "miles", "centimeters", "inches", "yards"]
SHAPES = ["rectangle", "triangle", "square", "trapezoid", "parallelogram", "rhombus", "kite"]
ADJECTIVES = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "brown", "small",
              "large", "tiny", "huge", "shiny", "wooden", "plastic", "glass", "paper", "metal", "striped", "spotted",
              "fresh", "old", "new", "heavy", "light", "round", "flat", "soft", "hard", "sweet", "sour", "spicy",
              "cheap", "fancy", "plain", "golden", "silver", "rusty", "dusty", "clean", "broken", "spare", "extra",
              "tall", "short", "long", "narrow", "wide", "bright", "dark", "warm", "cold", "wet", "dry", "rare",
              "common", "local", "foreign", "handmade", "painted", "folded", "polished"]
PLACE_ADJECTIVES = ["busy", "quiet", "old", "new", "downtown", "corner", "local", "family", "village", "seaside",
                    "hillside", "riverside", "uptown", "suburban", "rural", "central", "northern", "southern"]

# fixed runs of at most three words between numbers, names and described objects, so that
# any 8 words hold about as many bits as real problem text: problems share a run of 8
# words by chance about as rarely as real problems do
SENTENCES = [
    "{n1} works {a} hours at the {adjp} {place} on day {e}.",
    "On day {d}, {n1} bought {a} {adj} {item} for {p} dollars.",
    "{n1} has {a} {adj} {item}; {n2} has {b} more.",
    "The {adjp} {place} sold {a} {adj} {item} by {h}:{m}.",
    "{b} {adj} boxes of {w} kilograms hold {a} {item} each.",
    "A {shape} of side {a} {unit} has height {b} {unit}.",
    "{n2} gives {b} of {pronoun} {a} {adj} {item} to {n1}.",
    "The {adj} {item} cost {p} dollars, up {pct} percent since day {e}.",
    "{n1} walks {a} {unit} to the {adjp} {place}, then {b} {unit} back.",
    "After {d} days, {n2} had {c} {adj} {item} and {b} {item2}.",
    "{a} {adj} {item} weigh {w} grams; {n1} packs them in {b} crates.",
    "{n1} and {n2} share {c} {adj} {item}; {n1} gets {a} more.",
]
QUESTIONS = [
    "How many {adj} {item} does {n1} have after {d} days?",
    "Find {n1}'s cost for {d} {adj} {item}, in dollars.",
    "Over {e} minutes, how many {unit} does {n1} cover?",
    "Find {n1}'s total area for {d} {shape}s.",
    "How many {adj} {item} does {n2} still have on day {e}?",
    "What percent of {n2}'s {a} {adj} {item} were kept?",
    "How many more {adj} {item} than {n1} does {n2} have?",
    "Find the mean of {a}, {b} and {w}.",
]
WRAPPERS = [
    "Please solve the following problem carefully and put the final answer in a box. {problem} "
    "Show every step of your reasoning before you give the answer.",
    "Here is a question from my homework that I could not finish last night: {problem} Thanks a lot!",
]


def slots(rng: random.Random) -> dict[str, object]:
    a, b = rng.randint(2, 9999), rng.randint(2, 9999)
    return {"n1": rng.choice(NAMES), "n2": rng.choice(NAMES), "place": rng.choice(PLACES),
            "adjp": rng.choice(PLACE_ADJECTIVES), "adj": rng.choice(ADJECTIVES), "item": rng.choice(ITEMS),
            "item2": rng.choice(ITEMS), "unit": rng.choice(UNITS), "shape": rng.choice(SHAPES),
            "pronoun": rng.choice(["her", "his", "their"]), "a": a, "b": b, "c": a + b + rng.randint(1, 99),
            "d": rng.randint(2, 99), "e": rng.randint(100, 9999), "h": rng.randint(1, 12),
            "m": f"{rng.randint(0, 59):02d}", "w": rng.randint(2, 9999),
            "p": f"{rng.randint(1, 40)}.{rng.randint(0, 99):02d}", "pct": rng.randint(2, 95)}


def word_problem(rng: random.Random) -> str:
    """A problem of 20-60 words: two to six sentences and a question, sharing their slots."""
    while True:
        fill = slots(rng)
        text = " ".join(s.format(**fill) for s in rng.sample(SENTENCES, rng.randint(2, 6)))
        text += " " + rng.choice(QUESTIONS).format(**fill)
        if 20 <= len(text.split()) <= 60:
            return text


def restyled(text: str, rng: random.Random) -> str:
    """Case, spacing and punctuation changed."""
    text = text.upper() if rng.random() < 0.5 else text.lower()
    return text.replace(",", " ,").replace(".", " .  ").replace("?", "")


def typos(text: str, rng: random.Random) -> str:
    """One letter changed in a word after every five or so (in the normalised words): no run
    of 8 words is left whole, the ratio stays high."""
    words = normalise(text).split()
    unchanged = rng.randrange(5)
    for i, word in enumerate(words):
        unchanged += 1
        if unchanged > 5 and word.isalpha():
            j = rng.randrange(len(word))
            words[i] = word[:j] + rng.choice([c for c in "aeiou" if c != word[j]]) + word[j + 1:]
            unchanged = 0
    return " ".join(words)


def one_number_changed(text: str, rng: random.Random) -> str:
    numbers = [w for w in text.split() if w.rstrip(".,?").isdigit()]
    old = rng.choice(numbers).rstrip(".,?")
    return text.replace(old, str(int(old) + rng.randint(1, 9)), 1)


def synthetic(problems: int, items: int, seed: int = 0) -> tuple[list[Problem], list[BenchmarkItem], set[str]]:
    """`problems` problems (planted copies among them), the benchmark, and the planted problems' ids."""
    rng = random.Random(seed)
    bench = [BenchmarkItem(text=word_problem(rng), row=i) for i in range(items)]
    planted: list[str] = []
    for kind, change in (("restyled", restyled),
                         ("wrapped", lambda t, r: r.choice(WRAPPERS).format(problem=t)),
                         ("one-number", one_number_changed), ("typos", typos)):
        for item in rng.sample(bench, min(100, items)):
            planted.append(change(item.text, rng))
    texts = [word_problem(rng) for _ in range(problems - len(planted))]
    at = sorted(rng.sample(range(problems), len(planted)))
    planted_ids: set[str] = set()
    for position, text in zip(at, planted):
        texts.insert(position, text)
    out = []
    for row, text in enumerate(texts):
        out.append(Problem(id=f"p{row}", problem=text, answer="0", source="synthetic", source_row=row))
    for position in at:
        planted_ids.add(f"p{position}")
    return out, bench, planted_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--ngram", type=int, default=8)
    parser.add_argument("--fuzzy", type=float, default=95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    problems, bench, planted = synthetic(args.problems, args.items, args.seed)
    print(f"generated {len(problems):,} problems ({len(planted)} planted copies) and {len(bench):,} benchmark items "
          f"in {time.perf_counter() - started:.1f} s; words per problem "
          f"{min(len(p.problem.split()) for p in problems)}-{max(len(p.problem.split()) for p in problems)}")

    spec = DecontaminateSpec(against=[{"source": "synthetic", "name": "BENCH"}], ngram=args.ngram, fuzzy=args.fuzzy)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    index = build_index("BENCH", bench, spec)
    timings["index"] = time.perf_counter() - t

    t = time.perf_counter()
    normalised = {p.id: normalise(p.problem) for p in problems}
    timings["normalise"] = time.perf_counter() - t

    t = time.perf_counter()
    by_ngram = {}
    for problem in problems:
        match = ngram_match(index, normalised[problem.id].split())
        if match is not None:
            by_ngram[problem.id] = match
    timings["ngram"] = time.perf_counter() - t

    t = time.perf_counter()
    left = [p.id for p in problems if p.id not in by_ngram]
    matches = fuzzy_matches(index, [normalised[i] for i in left], normalised=True)
    by_fuzzy = {i: m for i, m in zip(left, matches) if m is not None}
    timings["fuzzy"] = time.perf_counter() - t

    t = time.perf_counter()
    found = find_contamination(problems, spec, indexes=[index])
    timings["total"] = time.perf_counter() - t

    for step, seconds in timings.items():
        print(f"{step:>9}: {seconds:6.2f} s")
    found_ids = {c.id for c in found}
    print(f"set aside: {len(found):,} (n-gram {len(by_ngram):,}, fuzzy only {len(by_fuzzy):,}); "
          f"planted copies found: {len(found_ids & planted)}/{len(planted)}; "
          f"other problems set aside: {len(found_ids - planted)}")
    missed = sorted(planted - found_ids, key=lambda i: int(i[1:]))[:3]
    for problem_id in missed:
        print(f"  missed: {problems[int(problem_id[1:])].problem[:120]}")
    for record in [c for c in found if c.id not in planted][:3]:
        print(f"  by chance ({record.method}, score {record.score}): shares {record.shared!r}")


if __name__ == "__main__":
    main()
