"""The built site in a real browser: pages load cleanly, images show, links resolve, the lightbox opens.

A small site is built once (tiny models, a few synthetic scenes) and served over HTTP on
127.0.0.1; headless Chromium, driven by Selenium through chromedriver, then opens each page the
way a reader would. What a static check of the HTML cannot see is checked here: console errors
from the theme's scripts, images the browser fails to decode, links that 404 once resolved
against the page's URL, and the GLightbox overlay that galleries rely on.

Each page leaves a screenshot under ``$PATCHATLAS_TEST_ARTIFACTS`` (default: a temporary
folder, printed when the browser starts), so a CI run keeps a picture of every page.

The browser comes from the system: ``make install`` installs Debian's ``chromium`` and
``chromium-driver`` where it can. Without them the tests skip with the reason, except under CI
(``CI`` set), where a skipped browser test would hide a broken set-up, so they fail instead.
``PATCHATLAS_CHROMIUM`` and ``PATCHATLAS_CHROMEDRIVER`` point at another pair.
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import pytest
from PIL import Image

from generator.cli import main

from conftest import TINY_REGISTERS, offline_tiny_zoo, save_untrained_weights

# Larger than the gallery's 120 px display cap, so "opens full size" is a visible difference.
SIDE = 160
N_IMAGES = 3
MODEL_NAMES = ("tiny_random", "tiny_reg")
DATASET_NAMES = ("synthetic-scenes", "content-free")
GALLERY_PAGE_PREFIXES = ("datasets/", "models/", "positional-artifacts/")
MAIN_PAGES = ("", *(f"datasets/{d}/" for d in DATASET_NAMES), "positional-artifacts/",
              *(f"models/{m}/" for m in MODEL_NAMES), "methods/")

# Headless and quiet: without the background-networking switches Chromium keeps trying to
# reach update, sync and field-trial servers, which on a closed network only adds noise.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900",
)
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WAIT_S = 20
SCREENSHOT_MAX_HEIGHT = 8000


# --- finding a browser -------------------------------------------------------------------------

def _unavailable(reason: str):
    """Skip on a developer machine; fail under CI, where the browser tests must really run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (`make install` installs chromium and "
                    f"chromium-driver as root with apt-get)")
    pytest.skip(reason)


def _major_version(binary: str) -> int | None:
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\b(\d+)\.\d+\.\d+", result.stdout)
    return int(match.group(1)) if result.returncode == 0 and match else None


def _chromedriver_path() -> str | None:
    if os.environ.get("PATCHATLAS_CHROMEDRIVER"):
        return os.environ["PATCHATLAS_CHROMEDRIVER"]
    found = shutil.which("chromedriver")
    if found:
        return found
    # Where GitHub's hosted Ubuntu images keep theirs.
    runner_dir = os.environ.get("CHROMEWEBDRIVER")
    if runner_dir and Path(runner_dir, "chromedriver").is_file():
        return str(Path(runner_dir, "chromedriver"))
    return None


def find_browser_pair() -> tuple[str, str]:
    """``(browser, chromedriver)`` of the same major version, or ``LookupError`` saying why not.

    A machine can hold several Chromium-family browsers; chromedriver only drives the one whose
    major version it was built for, so the pair is matched by version rather than by name.
    """
    driver = _chromedriver_path()
    if not driver:
        raise LookupError("no chromedriver found (install Debian's chromium-driver, or set "
                          "PATCHATLAS_CHROMEDRIVER)")
    driver_major = _major_version(driver)
    if driver_major is None:
        raise LookupError(f"{driver} --version did not report a version")
    if os.environ.get("PATCHATLAS_CHROMIUM"):
        candidates = [os.environ["PATCHATLAS_CHROMIUM"]]
    else:
        candidates = [path for name in BROWSER_NAMES if (path := shutil.which(name))]
    versions = {path: _major_version(path) for path in candidates}
    for path, major in versions.items():
        if major == driver_major:
            return path, driver
    raise LookupError(f"no browser matching chromedriver {driver_major} ({driver}); found "
                      f"{versions or 'none of ' + ', '.join(BROWSER_NAMES)}")


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """A small built site: two tiny models (one from a local checkpoint) over both sources."""
    # Its own build, not conftest's shared tiny_builds: HTML, and 160 px images, so that a stored image is
    # wider than its gallery thumbnail (the lightbox test).
    mp = offline_tiny_zoo(tmp_path_factory)
    root = tmp_path_factory.mktemp("browser-build")
    ckpt = root / "tiny_reg.safetensors"
    save_untrained_weights(TINY_REGISTERS, ckpt, seed=3)
    out = root / "out"
    code = main(["build", "--out", str(out), "--models", ",".join(MODEL_NAMES), "--layers", "all",
                 "--source-option", f"n_images={N_IMAGES}", "--source-option", f"size={SIDE}",
                 "--weights", f"tiny_reg={ckpt}", "--k", "2,4", "--gallery-k", "4", "--linear-max-steps", "50",
                 "--batch-size", "3", "--device", "cpu", "--quiet"])
    mp.undo()
    assert code == 0, "patchatlas build failed; see the captured output"
    return out / "site"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # one line per request would drown the test output
        pass


@pytest.fixture(scope="module")
def base_url(site_dir):
    """``site_dir`` served on 127.0.0.1 at a free port for the module's duration."""
    handler = functools.partial(_QuietHandler, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def artifacts_dir(request, tmp_path_factory) -> Path:
    folder = Path(os.environ.get("PATCHATLAS_TEST_ARTIFACTS") or tmp_path_factory.mktemp("browser-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (it is in the `test` extras: `make install`)")
    try:
        browser, chromedriver = find_browser_pair()
    except LookupError as err:
        _unavailable(str(err))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    chrome.set_page_load_timeout(WAIT_S)
    yield chrome
    chrome.quit()


# --- page checks -------------------------------------------------------------------------------

_ALL_IMAGES_SETTLED = "return Array.from(document.images).every(img => img.complete);"
_BROKEN_IMAGES = """
return Array.from(document.images)
  .filter(img => !(img.complete && img.naturalWidth > 0))
  .map(img => img.currentSrc || img.src);
"""
# Lazy images in closed tabs or below the fold would not load until shown; a reader gets them
# eventually, so the check asks for them now.
_LOAD_LAZY_IMAGES = "document.querySelectorAll('img[loading=lazy]').forEach(img => { img.loading = 'eager'; });"
# Page titles and navigation labels are plain text: a backslash escape there is shown literally.
_NAVIGATION_TEXT = ("return [document.title, ...Array.from(document.querySelectorAll("
                    "'.md-nav__link, .md-header__topic, h1'), el => el.textContent.trim())];")
_MARKDOWN_ESCAPE = re.compile(r"\\[\\`*_{}\[\]()#+!|~]")
_LINK_TARGETS = "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);"


def _wait_until(chrome, script: str, what: str) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(chrome, WAIT_S).until(lambda d: d.execute_script(script))
    except TimeoutException:
        pytest.fail(f"{chrome.current_url}: timed out after {WAIT_S} s waiting for {what}")


def open_page(chrome, url: str) -> None:
    """Load ``url`` and wait until the document and every image on it have finished loading."""
    chrome.get_log("browser")  # drop what earlier pages logged
    chrome.get(url)
    _wait_until(chrome, "return document.readyState === 'complete';", "the page to load")
    chrome.execute_script(_LOAD_LAZY_IMAGES)
    _wait_until(chrome, _ALL_IMAGES_SETTLED, "its images")


def severe_console_messages(chrome) -> list[str]:
    return [entry["message"] for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]


def internal_links(chrome, base_url: str) -> set[str]:
    """Every same-origin link target on the current page, without its #fragment."""
    origin = urlsplit(base_url).netloc
    targets = set()
    for href in chrome.execute_script(_LINK_TARGETS):
        parts = urlsplit(href)
        if parts.scheme in ("http", "https") and parts.netloc == origin:
            targets.add(urlunsplit(parts._replace(fragment="")))
    return targets


_status_cache: dict[str, int] = {}


def http_status(url: str) -> int:
    if url not in _status_cache:
        try:
            with urllib.request.urlopen(url, timeout=WAIT_S) as response:
                _status_cache[url] = response.status
        except urllib.error.HTTPError as err:
            _status_cache[url] = err.code
    return _status_cache[url]


def save_full_page_screenshot(chrome, path: Path) -> None:
    """The whole page, not only the window, capped in height so a long gallery stays a sane PNG."""
    width, height = chrome.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];")
    shot = chrome.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": min(height, SCREENSHOT_MAX_HEIGHT), "scale": 1},
    })
    path.write_bytes(base64.b64decode(shot["data"]))


def _screenshot_name(page: str) -> str:
    return (page.strip("/").replace("/", "--") or "home") + ".png"


def check_page(chrome, base_url: str, page: str, artifacts: Path) -> None:
    """Load ``page`` and assert it renders cleanly; leaves a screenshot in ``artifacts``."""
    url = urljoin(base_url, page)
    open_page(chrome, url)
    save_full_page_screenshot(chrome, artifacts / _screenshot_name(page))
    assert chrome.title, f"{url}: page has no title"
    labels = chrome.execute_script(_NAVIGATION_TEXT)
    leaked = sorted({label for label in labels if _MARKDOWN_ESCAPE.search(label)})
    assert not leaked, f"{url}: Markdown escapes shown as text in titles or navigation: {leaked}"
    assert chrome.find_elements("css selector", "article.md-content__inner"), f"{url}: no page content rendered"
    if page.startswith(GALLERY_PAGE_PREFIXES):
        assert chrome.execute_script("return document.images.length;"), f"{url}: a gallery page without images"
    broken = chrome.execute_script(_BROKEN_IMAGES)
    assert not broken, f"{url}: {len(broken)} image(s) failed to load: {broken[:5]}"
    links = internal_links(chrome, base_url)
    assert links, f"{url}: no internal links (navigation missing?)"
    dead = sorted((link, status) for link in links if (status := http_status(link)) != 200)
    assert not dead, f"{url}: {len(dead)} internal link(s) do not resolve: {dead[:5]}"
    errors = severe_console_messages(chrome)
    assert not errors, f"{url}: console errors: {errors}"


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", MAIN_PAGES, ids=lambda p: p.strip("/") or "home")
def test_main_page_renders_cleanly(driver, base_url, artifacts_dir, page):
    check_page(driver, base_url, page, artifacts_dir)


def test_every_other_page_renders_cleanly(driver, base_url, site_dir, artifacts_dir):
    """Pages beyond the main ones (downloads, probe metrics, ...) are held to the same checks."""
    folders = [p.parent.relative_to(site_dir).as_posix() for p in site_dir.rglob("index.html")
               if "assets" not in p.relative_to(site_dir).parts]
    pages = {"" if folder == "." else folder + "/" for folder in folders}
    assert set(MAIN_PAGES) <= pages, f"main pages not built: {sorted(set(MAIN_PAGES) - pages)}"
    others = sorted(pages - set(MAIN_PAGES))
    assert others, "expected pages beyond the main ones (downloads, probe metrics)"
    for page in others:
        check_page(driver, base_url, page, artifacts_dir)


def test_gallery_image_opens_full_size_in_the_lightbox(driver, base_url, site_dir, artifacts_dir):
    from selenium.webdriver.common.by import By

    page = "datasets/synthetic-scenes/"
    open_page(driver, urljoin(base_url, page))
    thumbs = [a for a in driver.find_elements(By.CSS_SELECTOR, "a.glightbox")
              if "/full/" in (a.get_attribute("href") or "") and a.is_displayed()]
    assert thumbs, "no visible gallery image links (a.glightbox → assets/<dataset>/full/) on the dataset page"
    link = thumbs[0]
    target = link.get_attribute("href")
    thumb_width = link.find_element(By.TAG_NAME, "img").rect["width"]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", link)
    link.click()

    # The overlay is position: fixed, so visibility is judged by its box and style, not offsetParent.
    _wait_until(driver, "const box = document.querySelector('#glightbox-body, .glightbox-container');"
                        "if (!box) return false; const style = getComputedStyle(box), rect = box.getBoundingClientRect();"
                        "return style.display !== 'none' && style.visibility !== 'hidden' && rect.width > 0;",
                "the lightbox to open")
    slide_image = "document.querySelector('.gslide.current img')"
    _wait_until(driver, f"const img = {slide_image}; return !!img && img.complete && img.naturalWidth > 0;",
                "the lightbox image to load")
    # The slide zooms in from the thumbnail; measure once its size has stopped changing.
    measure = (f"const img = {slide_image}; const box = img.getBoundingClientRect();"
               "return {src: img.currentSrc || img.src, natural: img.naturalWidth, width: box.width};")
    shown, deadline = driver.execute_script(measure), time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.25)
        previous, shown = shown, driver.execute_script(measure)
        if shown == previous:
            break
    driver.save_screenshot(str(artifacts_dir / "lightbox.png"))  # the window: the overlay is fixed to it
    assert severe_console_messages(driver) == []

    assert shown["src"] == target, "the lightbox shows a different image than the one clicked"
    file_width, _ = Image.open(site_dir / unquote(urlsplit(target).path).lstrip("/")).size
    assert shown["natural"] == file_width
    # Full size: at least the stored image's own width (it fits the window; GLightbox may enlarge
    # small images), so wider than the thumbnail it was opened from.
    assert file_width > thumb_width, "test set-up: the stored image should be wider than the gallery thumbnail"
    assert shown["width"] >= file_width - 1, f"lightbox shows {shown['width']} px of a {file_width} px image"


_BOX = ("const el = arguments[0]; const r = el.getBoundingClientRect(); const s = getComputedStyle(el);"
        "return {width: r.width, height: r.height, visible: s.display !== 'none' && s.visibility !== 'hidden'"
        " && parseFloat(s.opacity) > 0};")


def _shown(chrome, element) -> bool:
    box = chrome.execute_script(_BOX, element)
    return box["visible"] and box["width"] > 0 and box["height"] > 0


@pytest.mark.parametrize("scheme", ("light", "dark"))
@pytest.mark.parametrize("page", ("", "datasets/synthetic-scenes/"), ids=("home", "dataset"))
def test_reference_rows_and_strip_show_in_both_themes(driver, base_url, artifacts_dir, page, scheme):
    """The home page's strip and the reference rows are on screen, in the light and the dark theme."""
    from selenium.webdriver.common.by import By

    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
    try:
        # The theme remembers the palette of an earlier page; a reader new to the site gets the system's.
        open_page(driver, urljoin(base_url, page))
        driver.execute_script("localStorage.clear(); sessionStorage.clear();")
        open_page(driver, urljoin(base_url, page))
        expected = "slate" if scheme == "dark" else "default"
        assert driver.execute_script("return document.body.getAttribute('data-md-color-scheme');") == expected
        save_full_page_screenshot(driver, artifacts_dir / _screenshot_name(page).replace(".png", f"-{scheme}.png"))
        if page == "":
            strips = driver.find_elements(By.CSS_SELECTOR, "article .gallery-strip")
            assert strips and _shown(driver, strips[0]), "the home page's gallery strip is not displayed"
            images = strips[0].find_elements(By.TAG_NAME, "img")
            assert images and all(_shown(driver, img) for img in images)
        # tablesort-init.js gives reference rows their class; they must be on screen, muted.
        rows = [row for row in driver.find_elements(By.CSS_SELECTOR, "article tr.reference-row") if _shown(driver, row)]
        assert rows, f"{page or 'home'}: no visible reference row"
        colours = driver.execute_script(
            "const row = arguments[0]; "
            "const model = row.parentElement.querySelector('tr:not(.reference-row):not(.reference-divider)');"
            "return [getComputedStyle(row).color, model ? getComputedStyle(model).color : null];", rows[0])
        assert colours[1] is None or colours[0] != colours[1], "reference rows are not set apart from the models"
        # Sorting a column, either way, never lifts a reference row above a model.
        table = rows[0].find_element(By.XPATH, "./ancestor::table")
        header = table.find_elements(By.CSS_SELECTOR, "thead th")[2]
        for _ in range(2):
            header.click()
            kinds = driver.execute_script(
                "return Array.from(arguments[0].tBodies[0].rows, r => r.classList.contains('reference-row') ? 'ref'"
                " : r.classList.contains('reference-divider') ? 'divider' : 'model');", table)
            assert "divider" in kinds and kinds == sorted(kinds, key=("model", "divider", "ref").index), kinds
        assert severe_console_messages(driver) == []
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
