"""METEOR on several threads (``easygen/MeteorParallel.java``) answers exactly what pycocoevalcap's
single-threaded ``Meteor`` answers: every per-image score and the corpus score, bit for bit."""

from __future__ import annotations

import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from easygen import metrics

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")

WORDS = (
    "a an the man woman dog dogs cat bus red large small riding sitting on in near park street table".split()
)


def _corpus(n: int, seed: int = 0):
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))

    gts = {f"i{k}": [sentence() for _ in range(rng.randint(1, 5))] for k in range(n)}
    # some hypotheses repeat a reference, some carry the "|||" separator that both sides strip
    res = {
        k: [rng.choice(v) if rng.random() < 0.3 else sentence() + (" ||| x" if rng.random() < 0.05 else "")]
        for k, v in gts.items()
    }
    return gts, res


@pytest.mark.skipif(metrics._meteor_parallel_classes() is None, reason="needs a JDK (javac)")
def test_parallel_meteor_equals_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    gts, res = _corpus(300)

    def reference():
        m = Meteor()
        try:
            return m.compute_score(gts, res)
        finally:
            with m.lock:
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait()

    def ours():
        m = metrics._Meteor(threads=3)
        try:
            assert m.threads == 3 and "MeteorParallel" in m.cmd
            return m.compute_score(gts, res)
        finally:
            m.close()

    with ThreadPoolExecutor(2) as pool:  # both JVMs load their paraphrase tables at the same time
        ref_future, our_future = pool.submit(reference), pool.submit(ours)
        ref_total, ref_scores = ref_future.result()
        our_total, our_scores = our_future.result()
    assert len(our_scores) == len(gts)
    assert our_scores == list(ref_scores)
    assert our_total == ref_total


def test_thread_count_from_environment(monkeypatch):
    monkeypatch.setenv("EASYGEN_METEOR_THREADS", "3")
    assert metrics._meteor_threads() == 3
    monkeypatch.setenv("EASYGEN_METEOR_THREADS", "0")
    with pytest.raises(ValueError, match="EASYGEN_METEOR_THREADS must be an integer >= 1, got '0'"):
        metrics._meteor_threads()
    monkeypatch.delenv("EASYGEN_METEOR_THREADS")
    assert 1 <= metrics._meteor_threads() <= 4


def test_single_thread_runs_meteor_itself():
    m = metrics._Meteor(threads=1)
    try:
        assert m.threads == 1 and m.cmd[:3] == ["java", "-jar", "-Xmx2G"]
    finally:
        m.close()
