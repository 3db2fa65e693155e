"""Where a library does the job now, it does it as the code it replaced did, on the same inputs:

- diffusers' ``convert_ldm_vae_checkpoint`` loads LDM autoencoder files (easygen/bidiffuser/autoencoder.py);
- webdataset's ``ShardWriter`` writes the converters' shards (data_modules/convert.py), byte for byte the
  tar files the converter wrote with ``tarfile``, and completes them atomically;
- Lightning's ``ThroughputMonitor`` under callbacks/throughput.py gives the sliding-window rates and MFU
  of the callback it replaced, and the dense bf16 peaks of H100/H200 names;
- torch's ``dcp_to_torch_save`` reads sharded checkpoints (easygen/stages/consolidate.py);
- transformers' ``TextStreamer`` streams the chat answer (easygen/chat.py).
"""

from __future__ import annotations

import io
import json
import tarfile
import types
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from tests.ldm_vae import diffusers_to_ldm_state_dict

# --------------------------------------------------------------------------------------------------
# 1. LDM autoencoder files through diffusers' converter


def _sd_like_vae() -> AutoencoderKL:
    """SD's KL-f8 topology (4 levels, two res blocks a level, 4 latent channels, 32 GroupNorm groups) at
    small widths, its weights moved off their init so that a mixed-up key shows."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


# LDM names (UniDiffuser's autoencoder_kl.pth layout) and the diffusers names they hold, written out
LDM_NAMES = {
    "encoder.down.2.block.0.nin_shortcut.weight": "encoder.down_blocks.2.resnets.0.conv_shortcut.weight",
    "encoder.down.0.downsample.conv.bias": "encoder.down_blocks.0.downsamplers.0.conv.bias",
    "encoder.mid.block_2.norm1.weight": "encoder.mid_block.resnets.1.norm1.weight",
    "encoder.norm_out.bias": "encoder.conv_norm_out.bias",
    "decoder.up.3.block.2.conv2.weight": "decoder.up_blocks.0.resnets.2.conv2.weight",
    "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
    "decoder.up.1.block.0.nin_shortcut.bias": "decoder.up_blocks.2.resnets.0.conv_shortcut.bias",
    "decoder.mid.attn_1.norm.weight": "decoder.mid_block.attentions.0.group_norm.weight",
    "decoder.mid.attn_1.proj_out.bias": "decoder.mid_block.attentions.0.to_out.0.bias",
}


def test_ldm_autoencoder_file_loads_every_tensor_exactly(tmp_path):
    from easygen.bidiffuser.autoencoder import load_autoencoder

    vae = _sd_like_vae()
    ref = vae.state_dict()
    ldm = diffusers_to_ldm_state_dict(ref, num_levels=4)
    for ldm_key, key in LDM_NAMES.items():
        assert torch.equal(ldm[ldm_key], ref[key]), ldm_key
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # a training checkpoint also holds the VAE loss's discriminator: not part of the network
    torch.save({**ldm, "loss.discriminator.main.0.weight": torch.zeros(2)}, tmp_path / "autoencoder_kl.pth")
    loaded = load_autoencoder(tmp_path / "autoencoder_kl.pth")  # widths of 32s: SD's 32 groups assumed
    assert loaded.config.layers_per_block == 2 and tuple(loaded.config.block_out_channels) == (32, 32, 64, 64)
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


def test_ldm_autoencoder_file_errors_name_the_file_and_key(tmp_path):
    from easygen.bidiffuser.autoencoder import load_autoencoder

    ldm = diffusers_to_ldm_state_dict(_sd_like_vae().state_dict(), num_levels=4)
    # a key the converter passes over, and one it renames to a name AutoencoderKL does not have
    torch.save({**ldm, "model_ema.decay": torch.tensor(0.9999)}, tmp_path / "ema.pth")
    with pytest.raises(ValueError, match=r"ema\.pth: unexpected keys .*\['model_ema\.decay'\]"):
        load_autoencoder(tmp_path / "ema.pth")
    torch.save({**ldm, "decoder.up.0.block.5.conv1.bias": torch.zeros(32)}, tmp_path / "block5.pth")
    with pytest.raises(
        ValueError, match=r"block5\.pth: unexpected keys .*decoder\.up\.0\.block\.5\.conv1\.bias"
    ):
        load_autoencoder(tmp_path / "block5.pth")
    # the converter would take [:, :, 0, 0] of a 3x3 kernel: refused
    bad = dict(ldm, **{"encoder.mid.attn_1.k.weight": torch.zeros(64, 64, 3, 3)})
    torch.save(bad, tmp_path / "conv3.pth")
    with pytest.raises(ValueError, match=r"conv3\.pth: encoder\.mid\.attn_1\.k\.weight: expected a 1x1 conv"):
        load_autoencoder(tmp_path / "conv3.pth")


# --------------------------------------------------------------------------------------------------
# 2. the converters' shards through webdataset's ShardWriter


def _tarfile_shards(out: Path, samples: list[tuple[str, str, dict[str, bytes]]], shard_size: int) -> None:
    """The converter's former writer: per split, shard-%06d.tar of at most shard_size samples, members
    in extension order, mtime 0, mode 0o444, USTAR."""
    by_split: dict[str, list] = {}
    for split, key, members in samples:
        by_split.setdefault(split, []).append((key, members))
    for split, items in by_split.items():
        (out / split).mkdir(parents=True)
        for n in range(0, len(items), shard_size):
            with tarfile.open(
                out / split / f"shard-{n // shard_size:06d}.tar", "w", format=tarfile.USTAR_FORMAT
            ) as tar:
                for key, members in items[n : n + shard_size]:
                    for ext in sorted(members):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
                        tar.addfile(info, io.BytesIO(members[ext]))


def _captions_set(root: Path, n: int = 11) -> Path:
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        name = f"p{i}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", (16 + i, 12), (20 * i, 40, 0)).save(root / "img" / name)
        split = "val" if i % 3 == 0 else "train"
        lines.append({"image": name, "captions": [f"caption {i}", "é ü"], "split": split, "id": f"s{i}"})
    (root / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return root / "c.jsonl"


def test_shards_are_the_tarfile_writers_bytes(tmp_path):
    from data_modules import convert as conv

    source = _captions_set(tmp_path)
    manifest = conv.convert(
        "captions", input=source, images=tmp_path / "img", out=tmp_path / "out", shard_size=3, progress=False
    )
    conv._init_worker(None)
    prepared = [conv._prepare(r) for r in conv.records_captions(str(source), str(tmp_path / "img"))]
    _tarfile_shards(tmp_path / "ref", [(p.split, p.key, p.members) for p in prepared], shard_size=3)
    ref = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.tar"))
    got = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == sorted([*ref, Path("manifest.json")])
    for name in ref:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert manifest["splits"] == {
        "train": {"samples": 7, "shards": {"train/shard-000000.tar": 3, "train/shard-000001.tar": 3,
                                           "train/shard-000002.tar": 1}},
        "val": {"samples": 4, "shards": {"val/shard-000000.tar": 3, "val/shard-000001.tar": 1}},
    }  # fmt: skip


def test_a_crashed_conversion_leaves_only_complete_shards(tmp_path, monkeypatch):
    """The run dies while its second train shard is half written: the first is complete, the half one is
    not left as a .tar (nor as a .tmp), and no manifest claims anything."""
    from data_modules import convert as conv

    source = _captions_set(tmp_path, n=9)  # train: s1 s2 s4 s5 s7 s8
    real = conv._prepare

    def dies_at_s7(record):
        if record.key == "s7":
            raise KeyboardInterrupt
        return real(record)

    monkeypatch.setattr(conv, "_prepare", dies_at_s7)
    with pytest.raises(KeyboardInterrupt):
        conv.convert("captions", input=source, images=tmp_path / "img", out=tmp_path / "out", shard_size=3,
                     progress=False)  # fmt: skip
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["train/shard-000000.tar"]
    with tarfile.open(tmp_path / "out" / files[0]) as tar:
        assert sorted({Path(m.name).stem for m in tar.getmembers()}) == ["s1", "s2", "s4"]


def test_long_keys_are_written(tmp_path):
    """A key past USTAR's 100-character names (the former writer raised on it) goes in a pax header."""
    import webdataset as wds

    from data_modules.convert import convert

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    key = "k" * 150
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["x"], "id": key}))
    convert(
        "captions", input=tmp_path / "c.jsonl", images=tmp_path / "img", out=tmp_path / "out", progress=False
    )
    (sample,) = list(wds.WebDataset(str(tmp_path / "out" / "train" / "shard-000000.tar"), shardshuffle=False))
    assert sample["__key__"] == key and sample["png"] == (tmp_path / "img" / "a.png").read_bytes()


# --------------------------------------------------------------------------------------------------
# 3. throughput and MFU through Lightning's ThroughputMonitor

# step k: its seconds, samples and tokens (the clock advances only inside training_step)
STEPS = [(0.5, 4, 40), (0.25, 2, 30), (1.0, 4, 16), (0.125, 1, 9), (0.75, 3, 33), (0.5, 4, 12), (2.0, 4, 50)]
FLOPS_PER_SAMPLE = 3e9


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def _module(clock: _Clock):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            seconds, self.last_batch_size, self.last_num_tokens = STEPS[batch_idx]
            clock.now += seconds
            return self.layer(batch.float()[:, None]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            clock.now += 100.0  # generation

        def on_validation_epoch_end(self):
            clock.now += 50.0  # scoring (callbacks/caption_eval.py scores here)

        def flops_per_sample(self) -> float:
            return FLOPS_PER_SAMPLE

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            return DataLoader(torch.arange(len(STEPS)), batch_size=1)

        def val_dataloader(self):
            return DataLoader(torch.arange(2), batch_size=1)

    return Module()


def test_throughput_equals_the_sliding_window_of_the_former_callback(tmp_path, monkeypatch):
    """The former callback's definition: over the last `window` steps, samples (tokens) / seconds, and MFU
    = samples/s x FLOPs per sample / peak; validation (its batches and its epoch end) is not step time."""
    import lightning.pytorch as pl
    import lightning.pytorch.callbacks.throughput_monitor as lightning_monitor

    import callbacks.throughput as ours

    clock = _Clock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(ours, "time", fake_time)
    monkeypatch.setattr(lightning_monitor, "time", fake_time)
    window, peak = 3, 2e12
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, dict(perf.last_metrics), dict(trainer.callback_metrics)))

    perf = ours.ThroughputCallback(window=window, peak_flops=peak)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[perf, Record()], max_steps=len(STEPS), val_check_interval=4,
                         num_sanity_val_steps=0, limit_val_batches=2)  # fmt: skip
    trainer.fit(_module(clock))
    assert [s[0] for s in seen] == list(range(len(STEPS)))
    for k, metrics, logged in seen:
        if k + 1 < window:
            assert metrics == {}, (k, metrics)  # Lightning rates a full window only
            continue
        last = STEPS[k + 1 - window : k + 1]
        seconds = sum(s[0] for s in last)
        samples_per_sec = sum(s[1] for s in last) / seconds
        want = {
            "perf/samples_per_sec": samples_per_sec,
            "perf/tokens_per_sec": sum(s[2] for s in last) / seconds,
            "perf/mfu": samples_per_sec * FLOPS_PER_SAMPLE / peak,
        }
        assert metrics == pytest.approx(want, rel=1e-12), k
        assert {name: logged[name].item() for name in want} == pytest.approx(want, rel=1e-6), k
    assert list(perf.step_times) == [s[0] for s in STEPS[-window:]]


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_table_and_lightnings_table(name, peak, monkeypatch):
    """Dense bf16 peaks by device name. Where Lightning's table has the part right (H100 SXM and PCIe,
    A100) the two agree; plain H200 names it does not find, and its H100 NVL figure is the sparse one."""
    from lightning.fabric.utilities.throughput import get_available_flops

    from callbacks.throughput import peak_flops_for_name

    assert peak_flops_for_name(name) == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    with warnings.catch_warnings():  # Lightning warns where it has no figure
        warnings.simplefilter("ignore")
        lightning_peak = get_available_flops(torch.device("cuda", 0), torch.bfloat16)
    if name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"):
        assert lightning_peak == pytest.approx(peak, rel=1e-3)
    elif name == "NVIDIA H100 NVL":
        assert lightning_peak > 2 * peak
    elif "H200" in name:
        assert lightning_peak is None
    else:  # a GPU the table does not list: the callback takes Lightning's figure
        assert peak is None and lightning_peak


# --------------------------------------------------------------------------------------------------
# 4. sharded checkpoints through torch's dcp_to_torch_save


def test_sharded_checkpoint_reads_back_exactly(tmp_path):
    import torch.distributed.checkpoint as dcp

    from easygen.lit.strategies import META_FILENAME
    from easygen.stages.consolidate import load_full_checkpoint

    g = torch.Generator().manual_seed(0)
    weights = {
        "model.a.weight": torch.randn(6, 4, generator=g),
        "model.b.bias": torch.randn(6, generator=g).bfloat16(),
    }
    adam = {
        name: {"step": torch.tensor(3.0), "exp_avg": torch.randn(w.shape, generator=g)}
        for name, w in weights.items()
    }
    groups = [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["model.b.bias", "model.a.weight"]}]
    path = tmp_path / "last.ckpt"
    dcp.save(
        {"state_dict": weights, "optimizer_0": {"state": adam, "param_groups": groups}}, checkpoint_id=path
    )
    torch.save({"global_step": 7, "epoch": 1}, path / META_FILENAME)

    full = load_full_checkpoint(path)
    assert full["global_step"] == 7 and full["epoch"] == 1
    assert set(full["state_dict"]) == set(weights)
    for name, w in weights.items():
        assert full["state_dict"][name].dtype == w.dtype and torch.equal(full["state_dict"][name], w)
    (opt,) = full["optimizer_states"]
    # keyed by position in param_groups, as torch.optim writes it
    assert opt["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1]}]
    for i, name in enumerate(groups[0]["params"]):
        assert torch.equal(opt["state"][i]["exp_avg"], adam[name]["exp_avg"]) and opt["state"][i]["step"] == 3


# --------------------------------------------------------------------------------------------------
# 5. the chat stream through transformers' TextStreamer


def test_streamed_answer_is_the_decoded_answer():
    """What the former streamer sent: the decoded answer (special tokens skipped, leading space dropped),
    then a newline; here from a real `generate` with the prompt given as embeddings, as EasyGen does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from easygen.chat import _Streamer
    from easygen.llm.tokenization import build_tokenizer

    tok = build_tokenizer(
        "llama", ["a red circle, on the left!", "two cats: 3 dogs\nnew line"], vocab_size=300
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    llm = LlamaForCausalLM(cfg).eval()
    embeds = torch.randn(1, 5, 32)
    chunks: list[str] = []
    out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=24,
                       do_sample=False, eos_token_id=None, pad_token_id=0, streamer=_Streamer(tok, chunks.append))  # fmt: skip
    assert out.shape == (1, 24)
    answer = tok.decode(out[0], skip_special_tokens=True)
    assert answer.strip() and len(chunks) > 2
    assert "".join(chunks) == answer.lstrip() + "\n" and chunks[-1].endswith("\n")

    # token by token, as generate puts them, over text with punctuation, digits, a newline and a special token
    ids = tok("two cats: 3 dogs\nnew line, on the left!", add_special_tokens=False).input_ids + [
        tok.eos_token_id
    ]
    chunks = []
    streamer = _Streamer(tok, chunks.append)
    streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the prompt (embeddings: no ids)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True).lstrip() + "\n"
