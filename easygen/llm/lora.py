"""LoRA for the EasyGen LLM through peft (the paper's training recipe).

The paper's LoRA stage: rank 8, alpha 16, dropout 0.05 on every Linear of the LLM except ``lm_head``;
the projector is outside the LLM and stays fully trainable. ``merge_lora`` folds the adapters into
the weights (W + alpha/r * B A) and returns a plain transformers model; ``save_merged`` writes a
standalone folder that ``AutoModelForCausalLM.from_pretrained`` loads without peft.
"""

from __future__ import annotations

import copy
from pathlib import Path

from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn


def _llm_of(model):
    """The LLM inside an ``EasyGen`` (anything with ``.llm`` and ``.projector``) or the model itself."""
    return model.llm if hasattr(model, "llm") and hasattr(model, "projector") else model


def apply_lora(
    llm, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules="all-linear", exclude=("lm_head",)
):
    """Wrap ``llm`` with LoRA adapters; only the adapters are trainable afterwards.

    ``target_modules`` is ``"all-linear"`` (every ``nn.Linear``) or a list of module-name suffixes;
    ``exclude`` lists module-name suffixes never adapted (``lm_head`` by default).
    """
    if isinstance(target_modules, str) and target_modules == "all-linear":
        excluded = tuple(exclude or ())
        # Resolve "all-linear" ourselves so that `exclude` is honoured exactly, for any architecture.
        targets = sorted(
            {
                name
                for name, module in llm.named_modules()
                if isinstance(module, nn.Linear)
                and not any(name == e or name.endswith("." + e) for e in excluded)
            }
        )
        if not targets:
            raise ValueError("apply_lora: the model has no nn.Linear modules to adapt")
    else:
        targets = list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, config)


def merge_lora(model):
    """Fold the adapters into the base weights; return the plain transformers model.

    Given an ``EasyGen``, its ``llm`` is replaced by the merged model as well.
    """
    llm = _llm_of(model)
    if not hasattr(llm, "merge_and_unload"):
        raise TypeError(
            f"merge_lora expects a peft model (or an EasyGen holding one), got {type(llm).__name__}"
        )
    merged = llm.merge_and_unload()
    if llm is not model:
        model.llm = merged
    return merged


def lora_state_dict(model) -> dict:
    """Adapter weights only (what a LoRA checkpoint needs besides the base model and projector)."""
    llm = _llm_of(model)
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(llm).items()}


def save_merged(model, tokenizer, out_dir) -> Path:
    """Write a standalone, merged transformers folder (safetensors + config + tokenizer).

    The adapters are merged into a copy, so ``model`` keeps training with its adapters.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = merge_lora(copy.deepcopy(_llm_of(model)))
    merged.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
