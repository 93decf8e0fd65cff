"""Make README's screenshot (docs/screenshot.png): the real stack, the shipped model, real images.

    python -m tools.screenshot [--data PATH]

Starts the whole system as `make run` does, uploads the first test image of each CIFAR-10 class
(the JPEG files themselves) plus one text file renamed .jpg, and photographs the results page
in Debian's chromium once every job is finished.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from shared.settings import REPO_ROOT
from tools.stack import free_port, stop, wait_ready
from training.data import SHARED_JPEG_ARCHIVE

OUT = REPO_ROOT / "docs" / "screenshot.png"


def first_test_image_per_class(archive: Path, folder: Path) -> list[Path]:
    picked: dict[str, Path] = {}
    with tarfile.open(archive) as tar:
        for member in sorted((m for m in tar if m.isfile() and "/test/" in f"/{m.name}"), key=lambda m: m.name):
            label = Path(member.name).parent.name
            if label not in picked:
                picked[label] = folder / f"{label}-{Path(member.name).name}"
                picked[label].write_bytes(tar.extractfile(member).read())
    return [picked[k] for k in sorted(picked)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED_JPEG_ARCHIVE)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cifar-svc-shot-"))
    paths = first_test_image_per_class(args.data, tmp)
    (tmp / "holiday-notes.jpg").write_text("this is text, not a picture")
    port = free_port()
    env = dict(os.environ, PORT=str(port), STORAGE_DIR=str(tmp / "store"), LOG_JSON="0")
    env.pop("REDIS_URL", None)
    stack = subprocess.Popen([sys.executable, "-m", "tools.stack"], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=90)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url + "/")
            page.set_input_files("#images", [str(x) for x in paths] + [str(tmp / "holiday-notes.jpg")])
            page.click("#submit")
            page.wait_for_url("**/batches/*")
            page.wait_for_selector("#downloads:not([hidden])", timeout=60_000)
            page.wait_for_timeout(600)  # the bars' width transition
            OUT.parent.mkdir(exist_ok=True)
            page.screenshot(path=OUT, full_page=True)
            browser.close()
        print(f"wrote {OUT.relative_to(REPO_ROOT)}")
        return 0
    finally:
        stop(stack, timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
