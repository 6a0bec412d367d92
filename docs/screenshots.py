"""Refresh docs/webui-*.png: each tab of `eqakit webui` on a finished demo, in headless Chromium.

    make demo                                    # runs/demo (or any demo dir)
    .venv/bin/python docs/screenshots.py runs/demo
    .venv/bin/python docs/screenshots.py runs/demo --out runs/demo/screenshots   # for its report.md

The page is started the way the README says (`eqakit webui DEMO/configs/infer.yaml`), so every
path it shows is the default it takes from that config. The OpenEQA tab asks the model its first
question; the Results tab opens the newest predict run. Needs Playwright's Python package and a
Chromium (Debian's /usr/bin/chromium by default).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
TABS = ("Chat", "OpenEQA", "Train", "Evaluate", "Results", "Export")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"eqakit webui exited with {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"eqakit webui did not answer at {url} within {seconds:.0f} s")


def shoot(url: str, chromium: str, out: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#model-status")
        page.wait_for_function("() => document.querySelector('#model-status').innerText.includes('loaded')")
        for tab in TABS:
            page.get_by_role("tab", name=tab).click()
            if tab == "Chat":
                box = page.locator("#chat-input textarea")
                box.fill("What is on the stool?")
                box.press("Enter")
                page.wait_for_timeout(4000)
            elif tab == "OpenEQA":
                page.locator("#eqa-open").click()
                page.wait_for_function("() => document.querySelectorAll('#eqa-frames img').length > 0")
                page.locator("#eqa-ask").click()
                page.wait_for_function(
                    "() => document.querySelector('#eqa-notice').innerText.includes('tokens/s')"
                )
            elif tab == "Results":
                page.locator("#res-open").click()
                page.wait_for_function("() => document.querySelector('#res-table').innerText.trim() !== ''")
            page.wait_for_timeout(1500)
            picture = out / f"webui-{tab.lower()}.png"
            page.screenshot(path=picture, full_page=True)
            print(f"wrote {picture}")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path, help="a finished `eqakit demo` directory")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the pictures go (default: docs/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.demo_dir / "configs" / "infer.yaml"
    port = free_port()
    eqakit = Path(sys.executable).with_name("eqakit")
    server = subprocess.Popen(
        [str(eqakit), "webui", str(config), "--port", str(port), "--allow-dir", str(args.demo_dir)]
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, server)
        shoot(url, args.chromium, args.out)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
