"""The released EasyGen's LLM side in its published format, and its import into an export folder.

The paper publishes two folders for the LLM side:

- the alignment output (``pretrain_only_MLP``): transformers' ``save_pretrained`` of the paper's
  ``DiffLlamaForCausalLM``, a ``LlamaForCausalLM`` whose inner model holds the projector. ``config.json``
  is a Llama config with ``"model_type": "diffllama"``; the weights (``pytorch_model*.bin`` or
  ``*.safetensors``, one file or shards with an index) hold every Llama tensor under its usual name plus
  ``model.fastchat_proj.fc1/fc2.{weight,bias}`` (768 -> 3072 -> 4096, exact GELU between: the paper's
  projector); Llama's sentencepiece tokenizer beside them.
- the instruction-tuning adapter (``instruction_tunning_lora``): peft's ``save_pretrained`` of a LoRA on
  that model (``adapter_config.json``; ``adapter_model.bin`` or ``.safetensors`` with keys
  ``base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight``).

transformers has a model type ``diffllama`` of its own (differential attention, another architecture):
``AutoModelForCausalLM`` builds that from the paper's folder, initialises its ``lambda_*`` tensors at
random and drops the projector, and only a load report says so. ``refuse_release_folder`` stops that
load with one line (easygen/llm/loading.py); ``convert_release`` turns the two folders into a plain Llama
with the adapter merged plus the projector's tensors, which ``python -m easygen.stages.import_release``
writes as an export folder (``easygen.export``) whose config names the paper's prompt (template
``easygen``, easygen/llm/templates.py).

The import streams: tensors are read one at a time (a plain read per safetensors tensor, ``torch.load(mmap=True)``
for ``.bin`` files),
the adapter is merged into each targeted weight as it passes (W + B A * alpha / r, as peft's
``merge_and_unload``, rounded once to the stored dtype), and written into safetensors shards whose headers are planned from the input's
shapes first. The model is never held whole, let alone twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from easygen.errors import ConfigError

IMPORT_COMMAND = "python -m easygen.stages.import_release --llm {llm} [--lora ADAPTER_DIR] --out OUT"
PROJECTOR_PREFIX = "model.fastchat_proj."
PROJECTOR_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
RELEASE_MODEL_TYPE = "diffllama"
RELEASE_ARCHITECTURE = "DiffLlamaForCausalLM"
# transformers' own DiffLlama has these per layer; the paper's folder has none
DIFFLLAMA_OWN = re.compile(r"\.self_attn\.lambda_(q1|k1|q2|k2)$")
# rotary frequencies: a non-persistent buffer derived from the config, saved by older transformers
ROTARY_BUFFER = re.compile(r"\.rotary_emb\.inv_freq$")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

SAFE_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_OF = {v: k for k, v in SAFE_DTYPES.items()}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ----------------------------------------------------------------------------------------------------
# reading a transformers weights folder without loading it


class WeightsFile:
    """One weights file: its tensor names, shapes and dtypes from the header (safetensors) or from an
    mmap'd load (``.bin``), and its tensors one at a time. Damaged or cut-short files raise a
    ConfigError naming the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"weights file missing: {self.path}")
        self.is_safetensors = self.path.suffix == ".safetensors"
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        if self.is_safetensors:
            self._read_safetensors_header()
        else:
            for name, t in self._bin().items():
                self.meta[name] = (t.dtype, tuple(t.shape))

    def _read_safetensors_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConfigError(f"truncated weights file {self.path}: {size} bytes, no safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise ConfigError(f"truncated weights file {self.path}: header of {n} bytes, file of {size}")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ConfigError(f"damaged weights file {self.path}: its safetensors header is not JSON") from None
        end = 0
        self.data_start, self.offsets = 8 + n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPE_OF:
                raise ConfigError(f"{self.path}: tensor {name} has dtype {info['dtype']}, not supported")
            self.meta[name] = (DTYPE_OF[info["dtype"]], tuple(info["shape"]))
            self.offsets[name] = (int(info["data_offsets"][0]), int(info["data_offsets"][1]))
            end = max(end, int(info["data_offsets"][1]))
        if 8 + n + end > size:
            raise ConfigError(
                f"truncated weights file {self.path}: its header needs {8 + n + end} bytes, the file has {size}"
            )

    def _bin(self) -> dict:
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - zip/pickle errors of a damaged file, reported with its name
            raise ConfigError(f"truncated or damaged weights file {self.path}: {str(e).splitlines()[0][:200]}") from None
        if not isinstance(sd, dict):
            raise ConfigError(f"{self.path} holds a {type(sd).__name__}, not a state dict")
        return sd

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors in the given order, one at a time."""
        if self.is_safetensors:
            # plain reads into a buffer per tensor (no mmap: pages of a mapped file count as resident
            # memory until it is closed, a whole shard's worth)
            with open(self.path, "rb") as f:
                for name in names:
                    begin, end = self.offsets[name]
                    dtype, shape = self.meta[name]
                    buf = bytearray(end - begin)
                    f.seek(self.data_start + begin)
                    if f.readinto(buf) != len(buf):
                        raise ConfigError(f"truncated weights file {self.path}: tensor {name} is cut short")
                    flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
                    yield name, flat.view(dtype).reshape(shape)
        else:
            sd = self._bin()
            for name in names:
                yield name, sd[name]
            del sd


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weights files of a transformers folder, in order: a sharded index's files, or the single
    file (safetensors first, as transformers picks)."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise ConfigError(f"{index}: not a weights index (no weight_map)") from None
            files = list(dict.fromkeys(weight_map.values()))
            for name in files:
                if not (folder / name).is_file():
                    raise ConfigError(f"shard missing: {folder / name} (listed in {index.name})")
            return [folder / name for name in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise ConfigError(
        f"{folder}: no weights (model.safetensors, pytorch_model.bin or a sharded index of either)"
    )


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (not a transformers model folder)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path}: not JSON") from None


def tensor_names(folder: str | os.PathLike) -> list[str]:
    names: list[str] = []
    for f in weight_files(folder):
        names += list(WeightsFile(f).meta)
    return names


def is_release_config(config: dict) -> bool:
    return config.get("model_type") == RELEASE_MODEL_TYPE or RELEASE_ARCHITECTURE in (
        config.get("architectures") or []
    )


def refuse_release_folder(folder: str | os.PathLike, key: str) -> None:
    """A ConfigError when ``folder`` is the paper's LLM folder (``model_type: diffllama`` with the
    projector's tensors and none of transformers' DiffLlama's own): loading it as it is would build
    another architecture. The line names the import command."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    if not is_release_config(config):
        return
    try:
        names = tensor_names(folder)
    except ConfigError:
        names = []
    if names and any(DIFFLLAMA_OWN.search(n) for n in names) and not any(
        n.startswith(PROJECTOR_PREFIX) for n in names
    ):
        return  # transformers' own DiffLlama: its loader reports anything amiss
    raise ConfigError(
        f"{key}={folder} is the released EasyGen's LLM folder (model_type {RELEASE_MODEL_TYPE!r}, the paper's "
        f"DiffLlamaForCausalLM with the projector inside): transformers would build another model from it; "
        f"import it first: {IMPORT_COMMAND.format(llm=folder)}"
    )


# ----------------------------------------------------------------------------------------------------
# the adapter


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, dict[str, torch.Tensor]], float]:
    """``(adapter_config, {base weight name: {"A": tensor, "B": tensor}}, scaling)`` of a peft LoRA folder."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder}: no adapter_config.json (not a peft adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are imported")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise ConfigError(f"{cfg_path}: {flag}=true is not supported (the paper's adapter is plain LoRA)")
    if str(cfg.get("bias", "none")) != "none":
        raise ConfigError(f"{cfg_path}: bias={cfg.get('bias')!r}; only bias='none' adapters are imported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    files = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()]
    if not files:
        raise ConfigError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    wf = WeightsFile(files[0])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in wf.tensors(list(wf.meta)):
        m = LORA_KEY.match(name)
        if m is None:
            raise ConfigError(
                f"{files[0]}: tensor {name} is not a LoRA A/B weight (modules_to_save and other extras are "
                "not imported)"
            )
        pairs.setdefault(m["base"] + ".weight", {})[m["ab"]] = t.clone()
    for base, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{files[0]}: {base} has lora_{'A' if 'A' in ab else 'B'} only")
    return cfg, pairs, scaling


def merged_weight(name: str, weight: torch.Tensor, lora: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """peft's merge of one Linear weight (``merge_and_unload``): W + B @ A * scaling, the delta and the sum
    in float32, rounded once to the weight's dtype."""
    delta = (lora["B"].float() @ lora["A"].float()) * scaling
    return (weight.float() + delta).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------
# writing safetensors incrementally


class SafetensorsWriter:
    """One safetensors file written tensor by tensor: the header is laid out from ``(name, dtype, shape)``
    up front, then each tensor's bytes follow in that order (readable by ``safetensors.safe_open``)."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self.expected = []
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFE_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.position = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self.position]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise RuntimeError(f"safetensors writer: got {name} {tensor.dtype} {tuple(tensor.shape)}, planned {want}")
        t = tensor.detach().contiguous().cpu()
        if t.numel():  # the tensor's own bytes, no copy
            self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.expected):
            raise RuntimeError(f"safetensors writer: {len(self.expected) - self.position} tensors not written")
        self.file.close()


def _tensor_bytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------
# the import


def check_release(llm_dir: Path) -> tuple[dict, list[WeightsFile]]:
    """The paper's LLM folder, checked: its config and weights files (each header read, shards present)."""
    if not llm_dir.is_dir():
        raise ConfigError(f"--llm {llm_dir}: folder not found")
    config = read_config(llm_dir)
    files = [WeightsFile(f) for f in weight_files(llm_dir)]
    names = [n for f in files for n in f.meta]
    proj = [n for n in names if n.startswith(PROJECTOR_PREFIX)]
    if not is_release_config(config):
        raise ConfigError(
            f"--llm {llm_dir}: model_type {config.get('model_type')!r} with {len(proj)} fastchat_proj tensors; the "
            f"released EasyGen's LLM folder says model_type {RELEASE_MODEL_TYPE!r} (a plain Llama needs no import: "
            "set model.llm.path to it)"
        )
    if not proj:
        raise ConfigError(
            f"--llm {llm_dir}: no {PROJECTOR_PREFIX}* tensors: not the paper's alignment output (its projector "
            "lives there)"
        )
    missing = [k for k in PROJECTOR_KEYS if PROJECTOR_PREFIX + k not in proj]
    extra = sorted(set(proj) - {PROJECTOR_PREFIX + k for k in PROJECTOR_KEYS})
    if missing or extra:
        raise ConfigError(f"--llm {llm_dir}: projector tensors missing {missing} or unexpected {extra[:3]}")
    own = [n for n in names if DIFFLLAMA_OWN.search(n)]
    if own:
        raise ConfigError(f"--llm {llm_dir}: holds transformers' DiffLlama tensors (e.g. {own[0]}), not a Llama")
    return config, files


def llama_config(config: dict, source: Path) -> dict:
    """The paper's config as a plain Llama's (model type and architecture renamed; the rest as saved)."""
    from transformers import LlamaConfig

    plain = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    cfg = LlamaConfig(**plain)
    cfg.architectures = ["LlamaForCausalLM"]
    if cfg.hidden_size is None or cfg.num_hidden_layers is None:
        raise ConfigError(f"{source}/config.json: no hidden_size / num_hidden_layers")
    return cfg.to_dict()


def plan_shards(layout: list[tuple[str, torch.dtype, tuple]], max_shard_bytes: int) -> list[list[tuple]]:
    shards: list[list[tuple]] = [[]]
    size = 0
    for item in layout:
        nbytes = _tensor_bytes(item[1], item[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def write_llm(
    files: list[WeightsFile],
    out: Path,
    lora: dict[str, dict[str, torch.Tensor]],
    scaling: float,
    max_shard_bytes: int,
) -> dict[str, torch.Tensor]:
    """The Llama tensors of ``files`` (the adapter merged in) into safetensors shards under ``out``;
    returns the projector's tensors."""
    layout, source = [], {}
    for f in files:
        for name, (dtype, shape) in f.meta.items():
            if name.startswith(PROJECTOR_PREFIX) or ROTARY_BUFFER.search(name):
                continue
            layout.append((name, dtype, shape))
            source[name] = f
    for base, ab in lora.items():
        if base not in source:
            raise ConfigError(
                f"the adapter was made for another base model: it adapts {base}, which this LLM does not have"
            )
        dtype, shape = source[base].meta[base]
        a, b = tuple(ab["A"].shape), tuple(ab["B"].shape)
        if len(shape) != 2 or a[1] != shape[1] or b[0] != shape[0] or a[0] != b[1]:
            raise ConfigError(
                f"the adapter was made for another base model: {base} is {list(shape)} here, its lora_A "
                f"{list(a)} and lora_B {list(b)} fit a [{b[0]}, {a[1]}] weight"
            )
    shards = plan_shards(layout, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    projector: dict[str, torch.Tensor] = {}
    queue = {id(f): [] for f in files}
    for f in files:  # the projector comes out on the way; read it with its file
        queue[id(f)] = [n for n in f.meta if n.startswith(PROJECTOR_PREFIX)]
    weight_map = {}
    # the shards follow the input order, so each input file is read once, front to back
    with ExitStack() as stack:
        writers = []
        for shard, fname in zip(shards, names):
            writers.append(stack.enter_context(_closing(SafetensorsWriter(out / fname, shard))))
            for name, _, _ in shard:
                weight_map[name] = fname
        shard_of = {name: w for w, shard in zip(writers, shards) for name, _, _ in shard}
        for f in files:
            wanted = [n for n in f.meta if n in source] + queue[id(f)]
            for name, tensor in f.tensors(wanted):
                if name.startswith(PROJECTOR_PREFIX):
                    projector[name[len(PROJECTOR_PREFIX):]] = tensor.float().clone()
                    continue
                if name in lora:
                    tensor = merged_weight(name, tensor, lora[name], scaling)
                shard_of[name].write(name, tensor)
    if len(shards) > 1:
        total = sum(_tensor_bytes(d, s) for _, d, s in layout)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return projector


class _closing:
    def __init__(self, writer: SafetensorsWriter):
        self.writer = writer

    def __enter__(self) -> SafetensorsWriter:
        return self.writer

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.writer.close()
        else:
            self.writer.file.close()


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(llm_dir: Path, out: Path) -> None:
    if not (llm_dir / "tokenizer.model").is_file():
        raise ConfigError(f"--llm {llm_dir}: no tokenizer.model (Llama's sentencepiece tokenizer)")
    for name in TOKENIZER_FILES:
        if (llm_dir / name).is_file():
            shutil.copy2(llm_dir / name, out / name)


def dominant_dtype(files: list[WeightsFile]) -> torch.dtype:
    sizes: dict[torch.dtype, int] = {}
    for f in files:
        for dtype, shape in f.meta.values():
            sizes[dtype] = sizes.get(dtype, 0) + _tensor_bytes(dtype, shape)
    return max(sizes, key=sizes.get)


def convert_release(
    llm_dir: str | os.PathLike,
    out_llm: str | os.PathLike,
    lora_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """The paper's LLM folder (and adapter) -> ``out_llm``: a plain transformers Llama (adapter merged,
    safetensors shards of at most ``max_shard_bytes``) with the paper's tokenizer files. Returns the
    projector's tensors (``easygen.llm.projector.Projector`` keys, float32), the Llama config written and
    the adapter's config. Every input is checked before anything is written."""
    llm_dir, out_llm = Path(llm_dir), Path(out_llm)
    config, files = check_release(llm_dir)
    lora, scaling, adapter_cfg = {}, 1.0, None
    if lora_dir is not None:
        if not Path(lora_dir).is_dir():
            raise ConfigError(f"--lora {lora_dir}: folder not found")
        adapter_cfg, lora, scaling = read_adapter(lora_dir)
    if not (llm_dir / "tokenizer.model").is_file():
        raise ConfigError(f"--llm {llm_dir}: no tokenizer.model (Llama's sentencepiece tokenizer)")
    plain = llama_config(config, llm_dir)
    out_llm.mkdir(parents=True, exist_ok=True)
    projector = write_llm(files, out_llm, lora, scaling, max_shard_bytes)
    fc1, fc2 = projector["fc1.weight"], projector["fc2.weight"]
    if fc2.shape[0] != plain["hidden_size"] or fc1.shape[0] != fc2.shape[1]:
        raise ConfigError(
            f"--llm {llm_dir}: projector fc1 {list(fc1.shape)} / fc2 {list(fc2.shape)} do not lead to the "
            f"LLM's width {plain['hidden_size']}"
        )
    plain["dtype"] = DTYPE_NAMES.get(dominant_dtype(files), "float32")
    (out_llm / "config.json").write_text(json.dumps(plain, indent=2, sort_keys=True))
    copy_tokenizer(llm_dir, out_llm)
    return projector, plain, adapter_cfg
