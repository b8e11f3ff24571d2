"""Scoring arithmetic against values worked out by hand: pass@k, majority vote and its ties, error bars.

    .venv/bin/python -m pytest tests/test_metrics.py -q
"""
import math
import operator

import pytest

from eval_aime import ci95, mean_stderr, pass_at_k, summarize, vote


def test_pass_at_k_hand_computed():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=10, c=3, k=4: 1 - C(7,4)/C(10,4) = 1 - 35/210 = 5/6
    assert pass_at_k(10, 3, 4) == pytest.approx(5 / 6)
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    # pass@1 is the plain fraction correct
    assert pass_at_k(64, 13, 1) == pytest.approx(13 / 64)


def test_pass_at_k_matches_brute_force():
    # the probability that a random k-subset of n samples holds at least one of the c correct ones
    from itertools import combinations
    n, c = 6, 2
    for k in range(1, n + 1):
        subsets = list(combinations(range(n), k))
        hit = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(hit)


def test_pass_at_k_rejects_nonsense():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 8)


def test_majority_and_ties():
    # classes of equal answers, largest first: the majority answer is the first of the first class
    assert vote([5, 7, 5], operator.eq) == [[0, 2], [1]]
    assert vote([None, None, 7], operator.eq) == [[2]]               # None never votes
    assert vote([None, None], operator.eq) == []
    assert vote([], operator.eq) == []
    assert vote([7, 5, 5, 7], operator.eq) == [[0, 3], [1, 2]]       # tie: the answer that appeared first
    assert vote([5, 7, 7, 5], operator.eq) == [[0, 3], [1, 2]]
    assert vote([None, 3, 9, 9, 3], operator.eq) == [[1, 4], [2, 3]]


def test_mean_stderr_and_interval():
    # values .25, .5, .75: mean .5, sample variance (.0625 + 0 + .0625) / 2 = .0625, se = .25 / sqrt(3)
    mean, se = mean_stderr([0.25, 0.5, 0.75])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(0.25 / math.sqrt(3))
    assert ci95(mean, se) == pytest.approx([0.5 - 1.96 * se, 0.5 + 1.96 * se])
    assert ci95(0.95, 0.1) == pytest.approx([0.754, 1.0])          # clipped to [0, 1]
    assert mean_stderr([1.0]) == (1.0, None) and ci95(1.0, None) is None


def _rec(pid, k, extracted, gold, tokens=10, finish="stop"):
    return {"id": pid, "sample": k, "extracted": extracted, "correct": extracted == gold,
            "finish_reason": finish, "num_tokens": tokens}


def test_summarize_hand_computed():
    problems = [{"id": "a", "answer": 1}, {"id": "b", "answer": 2}]
    recs = [_rec("a", 0, 1, 1), _rec("a", 1, 1, 1), _rec("a", 2, 3, 1), _rec("a", 3, None, 1, 40, "length"),
            _rec("b", 0, 5, 2), _rec("b", 1, 2, 2, 30), _rec("b", 2, 5, 2), _rec("b", 3, None, 2)]
    records = {(r["id"], r["sample"]): r for r in recs}
    m, per = summarize(problems, records, 4)
    # per-problem correctness 2/4 and 1/4: pass@1 = 0.375, se = std([.5, .25]) / sqrt(2) = 0.125
    assert m["pass@1"] == pytest.approx(0.375)
    assert m["pass@1_stderr"] == pytest.approx(0.125)
    # pass@2: a: 1 - C(2,2)/C(4,2) = 5/6; b: 1 - C(3,2)/C(4,2) = 1/2
    assert m["pass@2"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert m["pass@4"] == 1.0
    assert m["maj@4"] == 0.5                              # a votes 1 (right), b votes 5 (wrong)
    assert m["no_answer_rate"] == 0.25 and m["truncation_rate"] == 0.125
    assert m["mean_tokens"] == pytest.approx(130 / 8) and m["max_tokens"] == 40
    assert m["greedy_accuracy"] is None
    assert per[1]["votes"] == {"5": 2, "2": 1, "none": 1} and per[1]["correct"] == 1
    # fewer samples than stored: only the first K count
    m2, _ = summarize(problems, records, 2)
    assert m2["pass@1"] == pytest.approx((1.0 + 0.5) / 2) and "pass@4" not in m2


def test_summarize_latex_golds_votes_over_equivalence_and_tables_by_level_and_subject():
    problems = [{"id": "a", "answer": "\\frac{1}{2}", "level": 1, "subject": "Algebra"},
                {"id": "b", "answer": "(3,4]", "level": 1, "subject": "Precalculus"},
                {"id": "c", "answer": 7, "level": 2, "subject": "Algebra"}]

    def rec(pid, k, extracted, correct):
        return {"id": pid, "sample": k, "extracted": extracted, "correct": correct, "finish_reason": "stop",
                "num_tokens": 1}
    recs = [rec("a", 0, "\\frac{1}{3}", False), rec("a", 1, "0.5", True), rec("a", 2, "\\dfrac12", True),
            rec("a", 3, "\\frac{2}{6}", False),
            rec("b", 0, "(3, 4)", False), rec("b", 1, "(3,4]", True), rec("b", 2, "\\left(3, 4\\right]", True),
            rec("b", 3, None, False),
            rec("c", 0, 8, False), rec("c", 1, 7, True), rec("c", 2, 7, True), rec("c", 3, None, False)]
    m, per = summarize(problems, {(r["id"], r["sample"]): r for r in recs}, 4)
    # a: 1/3 and 2/6 are one class (2 votes), tied with 0.5 and 1/2 (2 votes): the class seen first wins
    assert per[0]["votes"] == {"\\frac{1}{3}": 2, "0.5": 2} and per[0]["majority"] == "\\frac{1}{3}"
    # b: (3,4] and \left(3, 4\right] are one class of 2 (counted as strings, the wrong (3, 4) would win)
    assert per[1]["votes"] == {"(3,4]": 2, "(3, 4)": 1, "none": 1} and per[1]["majority_correct"]
    assert [pp["majority_correct"] for pp in per] == [False, True, True] and m["maj@4"] == pytest.approx(2 / 3)
    assert m["by_level"] == {"1": {"problems": 2, "pass@1": 0.5, "maj@4": 0.5},
                             "2": {"problems": 1, "pass@1": 0.5, "maj@4": 1.0}}
    assert m["by_subject"] == {"Algebra": {"problems": 2, "pass@1": 0.5, "maj@4": 0.5},
                               "Precalculus": {"problems": 1, "pass@1": 0.5, "maj@4": 1.0}}
    assert "by_level" not in summarize([{"id": "c", "answer": 7}], {(r["id"], r["sample"]): r for r in recs}, 4)[0]
