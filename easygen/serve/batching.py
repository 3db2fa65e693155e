"""Continuous batching for the server's decoder-only LLM: many answers decoded together, each request
joining the running batch at a token boundary and leaving it when its answer ends.

The batch is a set of rows, one per answer, over one left-padded KV cache (a list of per-layer key and
value tensors, [rows, heads, columns, head_dim]) and its attention mask [rows, columns]. `join` runs the
new requests' prompts (left-padded by the eval collator, easygen/llm/collate.py, with BiDiffuser's
features spliced in by EasyGen.embed, easygen/llm/model.py) in one forward pass, picks their first tokens
and merges their cache into the batch's, padding the shorter of the two on the left. `step` feeds every
row its last token and picks the next. A row's position ids count its real tokens only, as
EasyGen.generate's left-padded prompts have them (easygen.llm.model.position_ids_from_mask), so a row's
logits are those it has alone up to floating-point summation order; padded columns are masked out.
`drop` removes finished or cancelled rows and the columns no row uses any more.

Greedy picks are the argmax, as transformers' greedy search; sampling divides by the temperature, keeps
the smallest set of tokens whose probability reaches top_p (transformers' TopPLogitsWarper) and draws
from the row's own generator, so a seeded answer does not depend on the other rows.

Plain PyTorch: nothing here knows about jobs, HTTP or threads (easygen/serve/engine.py drives it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from easygen.llm.model import position_ids_from_mask


@dataclass
class Row:
    """One answer in the batch: its sampling settings and the tokens picked so far."""

    owner: object  # whatever the caller attaches (the engine's job)
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    generator: torch.Generator | None = None  # sampling only; None: torch's global generator
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end-of-sequence token) or "length" once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scores` [vocab] with -inf outside the nucleus, as transformers' TopPLogitsWarper: the low tail whose
    probability mass stays within 1 - top_p goes, the most likely token always stays."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(descending=False)
    remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    remove[-1] = False
    return scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))


def pick_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """The next token of each row from its logits [rows, vocab]: argmax when greedy, else a draw from the
    temperature-scaled, top-p-filtered distribution with the row's generator."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.temperature <= 0:
            continue
        probs = top_p_filter(logits[i] / row.temperature, row.top_p).softmax(-1)
        out[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
    return out


class BatchDecoder:
    """Rows decoding together over one KV cache (see the module's docstring). `model` is an EasyGen
    (easygen/llm/model.py) with a decoder-only LLM; `eos_token_id` ends a row."""

    def __init__(self, model, eos_token_id: int | None):
        self.model, self.llm = model, model.llm
        self.eos = eos_token_id
        self.rows: list[Row] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns] 1 = a real token
        self.last: torch.Tensor | None = None  # [rows] the token each row feeds next

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        picked = pick_tokens(logits, rows)
        for row, token in zip(rows, picked):
            if self.eos is not None and token == self.eos:
                row.finish_reason = "stop"
                continue
            row.tokens.append(token)
            if len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"
        return picked

    @torch.no_grad()
    def join(self, rows: list[Row], batch: dict) -> list[int]:
        """Prefill `rows` (the eval collator's left-padded batch of their prompts, with `features` for the
        rows that have a picture), pick each row's first token, and add the rows to the batch. Returns the
        tokens picked (an end-of-sequence token finishes its row with no text)."""
        if not rows:
            return []
        dev = self.device
        mask = batch["attention_mask"].to(dev)
        feats = batch["features"].to(dev) if batch.get("features") is not None else None
        embeds = self.model.embed(batch["input_ids"].to(dev), feats, batch["image_positions"].to(dev),
                                  batch["has_image"].to(dev))
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=True)
        picked = self._advance(rows, out.logits[:, -1])
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        last = torch.tensor(picked, device=dev)
        if self.kv is None:
            self.kv, self.mask, self.last = kv, mask, last
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            self.kv = [
                (torch.cat([_pad_left(k0, width), _pad_left(k1, width)]),
                 torch.cat([_pad_left(v0, width), _pad_left(v1, width)]))
                for (k0, v0), (k1, v1) in zip(self.kv, kv)
            ]
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
            self.last = torch.cat([self.last, last])
        self.rows.extend(rows)
        return picked

    @torch.no_grad()
    def step(self) -> list[int]:
        """One token for every row (finished rows must have been dropped first)."""
        if not self.rows:
            return []
        dev = self.device
        positions = self.mask.sum(1, keepdim=True)  # each row's next position: its real tokens so far
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        cache = DynamicCache(ddp_cache_data=self.kv)
        out = self.llm(input_ids=self.last[:, None].to(dev), attention_mask=self.mask, position_ids=positions,
                       past_key_values=cache, use_cache=True)
        self.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        picked = self._advance(self.rows, out.logits[:, -1])
        self.last = torch.tensor(picked, device=dev)
        return picked

    def drop(self, rows: list[Row]) -> None:
        """Remove `rows` from the batch, and the leading columns that are padding in every row left."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = mask[:, start:]
        self.kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                   for k, v in self.kv]
        self.last = self.last.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    def reset(self) -> None:
        self.rows, self.kv, self.mask, self.last = [], None, None, None


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence dimension (the last of a mask [rows, columns], the third of a
    key or value [rows, heads, columns, head_dim]) up to `width` columns."""
    dim = 1 if x.dim() == 2 else 2
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
