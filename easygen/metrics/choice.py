"""Multiple choice with circular evaluation (MMBench: Liu et al. 2023, "MMBench: Is Your Multi-modal
Model an All-around Player?", sec. 3.1; code: open-compass/VLMEvalKit).

- **Circular evaluation**: a question with n options is asked n times, its options rotated by one
  place each time (the right answer's letter moves with its text); the question counts as right only
  when every pass is right.
- **Answer extraction** without a judging model, VLMEvalKit's rules (``vlmeval/utils/matching_util.py``,
  ``can_infer_option`` then ``can_infer_text``):

  1. a refusal phrase ("Cannot determine the answer", ...) is answer "Z" (no option: wrong);
  2. the characters ``.()[],:;!*#{}`` become spaces and the text is split on whitespace; when exactly
     one option letter is among the words, that is the answer, unless "A" is among them and there are
     more than 3 words ("A" may then be the article); no letter but a "Z" word is "Z";
  3. else the lower-cased text: when exactly one option's lower-cased content occurs in it, that
     option is the answer;
  4. else nothing is extracted, and the pass is wrong.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

__all__ = ["REFUSALS", "extract_choice", "rotations", "circular_scores"]

REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SEPARATORS = ".()[],:;!*#{}"


def _by_letter(answer: str, letters: Sequence[str]) -> str | None:
    if any(r in answer for r in REFUSALS):
        return "Z"
    text = answer
    for c in _SEPARATORS:
        text = text.replace(c, " ")
    words = text.split()
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return None if ("A" in words and len(words) > 3) else found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def _by_content(answer: str, options: Mapping[str, str]) -> str | None:
    low = answer.lower()
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def extract_choice(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer names (``options``: letter -> content, in order), "Z" for
    a refusal, or None when nothing can be extracted."""
    letter = _by_letter(answer, list(options))
    return letter if letter is not None else _by_content(answer, options)


def rotations(options: Sequence[str], answer: int) -> list[tuple[list[str], int]]:
    """The circular passes of one question: ``(options rotated by k, index of the right option)`` for
    k = 0 .. n-1 (pass 0 is the question as given)."""
    n = len(options)
    if n < 2 or not 0 <= answer < n:
        raise ValueError(f"rotations: {n} options with answer index {answer}")
    return [([options[(j + k) % n] for j in range(n)], (answer - k) % n) for k in range(n)]


def circular_scores(
    passes: Mapping[Hashable, Sequence[tuple[str, Mapping[str, str], str]]],
    categories: Mapping[Hashable, Mapping[str, str]] | None = None,
) -> dict[str, float]:
    """Circular accuracy: ``passes`` maps a question to its passes, each ``(prediction text, options
    letter -> content, right letter)``; a question is right when the letter extracted from every pass
    is that pass's right letter. ``categories`` (question -> {"category": ..., "l2-category": ...})
    adds the per-category accuracies (``category/<name>``, ``l2-category/<name>``).

    Returns ``accuracy`` (circular), ``single_pass_accuracy`` (the first pass only, the vanilla
    protocol) and ``extracted`` (the fraction of passes whose answer named an option)."""
    if not passes:
        raise ValueError("circular_scores: nothing to score (no questions)")
    right: dict[Hashable, float] = {}
    first, named, total = [], 0, 0
    for q, rows in passes.items():
        if not rows:
            raise ValueError(f"circular_scores: question {q!r} has no passes")
        ok = []
        for pred, options, gold in rows:
            got = extract_choice(pred, options)
            named += got is not None and got != "Z"
            total += 1
            ok.append(got == gold)
        right[q] = float(all(ok))
        first.append(float(ok[0]))
    out = {
        "accuracy": sum(right.values()) / len(right),
        "single_pass_accuracy": sum(first) / len(first),
        "extracted": named / total,
    }
    for level in ("category", "l2-category"):
        groups: dict[str, list[float]] = {}
        for q, r in right.items():
            name = (categories or {}).get(q, {}).get(level)
            if name:
                groups.setdefault(str(name), []).append(r)
        out.update({f"{level}/{k}": sum(v) / len(v) for k, v in sorted(groups.items())})
    return out


