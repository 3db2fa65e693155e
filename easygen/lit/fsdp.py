"""FSDP2 sharding (`strategy=fsdp`): `fully_shard` per transformer block — LLM decoder layers, T5 encoder
and decoder blocks, U-ViT blocks — then the remaining modules, called from each LightningModule's
`configure_model` (its `shard` method) with the device mesh Lightning's ModelParallelStrategy provides.
Frozen modules are sharded without gradients. Modules that are called on their own (the token
embedding, the projector) get their own FSDP unit so their parameters are gathered whenever they run,
in training and in generation alike."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def _policy(strategy_cfg: dict, device_type: str):
    if device_type != "cuda":
        return MixedPrecisionPolicy()  # CPU (gloo): fp32 throughout
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return MixedPrecisionPolicy(
        param_dtype=dt[str(strategy_cfg.get("param_dtype", "bfloat16"))],
        reduce_dtype=dt[str(strategy_cfg.get("reduce_dtype", "float32"))],
    )


def _checkpoint(block: nn.Module) -> None:
    """Activation checkpointing in place (the composable API): parameter names stay as they are, so
    checkpoints, `init_from` and exports read the same keys with and without it."""
    checkpoint(block)


def _mesh(device_mesh):
    return (
        device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    )


def shard_blocks(
    blocks: nn.ModuleList, root: nn.Module, device_mesh, strategy_cfg: dict, extra_units=()
) -> None:
    mesh = _mesh(device_mesh)
    kw = dict(
        mesh=mesh,
        mp_policy=_policy(strategy_cfg, mesh.device_type),
        reshard_after_forward=bool(strategy_cfg.get("reshard_after_forward", True)),
    )
    if strategy_cfg.get("activation_checkpointing"):
        for block in blocks:
            _checkpoint(block)
    for block in blocks:
        fully_shard(block, **kw)
    for unit in extra_units:
        fully_shard(unit, **kw)
    fully_shard(root, **kw)


def shard_easygen(module, device_mesh, strategy_cfg: dict) -> None:
    """An `EasyGenModule`'s decoder-only LLM: one unit per decoder layer."""
    llm = module.model.llm
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    # the causal-LM wrapper is a unit of its own: generation calls it directly (not through EasyGen),
    # and it holds the final norm and lm_head
    shard_blocks(
        base.model.layers,
        module.model,
        device_mesh,
        strategy_cfg,
        extra_units=(base.get_input_embeddings(), module.model.projector, base),
    )


def shard_easygen_t5(module, device_mesh, strategy_cfg: dict) -> None:
    """An `EasyGenT5Module`'s FlanT5 (Mid-Align): one unit per encoder and decoder block."""
    t5 = module.model.t5
    blocks = nn.ModuleList([*t5.encoder.block, *t5.decoder.block])  # a view: the blocks stay where they are
    # transformers ties the encoder's and decoder's embed_tokens (and lm_head, when tied) to `shared` by
    # sharing the weight between distinct modules: FSDP2 needs every holder of a parameter in one unit
    tied = [m for m in t5.modules() if getattr(m, "weight", None) is t5.shared.weight]
    shard_blocks(
        blocks,
        module.model,
        device_mesh,
        strategy_cfg,
        # the encoder and decoder stacks are units too: EasyGenT5.encode calls the encoder on its own
        # (not through the T5), and their final layer norms must be gathered there
        extra_units=(tied, module.model.projector, t5.encoder, t5.decoder, t5),
    )


def shard_uvit(uvit: nn.Module, device_mesh, strategy_cfg: dict) -> None:
    # the U-ViT checkpoints its own blocks (UViTConfig.use_checkpoint)
    shard_blocks(uvit.blocks, uvit, device_mesh, dict(strategy_cfg, activation_checkpointing=False))
