"""The BiDiffuser stage's caption draw when `collate` runs in DataLoader workers (`data.num_workers` > 0,
as conf/data/captions.yaml sets): each worker draws its own captions, reproducibly for a fixed seed."""

from __future__ import annotations

import pytest
import torch

N_CAPTIONS = 4


def _samples(n: int) -> list[dict]:
    return [
        {"id": f"pic{i}", "image": torch.zeros(3, 2, 2), "captions": [f"{i}:{k}" for k in range(N_CAPTIONS)]}
        for i in range(n)
    ]


def _module():
    from easygen.lit.bidiffuser_module import BiDiffuserModule

    # online targets: collate stacks the pixels and draws one caption per sample, nothing else
    return BiDiffuserModule({"seed": 0, "stage": {"encoder_source": "online"}, "model": {}})


def _picks(module, num_workers: int, seed: int = 0) -> list[list[int]]:
    """Per batch, the index of the caption drawn for each sample."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        _samples(64), batch_size=8, num_workers=num_workers, collate_fn=module.collate
    )
    return [[int(c.split(":")[1]) for c in batch["captions"]] for batch in loader]


@pytest.mark.skipif(
    "fork" not in torch.multiprocessing.get_all_start_methods(), reason="workers share the module by fork"
)
def test_workers_draw_their_own_captions():
    module = _module()
    picks = _picks(module, num_workers=2)
    assert len(picks) == 8
    # worker 0 collates batches 0, 2, 4, 6 and worker 1 batches 1, 3, 5, 7; forked copies of one generator
    # gave both workers the same draws
    worker0, worker1 = picks[0::2], picks[1::2]
    assert worker0 != worker1
    # a fixed seed gives the same draws again (torch seeds each worker from it)
    assert _picks(_module(), num_workers=2) == picks
    # all four captions of a picture are used
    assert {k for batch in picks for k in batch} == set(range(N_CAPTIONS))


def test_main_process_draws_from_the_module_generator():
    import random

    module = _module()
    picks = _picks(module, num_workers=0)
    rng = random.Random(0)
    assert picks == [[rng.randrange(N_CAPTIONS) for _ in range(8)] for _ in range(8)]
