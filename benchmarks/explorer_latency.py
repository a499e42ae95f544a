"""Click latency and page weight of the explorer, in headless Chromium.

Serves a built site (``patchatlas build`` or ``render`` output) on 127.0.0.1, opens one dataset's
explorer page with its default models, and clicks ``--clicks`` random patches of random gallery
images through the DevTools protocol (real mouse events, as a reader's). For each click the page
records (javascripts/explorer.js) the time its handler took to recompute and redraw every panel
(``update_ms``), and the time from the event to the next frame after it (``frame_ms``). The page
weight is what the browser fetched to show the default view: the page, its scripts and styles,
the explorer's index and layer files and the thumbnails (Resource Timing's encoded body sizes).

Run: ``python benchmarks/explorer_latency.py --out build [--dataset synthetic-scenes] [--json f]``.
Needs chromium and chromedriver (``make browser``) and selenium (the ``test`` extras).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import command_line, format_table, machine_info  # noqa: E402
from generator.errors import PatchAtlasError  # noqa: E402

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

_RESOURCES = """
const nav = performance.getEntriesByType('navigation')[0];
const entries = [nav, ...performance.getEntriesByType('resource')];
return entries.map(e => ({name: e.name, bytes: e.encodedBodySize || e.transferSize || 0, type: e.initiatorType}));
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = next((p for name in BROWSERS if (p := shutil.which(name))), None)
    chromedriver = shutil.which("chromedriver")
    if not browser or not chromedriver:
        raise PatchAtlasError("no chromium and chromedriver found: run `make browser` as root, or install them")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))


def _wait(chrome, script: str, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = chrome.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise PatchAtlasError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ready(chrome) -> None:
    _wait(chrome, "return !!(window.patchatlasExplorer && window.patchatlasExplorer.first());", "the explorer")
    state = chrome.execute_async_script("const done = arguments[arguments.length - 1];"
                                        "window.patchatlasExplorer.ready().then(() => done('ready'), e => done(String(e)));")
    if state != "ready":
        raise PatchAtlasError(f"the explorer did not load: {state}")


def _click(chrome, x: float, y: float) -> None:
    for kind in ("mousePressed", "mouseReleased"):
        chrome.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})


def _summary(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(array)), "p95": float(np.percentile(array, 95)), "max": float(array.max()),
            "n": int(array.size)}


def measure(site: Path, dataset: str, clicks: int, seed: int = 0) -> dict:
    page = site / "explorer" / dataset / "index.html"
    if not page.is_file():
        raise PatchAtlasError(f"{page}: no explorer page for {dataset!r}; build the site first (`patchatlas build`)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/explorer/{dataset}/"
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as profile:
        chrome = _driver(Path(profile))
        try:
            start = time.perf_counter()
            chrome.get(url)
            _ready(chrome)
            _wait(chrome, "return Array.from(document.images).every(i => i.complete);", "the images")
            load_s = time.perf_counter() - start
            resources = chrome.execute_script(_RESOURCES)
            explorer = chrome.execute_script("const e = window.patchatlasExplorer.first();"
                                             "return {models: e.selected, layer: e.layer, images: e.n};")
            # Clicks land on the tiles in the window (viewport coordinates), the panels scrolled to its top.
            # (below the theme's fixed header, which would take a click at the very top).
            chrome.execute_script("document.querySelector('.pa-panels').scrollIntoView({block: 'start'});"
                                  "window.scrollBy(0, -120);")
            time.sleep(0.3)
            tiles = chrome.execute_script(
                "return Array.from(document.querySelectorAll('.pa-panel .pa-tile'), t => {"
                "const r = t.getBoundingClientRect(); return [r.left, r.top, r.width, r.height];})"
                ".filter(r => r[1] >= 100 && r[1] + r[3] <= window.innerHeight);")
            if not tiles:
                raise PatchAtlasError("no explorer tile fits in the window: clicks would miss")
            for _ in range(clicks):
                left, top, width, height = tiles[rng.integers(len(tiles))]
                _click(chrome, left + rng.uniform(0.05, 0.95) * width, top + rng.uniform(0.05, 0.95) * height)
            timings = _wait(chrome, f"const t = window.patchatlasExplorer.first().timings;"
                                    f"return t.length >= {clicks} && t.every(x => x.frame_ms !== undefined) ? t : null;",
                            "the clicks' timings")
            errors = [e["message"] for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
        finally:
            chrome.quit()
            server.shutdown()
            server.server_close()
    by_kind: dict[str, int] = {}
    for r in resources:
        kind = ("explorer data" if "/assets/explorer/" in r["name"] else "thumbnails" if r["name"].endswith(".png")
                else "page" if r["type"] == "navigation" else "scripts and styles")
        by_kind[kind] = by_kind.get(kind, 0) + r["bytes"]
    return {
        "dataset": dataset, "models": explorer["models"], "layer": explorer["layer"], "images": explorer["images"],
        "clicks": len(timings), "tiles_clicked_from": len(tiles), "update_ms": _summary([t["update_ms"] for t in timings]),
        "frame_ms": _summary([t["frame_ms"] for t in timings]), "load_s": load_s,
        "page_weight_bytes": sum(by_kind.values()), "page_weight_by_kind": by_kind, "console_errors": errors,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build"), help="a built output folder (its site/)")
    parser.add_argument("--dataset", default="synthetic-scenes")
    parser.add_argument("--clicks", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = measure(args.out / "site", args.dataset, args.clicks)
    import selenium
    import torch

    report["machine"] = machine_info(torch.device("cpu"), command_line(__file__, argv), selenium=selenium.__version__)
    rows = [[name, f"{report[key]['median']:.2f}", f"{report[key]['p95']:.2f}", f"{report[key]['max']:.2f}"]
            for name, key in (("handler: recompute and redraw", "update_ms"), ("event to next frame", "frame_ms"))]
    print(f"{report['dataset']}: {len(report['models'])} models ({', '.join(report['models'])}), layer "
          f"{report['layer']}, {report['images']} images, {report['clicks']} clicks")
    print(format_table(["click latency (ms)", "median", "p95", "max"], rows))
    print(f"page weight: {report['page_weight_bytes']:,} B " +
          ", ".join(f"{k} {v:,}" for k, v in sorted(report["page_weight_by_kind"].items())))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
