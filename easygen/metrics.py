"""Evaluation metrics: COCO caption scores, VQAv2 accuracy, FID and CLIP score (the paper's evaluation).

Captions follow the coco-caption protocol (Chen et al. 2015, "Microsoft COCO Captions: Data Collection
and Evaluation Server"; code: pycocoevalcap): PTB-tokenise predictions and references with Stanford's
PTBTokenizer, drop punctuation tokens, then BLEU-1..4 (Papineni et al. 2002, "closest" reference
length), METEOR 1.5 (Denkowski & Lavie 2014), ROUGE-L (Lin 2004, beta 1.2) and CIDEr-D (Vedantam et
al. 2015, sigma 6, clipped, x10). The scorers are pycocoevalcap's own classes; what differs is only the
plumbing, which must not change a digit:

- the PTB tokenizer runs once for references and predictions together (one JVM start instead of two;
  it tokenises line by line with ``-preserveLines``, so the lines do not interact);
- METEOR's JVM (which spends seconds loading its paraphrase table) starts before tokenisation, its
  SCORE lines are streamed without waiting for each answer (pycocoevalcap does one round trip per
  image), and it runs while BLEU, ROUGE-L and CIDEr are computed in Python.

CIDEr's document frequencies come from the references of the scored set, so a whole evaluation set
must be scored in one call, never per batch or per rank.

VQA accuracy follows the official VQAv2 evaluation as it stands (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): the prediction is normalised (punctuation, number
words, articles, contractions), the human answers get the punctuation step only and only when they
disagree, and a prediction scores min(#matching humans / 3, 1) averaged over the 10 leave-one-out
subsets of the 10 human answers.

FID (Heusel et al. 2017) and CLIP score (Hessel et al. 2021) go through torchmetrics with weights
from local paths only: nothing is downloaded. FID from a weights file runs torch-fidelity's
InceptionV3 (the ``fid`` extra).
"""

from __future__ import annotations

import atexit
import os
import pickle
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = [
    "caption_scores",
    "ptb_tokenize",
    "vqa_normalize",
    "vqa_accuracy",
    "vqa_scores",
    "fid_score",
    "require_torch_fidelity",
    "clip_score",
    "spice_models_available",
    "prewarm_meteor",
    "close_meteor",
]

# ----------------------------------------------------------------------------------------------------
# COCO caption metrics
# ----------------------------------------------------------------------------------------------------

# Tokens pycocoevalcap drops after PTB tokenisation (its PUNCTUATIONS list).
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def _coco_dir() -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__)))


def _check_inputs(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> list[Hashable]:
    """Validate the two dicts; return the ids in the order of ``references`` (pycocoevalcap's order)."""
    missing_pred = [i for i in references if i not in predictions]
    missing_ref = [i for i in predictions if i not in references]
    if missing_pred or missing_ref:
        raise ValueError(
            "caption_scores: predictions and references must have the same ids; "
            f"ids without a prediction: {missing_pred[:20]!r}"
            f"{' ...' if len(missing_pred) > 20 else ''} ({len(missing_pred)}), "
            f"ids without references: {missing_ref[:20]!r}"
            f"{' ...' if len(missing_ref) > 20 else ''} ({len(missing_ref)})"
        )
    if not references:
        raise ValueError("caption_scores: nothing to score (no ids)")
    for i, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(
                f"caption_scores: references[{i!r}] must be a non-empty list of str, got {refs!r}"
            )
        for r in refs:
            if not isinstance(r, str):
                raise ValueError(f"caption_scores: references[{i!r}] holds a non-str caption: {r!r}")
        if not isinstance(predictions[i], str):
            raise ValueError(f"caption_scores: predictions[{i!r}] must be a str, got {predictions[i]!r}")
    return list(references)


def ptb_tokenize(
    references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """PTB-tokenise references and predictions in one Java call, as pycocoevalcap's PTBTokenizer.

    Returns ``(gts, res)``: ``gts[id]`` the tokenised references, ``res[id] = [tokenised prediction]``,
    both in the order of ``references``. Output is identical to calling pycocoevalcap's
    ``PTBTokenizer().tokenize`` on each side separately.
    """
    ids = list(references)
    owners = [(i, True) for i in ids for _ in references[i]] + [(i, False) for i in ids]
    lines = [c.replace("\n", " ") for i in ids for c in references[i]] + [
        predictions[i].replace("\n", " ") for i in ids
    ]
    jar = _coco_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes("\n".join(lines).encode())
        cmd = [
            "java",
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
        ]
        proc = subprocess.run([*cmd, str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed (exit {proc.returncode}): {proc.stderr.decode()[-2000:]}")
    out = proc.stdout.decode().split("\n")
    # pycocoevalcap zips ids with lines and would silently drop the tail; we refuse instead.
    if len(out) < len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    gts: dict[Hashable, list[str]] = {i: [] for i in ids}
    res: dict[Hashable, list[str]] = {i: [] for i in ids}
    for (i, is_ref), line in zip(owners, out):
        tokens = " ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATION)
        (gts if is_ref else res)[i].append(tokens)
    return gts, res


class _Meteor:
    """METEOR 1.5 in ``-stdio`` mode, the same line protocol and options as pycocoevalcap's ``Meteor``.

    Differs in streaming: all SCORE lines go out from a writer thread while the answers are read,
    instead of one blocking round trip per image. One scoring thread (Meteor's own ``-stdio`` loop): a
    second one, sharing the paraphrase table, was slower on 2 CPUs (experiments/RESULTS.md).
    """

    def __init__(self) -> None:
        meteor_dir = _coco_dir() / "meteor"
        cmd = ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        # Drain stderr so a chatty JVM can never block on a full pipe.
        self._stderr: list[bytes] = []
        self._err_thread = threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True)
        self._err_thread.start()
        self.lock = threading.Lock()
        self._pending = bytearray()

    def _read_lines(self, n: int) -> list[str]:
        """The next ``n`` output lines, read in large chunks.

        Reading line by line from a helper thread would need the GIL once per line while the main
        thread computes CIDEr, stretching each line to a GIL switch interval (~5 ms): 10,000 lines
        would then take longer than pycocoevalcap's whole sequential run.
        """
        fd = self.proc.stdout.fileno()
        while self._pending.count(b"\n") < n:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.proc.wait(timeout=10)
                raise RuntimeError(
                    f"METEOR exited early (code {self.proc.returncode}): "
                    f"{b''.join(self._stderr).decode(errors='replace')[-2000:]}"
                )
            self._pending += chunk
        *lines, rest = self._pending.split(b"\n", n)
        self._pending = bytearray(rest)
        return [line.decode().strip() for line in lines]

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, list[float]]:
        with self.lock:
            return self._compute_score(gts, res)

    def _compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, list[float]]:
        ids = list(gts)
        score_lines = []
        for i in ids:
            hyp = res[i][0].replace("|||", "").replace("  ", " ")
            score_lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hyp)) + "\n")

        def write() -> None:
            self.proc.stdin.write("".join(score_lines).encode())
            self.proc.stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        stats = self._read_lines(len(ids))
        writer.join()
        eval_line = "EVAL" + "".join(f" ||| {s}" for s in stats)
        self.proc.stdin.write(f"{eval_line}\n".encode())
        self.proc.stdin.flush()
        *scores, total = (float(x) for x in self._read_lines(len(ids) + 1))
        return total, scores

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.kill()
        self.proc.wait()


# One METEOR JVM per process, started on first use (or by ``prewarm_meteor``) and reused: its start-up
# (loading the paraphrase table) costs ~11 s of CPU, more than scoring 5000 images with BLEU, ROUGE-L
# and CIDEr together. SCORE/EVAL requests are stateless, so reuse cannot change a score.
_meteor_server: _Meteor | None = None
_meteor_lock = threading.Lock()


def _get_meteor() -> _Meteor:
    global _meteor_server
    with _meteor_lock:
        if _meteor_server is None or not _meteor_server.alive():
            _meteor_server = _Meteor()
        return _meteor_server


def prewarm_meteor() -> None:
    """Start METEOR's JVM now (non-blocking) so that a later ``caption_scores`` finds it loaded."""
    _get_meteor()


def close_meteor() -> None:
    """Stop the shared METEOR JVM (it holds ~1 GB); the next ``caption_scores`` starts a new one."""
    global _meteor_server
    with _meteor_lock:
        if _meteor_server is not None:
            _meteor_server.close()
            _meteor_server = None


atexit.register(close_meteor)


def spice_models_available() -> bool:
    """Whether SPICE's Stanford CoreNLP 3.6.0 jars are on disk (pycocoevalcap downloads them otherwise)."""
    lib = _coco_dir() / "spice" / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").is_file() and (
        lib / "stanford-corenlp-3.6.0-models.jar"
    ).is_file()


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    tokenize: bool = True,
    spice: bool = False,
) -> dict[str, float]:
    """COCO caption metrics of a whole evaluation set, identical to pycocoevalcap's.

    Args:
        predictions: id -> generated caption.
        references: id -> reference captions (at least one). Scoring follows this dict's id order,
            as pycocoevalcap follows its ``gts`` order (the order changes float sums in the last digit).
        tokenize: PTB-tokenise both sides first (the COCO protocol). ``False`` scores the strings as
            whitespace-separated tokens (nlg-eval's convention).
        spice: also compute SPICE; needs Stanford CoreNLP 3.6.0 in pycocoevalcap's ``spice/lib``
            (never downloaded here: a ``FileNotFoundError`` says where to put it).

    Returns:
        ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]}`` as floats.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_inputs(predictions, references)
    if spice and not spice_models_available():
        raise FileNotFoundError(
            "SPICE needs stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar in "
            f"{_coco_dir() / 'spice' / 'lib'} (from stanford-corenlp-full-2015-12-09.zip); "
            "they are not downloaded at run time. Call with spice=False to skip SPICE."
        )
    # Start (or reuse) METEOR's JVM first: loading its paraphrase table overlaps with tokenisation.
    meteor = _get_meteor()
    try:
        if tokenize:
            gts, res = ptb_tokenize(references, predictions)
        else:
            gts = {i: list(references[i]) for i in ids}
            res = {i: [predictions[i]] for i in ids}
        with ThreadPoolExecutor(max_workers=1) as pool:
            meteor_future = pool.submit(meteor.compute_score, gts, res)
            scores: dict[str, float] = {}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            for n, value in enumerate(bleu, start=1):
                scores[f"Bleu_{n}"] = float(value)
            rouge, _ = Rouge().compute_score(gts, res)
            cider, _ = Cider().compute_score(gts, res)
            scores["METEOR"] = float(meteor_future.result()[0])
        scores["ROUGE_L"] = float(rouge)
        scores["CIDEr"] = float(cider)
    except BaseException:
        # A failed or interrupted exchange leaves the line protocol out of step: never reuse that JVM.
        close_meteor()
        raise
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return {
        k: scores[k]
        for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
        if k in scores
    }


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


def vqa_scores(
    predictions: Mapping[Hashable, str], answers_by_id: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """Mean VQAv2 accuracy over question ids: ``{"accuracy": float in [0, 1]}`` (the official
    ``overall`` is 100 times this, rounded to 2 decimals)."""
    missing_pred = [i for i in answers_by_id if i not in predictions]
    missing_ans = [i for i in predictions if i not in answers_by_id]
    if missing_pred or missing_ans:
        raise ValueError(
            f"vqa_scores: ids without a prediction: {missing_pred[:20]!r} ({len(missing_pred)}), "
            f"ids without answers: {missing_ans[:20]!r} ({len(missing_ans)})"
        )
    if not answers_by_id:
        raise ValueError("vqa_scores: nothing to score (no ids)")
    accs = [vqa_accuracy(predictions[i], answers_by_id[i]) for i in answers_by_id]
    return {"accuracy": sum(accs) / len(accs)}


# ----------------------------------------------------------------------------------------------------
# Text-to-image: FID and CLIP score
# ----------------------------------------------------------------------------------------------------

ImageBatch = torch.Tensor | Sequence  # uint8 (N, 3, H, W) tensor, or a list of PIL images


def _to_uint8(images: ImageBatch, name: str) -> torch.Tensor:
    """A batch of images as a uint8 (N, 3, H, W) tensor."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        x = images
    else:
        arrays = []
        for k, im in enumerate(images):
            a = np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im)
            if a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(f"{name}[{k}]: expected an RGB image (H, W, 3), got shape {a.shape}")
            arrays.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
        if not arrays:
            raise ValueError(f"{name}: no images")
        x = torch.stack(arrays)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if x.is_floating_point() and x.min() >= 0 and x.max() <= 1:
            x = (x * 255).round().to(torch.uint8)
        else:
            raise ValueError(f"{name}: expected uint8 images or floats in [0, 1], got {x.dtype}")
    return x


def _require_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p} (weights are read from local paths only)")
    return p


_FID_EXTRA = "pip install -e '.[fid]' (torch-fidelity, with a torchvision built for the installed torch)"


def _torchmetrics_fid():
    """torchmetrics' ``FrechetInceptionDistance``, with a clear error when its image stack cannot load.

    torchmetrics imports torch-fidelity's InceptionV3 whenever torch-fidelity is installed, and
    torch-fidelity imports torchvision: a torchvision built for another torch (e.g. a CUDA wheel beside
    a CPU-only torch) fails there with "operator torchvision::nms does not exist".
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            f"fid_score: torchmetrics' FID does not import ({type(e).__name__}: {e}); torch-fidelity and "
            f"torchvision must match the installed torch ({torch.__version__}): {_FID_EXTRA}"
        ) from e
    return FrechetInceptionDistance


def require_torch_fidelity() -> None:
    """Fail early, naming the extra to install, when torch-fidelity's InceptionV3 cannot be imported."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: F401
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            f"FID from an Inception weights file needs torch-fidelity's InceptionV3 ({type(e).__name__}: "
            f"{e}): {_FID_EXTRA}, or pass fid_score a feature extractor module"
        ) from e


def fid_score(
    real_images: ImageBatch,
    fake_images: ImageBatch,
    inception_path: str | os.PathLike | torch.nn.Module,
    *,
    batch_size: int = 50,
    antialias: bool = True,
) -> float:
    """Fréchet Inception Distance (Heusel et al. 2017, eq. 6) between two image sets, through
    torchmetrics' ``FrechetInceptionDistance`` (statistics accumulated in float64).

    ``inception_path`` is either the feature extractor itself (an ``nn.Module`` mapping uint8
    (N, 3, H, W) images to (N, D) features) or the path of a state dict for torch-fidelity's
    ``FeatureExtractorInceptionV3`` (the FID network ported from TensorFlow, e.g.
    ``weights-inception-2015-12-05-6726825d.pth``; 2048-d pool features; needs the ``fid`` extra).
    With a weights file, images are resized to 299x299 inside the network: bilinear with antialiasing
    (``antialias=True``, torchmetrics' default) or TensorFlow 1.x's bilinear resize as in torch-fidelity
    and the original FID code (``antialias=False``); the two give different values unless the images
    are 299x299 already.
    Images: uint8 (N, 3, H, W) tensors, floats in [0, 1], or lists of PIL images.
    """
    real = _to_uint8(real_images, "real_images")
    fake = _to_uint8(fake_images, "fake_images")
    for name, x in (("real_images", real), ("fake_images", fake)):
        if len(x) < 2:
            raise ValueError(f"fid_score: {name} holds {len(x)} image(s); a covariance needs at least 2")
    if isinstance(inception_path, torch.nn.Module):
        FrechetInceptionDistance = _torchmetrics_fid()
        fid = FrechetInceptionDistance(feature=inception_path.eval(), input_img_size=tuple(real.shape[1:]))
    else:
        weights = _require_path(inception_path, "Inception weights")
        if weights.is_dir():
            raise ValueError(f"Inception weights {weights}: expected a state dict file, got a folder")
        # torch-fidelity reads the file with weights_only=False (full unpickling): accept only a file
        # that loads as plain tensors.
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"Inception weights {weights}: not a state dict of tensors ({type(e).__name__}: {str(e)[:300]})"
            ) from e
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"Inception weights {weights}: expected a state dict (name -> tensor)")
        del state
        require_torch_fidelity()
        FrechetInceptionDistance = _torchmetrics_fid()
        try:
            fid = FrechetInceptionDistance(
                feature=2048, feature_extractor_weights_path=str(weights), antialias=antialias
            )
        except (RuntimeError, KeyError, AttributeError, TypeError, pickle.UnpicklingError) as e:
            raise ValueError(
                f"Inception weights {weights}: not a state dict of torch-fidelity's "
                f"FeatureExtractorInceptionV3 ({type(e).__name__}: {str(e)[:300]})"
            ) from e
    with torch.no_grad():
        for start in range(0, len(real), batch_size):
            fid.update(real[start : start + batch_size], real=True)
        for start in range(0, len(fake), batch_size):
            fid.update(fake[start : start + batch_size], real=False)
        return float(fid.compute())


class _ClipFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return projected embeddings as tensors.

    torchmetrics 1.9 normalises what these return, but transformers 5 returns a
    ``BaseModelOutputWithPooling`` (the projection in ``pooler_output``) where 4.x returned a tensor.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _local_clip_loader(clip_path: str | os.PathLike) -> Callable[[], tuple]:
    path = _require_path(clip_path, "CLIP model folder")

    def load() -> tuple:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        return _ClipFeatures(model), processor

    return load


def clip_score(
    images: ImageBatch, texts: Sequence[str], clip_path: str | os.PathLike, *, batch_size: int = 32
) -> float:
    """CLIP score as torchmetrics' ``CLIPScore`` defines it: ``max(100 * mean(cos(image, text)), 0)``.

    ``clip_path`` is a local folder saved by ``CLIPModel.save_pretrained`` together with its
    ``CLIPProcessor`` (e.g. a copy of openai/clip-vit-large-patch14).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if isinstance(texts, str):
        raise ValueError("clip_score: texts must be a list of str, one per image")
    x = _to_uint8(images, "images")
    if len(x) != len(texts):
        raise ValueError(f"clip_score: {len(x)} images but {len(texts)} texts")
    metric = CLIPScore(model_name_or_path=_local_clip_loader(clip_path))
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            metric.update(list(x[start : start + batch_size]), list(texts[start : start + batch_size]))
        return float(metric.compute())
