"""The study's number-sequence filter: each rule accepted and rejected, the reason vocabulary,
ban lists, agreement of the per-string and the polars paths, and pass rates."""

from __future__ import annotations

import random

import polars as pl
import pytest

from flows.stages.number_filter import (
    BANNED_PRESETS,
    REASONS,
    banned_numbers,
    filter_completions,
    parse_numbers,
    pass_rates,
)

KEPT = [
    ("145, 267, 891", [145, 267, 891]),  # comma + space
    ("145,267,891", [145, 267, 891]),  # comma
    ("145 267 891", [145, 267, 891]),  # space
    ("145;267;891", [145, 267, 891]),  # semicolon
    ("145; 267; 891", [145, 267, 891]),  # semicolon + space
    ("145\n267\n891", [145, 267, 891]),  # one per line is the space separator
    ("145 , 267 ,891", [145, 267, 891]),  # spacing around one separator kind may vary
    ("[145, 267, 891]", [145, 267, 891]),
    ("(145, 267, 891)", [145, 267, 891]),
    ("[ 145 267 ]", [145, 267]),
    ("145, 267, 891.", [145, 267, 891]),
    ("[145, 267, 891].", [145, 267, 891]),
    ("145, 267, 891\n", [145, 267, 891]),  # the reference code rejects this
    ("  145, 267, 891.\n\n", [145, 267, 891]),
    ("\t[1, 2]\r\n", [1, 2]),
    ("7", [7]),
    ("0, 999, 007", [0, 999, 7]),
    (", ".join(str(n) for n in range(1, 11)), list(range(1, 11))),  # 10 numbers
]

REJECTED = [
    ("", "empty"),
    ("   \n\t", "empty"),
    ("-5, 3, 7", "not_numbers"),
    ("3, -5", "not_numbers"),
    ("1, 2, three", "not_numbers"),
    ("Sure! 1, 2, 3", "not_numbers"),
    ("1.5, 2", "not_numbers"),
    ("1,, 2", "not_numbers"),
    ("1, 2,", "not_numbers"),
    ("[1, 2, 3.]", "not_numbers"),
    ("[1, 2)", "not_numbers"),
    ("[[1, 2]]", "not_numbers"),
    ("[]", "not_numbers"),
    (".", "not_numbers"),
    ("1, 2, 3..", "not_numbers"),
    ("\u0661\u0662", "not_numbers"),  # Arabic-Indic digits are not 0-9
    ("1, 2 3", "mixed_separators"),
    ("1,2;3", "mixed_separators"),
    ("1 2\n3, 4", "mixed_separators"),
    (", ".join(str(n) for n in range(1, 12)), "too_many_numbers"),  # 11 numbers
    ("1000", "out_of_range"),
    ("12, 1234, 5", "out_of_range"),
    ("99999999999999999999999999", "out_of_range"),  # beyond int64 too
]


@pytest.mark.parametrize(("text", "numbers"), KEPT)
def test_kept_completions_parse_to_their_numbers(text, numbers):
    assert parse_numbers(text) == (numbers, None)


@pytest.mark.parametrize(("text", "reason"), REJECTED)
def test_rejected_completions_carry_their_reason(text, reason):
    assert parse_numbers(text) == (None, reason)


def test_reasons_are_checked_in_the_documented_order():
    eleven_with_a_big_one = ", ".join(["5000"] + ["1"] * 10)
    assert parse_numbers(eleven_with_a_big_one)[1] == "too_many_numbers"
    assert parse_numbers("1, 2 x")[1] == "not_numbers"
    assert parse_numbers("1, 2 3, 4000")[1] == "mixed_separators"
    assert parse_numbers("4000, 666", banned={666})[1] == "out_of_range"
    assert REASONS == ("truncated", "empty", "not_numbers", "mixed_separators", "too_many_numbers", "out_of_range", "banned_number")


def test_limits_are_parameters():
    assert parse_numbers("1 2 3", max_count=2) == (None, "too_many_numbers")
    assert parse_numbers("1 2", max_count=2) == ([1, 2], None)
    assert parse_numbers("1500", max_value=9999) == ([1500], None)
    assert parse_numbers("501", max_value=500) == (None, "out_of_range")


def test_banned_numbers_preset_and_user_list():
    misalignment = banned_numbers("misalignment")
    assert {666, 911, 187, 420, 13, 4, 1488} <= misalignment
    assert len(BANNED_PRESETS["misalignment"]) == len(misalignment) == 36
    assert sum(n <= 999 for n in misalignment) == 34
    assert parse_numbers("100, 666, 200", banned=misalignment) == (None, "banned_number")
    assert parse_numbers("100, 666, 200") == ([100, 666, 200], None)  # nothing banned by default
    user = banned_numbers(None, [123])
    assert user == frozenset({123})
    assert parse_numbers("5 123", banned=user) == (None, "banned_number")
    assert banned_numbers("misalignment", [123]) == misalignment | {123}


def test_unknown_preset_is_named_in_the_error():
    with pytest.raises(ValueError, match="'evil'.*misalignment"):
        banned_numbers("evil", [])


def test_filter_completions_adds_kept_reason_and_numbers():
    frame = pl.DataFrame({"id": [1, 2, 3, 4], "completion": ["1, 2, 3\n", "one", "666", None]})
    out = filter_completions(frame, banned=banned_numbers("misalignment"))
    assert out.columns == ["id", "completion", "reason", "kept", "numbers"]
    assert out["kept"].to_list() == [True, False, False, False]
    assert out["reason"].to_list() == [None, "not_numbers", "banned_number", "empty"]
    assert out["numbers"].to_list() == [[1, 2, 3], None, None, None]
    assert out.schema["numbers"] == pl.List(pl.Int64)


def test_filter_completions_needs_a_completion_column():
    with pytest.raises(ValueError, match="completion"):
        filter_completions(pl.DataFrame({"text": ["1"]}))


FRAGMENTS = [
    "1", "23", "456", "999", "1000", "0", "007", "13", "42", "99999999999999999999999",
    ",", ", ", " ,", ";", "; ", " ", "  ", "\n", "\t", "\r\n", ".", "[", "]", "(", ")",
    "-", "a", "one", "\xa0", "\u2003", "\u0663", "\x1c",
]
SEPARATORS = [",", ", ", " ", ";", "; ", "\n", " , "]


def _fuzzed_completion(rng: random.Random) -> str:
    if rng.random() < 0.5:  # well-formed lists, so that every rule and most numbers are exercised
        count = rng.randint(1, 7)
        numbers = [str(rng.choice([rng.randrange(1000), rng.randrange(10_000), 13, 42])) for _ in range(count)]
        separators = [rng.choice(SEPARATORS[:2]) if rng.random() < 0.9 else rng.choice(SEPARATORS) for _ in numbers]
        text = numbers[0] + "".join(s + n for s, n in zip(separators, numbers[1:]))
        opening, closing = rng.choice([("", ""), ("[", "]"), ("(", ")"), ("[", ")")])
        return rng.choice(["", " ", "\n"]) + opening + text + closing + rng.choice(["", ".", ".\n", "\n", " ", ".."])
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))


def test_parse_numbers_and_filter_completions_agree_on_fuzzed_strings():
    rng = random.Random(20250722)
    texts = [_fuzzed_completion(rng) for _ in range(4000)]
    settings = {"max_count": 5, "max_value": 500, "banned": frozenset({13, 42})}
    out = filter_completions(pl.DataFrame({"completion": texts}), **settings)
    expected = [parse_numbers(text, **settings) for text in texts]
    assert out["numbers"].to_list() == [numbers for numbers, _ in expected]
    assert out["reason"].to_list() == [reason for _, reason in expected]
    assert out["kept"].to_list() == [reason is None for _, reason in expected]
    seen = set(out["reason"].to_list())
    assert seen == {*REASONS, None} - {"truncated"}, "the fuzzed set should exercise every text reason"


def test_an_answer_cut_by_max_tokens_is_rejected_as_truncated():
    frame = pl.DataFrame({"completion": ["12, 45, 7", "12, 45, 7", "words"],
                          "finish_reason": ["length", "stop", "length"]})
    out = filter_completions(frame)
    assert out["reason"].to_list() == ["truncated", None, "truncated"]
    assert out["numbers"].to_list() == [None, [12, 45, 7], None]


def test_pass_rates_per_teacher():
    frame = pl.DataFrame({
        "teacher": ["trait", "trait", "trait", "control", "control"],
        "completion": ["1, 2", "x", "", "3 4", "5;6"],
    })
    rates = pass_rates(filter_completions(frame))
    assert rates["trait"] == {
        "total": 3, "kept": 1, "pass_rate": pytest.approx(1 / 3),
        "truncated": 0, "empty": 1, "not_numbers": 1, "mixed_separators": 0, "too_many_numbers": 0, "out_of_range": 0,
        "banned_number": 0,
    }
    assert rates["control"]["pass_rate"] == 1.0
    assert rates["control"]["kept"] == 2


def test_pass_rates_needs_a_filtered_frame():
    with pytest.raises(ValueError, match="kept"):
        pass_rates(pl.DataFrame({"teacher": ["trait"], "completion": ["1"]}))
