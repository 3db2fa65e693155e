"""VQA accuracy: VQAv2 and OK-VQA (the official VQA evaluation), TextVQA (the EvalAI answer processor).

VQA accuracy follows the official VQAv2 evaluation as it stands (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): the prediction is normalised (punctuation, number
words, articles, contractions), the human answers get the punctuation step only and only when they
disagree, and a prediction scores min(#matching humans / 3, 1) averaged over the 10 leave-one-out
subsets of the 10 human answers.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

__all__ = [
    "vqa_normalize", "vqa_accuracy", "vqa_scores", "evalai_normalize", "textvqa_accuracy", "textvqa_scores",
]

# ----------------------------------------------------------------------------------------------------
# VQAv2 accuracy
# ----------------------------------------------------------------------------------------------------

# The tables of the official evaluation as it stands (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py), which LAVIS and LLaVA's VQAv2 scripts copy. The
# contractions use the ASCII apostrophe (the 2015 beta used the typographic one); the capitalised
# keys ("Im", "Ive", ...) can never match because words are lower-cased first.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Neither ":" nor "'" is a mark here ("3:00" and "don't" stay as they are).
_PUNCT = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]  # fmt: skip
# The official pattern, verbatim in behaviour: "(?!<=\d)" is a (mistyped) lookahead, so in effect a
# period is removed unless a digit follows it ("2.5" keeps its point).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``."""
    out = text
    for p in _PUNCT:
        # A mark touching a space (or any "1,000"-style number in the answer) is deleted; one inside a
        # word becomes a space ("black/white" -> "black white").
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official code passes re.UNICODE (= 32) as the positional ``count``: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _vqa_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, no articles,
    contractions given their apostrophe; words re-joined by single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """A predicted answer as the official VQAv2 evaluation normalises it before matching: newlines and
    tabs to spaces, outer whitespace stripped, punctuation, then number words, articles, contractions.
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (normally 10), exactly as the
    official ``VQAEval.evaluate`` scores one question:

    - the prediction is normalised in full (:func:`vqa_normalize`);
    - the human answers are compared as given, except that when they are not all identical each one
      goes through the punctuation step alone (no lower-casing, number words, articles or
      contractions): the official code trusts the annotation file's answers to be normalised already;
    - the score is ``mean over i of min(#{j != i : answers[j] == prediction} / 3, 1)``, the average
      over the leave-one-out subsets (each answer is left out on its own, as the official answer
      records are told apart by their ``answer_id`` even when their text repeats).
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"vqa_accuracy: answers must be a non-empty list of str, got {answers!r}")
    for k, a in enumerate(answers):
        if not isinstance(a, str):
            raise ValueError(f"vqa_accuracy: answers[{k}] must be a str, got {type(a).__name__}: {a!r}")
    if not isinstance(prediction, str):
        raise ValueError(f"vqa_accuracy: prediction must be a str, got {type(prediction).__name__}")
    pred = vqa_normalize(prediction)
    gts = [_vqa_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = sum(g == pred for g in gts)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    accs = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


def _check_ids(name: str, predictions: Mapping, answers_by_id: Mapping) -> None:
    """The two dicts hold the same ids (a predictions file missing answers is an error naming how many)."""
    missing_pred = [i for i in answers_by_id if i not in predictions]
    missing_ans = [i for i in predictions if i not in answers_by_id]
    if missing_pred or missing_ans:
        raise ValueError(
            f"{name}: {len(missing_pred)} question(s) without a prediction {missing_pred[:20]!r}, "
            f"{len(missing_ans)} prediction(s) for unknown questions {missing_ans[:20]!r}"
        )
    if not answers_by_id:
        raise ValueError(f"{name}: nothing to score (no ids)")


def _by_type(accs: Mapping[Hashable, float], types: Mapping[Hashable, str] | None) -> dict[str, float]:
    """Mean accuracy per type (the official ``accuracy['perAnswerType']``), keyed ``accuracy/<type>``."""
    groups: dict[str, list[float]] = {}
    for i, a in accs.items():
        if types is not None and types.get(i):
            groups.setdefault(str(types[i]), []).append(a)
    return {f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(groups.items())}


def vqa_scores(
    predictions: Mapping[Hashable, str],
    answers_by_id: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
) -> dict[str, float]:
    """Mean VQAv2 accuracy over question ids: ``{"accuracy": float in [0, 1]}`` (the official
    ``overall`` is 100 times this, rounded to 2 decimals), and with ``answer_types`` (id -> the
    annotation's ``answer_type``) the official per-answer-type breakdown as ``accuracy/<type>``."""
    _check_ids("vqa_scores", predictions, answers_by_id)
    accs = {i: vqa_accuracy(predictions[i], answers_by_id[i]) for i in answers_by_id}
    return {"accuracy": sum(accs.values()) / len(accs), **_by_type(accs, answer_types)}


# ----------------------------------------------------------------------------------------------------
# TextVQA: the EvalAI answer processor and the TextVQA evaluator
# ----------------------------------------------------------------------------------------------------
# TextVQA's evaluation (the EvalAI challenge's answer processor, in facebookresearch/mmf
# ``mmf/datasets/processors/processors.py`` ``EvalAIAnswerProcessor`` and ``mmf/utils/m4c_evaluators.py``
# ``TextVQAAccuracyEvaluator``) differs from the VQAv2 evaluation above in three ways: every string,
# the human answers included, goes through the whole processor; the processor first lower-cases,
# deletes every "," and "?" and splits "'s" off its word ("word_tokenize"); and it does so whether or
# not the human answers agree.


def evalai_normalize(answer: str) -> str:
    """An answer as the EvalAI processor normalises it: ``word_tokenize`` (lower case, "," and "?"
    deleted, "'s" -> " 's", stripped), newlines and tabs to spaces, then the VQA punctuation, digit and
    article steps."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction: the prediction and the human answers go through
    :func:`evalai_normalize`; the score is the mean over the answers i of
    ``min(1, #{j != i : answers[j] == prediction} / 3)`` (10-choose-9 averaging)."""
    if isinstance(answers, str) or len(answers) == 0 or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"textvqa_accuracy: answers must be a non-empty list of str, got {answers!r}")
    pred = evalai_normalize(prediction)
    gts = [evalai_normalize(a) for a in answers]
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


def textvqa_scores(
    predictions: Mapping[Hashable, str], answers_by_id: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """Mean TextVQA accuracy over question ids: ``{"accuracy": float in [0, 1]}``."""
    _check_ids("textvqa_scores", predictions, answers_by_id)
    accs = [textvqa_accuracy(predictions[i], answers_by_id[i]) for i in answers_by_id]
    return {"accuracy": sum(accs) / len(accs)}
