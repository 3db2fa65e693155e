"""Small benchmark files in the public formats (NoCaps, OK-VQA, GQA, TextVQA, MMBench, VQAv2 test-dev,
COCO captions), with real pictures, for the converter and eval-stage tests."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed).save(buf, format="JPEG")
    return buf.getvalue()


def write_nocaps(folder: Path, n: int = 6, *, test: bool = False) -> tuple[Path, Path]:
    """nocaps_val_4500_captions.json (COCO captions format, each image with its domain) and its
    pictures; ``test``: nocaps_test_image_info.json (images only)."""
    images = folder / "nocaps_images"
    images.mkdir(parents=True, exist_ok=True)
    domains = ["in-domain", "near-domain", "out-domain"]
    rows, anns = [], []
    for k in range(n):
        name = f"{k:016x}.jpg"
        picture(k).save(images / name)
        rows.append({"id": k, "file_name": name, "domain": domains[k % 3], "open_images_id": f"{k:016x}",
                     "height": 40, "width": 48, "coco_url": "", "date_captured": ""})  # fmt: skip
        anns += [{"image_id": k, "id": 10 * k + j, "caption": f"a picture number {k} variant {j}"} for j in range(10)]
    data = {"licenses": [], "info": {}, "images": rows}
    if not test:
        data["annotations"] = anns
    path = folder / ("nocaps_test_image_info.json" if test else "nocaps_val_4500_captions.json")
    path.write_text(json.dumps(data))
    return path, images


def write_vqa_format(folder: Path, subtype: str = "val2014", n: int = 6, *, annotations: bool = True,
                     answer_types=("yes/no", "number", "other")) -> tuple[Path, Path | None, Path]:  # fmt: skip
    """A VQA-format questions json (VQAv2, OK-VQA), its annotations (ten answers each) and COCO-named
    pictures."""
    images = folder / "coco"
    images.mkdir(parents=True, exist_ok=True)
    image_subtype = "test2015" if subtype.startswith("test") else subtype
    questions, anns = [], []
    for k in range(n):
        image_id = 100 + k
        picture(k).save(images / f"COCO_{image_subtype}_{image_id:012d}.jpg")
        qid = 1000 + k
        questions.append({"question": f"what is in picture {k}?", "question_id": qid, "image_id": image_id})
        ans = ["yes"] * 6 + ["no"] * 4 if k % 2 else ["red"] * 3 + ["blue"] * 7
        anns.append({"question_id": qid, "image_id": image_id, "answer_type": answer_types[k % len(answer_types)],
                     "question_type": "what", "multiple_choice_answer": ans[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(ans)]})  # fmt: skip
    q = folder / f"questions_{subtype}.json"
    q.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                             "data_subtype": subtype, "questions": questions}))  # fmt: skip
    a = None
    if annotations:
        a = folder / f"annotations_{subtype}.json"
        a.write_text(json.dumps({"info": {}, "data_subtype": subtype, "annotations": anns}))
    return q, a, images


def write_gqa(folder: Path, n: int = 6) -> tuple[Path, Path]:
    """testdev_balanced_questions.json ({question_id: {imageId, question, answer, isBalanced, types}}) and
    images/<imageId>.jpg (two questions per picture)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = {}
    for k in range(n):
        image_id = f"n{k // 2:05d}"
        if not (images / f"{image_id}.jpg").exists():
            picture(k).save(images / f"{image_id}.jpg")
        structural = ["verify", "query", "choose"][k % 3]
        data[f"20{k:06d}"] = {
            "imageId": image_id, "question": f"Is there a thing number {k}?", "answer": "yes" if k % 3 != 1 else "table",
            "fullAnswer": "Yes, there is.", "isBalanced": True, "groups": {"global": None, "local": "x"},
            "entailed": [], "equivalent": [], "semantic": [],
            "types": {"structural": structural, "semantic": ["obj", "attr"][k % 2], "detailed": "existC"},
            "annotations": {"answer": {}, "question": {}, "fullAnswer": {}}, "semanticStr": "",
        }  # fmt: skip
    path = folder / "testdev_balanced_questions.json"
    path.write_text(json.dumps(data))
    return path, images


def write_textvqa(folder: Path, n: int = 6) -> tuple[Path, Path]:
    """TextVQA_0.5.1_val.json and train_images/<image_id>.jpg."""
    images = folder / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    data = []
    for k in range(n):
        image_id = f"{k:016x}"
        picture(k).save(images / f"{image_id}.jpg")
        answers = ["Coca-Cola"] * 4 + ["coke"] * 6 if k % 2 else ["stop"] * 10
        data.append({"question": f"what does sign {k} say?", "image_id": image_id, "image_classes": ["Sign"],
                     "flickr_original_url": "", "flickr_300k_url": "", "image_width": 48, "image_height": 40,
                     "answers": answers, "question_tokens": ["what"], "question_id": 34600 + k,
                     "set_name": "val"})  # fmt: skip
    path = folder / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": data}))  # fmt: skip
    return path, images


def write_mmbench(folder: Path, n: int = 4) -> Path:
    """The MMBench dev TSV: index, question, hint, A..D, answer, category, l2-category, image (base64)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mmbench_dev_en.tsv"
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
            "comment", "split", "image"]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        for k in range(n):
            three = k % 2 == 1  # a question with three options (D empty)
            w.writerow([k, f"Which thing is shown in picture {k}?", "A hint." if k == 0 else "nan",
                        "a cat", "a dog", "a bird", "" if three else "a fish", "BCA"[k % 3],
                        ["scene", "ocr"][k % 2], "src", ["perception", "reasoning"][k % 2], "nan", "dev",
                        base64.b64encode(jpeg_bytes(k)).decode()])  # fmt: skip
    return path


def write_coco_val2014(folder: Path, n_images: int = 5) -> tuple[Path, Path]:
    """captions_val2014.json (COCO captions format: images + annotations, two captions a picture) and
    the val2014 pictures (not square: the reference is center-cropped)."""
    images = folder / "val2014"
    images.mkdir(parents=True, exist_ok=True)
    rows, anns = [], []
    for k in range(n_images):
        name = f"COCO_val2014_{k + 1:012d}.jpg"
        picture(100 + k, size=(40, 56)).save(images / name)
        rows.append({"id": k + 1, "file_name": name, "height": 40, "width": 56})
        anns += [{"image_id": k + 1, "id": 10 * k + j, "caption": f"a red square number {k} view {j}"} for j in range(2)]
    path = folder / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": rows, "annotations": anns}))
    return path, images


def write_feature_extractor(path: Path) -> Path:
    """A TorchScript feature extractor (uint8 [N, 3, H, W] -> [N, 4]: channel means and contrast), the
    form `stage.inception` accepts besides torch-fidelity's weights."""
    import torch

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float() / 255.0
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(1, 2, 3))[:, None]], dim=1)

    torch.jit.script(Features()).save(str(path))
    return path
