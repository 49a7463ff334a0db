"""Screenshots of mos-studio's two pages for the README (docs/images/), on a demo run.

    .venv/bin/python scripts/studio_screenshots.py [demo-out]

Needs playwright (the test extra) and Debian's chromium.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from mos.client.studio import Studio, serve
from mos.common.processes import free_port

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    demo = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "demo-out")
    studio = Studio(demo / "server/models/v1", device="cpu", state_dir=demo / "server")
    server = serve(studio, port=free_port())
    url = f"http://127.0.0.1:{server.server_address[1]}"
    out = ROOT / "docs/images"
    out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or "chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#prompt", "a photo of a <checker> and a <halfmoon>")
        page.fill("#width", "64")
        page.dispatch_event("#width", "change")
        page.check("#native-views")
        page.fill("#view-overlap", "0")
        page.fill("#guidance", "4")
        page.fill("#grid", "4")
        box = page.locator("#canvas").bounding_box()
        assert box is not None
        for x0, x1 in ((0.0, 0.5), (0.5, 1.0)):
            page.mouse.move(box["x"] + (x0 + 0.01) * box["width"], box["y"] + 0.1 * box["height"])
            page.mouse.down()
            page.mouse.move(
                box["x"] + (x1 - 0.01) * box["width"], box["y"] + 0.9 * box["height"], steps=6
            )
            page.mouse.up()
        page.fill(".box-prompt >> nth=0", "a photo of a <checker>")
        page.fill(".box-prompt >> nth=1", "a photo of a <halfmoon>")
        page.click("#render")
        page.wait_for_function("document.getElementById('result').src.includes('/api/image/')")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "studio.png"), full_page=True)
        page.goto(f"{url}/federation")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "federation.png"), full_page=True)
        browser.close()
    server.shutdown()
    studio.wait()
    print(f"wrote {out / 'studio.png'} and {out / 'federation.png'}")


if __name__ == "__main__":
    main()
