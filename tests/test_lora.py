"""LoRA through peft: adapters on every Linear but lm_head, merge equivalence, adapter-only checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from easygen.llm.loading import build_tiny_llm
from easygen.llm.lora import apply_lora, lora_state_dict, merge_lora, save_merged
from easygen.llm.model import EasyGen
from easygen.llm.projector import Projector
from easygen.llm.tokenization import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("llama", ["a dog on the sofa"], vocab_size=300)


def _lora_model(tok, seed=0):
    llm = build_tiny_llm(tok, hidden_size=32, layers=2, heads=4, seed=seed)
    model = EasyGen(llm, Projector(16, 64, 32), tokenizer=tok)
    n_linear = sum(1 for m in llm.modules() if isinstance(m, nn.Linear))
    model.llm = apply_lora(model.llm, r=4, alpha=8, dropout=0.0)
    # peft initialises B to zero (the adapter starts as a no-op); give it weights so merging is tested.
    g = torch.Generator().manual_seed(seed)
    for name, p in model.llm.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return model.eval(), n_linear


def test_only_adapters_trainable_and_lm_head_excluded(tok):
    model, n_linear = _lora_model(tok)
    trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.rsplit(".lora_A", 1)[0] for n in trainable if ".lora_A" in n}
    assert len(adapted) == n_linear - 1  # every Linear but lm_head
    assert not any("lm_head" in n for n in adapted)
    assert all(p.requires_grad for p in model.projector.parameters())
    names = [g["name"] for g in model.trainable_parameter_groups(lr=2e-5)]
    assert names == ["projector", "llm"]


def test_merge_gives_same_logits_and_state_dict_is_small(tok, tmp_path):
    model, _ = _lora_model(tok)
    ids = torch.randint(3, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = model.llm.get_base_model()
        with model.llm.disable_adapter():
            plain = model(ids, mask).logits
        adapted = model(ids, mask).logits
    assert not torch.allclose(plain, adapted)  # the adapters do something

    sd = lora_state_dict(model)
    total = sum(p.numel() for p in base.parameters())
    assert sd and all("lora_" in k for k in sd)
    assert sum(v.numel() for v in sd.values()) < 0.15 * total

    out = save_merged(model, tok, tmp_path / "merged")
    assert any(
        "lora_A" in n for n, _ in model.llm.named_parameters()
    )  # the training model keeps its adapters

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, attention_mask=mask).logits, adapted, rtol=1e-4, atol=1e-5
        )

    merged = merge_lora(model)
    assert model.llm is merged and type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits, adapted, rtol=1e-4, atol=1e-5)


def test_explicit_target_list(tok):
    llm = build_tiny_llm(tok, hidden_size=32, layers=2, heads=4)
    peft_llm = apply_lora(llm, r=2, target_modules=["q_proj", "v_proj"])
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_llm.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in adapted)
