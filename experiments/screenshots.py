"""The README's screenshots of the web demo, taken with a trained model in headless Chromium.

    python experiments/screenshots.py --init-from logs/all/runs/tiny-synthetic-seed42/instruct/easygen/trained.safetensors

Starts `python -m easygen.serve` on a free port with that model, then, as a user would:
- `web_chat.png`: attaches a synthetic picture (a small blue square at the bottom on white), asks for a
  caption, then asks what colour the shape is;
- `web_draw.png`: asks in the chat for a drawing ("Draw a small red circle on the left on a black
  background.") and waits for BiDiffuser's picture in the conversation.
Each answer is printed. Needs Debian's `chromium` and `chromium-driver` (selenium drives them; nothing is
downloaded). Pictures are saved with a 64-colour palette (`--out`, default experiments/screenshots)."""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.synthetic import draw  # noqa: E402

PICTURE = {"shape": "square", "colour": "blue", "background": "white", "size": "small", "position": "bottom"}
CHAT = ("Describe the image concisely.", "What colour is the shape?")
DRAW = "Draw a small red circle on the left on a black background."


def start_server(init_from: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "EASYGEN_ROOT_DIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "easygen.serve", "--port", "0", f"init_from={init_from}",
                             f"hydra.run.dir={tmp}/run", "logger=none"], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("the server stopped before it listened")
        found = re.search(r"(http://[0-9.:]+)", line)
        if found:
            return proc, found.group(1)
    raise SystemExit("the server did not print its URL within 300 s")


def wait_idle(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    time.sleep(0.5)
    while time.time() < deadline:
        if httpx.get(url + "/health", timeout=10).json().get("pending") == 0:
            time.sleep(1.0)  # the page's last update
            return
        time.sleep(0.2)
    raise SystemExit("the answer did not finish")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", required=True, help="a trained model (easygen/trained.safetensors of a run)")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "screenshots"))
    args = parser.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="easygen-shots-") as tmp:
        tmp = Path(tmp)
        picture = tmp / "square.png"
        draw(PICTURE, 192, random.Random(0)).save(picture)
        proc, url = start_server(str(Path(args.init_from).resolve()), tmp)
        opts = Options()
        opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000",
                    f"--user-data-dir={tmp / 'profile'}"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        try:
            driver.get(url + "/")
            time.sleep(3)

            def send(text: str, file: Path | None = None) -> None:
                box = driver.find_element(By.CSS_SELECTOR, "#easygen-message")
                if file is not None:
                    box.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(file))
                    time.sleep(2)
                area = box.find_element(By.CSS_SELECTOR, "textarea")
                area.clear()
                area.send_keys(text)
                box.find_element(By.CSS_SELECTOR, "button.submit-button").click()
                wait_idle(url)
                bots = driver.find_elements(By.CSS_SELECTOR, "#easygen-chat [data-testid=bot]")
                print(f"{text!r} -> {bots[-1].text if bots else None!r}")

            def shot(name: str) -> None:
                path = tmp / f"{name}.png"
                driver.save_screenshot(str(path))
                with Image.open(path) as img:
                    img.convert("RGB").quantize(colors=64).save(out / f"{name}.png", optimize=True)
                print("wrote", out / f"{name}.png")

            send(CHAT[0], picture)
            send(CHAT[1])
            shot("web_chat")
            driver.find_element(By.CSS_SELECTOR, "#easygen-clear").click()
            time.sleep(1)
            send(DRAW)
            images = driver.find_elements(By.CSS_SELECTOR, "#easygen-chat [data-testid=bot] img")
            print(f"pictures in the conversation: {len(images)}")
            time.sleep(0.5)
            shot("web_draw")
        finally:
            driver.quit()
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
