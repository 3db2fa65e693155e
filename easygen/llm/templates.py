"""Conversation templates, prompt rendering and label masking for the LLM side of EasyGen (the paper's LLM side).

A template is data: how the system message, a user turn and an assistant answer are written around
their content. ``render`` turns LLaVA-style turns (``[{"from": "human"|"gpt", "value": ...}]``) into a
flat list of segments, each either text (with a flag saying whether the LLM learns it) or the image
span (``N`` placeholder positions that the model later fills with projected BiDiffuser features).

The paper's prompt (Vicuna v1.1 roles, empty system message)::

    USER: <Img>[77 soft tokens]</Img> describe the image concisely. ASSISTANT: a dog on a sofa</s>

``<Img>``/``</Img>`` are plain text, not new tokens. Labels are -100 on the system prefix, every user
turn (role names included), the image span and the ``ASSISTANT:`` prefix; the answer and its
end-of-sequence token are learned.

The reference code hard-codes the prefix length (88 tokens) and silently trains on garbage when the
tokenisation drifts. ``encode`` instead derives every span boundary from the real tokenisation: for
each boundary it tokenises the text up to that boundary and requires the result to be a prefix of the
full tokenisation (sentencepiece's "legacy" handling of text after special tokens, BPE merges across a
boundary, ... all show up as a mismatch) and raises an error naming the sample otherwise.

Text on either side of the image span is tokenised separately (as MiniGPT-4/EasyGen embed
``p_before`` and ``p_after`` separately), so the placeholders never interact with the text's merges.

The ``easygen`` template is the paper's own sequence, token for token, as its training and caption/VQA
evaluation embed it (the released model was trained on it): the tokens of ``"USER: <Img>"`` with BOS, the
77 projected rows, the tokens of ``"</Img> "`` on their own without BOS, then the question text
(``"Describe the image concisely. ASSISTANT:"``, or ``"<question> please giving an short answer.
ASSISTANT:"``) on its own without BOS. With Llama's sentencepiece tokenizer the separate ``"</Img> "``
ends in a lone ``"▁"`` token and the question starts with its own dummy-prefix space: one token more than
``vicuna_v1.1``, which tokenises ``"</Img> Describe ..."`` in one piece.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
IMG_OPEN = "<Img>"
IMG_CLOSE = "</Img>"


@dataclass(frozen=True)
class Template:
    """A conversation format.

    ``user_format`` and ``answer_format`` contain ``{content}``; ``{bos}``/``{eos}`` are replaced by the
    tokenizer's own special-token strings. The user format ends with the assistant's role prefix
    (``ASSISTANT:``) so that a generation prompt is exactly the rendered history up to a user turn.
    """

    name: str
    system: str = ""
    system_format: str = "{system} "
    user_format: str = "USER: {content} ASSISTANT:"
    first_user_format: str | None = None
    answer_format: str = " {content}{eos}"
    add_bos: bool = True
    # the text after the image span tokenised in two runs of its own: `</Img> ` alone, then the rest from
    # the question's first character (the paper's forward embeds them separately)
    image_close_apart: bool = False


TEMPLATES: dict[str, Template] = {
    # FastChat "vicuna_v1.1": sep " ", sep2 "</s>". With the empty system message of the paper's LLM side the prompt
    # starts at "USER:" (FastChat would emit one leading separator; a lone space tokenises to nothing
    # useful and the paper's prompt starts at "USER:").
    "vicuna_v1.1": Template(name="vicuna_v1.1"),
    # Meta's Llama-2 chat format: the system block sits inside the first [INST]; later turns open with <s>.
    "llama_2": Template(
        name="llama_2",
        system="",
        system_format="",
        first_user_format="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
        user_format="{bos}[INST] {content} [/INST]",
        answer_format=" {content} {eos}",
    ),
    # The released EasyGen's prompt: Vicuna v1.1 roles, `</Img> ` and the question tokenised apart.
    "easygen": Template(name="easygen", image_close_apart=True),
    # No roles: image then answer, as LLaVA's "plain" pretraining format.
    "plain": Template(
        name="plain", system_format="", user_format="{content}\n", answer_format="{content}{eos}"
    ),
}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise KeyError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "Describe this image briefly.",
)

VQA_SUFFIX = " please giving an short answer."


def caption_prompt(rng: random.Random) -> str:
    """One of the caption instructions, chosen by the caller's seeded RNG."""
    return rng.choice(CAPTION_PROMPTS)


def vqa_prompt(question: str) -> str:
    """the paper's LLM side: ``"<question> please giving an short answer."`` (the reference's wording, kept)."""
    return question.strip() + VQA_SUFFIX


@dataclass
class Segment:
    """A piece of a rendered conversation: text, or the image span when ``image_tokens`` > 0."""

    text: str = ""
    learn: bool = False
    image_tokens: int = 0
    # tokenised apart from the text before it (a new run, without BOS)
    starts_run: bool = False


@dataclass
class Rendered:
    segments: list[Segment] = field(default_factory=list)
    add_bos: bool = True

    @property
    def text(self) -> str:
        """Human-readable form, the image span shown as ``<ImageHere>``."""
        return "".join(s.text if not s.image_tokens else "<ImageHere>" for s in self.segments)


def render(
    template: str | Template,
    turns: Sequence[dict],
    image_token_count: int,
    *,
    bos: str = "<s>",
    eos: str = "</s>",
    prompt_only: bool = False,
    sample_id: str = "?",
) -> Rendered:
    """Render LLaVA-style turns with ``template``.

    The first ``<image>`` marker becomes ``<Img>`` + ``image_token_count`` placeholders + ``</Img>``;
    with ``prompt_only`` the last assistant answer is dropped so the sequence ends at the assistant
    prefix (for generation).
    """
    tpl = get_template(template)
    turns = list(turns)
    if not turns:
        raise ValueError(f"sample {sample_id}: no conversation turns")
    for i, turn in enumerate(turns):
        role = turn.get("from")
        if role not in ("human", "gpt"):
            raise ValueError(f"sample {sample_id}: turn {i} has 'from'={role!r}, expected 'human' or 'gpt'")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(
                f"sample {sample_id}: turn {i} is from {role!r}, expected {expected!r} (turns alternate)"
            )
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"sample {sample_id}: turn {i} has no string 'value'")
    if prompt_only:
        if turns[-1]["from"] == "gpt":
            turns = turns[:-1]
    elif turns[-1]["from"] != "gpt":
        raise ValueError(f"sample {sample_id}: the last turn must be the answer ('gpt') for training")

    n_markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    if n_markers > 1:
        raise ValueError(f"sample {sample_id}: {n_markers} '{IMAGE_MARKER}' markers; one image per sample")
    if n_markers and image_token_count <= 0:
        raise ValueError(f"sample {sample_id}: has an '{IMAGE_MARKER}' marker but image_token_count=0")

    segments: list[Segment] = []
    if tpl.system_format and tpl.system:
        segments.append(Segment(tpl.system_format.format(system=tpl.system)))
    for i, turn in enumerate(turns):
        if turn["from"] == "human":
            fmt = tpl.first_user_format if (i == 0 and tpl.first_user_format) else tpl.user_format
            text = fmt.format(content=turn["value"], system=tpl.system, bos=bos, eos=eos)
            if IMAGE_MARKER in text:
                before, after = text.split(IMAGE_MARKER)
                segments.append(Segment(before + IMG_OPEN))
                segments.append(Segment(image_tokens=image_token_count))
                if tpl.image_close_apart:
                    segments.append(Segment(IMG_CLOSE + " "))
                    segments.append(Segment(after.lstrip(), starts_run=True))
                else:
                    segments.append(Segment(IMG_CLOSE + after))
            else:
                segments.append(Segment(text))
        else:
            segments.append(
                Segment(tpl.answer_format.format(content=turn["value"], bos=bos, eos=eos), learn=True)
            )
    return Rendered(segments=segments, add_bos=tpl.add_bos)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image_start: int  # index of the first placeholder position, -1 without image
    image_tokens: int


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode(
    tokenizer, rendered: Rendered, *, placeholder_id: int | None = None, sample_id: str = "?"
) -> Encoded:
    """Tokenise a rendered conversation and compute its labels from the real token boundaries.

    Raises ``ValueError`` naming ``sample_id`` when a segment boundary falls inside a token (the text
    up to the boundary does not tokenise to a prefix of the full tokenisation), or when a training
    sample ends up with no learned token.
    """
    if placeholder_id is None:
        placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids: list[int] = []
    labels: list[int] = []
    image_start, image_tokens = -1, 0
    if rendered.add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)

    # Split at the image span: each run of text segments is tokenised on its own.
    runs: list[list[Segment]] = [[]]
    for seg in rendered.segments:
        if seg.image_tokens:
            runs.append([seg])
            runs.append([])
        else:
            if seg.starts_run and runs[-1]:
                runs.append([])
            runs[-1].append(seg)

    for run in runs:
        if run and run[0].image_tokens:
            image_start, image_tokens = len(input_ids), run[0].image_tokens
            input_ids.extend([placeholder_id] * image_tokens)
            labels.extend([IGNORE_INDEX] * image_tokens)
            continue
        full_text = "".join(s.text for s in run)
        full = _tokenize(tokenizer, full_text)
        start_tok, prefix = 0, ""
        for k, seg in enumerate(run):
            prefix += seg.text
            if k == len(run) - 1:
                end_tok = len(full)
            else:
                head = _tokenize(tokenizer, prefix)
                if head != full[: len(head)]:
                    raise ValueError(
                        f"sample {sample_id}: segment boundary after {prefix[-40:]!r} falls inside a token "
                        f"(tokenising the prefix gives {tokenizer.convert_ids_to_tokens(head[-3:])} but the "
                        f"full text has {tokenizer.convert_ids_to_tokens(full[max(0, len(head) - 3) : len(head) + 1])}); "
                        "the template's separators do not split tokens cleanly"
                    )
                end_tok = len(head)
            if end_tok < start_tok:
                raise ValueError(
                    f"sample {sample_id}: token spans overlap at segment {k} ({seg.text[:40]!r})"
                )
            if seg.text and end_tok == start_tok:
                raise ValueError(f"sample {sample_id}: segment {k} ({seg.text[:40]!r}) maps to no tokens")
            piece = full[start_tok:end_tok]
            input_ids.extend(piece)
            labels.extend(piece if seg.learn else [IGNORE_INDEX] * len(piece))
            start_tok = end_tok
    return Encoded(input_ids=input_ids, labels=labels, image_start=image_start, image_tokens=image_tokens)
