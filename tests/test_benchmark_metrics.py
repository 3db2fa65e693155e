"""The benchmarks' metrics against the rules of their official evaluations. Every expected value is
derived by hand from the rule quoted beside it, not read off our output.

TextVQA: the EvalAI answer processor and TextVQA evaluator (facebookresearch/mmf,
``mmf/datasets/processors/processors.py`` ``EvalAIAnswerProcessor``, ``mmf/utils/m4c_evaluators.py``
``TextVQAAccuracyEvaluator``):

- T1 ``word_tokenize``: ``word.lower()``, ``.replace(",", "").replace("?", "").replace("'s", " 's")``,
  ``.strip()``; then ``.replace("\\n", " ").replace("\\t", " ").strip()``.
- T2 ``process_punctuation`` and ``process_digit_article``: the VQA rules (tests/test_vqa_accuracy.py
  R2-R4): a mark inside a word becomes a space, one touching a space goes; number words to digits,
  articles dropped, contractions.
- T3 ``_compute_answer_scores``: ``answers = [self.answer_processor(a) for a in raw_answers]`` (the
  human answers go through the whole processor, always); for each answer left out,
  ``acc = min(1, len(matching_answers) / 3)`` over the other nine; the mean over the ten.

GQA: ``eval.py`` of the GQA release:

- G1 ``if question["isBalanced"]:`` only balanced questions are scored;
- G2 ``correct = (predicted == gold)``: exact string match, no normalisation in eval.py;
- G3 ``answerType = "open" if question["types"]["structural"] == "query" else "binary"``; accuracy per
  ``types["structural"]`` and ``types["semantic"]``;
- G4 every balanced question needs a prediction ("no prediction for question ... Please add
  prediction for all questions.");
- G5 the predictions file holds ``res['text'].rstrip('.').lower()`` (LLaVA's
  ``scripts/convert_gqa_for_eval.py``).

MMBench: circular evaluation (Liu et al. 2023, sec. 3.1) and VLMEvalKit's rule-based extraction
(``vlmeval/utils/matching_util.py``):

- M1 circular: a question with n options is asked n times, the options shifted by one each time; right
  only if every pass is right;
- M2 ``can_infer_option``: a refusal phrase -> "Z"; ``.()[],:;!*#{}`` -> spaces, split; exactly one
  option letter among the words -> that letter, unless ``'A' in splits and len(splits) > 3``; no letter
  and a "Z" word -> "Z";
- M3 ``can_infer_text``: lower-cased; exactly one option whose lower-cased content is in the answer.

NoCaps: each domain scored on its own with the COCO caption pipeline (the NoCaps evaluation server's
breakdown), checked against pycocoevalcap's PTBTokenizer and Cider run directly on each subset.
"""

from __future__ import annotations

import pytest

from easygen.metrics import (
    circular_scores,
    evalai_normalize,
    extract_choice,
    gqa_normalize,
    gqa_scores,
    rotations,
    textvqa_accuracy,
    textvqa_scores,
    vqa_accuracy,
    vqa_normalize,
)

# ----------------------------------------------------------------------------------------------------
# OK-VQA: the VQAv2 evaluation's per-answer-type breakdown
# ----------------------------------------------------------------------------------------------------


def test_vqa_scores_per_answer_type():
    """vqaEval.py: ``accQA.append(avgGTAcc)``, ``accAnsType[ansType].append(avgGTAcc)``; ``perAnswerType``
    is the mean of each type's question accuracies (OK-VQA is scored by the same code)."""
    from easygen.metrics import vqa_scores

    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 10, 4: ["cat"] * 10}
    types = {1: "yes/no", 2: "number", 3: "other", 4: "other"}
    s = vqa_scores({1: "yes", 2: "two", 3: "blue", 4: "cat"}, answers, types)
    # 1.0; "two" -> "2": 0.6; 0.0; 1.0
    assert s["accuracy"] == pytest.approx(2.6 / 4)
    assert s["accuracy/yes/no"] == 1.0 and s["accuracy/number"] == pytest.approx(0.6)
    assert s["accuracy/other"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------
# TextVQA
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("STOP", "stop"),  # T1 lower()
        ("What?", "what"),  # T1 "?" deleted
        ("1,000", "1000"),  # T1 "," deleted
        ("red, white", "red white"),  # T1 "," deleted, split() re-joins
        ("john's", "john 's"),  # T1 "'s" -> " 's" ("'" is no mark, T2)
        ("coca-cola", "coca cola"),  # T2 "-" inside a word -> space
        ("the end.", "end"),  # T2 period dropped, article dropped
        ("Two\n", "2"),  # T1 strip, T2 number word
        ("dont", "don't"),  # T2 contractions
    ],
)
def test_evalai_normalize(raw, normalised):
    assert evalai_normalize(raw) == normalised


def test_evalai_differs_from_the_vqav2_prediction_rule():
    # VQAv2 keeps "'s" attached and deletes a comma only next to a space or between digits (R2)
    assert vqa_normalize("john's") == "john's" and evalai_normalize("john's") == "john 's"
    assert vqa_normalize("x,y") == "x y" and evalai_normalize("x,y") == "xy"  # T1: "," deleted outright


def test_textvqa_accuracy_processes_the_human_answers_always():
    # T3: ten identical "two" become "2" on the human side too; VQAv2 leaves identical answers as given
    assert textvqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    # T1 lower-cases the human answers: "STOP" matches "stop"
    assert textvqa_accuracy("stop", ["STOP"] * 10) == 1.0


def test_textvqa_accuracy_ten_choose_nine():
    # T3: 2 matches ("Coca-Cola" -> "coca cola" on both sides): each of the 2 left out sees 1 (1/3),
    # each of the 8 others sees 2 (2/3): (2/3 + 16/3) / 10 = 0.6
    assert textvqa_accuracy("coca-cola", ["Coca-Cola"] * 2 + ["pepsi"] * 8) == pytest.approx(0.6)
    # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert textvqa_accuracy("pepsi", ["pepsi"] * 3 + ["cola"] * 7) == pytest.approx(0.9)
    assert textvqa_accuracy("fanta", ["pepsi"] * 10) == 0.0


def test_textvqa_scores_missing_predictions_named():
    answers = {"a": ["x"] * 10, "b": ["y"] * 10, "c": ["z"] * 10}
    assert textvqa_scores({"a": "x", "b": "no", "c": "z"}, answers)["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"2 question\(s\) without a prediction"):
        textvqa_scores({"a": "x"}, answers)


# ----------------------------------------------------------------------------------------------------
# GQA
# ----------------------------------------------------------------------------------------------------


def _q(answer, structural="query", semantic="attr", balanced=True):
    return {"answer": answer, "isBalanced": balanced, "types": {"structural": structural, "semantic": semantic}}


def test_gqa_normalize_is_the_prediction_files_rule():
    assert gqa_normalize("Yes.") == "yes"  # G5 rstrip('.'), lower()
    assert gqa_normalize("the table...") == "the table"  # G5 every trailing period
    assert gqa_normalize("2.5") == "2.5"  # only trailing ones


def test_gqa_exact_match_and_breakdown():
    questions = {
        "1": _q("yes", "verify", "obj"),
        "2": _q("table", "query", "cat"),
        "3": _q("left", "choose", "rel"),
        "4": _q("red", "query", "attr"),
        "5": _q("no", "logical", "obj", balanced=False),  # G1: not scored, needs no prediction
    }
    # G2: "the table" != "table" (no article rule in GQA); "red " != "red"
    preds = {"1": "yes", "2": "the table", "3": "left", "4": "red "}
    s = gqa_scores(preds, questions)
    assert s["accuracy"] == 0.5
    assert s["binary"] == 1.0 and s["open"] == 0.0  # G3 "query" is open
    assert s["structural/verify"] == 1.0 and s["structural/query"] == 0.0 and "structural/logical" not in s
    assert s["semantic/obj"] == 1.0 and s["semantic/cat"] == 0.0
    with pytest.raises(ValueError, match=r"1 balanced question\(s\) without a prediction: \['4'\]"):  # G4
        gqa_scores({"1": "yes", "2": "x", "3": "left"}, questions)


# ----------------------------------------------------------------------------------------------------
# MMBench
# ----------------------------------------------------------------------------------------------------

OPTS = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"),  # M2 one letter
        ("The answer is B.", "B"),  # M2 "." -> space; one letter among the words
        ("(C) a bird", "C"),  # M2 brackets -> spaces
        ("A", "A"),
        ("A cat", "A"),  # M2 "A" with 2 words is taken
        ("A dog sits on a mat", "B"),  # M2 "A" with > 3 words may be the article -> M3: "a dog" in it
        ("B or C", None),  # M2 two letters; M3 no option content
        ("a bird, not a fish", None),  # M3 two contents
        ("I think it is a fish", "D"),  # M3 ("I" is no option letter)
        ("Cannot determine the answer", "Z"),  # M2 refusal
        ("Z", "Z"),  # M2 no letter, a "Z" word
        ("nothing", None),
    ],
)
def test_extract_choice(answer, letter):
    assert extract_choice(answer, OPTS) == letter


def test_rotations_move_the_answer_with_its_option():
    # M1: pass k shifts the options by k; the right option's letter moves with its text
    got = rotations(["cat", "dog", "bird", "fish"], 1)
    assert got == [
        (["cat", "dog", "bird", "fish"], 1),
        (["dog", "bird", "fish", "cat"], 0),
        (["bird", "fish", "cat", "dog"], 3),
        (["fish", "cat", "dog", "bird"], 2),
    ]


def test_circular_scores_right_only_when_every_pass_is_right():
    def passes(answers, options, gold_index):
        rows = []
        for (opts, gold), ans in zip(rotations(options, gold_index), answers):
            letters = {chr(65 + j): o for j, o in enumerate(opts)}
            rows.append((ans, letters, chr(65 + gold)))
        return rows

    opts = ["cat", "dog", "bird"]
    data = {
        # "dog" each pass: right letters B, A, C
        "q1": passes(["B", "A", "C"], opts, 1),
        # right on pass 0 only: circular wrong, single pass right (M1)
        "q2": passes(["B", "B", "B"], opts, 1),
        # by content every time (M3)
        "q3": passes(["dog", "it is a dog", "Dog"], opts, 1),
    }
    cats = {"q1": {"category": "x", "l2-category": "p"}, "q2": {"category": "x", "l2-category": "p"},
            "q3": {"category": "y", "l2-category": "p"}}  # fmt: skip
    s = circular_scores(data, cats)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["single_pass_accuracy"] == 1.0
    assert s["category/x"] == 0.5 and s["category/y"] == 1.0 and s["l2-category/p"] == pytest.approx(2 / 3)
    assert s["extracted"] == 1.0


# ----------------------------------------------------------------------------------------------------
# NoCaps
# ----------------------------------------------------------------------------------------------------


def test_nocaps_domains_scored_on_their_own():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from easygen.metrics import nocaps_scores

    refs = {
        "1": ["a dog runs on the grass", "a brown dog running"], "2": ["a cat on a sofa", "a sleeping cat"],
        "3": ["a jellyfish in the sea", "a pink jellyfish"], "4": ["a red bus on a street", "a bus"],
        "5": ["an accordion on a table", "a musical instrument"], "6": ["a man holds a violin", "a violin"],
    }  # fmt: skip
    preds = {"1": "a dog on grass", "2": "a cat on a sofa", "3": "a fish in the sea", "4": "a red bus",
             "5": "a table", "6": "a man with a violin"}  # fmt: skip
    domains = {"1": "in-domain", "2": "in-domain", "3": "out-domain", "4": "near-domain", "5": "out-domain",
               "6": "near-domain"}  # fmt: skip
    got = nocaps_scores(preds, refs, domains, spice=False)

    def cider(ids):
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in ids})
        res = tok.tokenize({i: [{"caption": preds[i]}] for i in ids})
        return Cider().compute_score(gts, res)[0]

    assert got["CIDEr"] == pytest.approx(cider(list(refs)), abs=1e-12)
    for d in ("in-domain", "near-domain", "out-domain"):
        assert got[f"{d}/CIDEr"] == pytest.approx(cider([i for i in refs if domains[i] == d]), abs=1e-12)
    with pytest.raises(ValueError, match="domains must be one of"):
        nocaps_scores(preds, refs, {**domains, "6": "far"}, spice=False)
