"""`stage=extract`: fp16 i2t features equal to the pipeline's own output, resuming after a lost shard,
ranks writing disjoint shards in separate processes with one manifest over both, a corrupt image skipped
and listed, encoder outputs for the BiDiffuser stage, and a restart with other settings refused."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, compose_at

N = 24  # synthetic split: 20 train (5 shards of 4), 2 val, 2 test
SHARD_SIZE = 4
SMALL = [
    "stage=extract",
    f"data.synthetic.n={N}",
    "model.bidiffuser.sampler.steps=2",
    "logger=none",
    "stage.splits=[train]",
    "stage.batch_size=8",
    "data.instruct_train=null",  # the caption set alone (the dialogues: test_dialogues_features_from_the_pictures)
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The synthetic set where `data.root` expects it, in shards of 4 so that a split has several."""
    from data_modules.synthetic import make_synthetic

    d = tmp_path_factory.mktemp("extract-data")
    cfg = make_cfg(d, d / "unused")
    make_synthetic(
        str(cfg.data.root), n=N, seed=0, image_size=int(cfg.model.image_size), shard_size=SHARD_SIZE
    )
    return d


def make_cfg(data_dir: Path, out: Path, overrides=()):
    return compose_at(data_dir, out, [*SMALL, *overrides])


def members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, field = m.name.partition(".")
            out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_features_fp16_and_resume(data_dir, tmp_path):
    from easygen.factories import build_bidiffuser
    from easygen.stages.common import container
    from easygen.stages.extract import extract_stage

    cfg = make_cfg(data_dir, tmp_path / "run")
    res = extract_stage(cfg)
    out = Path(res["artifacts"]["shards"])
    shards = sorted((out / "train").glob("*.tar"))
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert res["extract"]["written"] == [f"train/{p.name}" for p in shards]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 20
    assert manifest["splits"]["train"]["shards"] == {f"train/{p.name}": 4 for p in shards}

    # the stored features are the pipeline's i2t features of the same batch, rounded to fp16
    source = sorted(Path(str(cfg.data.root), "train").glob("*.tar"))[1]
    src = members(source)
    got = members(shards[1])
    assert list(got) == list(src)
    for key in src:
        assert {f for f in got[key] if f != "features.npy"} == set(src[key])
        assert all(got[key][f] == src[key][f] for f in src[key])  # the sample itself is copied unchanged
    from easygen.images import load_image

    pipe = build_bidiffuser(container(cfg))
    images = torch.stack([load_image(src[k]["png"], int(cfg.model.image_size)) for k in src])
    expected = pipe.i2t_features(images).numpy()
    stored = np.stack([npy(got[k]["features.npy"]) for k in src])
    assert stored.dtype == np.float16
    assert stored.shape == (4, int(cfg.model.num_image_tokens), int(cfg.model.feature_dim))
    # fp16 keeps 11 significant bits: equal up to that rounding
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=1e-3, atol=1e-3)

    # a restart skips finished shards: only the deleted one is written again, the others are untouched
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[3].unlink()
    res2 = extract_stage(cfg)
    assert res2["extract"]["written"] == ["train/shard-000003.tar"]
    assert len(res2["extract"]["resumed"]) == 4
    assert res2["metrics"]["extract/images"] == 4.0
    for p in shards:
        if p != shards[3]:
            assert p.stat().st_mtime_ns == stamps[p.name]
    assert members(shards[3]).keys() == members(Path(str(cfg.data.root), "train", shards[3].name)).keys()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # nothing half-written is left behind
    assert not list(out.rglob("*.tmp"))

    # a restart with other settings into the same folder is refused, naming the key to change
    from easygen.errors import ConfigError

    with pytest.raises(ConfigError, match="stage.out_dir"):
        extract_stage(make_cfg(data_dir, tmp_path / "run", ["stage.dtype=float32"]))


def test_corrupt_image_skipped_and_listed(data_dir, tmp_path):
    """A shard with an undecodable picture: the sample is dropped, the rest of the shard is written, and the
    manifest lists the shard, key and reason."""
    from easygen.stages.extract import extract_stage

    src_root = tmp_path / "src"
    (src_root / "train").mkdir(parents=True)
    cfg0 = make_cfg(data_dir, tmp_path / "unused")
    source = sorted(Path(str(cfg0.data.root), "train").glob("*.tar"))[0]
    bad_key = next(iter(members(source)))
    dst = src_root / "train" / source.name
    with tarfile.open(source) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == f"{bad_key}.png":
                data = b"\x89PNG\r\n\x1a\n this is not a picture"
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    cfg = make_cfg(data_dir, tmp_path / "run", [f"data.train=[{{urls:'{dst}',weight:1.0}}]"])
    res = extract_stage(cfg)
    out = Path(res["artifacts"]["shards"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == {f"train/{source.name}": 3}
    assert len(manifest["skipped"]) == 1
    skipped = manifest["skipped"][0]
    assert (
        skipped["key"] == bad_key
        and skipped["shard"] == str(dst)
        and "unreadable image .png" in skipped["reason"]
    )
    assert res["metrics"]["extract/skipped"] == 1.0
    written = members(out / "train" / source.name)
    assert bad_key not in written and len(written) == 3
    # the skipped sample stays listed after a resumed run
    extract_stage(cfg)
    assert json.loads((out / "manifest.json").read_text())["skipped"] == [skipped]


def test_encoder_outputs(data_dir, tmp_path):
    """`stage.what=encoders`: VAE moments, CLIP image embedding and one text latent per caption, fp16."""
    from easygen.factories import build_bidiffuser
    from easygen.images import load_image
    from easygen.stages.common import container
    from easygen.stages.extract import extract_stage

    cfg = make_cfg(data_dir, tmp_path / "run", ["stage.what=encoders"])
    out = Path(extract_stage(cfg)["artifacts"]["shards"])
    assert json.loads((out / "manifest.json").read_text())["what"] == ["encoders"]
    got = members(sorted((out / "train").glob("*.tar"))[0])
    pipe = build_bidiffuser(container(cfg))
    c = pipe.uvit.config
    key, fields = next(iter(got.items()))
    assert "features.npy" not in fields
    enc = pipe.encode_images(load_image(fields["png"], int(cfg.model.image_size))[None])
    captions = json.loads(fields["json"])["captions"]
    moments, clip_img, text = (npy(fields[f]) for f in ("moments.npy", "clip_img.npy", "text_latents.npy"))
    assert moments.dtype == clip_img.dtype == text.dtype == np.float16
    assert moments.shape == (2 * c.in_chans, c.img_size, c.img_size)
    assert text.shape == (len(captions), c.num_text_tokens, c.text_dim)
    np.testing.assert_allclose(moments.astype(np.float32), enc["moments"][0].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(clip_img.astype(np.float32), enc["clip_img"][0].numpy(), rtol=1e-3, atol=1e-3)
    for i, caption in enumerate(captions):
        np.testing.assert_allclose(text[i], pipe.encode_texts([caption])[0].numpy(), atol=2e-3, rtol=2e-3)


def test_ranks_split_shards(data_dir, tmp_path, monkeypatch):
    """RANK 0 then RANK 1 of WORLD_SIZE 2 (the environment a launcher sets, no process group): every
    second shard each, and the manifest after the second lists both ranks' shards."""
    from easygen.stages.extract import extract_stage

    cfg = make_cfg(data_dir, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        res = extract_stage(cfg)
        assert res["extract"]["rank"] == rank
        written.append(res["extract"]["written"])
    assert written == [
        [f"train/shard-{i:06d}.tar" for i in (0, 2, 4)],
        [f"train/shard-{i:06d}.tar" for i in (1, 3)],
    ]
    manifest = json.loads((Path(str(cfg.stage.out_dir)) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == {f"train/shard-{i:06d}.tar": 4 for i in range(5)}


@pytest.mark.slow
def test_ranks_write_disjoint_shards(data_dir, tmp_path, run_env):
    """Two processes as RANK 0 and 1 of WORLD_SIZE 2, one after the other: each writes its own shards, and
    the manifest after the second lists all of them."""
    shards = tmp_path / "shards"
    common = [
        *SMALL,
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path}/logs",
        f"stage.out_dir={shards}",
    ]
    written = []
    for rank in (0, 1):
        env = dict(run_env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        r = subprocess.run(
            [sys.executable, "run.py", *common, f"hydra.run.dir={tmp_path}/rank{rank}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        written.append({p.name for p in (shards / "train").glob("*.tar")} - set().union(*written))
    assert written[0] == {"shard-000000.tar", "shard-000002.tar", "shard-000004.tar"}
    assert written[1] == {"shard-000001.tar", "shard-000003.tar"}
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == {f"train/shard-{i:06d}.tar": 4 for i in range(5)}
    assert manifest["splits"]["train"]["samples"] == 20
    # rank 0 writes results.json; rank 1 does not
    assert (tmp_path / "rank0" / "results.json").exists() and not (
        tmp_path / "rank1" / "results.json"
    ).exists()


def test_dialogues_features_from_the_pictures(data_dir, tmp_path):
    """With the synthetic set's dialogues (`data.instruct_train`), extract writes them beside the captions:
    a question gets the features of its picture (the caption sample's, served from the memo of pictures
    already seen), a draw request (no picture) is copied as it is; `sources` hands each source on."""
    from easygen.stages.extract import extract_stage

    cfg = compose_at(data_dir, tmp_path / "run", [o for o in SMALL if not o.startswith("data.instruct_train")])
    assert len(cfg.data.instruct_train) == 2
    res = extract_stage(cfg)
    out = Path(res["artifacts"]["shards"])
    captions = {k: v for p in sorted((out / "train").glob("shard-*.tar")) for k, v in members(p).items()}
    questions = {k: v for p in sorted((out / "train").glob("question-*.tar")) for k, v in members(p).items()}
    draws = {k: v for p in sorted((out / "train").glob("draw-*.tar")) for k, v in members(p).items()}
    assert len(captions) == 20 and len(questions) == 5 * 20 and len(draws) == 2 * 20
    for q in questions.values():
        picture = json.loads(q["json"])["dialogue"]["picture"]
        assert q["png"] == captions[picture]["png"]
        np.testing.assert_array_equal(npy(q["features.npy"]), npy(captions[picture]["features.npy"]))
    assert all(set(d) == {"json"} for d in draws.values())
    sources = res["artifacts"]["sources"]
    assert sources["train"] == [{"urls": "::".join(str(out / "train" / f"shard-{i:06d}.tar") for i in range(5)),
                                 "weight": 1.0}]
    assert sources["instruct_train"] == [{"urls": str(out / "train" / "draw-*.tar"), "weight": 0.25},
                                         {"urls": str(out / "train" / "question-*.tar"), "weight": 0.4}]
