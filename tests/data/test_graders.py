"""Every grader on the edge cases users' models produce: whitespace, case, markdown, number formats, broken JSON."""

import pytest

from toolchain.data.graders import GraderConfig, Ungradable, check_gold, make_grader
from toolchain.errors import UserError


def grade(kind, gold, out, **kw):
    return make_grader(GraderConfig(kind=kind, **kw))(gold, out)


def test_exact_collapses_whitespace_but_keeps_case():
    assert grade("exact", "New  York", " New York\n")
    assert not grade("exact", "New York", "new york")
    assert not grade("exact", "New York", "New York City")


@pytest.mark.parametrize(
    "out,ok",
    [
        ("spam", True),
        ("Spam.", True),
        ("**SPAM**", True),
        ('"spam"', True),
        ("spam - it offers a prize", True),
        ("\n\nSpam\nbecause ...", True),
        ("ham", False),
        ("This is spam", False),  # the first word is the answer, not any word
        ("spammy", False),
        ("", False),
    ],
)
def test_label_reads_the_first_line_or_word(out, ok):
    assert grade("label", "spam", out, labels=["spam", "ham"]) is ok


def test_label_gold_outside_the_label_set_is_a_data_error():
    with pytest.raises(Ungradable, match="none of the labels"):
        check_gold(GraderConfig(kind="label", labels=["spam", "ham"]), "junk")


def test_contains_is_case_insensitive():
    assert grade("contains", "Paris", "The capital is paris, of course")
    assert not grade("contains", "Paris", "The capital is Lyon")


@pytest.mark.parametrize(
    "gold,out,ok",
    [
        ("1000", "1,000", True),
        ("1000", "The answer is 1e3.", True),
        ("-2.5", "x = -2.5", True),
        ("3", "$3", True),
        ("40", "40%", True),
        ("1000", "100", False),
        ("12", "no number here", False),
        ("0.1", "0.10000000001", True),
    ],
)
def test_number_parses_the_first_number(gold, out, ok):
    assert grade("number", gold, out) is ok


def test_number_gold_without_a_number_is_a_data_error():
    with pytest.raises(Ungradable, match="holds no number"):
        check_gold(GraderConfig(kind="number"), "many")


def test_regex_compares_the_extracted_group():
    kw = {"pattern": r"answer:\s*(\w+)"}
    assert grade("regex", "answer: blue", "I think... answer: blue", **kw)
    assert grade("regex", "blue", "answer:  blue", **kw)  # a bare gold value
    assert not grade("regex", "answer: blue", "answer: red", **kw)
    assert not grade("regex", "blue", "blue", **kw)  # the output must say it the way the pattern asks


def test_json_needs_valid_json_with_the_keys_and_the_gold_values():
    kw = {"keys": ["name", "qty"]}
    gold = '{"name": "pen", "qty": 2}'
    assert grade("json", gold, '```json\n{"qty": 2, "name": "pen", "extra": 1}\n```', **kw)
    assert grade("json", gold, 'Here: {"name": "pen", "qty": 2}', **kw)
    assert not grade("json", gold, '{"name": "pen", "qty": 3}', **kw)
    assert not grade("json", gold, '{"name": "pen"}', **kw)
    assert not grade("json", gold, '{"name": "pen", "qty": 2', **kw)  # invalid JSON
    with pytest.raises(Ungradable, match="not a JSON object"):
        check_gold(GraderConfig(kind="json", keys=["name"]), "pen")


def test_empty_gold_and_bad_grader_configs():
    with pytest.raises(Ungradable, match="empty"):
        check_gold(GraderConfig(), "  ")
    with pytest.raises(UserError, match="unknown grader 'fuzzy'"):
        GraderConfig(kind="fuzzy").validate("task.grader")
    with pytest.raises(UserError, match="label set"):
        GraderConfig(kind="label").validate("task.grader")
    with pytest.raises(UserError, match="not a valid regular expression"):
        GraderConfig(kind="regex", pattern="(").validate("task.grader")
