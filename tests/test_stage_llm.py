"""The LLM stages on the tiny preset, through the real configs and the runner's data and module builders:
what `stage=pretrain` and `stage=instruct lora=on|off` train (every other parameter bit-identical),
the three feature sources, the projector's own learning rate, small LoRA checkpoints, the FlanT5
Mid-Align path (`model=tiny_t5`) and the shuffled-images control."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from callbacks.feature_standardizer import FitFeatureStandardizer
from tests.conftest import compose_at

SMALL = [
    "data.synthetic.n=40",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=2",
    "logger=none",
    "callbacks=none",
    "data.shuffle_buffer=8",
]


# one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llm-data")


def make_cfg(data_dir: Path, out: Path, overrides=()):
    return compose_at(data_dir, out, [*SMALL, *overrides])


def fit(cfg, steps: int = 2, ckpt_dir: Path | None = None):
    """Train the stage's module for `steps` steps as `train_stage` does; returns (module, before, trainer)."""
    from easygen.stages.build import datamodule, lightning_module
    from easygen.stages.common import ensure_data

    pl.seed_everything(int(cfg.seed))
    ensure_data(cfg)
    module = lightning_module(cfg)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    dm = datamodule(cfg, module)
    callbacks = [FitFeatureStandardizer()]  # what conf/callbacks/default.yaml adds
    if ckpt_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
    )
    trainer.fit(module, datamodule=dm)
    return module, before, trainer


def is_projector_weight(key: str) -> bool:
    """A trainable projector tensor (not the fitted feature statistics of model.projector.standardize)."""
    return key.startswith("model.projector.") and ".feature_" not in key


def changed(module, before) -> set[str]:
    """The tensors training changed; the projector's feature statistics are set at fit start
    (callbacks/feature_standardizer.py), not trained, and are left out (checked fitted instead)."""
    after = module.state_dict()
    assert set(after) == set(before)
    assert not getattr(module.model.projector, "needs_fit", False)
    return {k for k, v in after.items() if not torch.equal(v, before[k]) and ".feature_" not in k}


def trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("source", ["on_the_fly", "captions"])
def test_pretrain_trains_only_the_projector(data_dir, tmp_path, source):
    cfg = make_cfg(data_dir, tmp_path, [f"stage.feature_source={source}"])
    module, before, _ = fit(cfg, steps=2)
    diff = changed(module, before)
    projector = {k for k in before if is_projector_weight(k)}
    # every projector tensor moved, nothing else did (LLM, lm_head, BiDiffuser: bit-identical)
    assert diff == projector, sorted(diff ^ projector)[:10]
    assert trainable(module) == projector


def test_pretrain_on_extracted_features(data_dir, tmp_path):
    """Shards written by the extract stage's shard writer: features come from `features.npy`, no BiDiffuser
    is built, and the batch carries the stored features exactly."""
    from data_modules.shards import ShardIndexDataset, expand_urls
    from easygen.checkpoint import save_state_dict_file
    from easygen.factories import build_bidiffuser
    from easygen.stages.build import lightning_module
    from easygen.stages.common import container, ensure_data
    from easygen.stages.extract import extract_shard

    base = make_cfg(data_dir, tmp_path)
    ensure_data(base)
    pipe = build_bidiffuser(container(base))
    shards = tmp_path / "extracted"
    for split, spec in (("train", base.data.train[0].urls), ("val", base.data.val)):
        (shards / split).mkdir(parents=True)
        for url in expand_urls(spec):
            extract_shard(pipe, url, shards / split / Path(url).name, int(base.model.image_size), 8, "cpu")
    cfg = make_cfg(
        data_dir,
        tmp_path / "run",
        [
            "stage.feature_source=extracted",
            f"data.train=[{{urls:'{shards}/train/*.tar',weight:1.0}}]",
            f"data.val='{shards}/val/*.tar'",
            f"data.test='{shards}/val/*.tar'",
            "data.samples_per_epoch=32",
        ],
    )
    module, before, _ = fit(cfg, steps=2)
    assert module.bidiffuser is None
    assert changed(module, before) == {k for k in before if is_projector_weight(k)}
    batch = next(iter(module.trainer.datamodule.train_dataloader()))
    feats = module.image_features(batch)
    assert feats.shape == (4, int(cfg.model.num_image_tokens), int(cfg.model.feature_dim))
    assert torch.equal(feats, batch["features"])
    # model.projector.standardize: statistics of the stored training features, fitted before the first step
    ds = ShardIndexDataset(f"{shards}/train/*.tar", int(cfg.model.image_size), load_images=False)
    stored = torch.stack([torch.as_tensor(ds[i]["features"]).float() for i in range(len(ds))]).double()
    proj = module.model.projector
    torch.testing.assert_close(proj.feature_mean, stored.mean(0).float())
    torch.testing.assert_close(proj.feature_std, stored.std(0).float())
    # the next stage starts from them (init_from) instead of fitting again on its own data
    state = module.trained_state()
    assert {"model.projector.feature_mean", "model.projector.feature_std"} <= set(state)
    save_state_dict_file(state, tmp_path / "trained.safetensors")
    nxt = lightning_module(make_cfg(data_dir, tmp_path / "next", ["stage.feature_source=captions",
                                                                 f"init_from={tmp_path / 'trained.safetensors'}"]))
    nxt.configure_model()
    assert torch.equal(nxt.model.projector.feature_mean, proj.feature_mean)
    assert torch.equal(nxt.model.projector.fc1.weight, proj.fc1.weight)


def test_pretrain_lm_head_is_a_choice(data_dir, tmp_path):
    cfg = make_cfg(data_dir, tmp_path, ["stage.feature_source=captions", "stage.train_lm_head=true"])
    module, before, _ = fit(cfg, steps=2)  # the warmup starts at lr 0 (transformers), so one step would not move
    expected = {k for k in before if is_projector_weight(k) or k.startswith("model.llm.lm_head.")}
    assert changed(module, before) == expected


def test_instruct_lora_trains_adapters_and_projector_small_checkpoint(data_dir, tmp_path):
    cfg = make_cfg(data_dir, tmp_path, ["stage=instruct", "lora=on", "stage.feature_source=captions"])
    module, before, trainer = fit(cfg, steps=2, ckpt_dir=tmp_path / "ckpt")
    diff = changed(module, before)
    lora_b = {k for k in before if "lora_B" in k}
    projector = {k for k in before if is_projector_weight(k)}
    assert lora_b and projector <= diff
    assert lora_b <= diff  # B starts at zero: every adapter learned
    assert all("lora_" in k or k.startswith("model.projector.") for k in diff)
    names = trainable(module)
    assert all("lora_" in n or n.startswith("model.projector.") for n in names)
    # the checkpoint holds exactly the trained tensors: adapters + projector, far smaller than the LLM
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    # (plus the projector's fitted feature statistics, which are buffers)
    stats = {k for k in module.state_dict() if ".projector.feature_" in k}
    assert set(ckpt["state_dict"]) == names | stats
    saved = sum(v.numel() for v in ckpt["state_dict"].values())
    llm = sum(p.numel() for p in module.model.llm.parameters() if not p.requires_grad)
    assert saved < llm / 3, (saved, llm)
    # the exported weights start a chat/eval module that applies the same adapters
    art = module.export_artifacts(tmp_path / "export")
    from easygen.checkpoint import load_state_dict_file

    assert set(load_state_dict_file(art["weights"])) == names | stats
    # stage.export_merged: the merged folder loads with plain transformers and gives the adapted logits
    from transformers import AutoModelForCausalLM

    module.stage_cfg["export_merged"] = True
    art = module.export_artifacts(tmp_path / "export")
    merged = AutoModelForCausalLM.from_pretrained(art["merged_llm"], local_files_only=True).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(3, len(module.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    module.model.llm.eval()
    with torch.no_grad():
        adapted = module.model.llm(input_ids=ids).logits
        base = module.model.llm.get_base_model()
        with module.model.llm.disable_adapter():
            plain = base(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-6)  # the adapters learned something
    torch.testing.assert_close(got, adapted, rtol=1e-5, atol=1e-5)


def test_instruct_full_llm_and_projector_own_lr(data_dir, tmp_path):
    # projector_lr 0: the projector keeps its weights while the whole LLM trains at optim.lr
    cfg = make_cfg(
        data_dir,
        tmp_path,
        [
            "stage=instruct",
            "lora=off",
            "stage.feature_source=captions",
            "optim.lr=1e-3",
            "optim.projector_lr=0.0",
        ],
    )
    module, before, trainer = fit(cfg, steps=2)
    diff = changed(module, before)
    llm = {k for k in before if k.startswith("model.llm.")}
    assert not any(k.startswith("model.projector.") for k in diff)
    assert not any(k.startswith("bidiffuser.") for k in diff)
    # every LLM weight that takes part in the loss moved; unused embedding rows do not make a tensor equal
    assert diff == llm, sorted(llm - diff)[:10]
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["projector"]["initial_lr"] == 0.0 and groups["decay"]["initial_lr"] == 1e-3


def test_projector_learning_rate_in_the_optimizer(data_dir, tmp_path):
    cfg = make_cfg(
        data_dir,
        tmp_path,
        [
            "stage=instruct",
            "lora=on",
            "stage.feature_source=captions",
            "optim.lr=2e-5",
            "optim.projector_lr=1e-3",
        ],
    )
    module, before, trainer = fit(cfg, steps=1)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    proj_ids = {id(p) for p in module.model.projector.parameters()}
    assert {id(p) for p in groups["projector"]["params"]} == proj_ids
    assert groups["projector"]["initial_lr"] == 1e-3
    others = [g for n, g in groups.items() if n != "projector"]
    assert others and all(g["initial_lr"] == 2e-5 for g in others)
    assert all(id(p) not in proj_ids for g in others for p in g["params"])


# -- shuffled images control ------------------------------------------------------------------------


def test_derangement_has_no_fixed_point_and_is_seeded():
    from easygen.lit.easygen_module import derangement

    for n in (2, 3, 5, 16):
        for seed in range(20):
            p = derangement(n, torch.Generator().manual_seed(seed))
            assert sorted(p.tolist()) == list(range(n))
            assert not bool((p == torch.arange(n)).any())
            assert torch.equal(p, derangement(n, torch.Generator().manual_seed(seed)))
    seen = {tuple(derangement(4, torch.Generator().manual_seed(s)).tolist()) for s in range(200)}
    assert len(seen) == 9  # all derangements of 4 elements occur
    with pytest.raises(ValueError, match="derangement"):
        derangement(1, torch.Generator())


def test_shuffle_features_pairs_captions_with_other_pictures(data_dir, tmp_path):
    """With stage.shuffle_features the training loss is the model's loss on the batch with its feature rows
    permuted by a derangement; without it, on the true pairs; evaluation is never shuffled."""
    from easygen.stages.build import lightning_module
    from easygen.stages.common import ensure_data

    feats = {}
    for flag in (False, True):
        cfg = make_cfg(
            data_dir, tmp_path, ["stage.feature_source=captions", f"stage.shuffle_features={flag}"]
        )
        ensure_data(cfg)
        module = lightning_module(cfg)
        module.configure_model()
        samples = [
            {"id": f"s{i}", "kind": "caption", "captions": [c]}
            for i, c in enumerate(
                [
                    "a small red circle on the left",
                    "a large blue square at the top",
                    "a green cross in the center",
                    "a small yellow triangle on the right",
                    "a large purple circle at the bottom",
                ]
            )
        ]
        batch = module.collate(samples)
        true = module.image_features(batch)
        seen = []
        orig = module.model.forward

        def spy(*args, _seen=seen, _orig=orig, **kwargs):
            _seen.append(kwargs["features"])
            return _orig(*args, **kwargs)

        module.model.forward = spy
        module.log = lambda *a, **k: None
        module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        loss = module.training_step(batch, 0)
        module.model.forward = orig
        used = seen[0]
        if not flag:
            assert torch.equal(used, true)
            feats["plain"] = loss
            continue
        # every row is some other sample's feature
        match = (used[:, None] == true[None]).flatten(2).all(-1).int()
        assert (match.sum(1) == 1).all()
        perm = match.argmax(1)
        assert not bool((perm == torch.arange(5)).any())
        expect = module.model(
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            features=true[perm],
            image_positions=batch["image_positions"],
            has_image=batch["has_image"],
        ).loss
        assert torch.equal(loss.detach(), expect.detach())
        assert not torch.equal(loss.detach(), feats["plain"].detach())
        # evaluation reads the true pictures, in order (caption-as-image is a training trick only)
        images = torch.rand(5, 3, int(cfg.model.image_size), int(cfg.model.image_size))
        eval_batch = module.eval_collate([dict(s, image=im) for s, im in zip(samples, images)])
        module._feature_cache.clear()
        got = module.image_features(eval_batch)
        assert torch.equal(got, module.bidiffuser.i2t_features(images))


# -- FlanT5 Mid-Align ---------------------------------------------------------------------------------


def test_t5_collator_prompt_labels_and_captions():
    from easygen.llm.t5_collate import T5Collator
    from easygen.llm.templates import IGNORE_INDEX
    from easygen.llm.tokenization import build_tokenizer

    tok = build_tokenizer("t5", ["a red circle", "what colour is it"], vocab_size=300)
    col = T5Collator(tok, max_length=64)
    feats = torch.randn(16, 8)
    batch = col(
        [
            {"id": "c", "kind": "caption", "captions": ["a red circle"], "features": feats},
            {
                "id": "v",
                "kind": "vqa",
                "question": "what colour is it?",
                "answers": ["red", "red", "blue"],
                "features": feats,
                "captions": ["a red circle on black"],
            },
        ]
    )
    eos = tok.eos_token_id
    for b, answer in enumerate(["a red circle", "red"]):
        row = batch["labels"][b]
        ids = row[row != IGNORE_INDEX].tolist()
        # a T5 tokenizer appends </s> itself
        assert ids == tok(answer)["input_ids"] and ids[-1] == eos
    prompt = tok.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()], skip_special_tokens=True)
    assert "what colour is it? please giving an short answer." in prompt and "<image>" not in prompt
    assert batch["has_image"].all() and batch["features"].shape == (2, 16, 8)
    cap = batch["caption_input_ids"][0][batch["caption_attention_mask"][0].bool()].tolist()
    assert cap == tok("a red circle")["input_ids"]
    with pytest.raises(ValueError, match="sample x"):
        col([{"id": "x", "kind": "caption", "captions": ["a"]}])  # an image marker with nothing to place


def test_t5_mid_align_stage(data_dir, tmp_path):
    """`model=tiny_t5`: EasyGenT5Module (model.module) with EasyGenT5; pretrain trains only the projector,
    with the feature-matching term in the loss; its loss equals LM loss + weight * MSE; generation gives
    text; the checkpoint is refused by the exporter (decoder-only LLMs only)."""
    from easygen.errors import ConfigError
    from easygen.lit.easygen_t5_module import EasyGenT5Module
    from easygen.llm.t5 import EasyGenT5
    from easygen.stages.export import export_checkpoint

    cfg = make_cfg(
        data_dir,
        tmp_path,
        ["model=tiny_t5", "stage.feature_source=captions", "model.llm.mid_align_weight=0.5"],
    )
    module, before, _ = fit(cfg, steps=2, ckpt_dir=tmp_path / "ckpt")
    assert type(module) is EasyGenT5Module and isinstance(module.model, EasyGenT5)
    assert module.llm is module.model.t5
    # the preset's tokenizer is a real T5 one (tests/test_t5_tokenizer.py), the embedding sized to it
    from transformers import T5TokenizerFast

    tok = module.tokenizer
    assert isinstance(tok, T5TokenizerFast) and tok.bos_token is None
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1) and len(tok) <= int(cfg.model.llm.vocab_size)
    t5 = module.model.t5
    assert t5.get_input_embeddings().num_embeddings == len(tok) == t5.lm_head.out_features
    assert changed(module, before) == {k for k in before if is_projector_weight(k)}
    module.eval()
    samples = [
        {"id": f"s{i}", "kind": "caption", "captions": [c]}
        for i, c in enumerate(["a small red circle on the left", "a large blue square at the top"])
    ]
    batch = module.collate(samples)
    assert batch["caption_input_ids"] is not None
    feats = module.image_features(batch)
    with torch.no_grad():
        out = module.model(
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            features=feats,
            caption_input_ids=batch["caption_input_ids"],
            caption_attention_mask=batch["caption_attention_mask"],
        )
        ref = module.model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], features=None)
    assert out.align_loss is not None and float(out.align_loss) > 0
    assert math.isclose(float(out.loss), float(out.lm_loss) + 0.5 * float(out.align_loss), rel_tol=1e-6)
    # without the image the logits differ: the projected tokens really reach the decoder
    assert not torch.allclose(out.logits, ref.logits)
    # eval generation
    size = int(cfg.model.image_size)
    res = module.predict_captions(
        module.eval_collate([dict(s, image=torch.rand(3, size, size)) for s in samples]), max_new_tokens=4
    )
    assert len(res["predictions"]) == 2 and all(isinstance(t, str) for t in res["predictions"])
    # the generated ids are the model's own greedy decoding, decoded by the T5 tokenizer
    batch = module.eval_collate([dict(s, image=torch.rand(3, size, size)) for s in samples])
    feats = module.image_features(batch)
    ids = module.model.generate(
        batch["input_ids"], batch["attention_mask"], features=feats, max_new_tokens=4, num_beams=1, do_sample=False
    )
    assert module.generate_texts(batch, feats, 4, 1) == tok.batch_decode(ids, skip_special_tokens=True)
    # every sample needs a picture (Mid-Align has nowhere else to put the image)
    with pytest.raises(ValueError, match="needs an image in every sample"):
        module.generate_texts(batch, None, 4, 1)
    with pytest.raises(ConfigError, match="FlanT5 variant is not supported"):
        export_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"), str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    ("model", "cls"),
    [
        ("tiny", "easygen.lit.easygen_module.EasyGenModule"),
        ("tiny_t5", "easygen.lit.easygen_t5_module.EasyGenT5Module"),
    ],
)
def test_model_config_names_the_llm_module(data_dir, tmp_path, model, cls):
    """`model.module` chooses the LightningModule for pretrain, instruct and eval alike."""
    from easygen.stages.build import lightning_module
    from easygen.stages.evaluate import _module

    for stage in ("stage=pretrain", "stage=instruct", "stage=eval"):
        cfg = make_cfg(data_dir, tmp_path, [stage, f"model={model}"])
        module = _module(cfg) if stage == "stage=eval" else lightning_module(cfg)
        assert f"{type(module).__module__}.{type(module).__qualname__}" == cls, stage


def test_t5_instruct_trains_decoder_not_encoder(data_dir, tmp_path):
    cfg = make_cfg(
        # the dialogues' draw requests have no picture, which Mid-Align cannot take: the captions alone
        data_dir, tmp_path, ["stage=instruct", "model=tiny_t5", "stage.feature_source=captions",
                             "stage.extra_train=null"]
    )
    module, before, _ = fit(cfg, steps=2)  # the warmup starts at lr 0 (transformers), so one step would not move
    diff = changed(module, before)
    assert any(k.startswith("model.t5.decoder.") for k in diff) and any(
        k.startswith("model.projector.") for k in diff
    )
    assert not any(k.startswith(("model.t5.encoder.", "model.t5.shared.")) for k in diff), [
        k for k in diff if "encoder" in k or "shared" in k
    ]


def test_t5_with_lora_is_a_config_error(data_dir, tmp_path):
    from easygen.errors import ConfigError
    from easygen.stages.build import lightning_module

    cfg = make_cfg(data_dir, tmp_path, ["stage=instruct", "lora=on", "model=tiny_t5"])
    with pytest.raises(ConfigError, match="lora=off"):
        lightning_module(cfg)
