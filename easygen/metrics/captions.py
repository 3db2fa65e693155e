"""COCO caption scores (the paper's captioning evaluation), identical to pycocoevalcap's.

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
"""

from __future__ import annotations

import atexit
import os
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = [
    "caption_scores",
    "ptb_tokenize",
    "spice_models_available",
    "prewarm_meteor",
    "close_meteor",
    "nocaps_scores",
    "NOCAPS_DOMAINS",
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


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def nocaps_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    domains: Mapping[Hashable, str],
    *,
    spice: bool = True,
) -> dict[str, float]:
    """NoCaps scores (Agrawal et al. 2019, "nocaps: novel object captioning at scale", sec. 4): the COCO
    metrics of the whole split, and of each domain's images scored on their own, as the NoCaps
    evaluation server reports them (``<domain>/CIDEr``, ``<domain>/SPICE``, ...; CIDEr's document
    frequencies then come from that domain's references). ``domains``: id -> "in-domain",
    "near-domain" or "out-domain" (the image's ``domain`` field)."""
    ids = _check_inputs(predictions, references)
    unknown = sorted({str(domains.get(i)) for i in ids} - set(NOCAPS_DOMAINS))
    if unknown:
        raise ValueError(f"nocaps_scores: domains must be one of {NOCAPS_DOMAINS}, found {unknown}")
    out = {k: v for k, v in caption_scores(predictions, references, spice=spice).items()}
    for domain in NOCAPS_DOMAINS:
        part = [i for i in ids if domains[i] == domain]
        if part:
            scores = caption_scores({i: predictions[i] for i in part}, {i: references[i] for i in part},
                                    spice=spice)  # fmt: skip
            out.update({f"{domain}/{k}": v for k, v in scores.items()})
    return out
