"""Decontamination: normalisation, n-gram and fuzzy matching (both sides of each boundary),
benchmark reading, the recipe section and the set-aside records."""

from __future__ import annotations

import json
import random

import pytest
from rapidfuzz import fuzz

from flows.inputs.decontamination import (
    BenchmarkItem,
    build_index,
    counts_by_benchmark,
    decontaminated,
    find_contamination,
    fuzzy_matches,
    ngram_match,
    normalise,
    read_benchmark,
    words_of,
)
from flows.inputs.problem_shards import problem_shards
from flows.inputs.problems import ProblemSourceError
from schemas.recipe import BenchmarkSpec, DecontaminateSpec, ProblemsSpec, RecipeError, check_job, parse_recipe
from schemas.records import Problem

LONG_ITEM = ("A farmer has 17 sheep and buys 5 more at the Saturday market near the old mill. "
             "How many sheep does the farmer have now?")


def spec(ngram: int = 8, fuzzy: float = 95, common: int = 5, names=("BENCH",)) -> DecontaminateSpec:
    return DecontaminateSpec(against=[{"source": f"{name}.jsonl", "name": name} for name in names],
                             ngram=ngram, fuzzy=fuzzy, common=common)


def index_of(*texts: str, **settings):
    return build_index("BENCH", [BenchmarkItem(text, row) for row, text in enumerate(texts)], spec(**settings))


def problem(text: str, pid: str = "p") -> Problem:
    return Problem(id=pid, problem=text, answer="1", source="problems.jsonl", source_row=3)


def found(texts: list[str], *items: str, **settings) -> list:
    return find_contamination([problem(t, f"p{i}") for i, t in enumerate(texts)], spec(**settings),
                              indexes=[index_of(*items, **settings)])


# --- normalisation ------------------------------------------------------------------


def test_normalise_drops_case_punctuation_and_spacing():
    assert normalise("  What's  the SUM,\tof $1,000 and x-y?\n") == "whats the sum of 1000 and x y"
    assert normalise("x+y=3") == normalise("x + y = 3") == "x y 3"
    assert normalise("Ｆｕｌｌ width") == "full width"  # NFKC
    assert normalise("3.5 and 1,2") == "3 5 and 1 2"  # a comma between digits is a thousands separator only before 3
    assert words_of("It’s 2 o'clock") == ["its", "2", "oclock"]


# --- n-grams ------------------------------------------------------------------------

BENCH_SENTENCE = "one two three four five six seven eight nine ten eleven twelve"


def test_a_shared_8_gram_flags_and_7_shared_words_do_not():
    index = index_of(BENCH_SENTENCE)
    eight = words_of("zebra one two three four five six seven eight yak")
    seven = words_of("zebra one two three four five six seven yak eight")
    match = ngram_match(index, eight)
    assert match is not None and match.method == "ngram" and match.shared == "one two three four five six seven eight"
    assert match.score == pytest.approx(100 / 5)  # 1 of the item's 5 n-grams
    assert ngram_match(index, seven) is None
    assert ngram_match(index_of(BENCH_SENTENCE, ngram=7), seven) is not None  # the size is the recipe's


def test_a_problem_opening_like_a_benchmark_question_is_not_flagged():
    benchmark = ["What is the sum of all positive divisors of 500?",
                 "What is the sum of all the roots of x^2 - 5x + 6?"]
    assert found(["What is the sum of all integers from 1 to 348?"], *benchmark) == []


def test_case_spacing_and_punctuation_changes_are_caught():
    copy = LONG_ITEM.upper().replace(",", " ,").replace(".", " ;  ").replace("?", "")
    [record] = found([copy], LONG_ITEM, fuzzy=0)
    assert record.method == "ngram" and record.score == 100.0


def test_an_item_wrapped_in_a_longer_prompt_is_caught_by_ngrams_not_by_the_ratio():
    wrapped = ("Please solve the following problem carefully, showing every step of your work. " + LONG_ITEM
               + " Put your final answer inside a box and double check the arithmetic before you answer.")
    [record] = found([wrapped], LONG_ITEM)
    assert record.method == "ngram" and record.score == 100.0
    assert found([wrapped], LONG_ITEM, ngram=0) == []  # `ratio` compares whole texts: wrapping is the n-grams' job


def test_one_number_changed_is_caught():
    [record] = found([LONG_ITEM.replace("17", "19")], LONG_ITEM, fuzzy=0)
    assert record.method == "ngram" and 50 < record.score < 100
    [record] = found([LONG_ITEM.replace("17", "19")], LONG_ITEM, ngram=0)
    assert record.method == "fuzzy" and 95 <= record.score < 100


def test_boilerplate_found_in_many_items_is_not_evidence():
    tail = " Express your answer as a common fraction in simplest form."
    items = [f"Item {name} asks about {n} marbles in a jar{tail}" for n, name in enumerate("abcdef")]
    problem_text = "Ana picks 3 red and 4 blue marbles out of a bag of 20." + tail
    assert found([problem_text], *items, fuzzy=0) == []  # the tail is in 6 items (common: 5)
    assert len(found([problem_text], *items, fuzzy=0, common=0)) == 1  # every n-gram counted
    assert len(found([problem_text], *items[:4], fuzzy=0)) == 1  # in 4 items only: it counts


def test_the_item_sharing_most_of_its_ngrams_is_recorded():
    first, second = "a b c d e f g h i j k l", "z y x w v a b c d e f g h"
    [record] = found(["a b c d e f g h i j k l m"], first, second, fuzzy=0)
    assert (record.benchmark_problem, record.benchmark_row, record.score) == (first, 0, 100.0)


# --- fuzzy --------------------------------------------------------------------------


def test_fuzzy_cutoff_both_sides():
    item = "Compute the number of ways to seat 8 people around a round table."
    near = "Compute the number of ways to seat 9 people around a round table!"
    ratio = fuzz.ratio(normalise(near), normalise(item))
    assert 95 < ratio < 100
    [record] = found([near], item, ngram=0, fuzzy=ratio)
    assert record.method == "fuzzy" and record.score == pytest.approx(ratio, abs=0.01)
    assert record.shared == normalise(item)
    assert found([near], item, ngram=0, fuzzy=ratio + 0.5) == []


def test_a_short_item_does_not_flag_long_problems_with_the_same_phrase():
    short = "What is 2 + 3?"
    longer = ["Ben has 4 bags with 6 apples each. What is 2 + 3 more than the number of apples he has?",
              "What is 2 + 3? Then multiply the result by the number of days in a week."]
    assert found(longer, short) == []  # partial_ratio / token_set_ratio would give 100 here
    assert [r.id for r in found(["what is 2+3", *longer], short)] == ["p0"]  # the copy itself is caught
    assert fuzz.partial_ratio(normalise(short), normalise(longer[1])) == 100


def test_fuzzy_bounds_skip_no_pair_that_reaches_the_cutoff():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(40)] + ["apples", "pears", "ana", "ben", "3", "17", "x"]
    items = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 30))) for _ in range(300)]
    texts = []
    for _ in range(400):  # near copies with a few characters changed, and unrelated texts
        base = list(rng.choice(items))
        for _ in range(rng.randint(0, 4)):
            base[rng.randrange(len(base))] = rng.choice("abcxyz 19")
        texts.append("".join(base) if rng.random() < 0.6 else " ".join(rng.choice(vocab) for _ in range(12)))
    for cutoff in (80, 90, 95):
        index = build_index("B", [BenchmarkItem(t, i) for i, t in enumerate(items)], spec(fuzzy=cutoff))
        got = [m.score if m else 0 for m in fuzzy_matches(index, texts)]
        brute = [max(fuzz.ratio(normalise(t), normalise(i), score_cutoff=cutoff) for i in items) for t in texts]
        assert got == pytest.approx(brute, abs=0.01)
        assert sum(score > 0 for score in brute) > 50


# --- records, counts, benchmarks in order -------------------------------------------


def test_set_aside_record_fields():
    items = [BenchmarkItem("Unrelated item about planets and moons orbiting far away.", 0, "test/1"),
             BenchmarkItem(LONG_ITEM, 1, "test/2")]
    index = build_index("MATH-500", items, spec(names=("MATH-500",)))
    [record] = find_contamination([problem("Solve: " + LONG_ITEM, "q-7")], spec(names=("MATH-500",)), [index])
    assert record.model_dump() == {
        "id": "q-7", "problem": "Solve: " + LONG_ITEM, "source": "problems.jsonl", "source_row": 3,
        "benchmark": "MATH-500", "benchmark_problem": LONG_ITEM, "benchmark_row": 1, "benchmark_id": "test/2",
        "method": "ngram", "score": 100.0, "shared": "a farmer has 17 sheep and buys 5",
    }


def test_a_problem_counts_for_the_first_benchmark_it_matches():
    settings = spec(names=("FIRST", "SECOND"))
    indexes = [build_index(name, [BenchmarkItem(LONG_ITEM, 0)], settings) for name in ("FIRST", "SECOND")]
    records = find_contamination([problem(LONG_ITEM, "a"), problem("Nothing alike at all here.", "b")], settings,
                                 indexes)
    assert [(r.id, r.benchmark) for r in records] == [("a", "FIRST")]
    assert counts_by_benchmark(settings, records) == {"FIRST": 1, "SECOND": 0}
    assert counts_by_benchmark(None, records) == {}


def test_decontaminated_shards_keep_run_order_and_list_the_set_aside(tmp_path):
    rows = [{"id": f"p{i}", "problem": f"Problem number {i}: how many {i} cats sit on {i + 1} mats today?",
             "answer": str(i)} for i in range(12)]
    rows[4]["problem"], rows[9]["problem"] = LONG_ITEM, LONG_ITEM.lower() + " (from a textbook)"
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"question": LONG_ITEM, "unique_id": "u1"}) + "\n")
    shards = problem_shards(ProblemsSpec(source=str(tmp_path / "problems.jsonl"), columns={"id": "id"}), 5,
                            tmp_path / "state")
    settings = DecontaminateSpec(against=[{"source": str(tmp_path / "bench.jsonl"), "name": "B",
                                           "columns": {"problem": "question", "id": "unique_id"}}])
    clean = decontaminated(shards, settings)
    assert clean.count == 10 and len(clean) == 2
    assert [p.id for p in clean.read(0) + clean.read(1)] == [f"p{i}" for i in range(12) if i not in (4, 9)]
    assert [(r.id, r.benchmark_id) for r in clean.set_aside] == [("p4", "u1"), ("p9", "u1")]
    assert decontaminated(shards, None) is shards


# --- reading benchmarks ---------------------------------------------------------------


def test_a_benchmark_needs_only_its_problem_column(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text(json.dumps({"problem": "First item text."}) + "\n" + json.dumps({"problem": "Second."}) + "\n")
    items = read_benchmark(BenchmarkSpec(source=str(path)))
    assert items == [BenchmarkItem("First item text.", 0, None), BenchmarkItem("Second.", 1, None)]
    assert BenchmarkSpec(source=str(path)).label == "math500"


def test_a_benchmark_error_names_the_benchmark_and_row(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"problem": "ok"}) + "\n" + json.dumps({"text": "no problem column"}) + "\n")
    with pytest.raises(ProblemSourceError, match=r"benchmark B: .*b.jsonl row 1: missing column 'problem'"):
        read_benchmark(BenchmarkSpec(source=str(path), name="B"))
    with pytest.raises(ProblemSourceError, match="benchmark nowhere: .*not found"):
        read_benchmark(BenchmarkSpec(source=str(tmp_path / "nowhere.jsonl")))


def test_a_hub_name_that_cannot_be_loaded_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProblemSourceError, match="benchmark MATH-500: HuggingFaceH4/MATH-500: not a local path"):
        read_benchmark(BenchmarkSpec(source="HuggingFaceH4/MATH-500"))  # offline in tests


# --- the recipe section -------------------------------------------------------------


def recipe_with(decontaminate: dict, **extra) -> dict:
    teacher = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    return {"run_name": "r", "output_dir": "out", "problems": {"source": "builtin:arithmetic", "limit": 2},
            "teachers": {"tool": teacher, "reasoning": teacher}, "decontaminate": decontaminate, **extra}


@pytest.mark.parametrize("section, message", [
    ({"against": [{"source": "a.jsonl"}], "ngram": -1}, "decontaminate.ngram"),
    ({"against": [{"source": "a.jsonl"}], "fuzzy": 101}, "decontaminate.fuzzy"),
    ({"against": []}, "decontaminate.against"),
    ({"against": [{"source": "x/a.jsonl"}, {"source": "y/a.jsonl"}]}, "names must be unique.*a"),
    ({"against": [{"source": "a.jsonl", "columns": {"question": "q"}}]}, "decontaminate.against.0.columns.question"),
])
def test_bad_sections_name_the_field(section, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_with(section))


def test_paths_resolve_like_problems_and_hub_names_stay(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "math500.jsonl").write_text("")
    recipe = parse_recipe(recipe_with({"against": [{"source": "data/math500.jsonl", "name": "MATH-500"},
                                                   {"source": "HuggingFaceH4/aime_2024"}]}), base_dir=tmp_path)
    sources = [b.source for b in recipe.decontaminate.against]
    assert sources == [str(tmp_path / "data" / "math500.jsonl"), "HuggingFaceH4/aime_2024"]
    assert [b.label for b in recipe.decontaminate.against] == ["MATH-500", "aime_2024"]
    assert recipe.decontaminate.ngram == 8 and recipe.decontaminate.fuzzy == 95


def test_only_the_problem_jobs_take_the_section():
    recipe = parse_recipe(recipe_with({"against": [{"source": "a.jsonl"}]}))
    assert check_job(recipe, "dualdistill") is recipe
    leakage = parse_recipe({"run_name": "r", "output_dir": "out", "decontaminate": {"against": [{"source": "a.jsonl"}]},
                            "leakage": {"trait": "owl", "trait_teacher": {"endpoint": "embedded"}}})
    with pytest.raises(RecipeError, match="`decontaminate:` is for the dualdistill and self_distill jobs"):
        check_job(leakage, "leakage")


def test_the_summary_table_and_markdown_give_the_counts(capsys):
    from flows.orchestration.tables import print_summary
    from flows.publishing.report import RunSummary, summary_markdown

    summary = RunSummary("r", 6, 6, 0, {}, {}, contaminated={"MATH-500": 4, "AIME": 0})
    print_summary(summary.to_dict())
    printed = capsys.readouterr().out
    assert "set aside as copies of benchmark items (never sent to a model): MATH-500 4, AIME 0" in printed
    assert "## Decontamination" in summary_markdown(summary) and "| MATH-500 | 4 |" in summary_markdown(summary)
    assert "Decontamination" not in summary_markdown(RunSummary("r", 6, 6, 0, {}, {}))


def test_a_plan_pilot_never_picks_a_benchmark_copy(tmp_path):
    from flows.orchestration.plan import _counted

    rows = [{"id": "copy", "problem": LONG_ITEM, "answer": "22"}] + [
        {"id": f"p{i}", "problem": f"Problem {i}: what is {i} times {i + 2}?", "answer": str(i * (i + 2))}
        for i in range(3)]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"problem": LONG_ITEM}) + "\n")
    recipe = parse_recipe(recipe_with({"against": [{"source": "bench.jsonl"}]},
                                      problems={"source": "problems.jsonl", "columns": {"id": "id"}}),
                          base_dir=tmp_path)
    count, pilot = _counted(recipe, 2)
    assert count == 3 and [p.id for p in pilot] == ["p0", "p1"]
