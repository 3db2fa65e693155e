"""Converters from the public dataset formats to EasyGen WebDataset shards.

    python -m data_modules.convert FORMAT --input FILE [--images DIR] --out OUT \\
        [--annotations FILE] [--shard-size N] [--workers N] [--resize N] [--split NAME]

Record formats (one example record each):

  captions       a .jsonl file, one json object a line; "image" is relative to --images (or absolute),
                 "captions" is a non-empty list of strings, "split" (optional, default --split or train)
                   {"image": "cat.jpg", "captions": ["a cat on a mat", "a sleeping cat"], "split": "train"}
                 other fields (e.g. "id") travel with the sample.
  coco-karpathy  Karpathy's dataset_coco.json: {"images": [{"filepath": "val2014",
                   "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "test",
                   "sentences": [{"raw": "A cat on a mat."}, ...]}, ...]}; "restval" joins train
  llava          LLaVA instruct json: [{"id": "42", "image": "COCO_train2014_000000000042.jpg",
                   "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                     {"from": "gpt", "value": "A cat."}]}, ...]
                 turns alternate human/gpt, exactly one <image> marker when "image" is given
  vqav2          VQAv2 questions json (--input): {"data_subtype": "val2014", "questions": [{"image_id": 42,
                   "question": "What color is the cat?", "question_id": 42000}, ...]}
                 + annotations json (--annotations, optional): {"annotations": [{"question_id": 42000,
                   "answers": [{"answer": "black"}, ... ten answers]}, ...]};
                 images COCO_<subtype>_%012d.jpg or %012d.jpg in --images
  okvqa          OK-VQA: the same two files as vqav2 (OpenEnded_mscoco_val2014_questions.json,
                   mscoco_val2014_annotations.json: ten answers, "answer_type", "question_type")
  nocaps         nocaps_val_4500_captions.json (COCO captions format plus the image's domain):
                   {"images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain"}, ...],
                    "annotations": [{"image_id": 0, "caption": "A man ..."}, ...]}; without
                   "annotations" (nocaps_test_image_info.json) the images are written for the test split
  gqa            GQA questions (testdev_balanced_questions.json): {"201307251": {"imageId": "n15740",
                   "question": "Is it ...?", "answer": "yes", "isBalanced": true,
                   "types": {"structural": "verify", "semantic": "attr", ...}, ...}, ...};
                   pictures <imageId>.jpg in --images; split testdev unless --split
  textvqa        TextVQA_0.5.1_val.json: {"dataset_type": "val", "data": [{"question_id": 34602,
                   "image_id": "003a8ae2ef43b901", "question": "what is ...?", "answers": [ten strings]},
                   ...]}; pictures <image_id>.jpg in --images (train_images); test has no answers
  mmbench        the MMBench dev TSV: columns index, question, hint, A, B, C, D, answer, category,
                   l2-category and image (base64); no --images. Each question is written once per
                   rotation of its options (circular evaluation), its prompt listing the options

Writes OUT/<split>/shard-%06d.tar and OUT/manifest.json (samples per split and per shard, the source,
every skipped record with its reason). A JPEG or PNG is copied byte for byte unless --resize asks for a
smaller one; other formats are re-encoded as JPEG. A record whose image is missing or unreadable, whose
caption is empty or whose conversation is malformed is skipped; the reasons are printed (counted by kind,
the first few records by line or position) and listed in manifest.json. Exit status: 0 when samples were
written, 1 when no record was usable, 2 when an input file or folder is missing or unreadable.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

FORMATS = ("coco-karpathy", "llava", "vqav2", "captions", "okvqa", "nocaps", "gqa", "textvqa", "mmbench")
IMAGE_MARKER = "<image>"
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Record:
    """One source record before its image is read: where it goes and what its json says."""

    index: int  # position in the source file, for the skipped list
    key: str
    split: str
    meta: dict[str, Any]
    image: Path | None = None
    image_candidates: list[Path] = field(default_factory=list)
    image_data: bytes | None = None  # the picture itself, for formats that embed it (MMBench's base64)
    error: str | None = None  # known-bad before reading the image
    where: str = ""  # "line 3" / "images[4]": where the record sits in the source file, for messages


@dataclass
class Prepared:
    index: int
    key: str
    split: str
    members: dict[str, bytes] | None
    error: str | None
    where: str = ""


def sanitize_key(text: str) -> str:
    """A webdataset key: no dots (the first dot splits key from field), no path separators."""
    key = _UNSAFE_KEY.sub("_", str(text)).strip("_")
    return key or "sample"


def _check_captions(captions: Any) -> str | None:
    if isinstance(captions, str):
        return "'captions' must be a list of strings, found one string (write [\"...\"])"
    if not isinstance(captions, list) or not captions:
        return "empty caption list"
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            return f"empty caption at index {i}"
    return None


def _check_conversation(turns: Any, has_image: bool) -> str | None:
    if not isinstance(turns, list) or not turns:
        return "malformed conversation: 'conversations' must be a non-empty list"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"malformed conversation: turn {i} must be an object with a string 'value'"
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            return f"malformed conversation: turn {i} is from {turn.get('from')!r}, expected {expected!r}"
        if not turn["value"].strip():
            return f"malformed conversation: turn {i} is empty"
    if len(turns) % 2:
        return "malformed conversation: the last turn must be from 'gpt'"
    markers = sum(turn["value"].count(IMAGE_MARKER) for turn in turns)
    if has_image and markers != 1:
        return f"malformed conversation: a record with an image needs exactly one {IMAGE_MARKER} marker, found {markers}"
    if not has_image and markers:
        return f"malformed conversation: {IMAGE_MARKER} marker but no 'image'"
    return None


def _load_json(path: str | os.PathLike, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{what} {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid json: {exc}") from exc


class _KeyMaker:
    """Unique, dot-free keys; a repeated source id gets a ``_<n>`` suffix."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, text: str) -> str:
        base = key = sanitize_key(text)
        n = 1
        while key in self.used:
            key = f"{base}_{n}"
            n += 1
        self.used.add(key)
        return key


# --------------------------------------------------------------------------------------------------
# per-format record readers


def records_coco_karpathy(input: str, images: str, **_: Any) -> Iterator[Record]:
    data = _load_json(input, "coco-karpathy file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{input}: expected an object with an 'images' list (Karpathy's dataset_coco.json)")
    keys = _KeyMaker()
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry or "split" not in entry:
            yield Record(
                i, f"record{i}", "train", {}, error="record lacks 'filename' or 'split'", where=f"images[{i}]"
            )
            continue
        cocoid = entry.get("cocoid", entry.get("imgid", Path(entry["filename"]).stem))
        split = "train" if entry["split"] == "restval" else str(entry["split"])
        captions = [s.get("raw") if isinstance(s, dict) else None for s in entry.get("sentences", [])]
        key = keys(f"coco_{cocoid}")
        meta = {"id": str(cocoid), "kind": "caption", "captions": captions, "cocoid": cocoid, "split": split}
        meta["filename"] = entry["filename"]
        path = Path(images) / entry.get("filepath", "") / entry["filename"]
        yield Record(i, key, split, meta, image=path, error=_check_captions(captions), where=f"images[{i}]")


def records_llava(input: str, images: str | None, split: str = "train", **_: Any) -> Iterator[Record]:
    data = _load_json(input, "llava file")
    if not isinstance(data, list):
        raise ValueError(
            f"{input}: expected a list of {{id, image, conversations}} records (LLaVA instruct json)"
        )
    keys = _KeyMaker()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            yield Record(i, f"record{i}", split, {}, error="record is not an object", where=f"record {i}")
            continue
        source_id = str(entry.get("id", i))
        key = keys(f"llava_{source_id}")
        has_image = bool(entry.get("image"))
        meta = {
            "id": key,
            "kind": "conversation",
            "source_id": source_id,
            "conversations": entry.get("conversations"),
            "split": split,
        }
        path = None
        if has_image:
            meta["image_file"] = entry["image"]
            path = Path(entry["image"]) if images is None else Path(images) / entry["image"]
        error = _check_conversation(entry.get("conversations"), has_image)
        yield Record(i, key, split, meta, image=path, error=error, where=f"record {i} (id {source_id})")


def records_vqav2(
    input: str, images: str, annotations: str | None = None, split: str | None = None, name: str = "vqav2",
    **_: Any,
) -> Iterator[Record]:
    questions = _load_json(input, f"{name} questions file")
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"{input}: expected an object with a 'questions' list (VQAv2 questions json)")
    subtype = str(questions.get("data_subtype", ""))
    # test-dev questions use the test2015 images.
    image_subtype = "test2015" if subtype.startswith("test") else subtype
    split = split or {"train2014": "train", "val2014": "val"}.get(
        subtype, "test" if subtype.startswith("test") else "train"
    )
    answers_by_qid: dict[Any, dict[str, Any]] = {}
    if annotations is not None:
        ann = _load_json(annotations, f"{name} annotations file")
        if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
            raise ValueError(
                f"{annotations}: expected an object with an 'annotations' list (VQAv2 annotations json)"
            )
        answers_by_qid = {
            a["question_id"]: a for a in ann["annotations"] if isinstance(a, dict) and "question_id" in a
        }
    keys = _KeyMaker()
    for i, q in enumerate(questions["questions"]):
        if not isinstance(q, dict) or not {"question", "question_id", "image_id"} <= q.keys():
            yield Record(
                i,
                f"record{i}",
                split,
                {},
                error="question lacks 'question', 'question_id' or 'image_id'",
                where=f"questions[{i}]",
            )
            continue
        qid, image_id = q["question_id"], q["image_id"]
        key = keys(f"{'vqa' if name == 'vqav2' else name}_{qid}")
        meta = {
            "id": str(qid),
            "kind": "vqa",
            "question": q["question"],
            "question_id": qid,
            "image_id": image_id,
            "answers": [],
            "split": split,
        }
        error = None if isinstance(q["question"], str) and q["question"].strip() else "empty question"
        if annotations is not None:
            a = answers_by_qid.get(qid)
            if a is None:
                error = error or f"no annotation for question_id {qid}"
            else:
                answers = [x.get("answer") if isinstance(x, dict) else None for x in a.get("answers", [])]
                if len(answers) != 10 or not all(isinstance(x, str) for x in answers):
                    error = error or f"expected 10 string answers, found {len(answers)}"
                meta["answers"] = answers
                for extra in ("multiple_choice_answer", "answer_type", "question_type"):
                    if extra in a:
                        meta[extra] = a[extra]
        candidates = [
            Path(images) / f"COCO_{image_subtype}_{int(image_id):012d}.jpg",
            Path(images) / f"{int(image_id):012d}.jpg",
        ]
        yield Record(
            i, key, split, meta, image_candidates=candidates, error=error, where=f"questions[{i}] (id {qid})"
        )


def records_okvqa(input: str, images: str, annotations: str | None = None, split: str | None = None,
                  **_: Any) -> Iterator[Record]:
    """OK-VQA ships in the VQA format (questions + annotations with ten answers each)."""
    return records_vqav2(input, images, annotations, split, name="okvqa")


def records_nocaps(input: str, images: str, split: str | None = None, **_: Any) -> Iterator[Record]:
    data = _load_json(input, "nocaps file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{input}: expected an object with an 'images' list (nocaps_val_4500_captions.json)")
    has_captions = "annotations" in data
    split = split or ("val" if has_captions else "test")
    captions: dict[Any, list] = {}
    for a in data.get("annotations") or []:
        if isinstance(a, dict) and "image_id" in a:
            captions.setdefault(a["image_id"], []).append(a.get("caption"))
    keys = _KeyMaker()
    for i, im in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(im, dict) or not {"id", "file_name"} <= im.keys():
            yield Record(i, f"record{i}", split, {}, error="image lacks 'id' or 'file_name'", where=where)
            continue
        caps = captions.get(im["id"], [])
        meta = {"id": str(im["id"]), "kind": "caption", "captions": caps, "split": split,
                "domain": im.get("domain"), "file_name": im["file_name"]}  # fmt: skip
        error = _check_captions(caps) if has_captions else None
        if has_captions and im.get("domain") not in ("in-domain", "near-domain", "out-domain"):
            error = error or f"'domain' must be in-domain, near-domain or out-domain, found {im.get('domain')!r}"
        yield Record(i, keys(f"nocaps_{im['id']}"), split, meta, image=Path(images) / im["file_name"],
                     error=error, where=f"{where} (id {im['id']})")  # fmt: skip


def records_gqa(input: str, images: str, split: str | None = None, **_: Any) -> Iterator[Record]:
    data = _load_json(input, "gqa questions file")
    if not isinstance(data, dict):
        raise ValueError(f"{input}: expected an object {{question_id: {{imageId, question, answer, ...}}}}")
    split = split or "testdev"
    keys = _KeyMaker()
    for i, (qid, q) in enumerate(data.items()):
        where = f"question {qid}"
        if not isinstance(q, dict) or not {"imageId", "question"} <= q.keys():
            yield Record(i, f"record{i}", split, {}, error="question lacks 'imageId' or 'question'", where=where)
            continue
        answer = q.get("answer")
        meta = {"id": str(qid), "kind": "vqa", "question": q["question"], "split": split,
                "answers": [answer] if isinstance(answer, str) else [], "imageId": q["imageId"],
                "isBalanced": bool(q.get("isBalanced", True)),
                "types": {k: (q.get("types") or {}).get(k) for k in ("structural", "semantic", "detailed")}}
        error = None if isinstance(q["question"], str) and q["question"].strip() else "empty question"
        if "answer" in q and not (isinstance(answer, str) and answer):
            error = error or "empty answer"
        yield Record(i, keys(f"gqa_{qid}"), split, meta, image=Path(images) / f"{q['imageId']}.jpg",
                     error=error, where=where)  # fmt: skip


def records_textvqa(input: str, images: str, split: str | None = None, **_: Any) -> Iterator[Record]:
    data = _load_json(input, "textvqa file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{input}: expected an object with a 'data' list (TextVQA_0.5.1_<split>.json)")
    split = split or str(data.get("dataset_type") or "val")
    keys = _KeyMaker()
    for i, q in enumerate(data["data"]):
        where = f"data[{i}]"
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= q.keys():
            yield Record(i, f"record{i}", split, {}, error="record lacks 'question_id', 'image_id' or 'question'",
                         where=where)  # fmt: skip
            continue
        answers = q.get("answers", [])
        meta = {"id": str(q["question_id"]), "kind": "vqa", "question": q["question"], "answers": answers,
                "question_id": q["question_id"], "image_id": q["image_id"], "split": split}  # fmt: skip
        error = None if isinstance(q["question"], str) and q["question"].strip() else "empty question"
        if "answers" in q and (len(answers) != 10 or not all(isinstance(a, str) for a in answers)):
            error = error or f"expected 10 string answers, found {len(answers) if isinstance(answers, list) else 0}"
        yield Record(i, keys(f"textvqa_{q['question_id']}"), split, meta,
                     image=Path(images) / f"{q['image_id']}.jpg", error=error,
                     where=f"{where} (id {q['question_id']})")  # fmt: skip


MMBENCH_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def mmbench_prompt(question: str, hint: str | None, options: dict[str, str]) -> str:
    """The multiple-choice prompt: the hint (when there is one), the question, one line per option
    ("A. ..."), and the instruction to answer with the letter."""
    lines = [f"{hint}\n{question}" if hint else question]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join([*lines, MMBENCH_INSTRUCTION])


def _tsv_value(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None or not str(value).strip() or str(value).strip().lower() == "nan":
        return None
    return str(value)


def records_mmbench(input: str, split: str | None = None, **_: Any) -> Iterator[Record]:
    import base64
    import binascii
    import csv

    from easygen.metrics.choice import rotations

    csv.field_size_limit(1 << 30)  # the pictures are base64 fields of megabytes
    try:
        with open(input, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"mmbench file {input} does not exist") from exc
    if rows and not {"index", "question", "A", "B", "answer", "image"} <= rows[0].keys():
        raise ValueError(f"{input}: expected the MMBench TSV columns index, question, A, B, ..., answer, image")
    split = split or "dev"
    keys = _KeyMaker()
    n = 0
    for i, row in enumerate(rows):
        where = f"row {i + 2} (index {row.get('index')})"
        options = [v for v in (_tsv_value(row, c) for c in "ABCDEFGHI") if v is not None]
        answer = (_tsv_value(row, "answer") or "").strip()
        error = None
        if len(options) < 2:
            error = f"{len(options)} option(s); multiple choice needs at least 2"
        elif answer not in "ABCDEFGHI"[: len(options)] or not answer:
            error = f"answer {answer!r} is not one of the {len(options)} option letters"
        elif not _tsv_value(row, "question"):
            error = "empty question"
        try:
            data = base64.b64decode(row.get("image") or "", validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if error is None and not data:
            error = "unreadable image: the 'image' field is not base64"
        if error is not None:
            yield Record(n, f"row{i + 2}", split, {}, error=error, where=where)
            n += 1
            continue
        index = str(row["index"]).strip()
        for k, (opts, right) in enumerate(rotations(options, "ABCDEFGHI".index(answer))):
            letters = {"ABCDEFGHI"[j]: o for j, o in enumerate(opts)}
            prompt = mmbench_prompt(row["question"], _tsv_value(row, "hint"), letters)
            meta = {"id": f"{index}_{k}", "kind": "conversation", "split": split, "question_index": index,
                    "rotation": k, "options": letters, "answer": "ABCDEFGHI"[right],
                    "captions": ["ABCDEFGHI"[right]], "category": _tsv_value(row, "category"),
                    "l2-category": _tsv_value(row, "l2-category"),
                    "conversations": [{"from": "human", "value": f"{IMAGE_MARKER}\n{prompt}"},
                                      {"from": "gpt", "value": "ABCDEFGHI"[right]}]}  # fmt: skip
            yield Record(n, keys(f"mmbench_{index}_{k}"), split, meta, image_data=data, where=where)
            n += 1


_RESERVED = {"id", "kind", "captions", "split", "image"}


def records_captions(input: str, images: str | None, split: str = "train", **_: Any) -> Iterator[Record]:
    keys = _KeyMaker()
    try:
        lines = Path(input).read_text().splitlines()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"captions file {input} does not exist") from exc
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"line {i + 1}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record(i, f"line{i + 1}", split, {}, error=f"not valid json: {exc}", where=where)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            yield Record(i, f"line{i + 1}", split, {}, error="no string 'image' field", where=where)
            continue
        image = Path(entry["image"])
        if not image.is_absolute() and images is not None:
            image = Path(images) / image
        key = keys(entry.get("id") or Path(entry["image"]).stem)
        record_split = str(entry.get("split") or split)
        meta = {
            "id": str(entry.get("id") or key),
            "kind": "caption",
            "captions": entry.get("captions"),
            "split": record_split,
        }
        # Extra fields (e.g. the synthetic set's attributes) travel with the sample.
        meta.update({k: v for k, v in entry.items() if k not in _RESERVED})
        if "captions" not in entry:
            near = [k for k in ("caption", "text", "sentences", "raw") if k in entry]
            hint = f" (found {near[0]!r}; the field is 'captions', a list of strings)" if near else ""
            error = f"no 'captions' field{hint}"
        else:
            error = _check_captions(entry["captions"])
        yield Record(i, key, record_split, meta, image=image, error=error, where=where)


READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "coco-karpathy": records_coco_karpathy,
    "llava": records_llava,
    "vqav2": records_vqav2,
    "captions": records_captions,
    "okvqa": records_okvqa,
    "nocaps": records_nocaps,
    "gqa": records_gqa,
    "textvqa": records_textvqa,
    "mmbench": records_mmbench,
}


# --------------------------------------------------------------------------------------------------
# image reading (runs in worker processes)


def _encode_image(path: Path | None, resize: int | None, data: bytes | None = None) -> tuple[str, bytes]:
    data = path.read_bytes() if data is None else data
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        # A full decode, not verify(): verify() misses truncated JPEG data.
        img.load()
        if fmt in ("JPEG", "PNG") and (resize is None or min(img.size) <= resize):
            return ("jpg" if fmt == "JPEG" else "png"), data
        out_fmt = "PNG" if fmt == "PNG" else "JPEG"
        if resize is not None and min(img.size) > resize:
            scale = resize / min(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
        if out_fmt == "JPEG" and img.mode != "RGB":
            img = img.convert("RGB")
        buffer = io.BytesIO()
        img.save(buffer, format=out_fmt, **({"quality": 95} if out_fmt == "JPEG" else {}))
        return ("jpg" if out_fmt == "JPEG" else "png"), buffer.getvalue()


_RESIZE: int | None = None


def _init_worker(resize: int | None) -> None:
    global _RESIZE
    _RESIZE = resize


def _prepare(record: Record) -> Prepared:
    def skip(reason: str) -> Prepared:
        return Prepared(record.index, record.key, record.split, None, reason, record.where)

    if record.error is not None:
        return skip(record.error)
    members: dict[str, bytes] = {}
    if record.image_data is not None:
        try:
            ext, data = _encode_image(None, _RESIZE, record.image_data)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return skip(f"unreadable image: {exc}")
        members[ext] = data
    path = record.image
    if path is None and record.image_candidates:
        path = next((p for p in record.image_candidates if p.is_file()), None)
        if path is None:
            return skip("missing image " + " or ".join(str(p) for p in record.image_candidates))
    if path is not None:
        if not path.is_file():
            return skip(f"missing image {path}")
        try:
            ext, data = _encode_image(path, _RESIZE)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return skip(f"unreadable image {path}: {exc}")
        members[ext] = data
    members["json"] = json.dumps(record.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return Prepared(record.index, record.key, record.split, members, None, record.where)


# the kind of a skip reason, for the printed summary (the manifest keeps every full reason)
_KINDS = (
    (re.compile(r"^missing image"), "missing image"),
    (re.compile(r"^unreadable image"), "unreadable image"),
    (re.compile(r"^not valid json"), "not valid json"),
    (re.compile(r"^empty caption at index"), "empty caption"),
    (re.compile(r"^no 'captions' field \(found '(\w+)'"), r"no 'captions' field (found '\1' instead)"),
    (re.compile(r"^malformed conversation"), "malformed conversation"),
    (re.compile(r"^no annotation for question_id"), "no annotation for the question"),
    (re.compile(r"^expected 10 string answers"), "not 10 string answers"),
    (re.compile(r"^answer .* is not one of the"), "answer is not an option letter"),
)


def reason_kind(reason: str) -> str:
    for pattern, kind in _KINDS:
        m = pattern.match(reason)
        if m:
            return m.expand(kind)
    return reason


# --------------------------------------------------------------------------------------------------
# writing


class _SplitWriter:
    """``<out>/<split>/<prefix>-%06d.tar`` (prefix ``shard``) with at most ``shard_size`` samples each,
    through webdataset's ``ShardWriter``. Each shard is written as ``<prefix>-%06d.tar.tmp`` and renamed when
    complete (ShardWriter's ``post`` hook), so that a crashed conversion leaves no partial ``.tar`` for the
    readers of data_modules/shards.py, which take ``*.tar``."""

    def __init__(self, out: Path, split: str, shard_size: int, prefix: str = "shard"):
        directory = out / split
        directory.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.counts: dict[str, int] = {}
        self.file: io.BufferedWriter | None = None
        self.writer = wds.ShardWriter(
            os.path.join(str(directory).replace("%", "%%"), f"{prefix}-%06d.tar.tmp"),
            maxcount=shard_size,
            maxsize=float("inf"),
            post=self._complete,
            verbose=0,
            opener=self._open,
            # fixed metadata and no encoding (the members are bytes already): the same input gives
            # byte-identical shards
            encoder=False,
            user="",
            group="",
            mtime=0,
        )

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.writer.write({"__key__": key, **members})
        name = f"{self.split}/{Path(self.writer.fname).name.removesuffix('.tmp')}"
        self.counts[name] = self.counts.get(name, 0) + 1

    # A plain open() rather than webdataset's gopen (which rewrites URLs from the environment); the tar
    # writer does not close a file it was handed, so the post hook does, before the rename.
    def _open(self, tmp: str) -> io.BufferedWriter:
        self.file = open(tmp, "wb")  # closed in _complete or abort
        return self.file

    def _complete(self, tmp: str) -> None:
        self.file.close()
        os.replace(tmp, tmp.removesuffix(".tmp"))

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        """Close without completing the shard being written: its ``.tmp`` is removed."""
        self.writer.post = None
        try:
            self.writer.close()
        finally:
            self.file.close()
            Path(self.writer.fname).unlink(missing_ok=True)


def _check_inputs(format: str, input, images, annotations, shard_size: int) -> None:
    """Fail before reading anything: an unknown format, a bad shard size, a missing input file or folder."""
    if format not in READERS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if format in ("coco-karpathy", "vqav2", "okvqa", "nocaps", "gqa", "textvqa") and images is None:
        raise ValueError(f"format {format!r} needs --images (the folder of the COCO images)")
    for what, path in (("input file", input), ("annotations file", annotations)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(
                f"{what} {path} does not exist" if not Path(path).exists() else f"{what} {path} is not a file"
            )
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(
            f"images folder {images} does not exist" if not Path(images).exists()
            else f"--images {images} is not a folder"
        )


def _write_shards(records: list[Record], out: Path, shard_size: int, workers: int, resize: int | None,
                  desc: str, progress: bool) -> tuple[dict[str, _SplitWriter], list[dict[str, Any]]]:
    """Prepare every record (in `workers` processes) and write it to its split's shards; a record that
    cannot be prepared is skipped and listed. Any error discards the shards being written."""
    writers: dict[str, _SplitWriter] = {}
    skipped: list[dict[str, Any]] = []
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(resize,))
        results = pool.imap(_prepare, records, chunksize=8)
    else:
        pool = None
        _init_worker(resize)
        results = map(_prepare, records)
    try:
        for prepared in tqdm(results, total=len(records), desc=desc, disable=not progress):
            if prepared.members is None:
                skipped.append({"record": prepared.index, "where": prepared.where, "key": prepared.key,
                                "kind": reason_kind(prepared.error), "reason": prepared.error})
                continue
            if prepared.split not in writers:
                writers[prepared.split] = _SplitWriter(out, prepared.split, shard_size)
            writers[prepared.split].write(prepared.key, prepared.members)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for writer in writers.values():
        writer.close()
    return writers, skipped


def convert(
    format: str,
    *,
    input: str | os.PathLike,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    resize: int | None = None,
    split: str | None = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert a public-format dataset to shards under ``out``; returns (and writes) the manifest.

    ``split`` overrides the split of formats that have none of their own (llava, captions without a
    ``split`` field; vqav2 reads it from ``data_subtype``). ``source`` replaces the manifest's record
    of where the data came from.
    """
    _check_inputs(format, input, images, annotations, shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"input": str(input), "images": None if images is None else str(images)}
    if annotations is not None:
        kwargs["annotations"] = str(annotations)
    if split is not None:
        kwargs["split"] = split
    records = list(READERS[format](**kwargs))

    writers, skipped = _write_shards(records, out, shard_size, workers, resize,
                                     desc=f"convert {format}", progress=progress)

    splits = {
        name: {"samples": sum(w.counts.values()), "shards": dict(w.counts)}
        for name, w in sorted(writers.items())
    }
    manifest = {
        "format": format,
        "source": source
        or {
            k: str(Path(v).resolve())
            for k, v in (("input", input), ("images", images), ("annotations", annotations))
            if v is not None
        },
        "shard_size": shard_size,
        "resize": resize,
        "records": len(records),
        "samples": sum(s["samples"] for s in splits.values()),
        "splits": splits,
        "skipped": skipped,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def skip_summary(manifest: dict[str, Any], first: int = 5) -> list[str]:
    """Printed lines for the skipped records: counts by kind, then the first few with where they sit."""
    skipped = manifest["skipped"]
    if not skipped:
        return []
    kinds: dict[str, int] = {}
    for s in skipped:
        kind = s.get("kind") or reason_kind(s["reason"])
        kinds[kind] = kinds.get(kind, 0) + 1
    lines = [f"skipped {len(skipped)} of {manifest['records']} records:"]
    lines += [f"  {n} x {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append("first skipped:")
    for s in skipped[:first]:
        lines.append(f"  {s.get('where') or 'record ' + str(s['record'])}: {s['reason']}")
    if len(skipped) > first:
        lines.append(f"  ... ({len(skipped) - first} more in manifest.json)")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line; exits 2 on a missing/unreadable input, 1 when no record was usable."""
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m data_modules.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("--input", required=True, help="the source json/jsonl file")
    parser.add_argument("--images", default=None, help="folder the record image paths are relative to")
    parser.add_argument("--annotations", default=None, help="vqav2, okvqa: the annotations json")
    parser.add_argument(
        "--out", required=True, help="output folder for <split>/shard-*.tar and manifest.json"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=1, help="processes reading/validating images")
    parser.add_argument("--resize", type=int, default=None, help="downscale so the shorter side is at most N")
    parser.add_argument("--split", default=None, help="split name for formats without one")
    args = parser.parse_args(argv)
    try:
        manifest = convert(
            args.format,
            input=args.input,
            out=args.out,
            images=args.images,
            annotations=args.annotations,
            shard_size=args.shard_size,
            workers=args.workers,
            resize=args.resize,
            split=args.split,
        )
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    counts = ", ".join(f"{name} {s['samples']}" for name, s in manifest["splits"].items())
    print(
        f"wrote {manifest['samples']} samples{f' ({counts})' if counts else ''} to {args.out}; "
        f"skipped {len(manifest['skipped'])}"
    )
    for line in skip_summary(manifest):
        print(line)
    if manifest["records"] == 0:
        sys.stderr.write(f"error: {args.input} holds no records (see --help for the {args.format} format)\n")
        raise SystemExit(1)
    if manifest["samples"] == 0:
        sys.stderr.write(
            f"error: none of the {manifest['records']} records of {args.input} was usable "
            f"(reasons above; see --help for the {args.format} format)\n"
        )
        raise SystemExit(1)
    return manifest


if __name__ == "__main__":
    main()
