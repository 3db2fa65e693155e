"""VQAv2 accuracy against the rules of the official evaluation (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, ``VQAEval.evaluate``). Every expected value below is
derived by hand from the rule quoted next to it, not read off our output.

The rules, as the official code states them:

- R1 prediction: ``resAns.replace('\\n', ' ').replace('\\t', ' ').strip()``, then R2, R3, R4.
- R2 ``processPunctuation``: for each p in ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``:
  ``if (p + ' ' in inText or ' ' + p in inText) or re.search(commaStrip, inText)`` (commaStrip is
  digit-comma-digit) the mark is deleted, else it becomes a space.
- R3 ``periodStrip = "(?!<=\\d)(\\.)(?!\\d)"``, applied as ``periodStrip.sub("", outText, re.UNICODE)``:
  a period not followed by a digit goes; ``re.UNICODE`` (32) lands in ``count``.
- R4 ``processDigitArticle``: ``inText.lower().split()``, number words "none".."ten" to digits, articles
  a/an/the dropped, then the contractions table (``"dont": "don't"``, ``"isnt": "isn't"``, ...).
- R5 human answers: ``if len(set(gtAnswers)) > 1:`` each answer gets ``processPunctuation`` only.
- R6 ``otherGTAns = [item for item in answers if item != gtAnsDatum]`` (records differ by answer_id,
  so exactly one is left out), ``acc = min(1, len(matchingAns) / 3)``, averaged over the answers.
"""

import pytest

from easygen.metrics import vqa_accuracy, vqa_normalize, vqa_scores


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("  Yes\n", "yes"),  # R1 strip, R4 lower()
        ("yes\tno", "yes no"),  # R1 tab -> space
        ("yes.", "yes"),  # R3: a period not followed by a digit goes
        ("2.5", "2.5"),  # R3: ... one followed by a digit stays
        ("10:30 p.m.", "10:30 pm"),  # ":" is no mark (R2 list); both periods go (R3)
        ("x." * 33, "x" * 33 + "."),  # R3 with count=re.UNICODE=32: the 33rd period stays
        ("two", "2"),  # R4 number words
        ("none", "0"),
        ("a dog", "dog"),  # R4 articles
        ("the red bus", "red bus"),
        ("black/white", "black white"),  # R2: a mark touching no space becomes a space
        ("black / white", "black white"),  # R2: one touching a space is deleted (split() re-joins)
        ("red, white", "red white"),  # R2: ", " touches a space
        ("1,000", "1000"),  # R2: digit-comma-digit anywhere: every mark is deleted
        ("1,000 (approx)", "1000 approx"),  # ... the brackets too
        ("yes!", "yes"),  # "!" is a mark (R2 list)
        ("{frisbee}", "frisbee"),  # "{" and "}" are marks
        ("a red-white bus", "red white bus"),  # "-" is a mark inside a word -> space; R4 drops "a"
        ("dont", "don't"),  # R4 contractions, ASCII apostrophe
        ("isnt", "isn't"),
        ("dont know", "don't know"),
        ("don't", "don't"),  # "'" is no mark (R2 list): the word is kept as is
        ("what's that?", "what's that"),  # "?" inside the text with no space: -> space, stripped
    ],
)
def test_vqa_normalize(raw, normalised):
    assert vqa_normalize(raw) == normalised


def test_vqa_accuracy_cases_that_differ_from_the_2015_beta():
    # R2 "!" -> space -> "yes"; R5 answers differ, punctuation leaves "yes"/"no"; leaving any one out
    # keeps >= 8 "yes": min(1, 8/3) = 1 for all 10.
    assert vqa_accuracy("yes!", ["yes"] * 9 + ["no"]) == 1.0
    # R4 "dont" -> "don't"; R5 keeps "don't know" ("'" is no mark); 2 matches: the 2 matching answers
    # see 1 other (1/3), the 8 others see 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
    assert vqa_accuracy("dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # R4 "isnt" -> "isn't"; 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert vqa_accuracy("isnt", ["isn't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # R2 on both sides: "-" inside a word -> space ("red-white bus" -> "red white bus"); R4 drops "a";
    # 4 matches: every leave-one-out subset holds >= 3.
    assert vqa_accuracy("a red-white bus", ["red-white bus"] * 4 + ["bus"] * 6) == 1.0
    # R2 "{" "}" -> spaces, stripped; all 10 answers identical (R5: untouched) and equal.
    assert vqa_accuracy("{frisbee}", ["frisbee"] * 10) == 1.0


def test_vqa_accuracy_human_answers_processed_only_when_they_differ():
    # R5: ten identical "red/white" are compared as they are, so "red white" matches none ...
    assert vqa_accuracy("red white", ["red/white"] * 10) == 0.0
    # ... but with one differing answer all get R2 ("red/white" -> "red white"): 9 matches -> 1.
    assert vqa_accuracy("red white", ["red/white"] * 9 + ["red"]) == 1.0
    # R5 applies punctuation only: no number words, articles, contractions or lower-casing on the
    # human side, while the prediction gets all of R4.
    assert vqa_accuracy("two", ["two"] * 10) == 0.0  # "2" != "two"
    assert vqa_accuracy("two", ["two"] * 9 + ["2"]) == pytest.approx(0.3)  # 1 match: 9 * (1/3) / 10
    assert vqa_accuracy("the cat", ["the cat"] * 4 + ["dog"] * 6) == 0.0  # "cat" != "the cat"
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 0.0  # "yes" != "Yes"
    assert vqa_accuracy("dont", ["dont"] * 5 + ["no"] * 5) == 0.0  # "don't" != "dont"


def test_vqa_accuracy_leave_one_out():
    # R6 with k matching answers out of 10: the k matching answers see k - 1 others, the rest see k.
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)  # (1*0 + 9*(1/3)) / 10
    # 0.6 = (2 * 1/3 + 8 * 2/3) / 10; dropping every "cat" record equal in text would give 0.533.
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)  # (3 * 2/3 + 7) / 10
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0  # R3 + R4: "2"
    assert vqa_accuracy("cat", ["cat"]) == 0.0  # one answer: its only subset is empty


def test_vqa_scores():
    preds = {1: "yes", 2: "two", 3: "blue"}
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 10}
    # 1.0; "two" -> "2" with 2 matches -> 0.6; 0.0
    assert vqa_scores(preds, answers)["accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    with pytest.raises(ValueError, match=r"1 question\(s\) without a prediction \[3\]"):
        vqa_scores({1: "yes", 2: "2"}, answers)
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match=r"answers\[1\] must be a str"):
        vqa_accuracy("yes", ["yes", None])
