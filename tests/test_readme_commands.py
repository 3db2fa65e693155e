"""Every command in README.md's ```bash blocks, run as written, in README order, in a fresh copy of the
repository (the files git tracks) with the inputs the README names created first.

The one change to what a user types is the README's documented shortening switch, EASYGEN_DEBUG=smoke,
set in the environment of every command alike. Nothing else is added: no `paths.*`, `hydra.run.dir` or
`hydra.sweep.dir` override. Commands that need real weights (a paper experiment or model preset) must end
in a one-line error naming the keys to set. The README's install and test commands are what `.ci/run`
runs itself (checked verbatim here) and are not run again. Each command's exit code and wall time is
printed as it finishes."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"

pytestmark = pytest.mark.slow

# commands that need weights nobody has here: they must stop at the config check, naming the keys
NEEDS_WEIGHTS = re.compile(r"\b(experiment=easygen_\w+|model=(vicuna7b|flant5xl))\b")
TIMEOUT = 900


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks: `\\` continuations joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            if pending:
                line = pending + " " + line.strip()
                pending = ""
            if line.endswith("\\"):
                pending = line[:-1].rstrip()
                continue
            command = _strip_comment(line)
            if command:
                commands.append(command)
    return commands


def _strip_comment(line: str) -> str:
    """The line up to its first `#` that starts a shell comment (outside quotes, after a blank)."""
    for i, char in enumerate(line):
        if char == "#" and (i == 0 or line[i - 1].isspace()):
            try:
                shlex.split(line[:i])
            except ValueError:  # inside quotes
                continue
            return line[:i].strip()
    return line.strip()


def _normalise(command: str) -> str:
    """A shell line with `python3 -m pip`/`python3 -m` spelled as `pip`/`python -m`, pip's -q dropped, quotes
    made single: what .ci/run and the README must agree on."""
    command = command.replace('"', "'").replace("python3 -m pip install -q", "pip install")
    return " ".join(command.replace("python3 -m", "python -m").split())


def split_install_and_test(commands: list[str]) -> tuple[list[str], list[str]]:
    """(commands CI runs itself: install and the test command, the rest)."""
    own = [c for c in commands if c.startswith(("pip install", "python -m pytest"))]
    return own, [c for c in commands if c not in own]


COMMANDS = readme_commands(README.read_text())
CI_OWN, TO_RUN = split_install_and_test(COMMANDS)


def test_readme_has_the_contract_commands():
    """An install command, the main job and one test command, and CI runs the install and test lines as
    the README writes them."""
    assert any(c.startswith("pip install") for c in CI_OWN)
    assert [c for c in CI_OWN if c.startswith("python -m pytest")] == ['python -m pytest -q -m "not slow"']
    assert "python run.py" in TO_RUN
    ci = [_normalise(line.split("#")[0]) for line in CI_SCRIPT.read_text().splitlines()]
    for command in CI_OWN:
        for part in command.split(" && "):
            assert _normalise(part) in ci, f".ci/run does not run the README's `{part}`"


# ----------------------------------------------------------------------------------------------------
# the inputs the README names


def _write_pictures(copy: Path) -> None:
    """my_pictures/ + my_pictures.jsonl: procedural pictures in the `captions` record format."""
    from data_modules.synthetic import captions_for, draw, sample_attributes

    rng = random.Random(0)
    folder = copy / "my_pictures"
    folder.mkdir()
    lines = []
    for i in range(40):
        attributes = sample_attributes(rng)
        draw(attributes, 64, rng).save(folder / f"{i}.png")
        split = "train" if i < 28 else ("val" if i < 34 else "test")
        lines.append(json.dumps({"image": f"{i}.png", "captions": captions_for(attributes)[:4], "split": split}))
    (copy / "my_pictures.jsonl").write_text("\n".join(lines) + "\n")


def _jpeg(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), colour).save(path, format="JPEG")


def _write_downloads(copy: Path) -> None:
    """downloads/: the public files the converters read, a few records each in their published formats."""
    dl = copy / "downloads"
    coco = dl / "coco"
    images = []
    for i, (folder, split) in enumerate([("val2014", "test"), ("train2014", "train"), ("val2014", "val"),
                                         ("train2014", "restval")]):
        name = f"COCO_{folder}_{i + 1:012d}.jpg"
        _jpeg(coco / folder / name, (40 * i, 100, 200))
        sentences = [f"a picture number {i}.", f"picture {i} of a thing."]
        images.append({"filepath": folder, "filename": name, "cocoid": i + 1, "imgid": i, "split": split,
                       "sentids": [0, 1], "sentences": [{"raw": s, "tokens": s.split(), "imgid": i, "sentid": j}
                                                        for j, s in enumerate(sentences)]})
    (dl / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    _jpeg(coco / "train2017" / "000000033471.jpg", (200, 30, 30))
    turns = [{"from": "human", "value": "What colour is the picture?\n<image>"},
             {"from": "gpt", "value": "It is red."}]
    (dl / "llava_instruct_80k.json").write_text(
        json.dumps([{"id": "000000033471", "image": "000000033471.jpg", "conversations": turns}])
    )
    questions, annotations = [], []
    for i in (2, 4):
        qid = i * 1000
        questions.append({"image_id": i, "question": "What is it?", "question_id": qid})
        answers = ["a thing"] * 8 + ["thing", "object"]
        annotations.append({"question_id": qid, "image_id": i, "question_type": "what is", "answer_type": "other",
                            "multiple_choice_answer": "a thing",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(answers)]})
    (dl / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
         "data_subtype": "train2014", "questions": questions}))
    (dl / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(
        {"info": {}, "license": {}, "data_subtype": "train2014", "annotations": annotations}))
    _write_benchmark_downloads(dl)


def _write_benchmark_downloads(dl: Path) -> None:
    """The benchmarks' public files at the paths the README names (tests/benchmark_files.py writes them)."""
    import torch

    from tests import benchmark_files as bf

    path, images = bf.write_nocaps(dl / "nocaps")
    path.rename(dl / path.name)
    images.rename(dl / "nocaps" / "val")
    for src, subtype, folder in ((dl / "_okvqa", "val2014", "val2014"), (dl / "_testdev", "test-dev2015", "test2015")):
        q, a, images = bf.write_vqa_format(src, subtype=subtype, annotations=subtype == "val2014")
        for picture in images.iterdir():
            (dl / "coco" / folder).mkdir(parents=True, exist_ok=True)
            picture.rename(dl / "coco" / folder / picture.name)
        if a is not None:
            q.rename(dl / "OpenEnded_mscoco_val2014_questions.json")
            a.rename(dl / "mscoco_val2014_annotations.json")
        else:
            q.rename(dl / "v2_OpenEnded_mscoco_test-dev2015_questions.json")
        shutil.rmtree(src)
    bf.write_gqa(dl / "gqa")
    path, _ = bf.write_textvqa(dl / "textvqa")
    path.rename(dl / path.name)
    bf.write_mmbench(dl)
    path, _ = bf.write_coco_val2014(dl / "coco")
    (dl / "coco" / "annotations").mkdir()
    path.rename(dl / "coco" / "annotations" / path.name)
    # the FID Inception weights' file (its first layer only: enough for the config check, which stops
    # the run naming the `fid` extra where torch-fidelity is not installed)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, dl / "pt_inception-2015-12-05.pth")


def _has_torch_fidelity() -> bool:
    try:
        from easygen.metrics.pictures import require_torch_fidelity

        require_torch_fidelity()
        return True
    except ImportError:
        return False


def _fresh_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and not ignored), no data, no runs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    copy = _fresh_copy(tmp_path_factory.mktemp("readme") / "easygen")
    _write_pictures(copy)
    _write_downloads(copy)
    return copy


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASYGEN_", "PYTEST", "WANDB_API"))}
    env.update(EASYGEN_DEBUG="smoke", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def run_as_typed(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The command as a shell would run it (`python` is the interpreter running the tests)."""
    env = dict(env)
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # `VAR=value python ...`
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "python", f"README command does not start with python: {command}"
    return subprocess.run([sys.executable, *words[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _export_loads_in_plain_transformers(copy: Path, command: str) -> None:
    """The export's LLM is a plain transformers folder: AutoModelForCausalLM loads it and it generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = copy / shlex.split(command)[-1] / "llm"
    model = AutoModelForCausalLM.from_pretrained(str(llm), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(llm), local_files_only=True)
    ids = tok("a red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert not any("lora" in k for k in model.state_dict()), "LoRA adapters were not merged"


def _consolidated_is_one_file(copy: Path, command: str) -> None:
    """The consolidated checkpoint is one file holding the whole model's tensors (no DCP shards)."""
    import torch

    ckpt = torch.load(copy / shlex.split(command)[-1], map_location="cpu", weights_only=False)
    tensors = [v for v in ckpt["state_dict"].values() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 10 and ckpt["global_step"] > 0


# what a command's output must show beyond its exit code
AFTER = {
    "python -m easygen.stages.export": _export_loads_in_plain_transformers,
    "python -m easygen.stages.consolidate": _consolidated_is_one_file,
}


@pytest.mark.parametrize("command", TO_RUN)
def test_readme_command(command, workdir, capsys):
    t0 = time.time()
    proc = run_as_typed(command, workdir, _env())
    wall = time.time() - t0
    with capsys.disabled():
        print(f"\n[readme] rc={proc.returncode:<3d} {wall:6.1f} s  {command}", flush=True)
    tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-5000:])
    if " --cfg job" in command:
        # the composed config, printed without running: the recipe's stage settings are in it
        assert proc.returncode == 0, tail
        shown = yaml.safe_load(proc.stdout)
        stage = re.search(r"experiment=\w+/(\w+)", command)
        assert stage is None or shown["stage"]["name"] == stage.group(1), tail
    elif "task=coco_fid" in command and not _has_torch_fidelity():
        # FID from Inception weights needs the `fid` extra: one line naming it and the key
        assert proc.returncode == 2, tail
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors and "stage.inception=" in errors[0] and "pip install -e '.[fid]'" in errors[0], tail
        assert "Traceback" not in proc.stderr, tail
    elif NEEDS_WEIGHTS.search(command):
        assert proc.returncode == 2, tail
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors and "model.llm.path" in errors[0], tail
        assert "Traceback" not in proc.stderr, tail
    else:
        assert proc.returncode == 0, tail
    for prefix, check in AFTER.items():
        if command.startswith(prefix):
            check(workdir, command)
