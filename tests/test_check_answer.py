"""check_answer, the project's one grading rule, on realistic (gold, model output) pairs: MATH-500's
answer kinds graded by math-verify's equivalence, integer golds kept strict, and the protocol traps
(a box only in the thinking, thinking never closed, two boxes, no box at all).

    .venv/bin/python -m pytest tests/test_check_answer.py -q
"""
import threading
import time

import pytest

import eval_aime
from eval_aime import check_answer, final_answer, load_problems

R1 = "<think>\nOkay, let me set this up. ... Let me double-check the arithmetic.\n</think>\n\n"


def boxed(latex, lead="Therefore the answer is "):
    return f"{R1}{lead}$\\boxed{{{latex}}}$."


CASES = [
    # fractions and decimals (golds as MATH-500 writes them)
    ("\\frac{14}{3}", boxed("\\dfrac{14}{3}"), True),
    ("\\frac{14}{3}", boxed("14/3"), True),
    ("\\frac{14}{3}", boxed("4.67"), False),
    ("0.15", boxed("\\frac{3}{20}"), True),
    ("\\frac{1}{2}", boxed("0.5"), True),
    ("1.25", boxed("\\frac54"), True),
    ("1\\frac{4}{5}", boxed("\\frac{9}{5}"), True),                      # a mixed number
    ("\\frac{3}{56}", boxed("\\frac{3}{65}"), False),
    ("\\frac 59", boxed("\\tfrac{5}{9}"), True),
    # radicals
    ("3\\sqrt{13}", boxed("\\sqrt{117}"), True),
    ("\\frac{\\sqrt{3}}{3}", boxed("\\frac{1}{\\sqrt{3}}"), True),
    ("11\\sqrt2", boxed("11\\sqrt{2}"), True),
    ("\\sqrt{2}", boxed("1.414"), False),                                # a decimal approximation is not the radical
    ("2\\sqrt{5}", boxed("2\\sqrt{3}"), False),
    # pi
    ("288 \\pi", boxed("288\\pi"), True),
    ("18+2\\pi", boxed("2\\pi + 18"), True),
    ("\\frac{20000}{\\pi}", boxed("20000/\\pi"), True),
    ("\\pi", boxed("3.14159"), False),
    # intervals: which ends are closed matters
    ("(-\\infty, 0]", boxed("(-\\infty,0]"), True),
    ("(-\\infty, 3]", boxed("(-\\infty, 3)"), False),
    ("(3,4]", boxed("(3,4)"), False),
    ("(-\\infty, 2) \\cup (3, \\infty)", boxed("(-\\infty,2)\\cup(3,\\infty)"), True),
    ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", boxed("\\left(0.6, \\frac{8}{3}\\right]"), True),
    ("x \\in [-2,7]", boxed("[-2, 7]"), True),
    # ordered tuples: order matters
    ("(3, -1)", boxed("(-1, 3)"), False),
    ("(15,-29)", boxed("(15, -29)"), True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", boxed("\\left(3,\\frac{\\pi}{2}\\right)"), True),
    ("(6,31,-1)", boxed("(31,6,-1)"), False),
    # matrices and vectors
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     boxed("\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}"), True),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     boxed("\\begin{pmatrix} 1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"), False),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", boxed("\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}"), True),
    # equations and assignments
    ("x=5", boxed("5"), True),
    ("x=5", boxed("x = 6"), False),
    ("y = 2x + 3", boxed("y=2x+3"), True),
    ("p - q", boxed("-q + p"), True),
    ("\\frac{11+9a}{20}", boxed("\\frac{9a+11}{20}"), True),
    ("2k+2", boxed("2(k+1)"), True),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", boxed("x^5-x^4+x^3-x^2+x-1"), True),
    ("6 - 5i", boxed("6-5i"), True),
    # lists of solutions (any order), with a +-
    ("1,-2", boxed("-2, 1"), True),
    ("1 \\pm \\sqrt{19}", boxed("1+\\sqrt{19}, 1-\\sqrt{19}"), True),
    ("3, 5, 7", boxed("3, 5"), False),
    # degrees, dollars, units, thousands separators
    ("\\frac{270}7\\text{ degrees}", boxed("\\frac{270}{7}^\\circ"), True),
    ("\\frac{270}7\\text{ degrees}", boxed("\\frac{270}{7}"), True),
    ("\\$18.90", boxed("\\$18.90"), True),
    ("\\$18.90", boxed("18.9"), True),
    ("\\$32,\\!348", boxed("32348"), True),
    ("10,\\!080", boxed("10{,}080"), True),
    ("864 \\mbox{ inches}^2", boxed("864"), True),
    ("5.4 \\text{ cents}", boxed("5.4 \\text{ cents}"), True),
    # answer choices and words
    ("\\text{(C)}", boxed("C"), True),
    ("\\text{(C)}", boxed("\\text{(C)}"), True),
    ("\\text{(C)}", boxed("(D)"), False),
    ("\\text{Evelyn}", boxed("\\text{Evelyn}"), True),
    ("\\text{even}", boxed("\\text{odd}"), False),
    # base subscripts: the digits in that base, however the subscript is written
    ("4210_{5}", boxed("4210_5"), True),
    ("52_8", boxed("52_{8}"), True),
    ("4210_{5}", boxed("4211_5"), False),
    # the strict protocol: the last complete box after the thinking, nothing else
    ("\\frac{14}{3}", "<think>\nso x = \\boxed{\\frac{14}{3}}\n</think>\n\nThe answer is $\\frac{14}{3}$.", False),
    ("\\frac{14}{3}", "<think>\nso x = \\boxed{\\frac{14}{3}}, let me verify by substituting", False),
    ("\\frac{14}{3}", R1 + "First $\\boxed{\\frac{13}{3}}$. Wait, recount: $\\boxed{\\frac{14}{3}}$.", True),
    ("\\frac{14}{3}", R1 + "First $\\boxed{\\frac{14}{3}}$. Wait, recount: $\\boxed{\\frac{13}{3}}$.", False),
    ("\\frac{14}{3}", R1 + "The answer is $\\frac{14}{3}$.", False),
    ("\\frac{14}{3}", R1 + "The answer is $\\boxed{\\frac{14}{3}", False),       # cut mid-box
    ("\\frac{14}{3}", R1 + "$\\fbox{$\\frac{14}{3}$}$", True),
    ("\\frac{14}{3}", R1 + "$\\boxed{}$", False),
    # integer golds: today's strict integer comparison, unchanged
    ("33", boxed("033"), True),
    (33, boxed("33.0"), True),
    ("10", boxed("10^\\circ"), True),
    ("33", boxed("\\frac{66}{2}"), False),
    ("33", R1 + "The answer is 33.", False),
]


@pytest.mark.parametrize("gold, text, expected", CASES)
def test_check_answer(gold, text, expected):
    assert check_answer(text, gold) is expected


def test_at_least_forty_pairs_over_every_kind():
    assert len(CASES) >= 40
    assert sum(expected for _, _, expected in CASES) >= 20 and sum(not e for _, _, e in CASES) >= 20


def test_final_answer_is_what_gets_graded():
    assert final_answer(boxed("\\dfrac{14}{3}"), "\\frac{14}{3}") == "\\dfrac{14}{3}"
    assert final_answer(boxed("033"), "33") == 33 and final_answer(boxed("\\frac12"), 33) is None
    assert final_answer(R1 + "$\\boxed{ }$", "\\frac12") is None


def test_every_math500_gold_matches_itself_and_not_its_neighbour():
    # math-verify itself (past check_answer's shortcut for identical text): a gold it cannot parse would
    # fail even a perfect model. Neighbouring golds are different answers (none of them equivalent).
    golds = [p["answer"] for p in load_problems(eval_aime.data_path("math500")) if isinstance(p["answer"], str)]
    assert len(golds) == 189
    grader = eval_aime._grader
    assert [g for g in golds if not grader.same(g, g.replace("\\frac", "\\dfrac"))] == []
    assert [(a, b) for a, b in zip(golds, golds[1:] + golds[:1]) if a != b and grader.same(a, b)] == []


def test_a_hang_or_a_crash_counts_as_wrong_and_the_next_answer_is_graded(monkeypatch):
    monkeypatch.setattr(eval_aime, "GRADE_TIMEOUT", 0.5)
    eval_aime.equivalent.cache_clear()
    start = time.monotonic()
    assert not check_answer(boxed("100!!!"), "\\frac{1}{2}")      # math-verify spends 3 s on it ...
    assert time.monotonic() - start < 2.5                          # ... but it is killed at 0.5
    assert check_answer(boxed("0.5"), "\\frac{1}{2}")            # a fresh grader
    eval_aime._grader.proc.kill()                                  # the grader dies between two answers
    assert not check_answer(boxed("0.25"), "\\frac{1}{4}")
    assert check_answer(boxed("0.75"), "\\frac{3}{4}")
    eval_aime.equivalent.cache_clear()


def test_grading_works_off_the_main_thread():
    # math-verify's own time limit (signal.alarm) refuses to run outside the main thread
    results = []
    thread = threading.Thread(target=lambda: results.append(check_answer(boxed("\\frac{9}{5}"), "1\\frac{4}{5}")))
    thread.start()
    thread.join()
    assert results == [True]


def test_majority_votes_over_equivalence_classes():
    same = eval_aime.equivalent
    answers = ["\\frac{1}{2}", "3", "0.5", "\\dfrac12", None, "3", "3.0"]
    assert eval_aime.vote(answers, same) == [[0, 2, 3], [1, 5, 6]]
    assert eval_aime.vote(["0.75", "\\frac{1}{2}", "0.5", "\\frac34", "\\frac{3}{4}"], same) == [[0, 3, 4], [1, 2]]
