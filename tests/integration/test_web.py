"""The web page in a real browser: headless Chromium (Debian's package, driven by Playwright) clicks through the
whole flow against `ppd serve` run as a subprocess on a free loopback port, as a person would.

The server runs with auth on (so the page must ask for the token) and an adapter whose user branch changes images.
Its example split does not exist at first: the page falls back to uploads (the endpoint's 404 message shown), the
test registers a user from uploaded pairs, then the real prepare job writes the split there and the page draws the
served world's pairs from it. The tests below run in file order as one person's session on one page.

Screenshots of each state go to a temporary folder; `PPD_WEB_SCREENSHOTS=docs pytest tests/integration/test_web.py`
refreshes the ones in docs/.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ppd.config import load_config
from ppd_ray.infra.processes import free_port, http_ok, start_process, wait_until
from tests.helpers import serve_load_script, solid_png

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "web-test-token-0123456789"
TOY_BASE = ROOT / "assets" / "toy_base"
HANDLE = re.compile(r"^u_[A-Za-z0-9_-]{32}$")
# Flags that keep Chromium quiet on a closed network (no update, sync or background connection attempts).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 4  # sampler steps: enough to tell images apart, short on 2 CPU cores
TIMEOUT_MS = 120_000


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:  # `make setup` installs it; try the same script once before giving up
        subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], check=False)
        found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is not installed and scripts/install_chromium.sh could not install it (needs apt-get)")
    return found


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory) -> Path:
    wanted = os.environ.get("PPD_WEB_SCREENSHOTS")
    folder = (ROOT / wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`ppd serve` (what a person runs) on a free port, auth on; yields (url, example split folder, log path)."""
    work = tmp_path_factory.mktemp("web")
    # On the toy base `ppd demo` trains on, so the page shows toy-world pictures; random adapter weights stand in
    # for a trained adapter (training one would take minutes), enough to make every user's images their own.
    adapter = serve_load_script().random_adapter(load_config("tiny_cpu"), work / "adapter", base_model=TOY_BASE)
    examples = work / "examples" / "validation"  # written later by the prepare job (see the module docstring)
    port = free_port()
    command = [
        sys.executable, "-m", "ppd_ray.cli.main", "serve", "--port", str(port),
        "--set", f"serve.adapter_dir={adapter}",
        "--set", f"serve.example_pairs_dir={examples}",
        "--set", "serve.auth=on",
        "--set", f"eval.inference_steps={STEPS}",
        "--set", "serve.generator.cpus=0.5",
    ]  # fmt: skip
    env = {**os.environ, "PPD_API_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, with a private token, as on a person's machine
    server = start_process(command, work / "serve.log", env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/healthz", timeout_s=5), timeout_s=300, what="ppd serve", process=server)
        yield url, examples, server.log_path
    finally:
        server.stop(timeout_s=60)  # SIGTERM: Ray's handler shuts down the local cluster it started


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    # Playwright gives every launch a fresh, temporary profile (user data dir); Chromium still keeps crash-report
    # and desktop settings under $HOME and the XDG folders: point those at a temporary folder too.
    home = tmp_path_factory.mktemp("chromium-home")
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
    }
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS, env=env)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def session(browser, server):
    """One page for the whole module, plus every URL it requested and every error it logged."""
    url, _, _ = server
    context = browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    problems: list[str] = []
    failed: list[tuple[int, str]] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on(
        "response", lambda response: failed.append((response.status, response.url)) if response.status >= 400 else None
    )
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.goto(f"{url}/")
    yield page, requests, problems, failed
    context.close()


# --- helpers on the page ---------------------------------------------------------------------------------------


def _row_sources(page, grid: str, row: str) -> list[str]:
    return page.eval_on_selector_all(f'#{grid} [data-row="{row}"] .cells img', "imgs => imgs.map(i => i.src)")


def _row_version(page, grid: str, row: str) -> int:
    value = page.get_attribute(f'#{grid} [data-row="{row}"]', "data-version")
    return int(value or 0)


def _wait_row(page, grid: str, row: str, after: int, label: str = "") -> list[str]:
    """The row's image sources once an answer newer than version `after` (whose label contains `label`: the
    settings it was generated with) is shown, every image decoded and no request for the row pending."""
    page.wait_for_function(
        """([grid, row, after, label]) => {
            const el = document.querySelector(`#${grid} [data-row="${row}"]`);
            return el && Number(el.dataset.version) > after && !el.hasAttribute("aria-busy")
                && el.querySelector(".row-label").textContent.includes(label)
                && [...el.querySelectorAll("img")].every(img => img.complete && img.naturalWidth > 0);
        }""",
        arg=[grid, row, after, label],
    )
    return _row_sources(page, grid, row)


def _pixels(source: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)  # [H, W, 3]


def _same(row: list[str], other: list[str]) -> bool:
    """Equal images seed by seed, up to a unit of round-off (the generator batches rows of concurrent requests, and
    a row's image may differ in the last float bits between batches: the API promises no more)."""
    return len(row) == len(other) and all(
        np.abs(_pixels(a) - _pixels(b)).max() <= 1 for a, b in zip(row, other, strict=True)
    )


def _differs(row: list[str], other: list[str]) -> bool:
    """Visibly different on every seed (mean absolute difference above 2 of 255), far beyond round-off."""
    return all(np.abs(_pixels(a) - _pixels(b)).mean() > 2 for a, b in zip(row, other, strict=True))


def _error_text(page) -> str:
    page.wait_for_selector("#error:not([hidden])")
    return page.inner_text("#error")


def _assert_error_hidden(page) -> None:
    assert page.is_hidden("#error"), page.inner_text("#error")


def _choose(page, pair: int, side: int, keyboard: bool = False) -> None:
    pick = f'.pair[data-index="{pair}"] .pick[data-side="{side}"]'
    if keyboard:
        page.focus(pick)
        page.keyboard.press("Enter")
    else:
        page.click(pick)
    assert page.get_attribute(pick, "aria-pressed") == "true"
    other = f'.pair[data-index="{pair}"] .pick[data-side="{1 - side}"]'
    assert page.get_attribute(other, "aria-pressed") == "false"


def _set_slider(page, selector: str, key: str) -> None:
    page.focus(selector)
    page.keyboard.press(key)  # Home / End / arrows: what a keyboard user does; fires the same input event


def _personalise(page) -> str:
    users_before = page.locator("#users li").count()
    page.click("#personalise")
    page.wait_for_function("n => document.querySelectorAll('#users li').length > n", arg=users_before)
    return page.locator("#users li .handle").nth(users_before).inner_text()


# --- the session ---------------------------------------------------------------------------------------------------


def test_page_comes_from_the_same_app_with_a_strict_content_policy(server):
    url, _, _ = server
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy  # scripts, styles, fonts: this server only
    for asset in ("/ui/app.js", "/ui/style.css"):
        assert asset in page.text and httpx.get(f"{url}{asset}").status_code == 200
    settings = httpx.get(f"{url}/ui/settings").json()
    assert settings["auth_required"] is True and settings["shots"] == 4


def test_a_wrong_token_shows_the_api_message(session, shots_dir):
    page, *_ = session
    page.wait_for_selector("#auth:not([hidden])")  # auth is on: the page asks for the token first
    assert page.locator(".pair img").count() == 0
    page.fill("#token", "not-the-token")
    page.press("#token", "Enter")
    assert _error_text(page) == "Authorization: missing or wrong bearer token"
    page.screenshot(path=str(shots_dir / "web-token-error.png"), full_page=True)


def test_without_example_pairs_the_page_takes_uploaded_pairs(session, server, smoke_config, tmp_path, shots_dir):
    page, *_ = session
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    page.wait_for_selector("#examples-note.warning")
    assert "no example pairs at" in page.inner_text("#examples-note")  # the endpoint's 404 message
    _assert_error_hidden(page)
    assert page.locator(".pair").count() == 4 and page.locator(".pair img").count() == 0

    size = smoke_config.data.toy.image_size
    dark, bright = tmp_path / "dark.png", tmp_path / "bright.png"
    dark.write_bytes(solid_png((30, 30, 60), size))
    bright.write_bytes(solid_png((230, 220, 160), size))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    for pair, caption in enumerate(["a picture of a teal ring", "a red square", "a blue circle", "a pink cross"]):
        page.fill(f"#pair-{pair}-caption", caption)
        for side, path in ((0, broken if pair == 0 else dark), (1, bright)):
            page.set_input_files(f'.pair[data-index="{pair}"] input.file[data-side="{side}"]', str(path))
        page.wait_for_selector(f'.pair[data-index="{pair}"] .pick[data-side="1"] img')
        _choose(page, pair, 1, keyboard=True)  # this user likes bright images
    page.click("#personalise")
    assert _error_text(page) == "pairs[0].image_0: is not a decodable image (UnidentifiedImageError)"
    page.screenshot(path=str(shots_dir / "web-api-error.png"), full_page=True)

    page.set_input_files('.pair[data-index="0"] input.file[data-side="0"]', str(dark))
    page.wait_for_function(
        "() => [...document.querySelectorAll('.pair img')].filter(i => i.complete && i.naturalWidth > 0).length === 8"
    )
    _choose(page, 0, 1)
    assert HANDLE.match(_personalise(page))
    _assert_error_hidden(page)


def test_example_pairs_render_and_a_click_marks_the_choice(
    ray_local, session, server, toy_world, smoke_config, shots_dir
):
    page, *_ = session
    _, examples, _ = server
    from ppd_ray.jobs.prepare import run as prepare

    prepare(smoke_config, toy_world / "pairs" / "population", examples.parent)  # the real job writes the split
    page.click("#other-examples")
    page.wait_for_selector("#examples-note:not(.warning)")  # the split is found now
    page.wait_for_function(
        "() => [...document.querySelectorAll('.pair img')].filter(i => i.complete && i.naturalWidth > 0).length === 8"
    )
    assert page.locator(".pair").count() == 4
    assert "from" in page.inner_text("#examples-note") and "validation" in page.inner_text("#examples-note")
    captions = [page.input_value(f"#pair-{i}-caption") for i in range(4)]
    assert all(captions) and len(set(captions)) == 4  # distinct captions first
    assert page.locator(".pick.chosen").count() == 0
    _choose(page, 0, 1)
    _choose(page, 0, 0)  # changing one's mind moves the mark
    assert page.inner_text('.pair[data-index="0"] .choice-label >> nth=0') == "A: preferred"
    for pair in range(1, 4):
        _choose(page, pair, 0, keyboard=pair == 3)
    assert page.locator(".pick.chosen").count() == 4
    page.locator("#taste").screenshot(path=str(shots_dir / "web-pairs.png"))


def test_personalising_returns_a_handle_and_shows_base_vs_personalised(session, shots_dir):
    page, *_ = session
    handle = _personalise(page)
    assert HANDLE.match(handle)
    assert page.locator("#users li").count() == 2
    assert "No profile text" in page.inner_text("#users li >> nth=1")  # pairdiff writes none, and the page says so
    assert page.input_value("#user-select") == handle
    base = _wait_row(page, "grid", "base", 0)
    personal = _wait_row(page, "grid", "user", 0)
    assert len(base) == len(personal) == 4
    assert len(set(base)) == 4  # four seeds, four images
    # The same seeds, another taste: every personalised image differs from the base image on its seed.
    assert _differs(personal, base)
    labels = page.eval_on_selector_all("#grid img", "imgs => imgs.map(i => i.alt)")
    assert all("seed" in label and ("Base model" in label or "User 2" in label) for label in labels)
    page.screenshot(path=str(shots_dir / "web-personalised.png"), full_page=True)
    page.locator("#generate-section").screenshot(path=str(shots_dir / "web-grid.png"))


def test_the_user_scale_slider_regenerates_live(session):
    page, *_ = session
    base = _row_sources(page, "grid", "base")
    at_default = _row_sources(page, "grid", "user")
    version = _row_version(page, "grid", "user")
    _set_slider(page, "#scale", "Home")
    at_zero = _wait_row(page, "grid", "user", version, "user scale 0.0")
    assert page.inner_text("#scale-value") == "0.0"
    assert _same(at_zero, base)  # s = 0 is the base model: taste switched off
    version = _row_version(page, "grid", "user")
    _set_slider(page, "#scale", "End")
    at_max = _wait_row(page, "grid", "user", version, "user scale 4.0")
    assert float(page.inner_text("#scale-value")) == float(page.get_attribute("#scale", "max")) == 4.0
    assert _differs(at_max, at_default) and _differs(at_max, base)
    version = _row_version(page, "grid", "user")
    _set_slider(page, "#scale", "Home")
    _set_slider(page, "#scale", "ArrowRight")
    for _ in range(9):
        page.keyboard.press("ArrowRight")
    back = _wait_row(page, "grid", "user", version, "user scale 1.0")
    assert _same(back, at_default)  # back at 1.0: the same images again


def test_users_with_different_choices_get_different_images(session):
    page, *_ = session
    second = _row_sources(page, "grid", "user")
    version = _row_version(page, "grid", "user")
    page.select_option("#user-select", label="User 1")  # preferred bright uploads; User 2 chose otherwise
    first = _wait_row(page, "grid", "user", version, "User 1 (")
    assert _differs(first, second)


def test_the_mix_slider_moves_between_two_users(session, shots_dir):
    page, *_ = session
    page.wait_for_selector("#mix-section:not([hidden])")
    assert page.input_value("#mix-a") != page.input_value("#mix-b")
    # Each user's own images at the current user scale (User 1 is selected since the previous test).
    users = {"User 1": _row_sources(page, "grid", "user")}
    version = _row_version(page, "grid", "user")
    page.select_option("#user-select", label="User 2")
    users["User 2"] = _wait_row(page, "grid", "user", version, "User 2 (")
    first = page.eval_on_selector("#mix-a", "s => s.options[s.selectedIndex].text")
    second = page.eval_on_selector("#mix-b", "s => s.options[s.selectedIndex].text")
    assert {first, second} == {"User 1", "User 2"}
    version = _row_version(page, "mix-grid", "mix")
    _set_slider(page, "#mix", "Home")
    all_first = _wait_row(page, "mix-grid", "mix", version, f"100% {first} + 0% {second}")
    assert _same(all_first, users[first])  # weights (1, 0): the first user's images
    version = _row_version(page, "mix-grid", "mix")
    _set_slider(page, "#mix", "End")
    assert _same(_wait_row(page, "mix-grid", "mix", version, f"0% {first} + 100% {second}"), users[second])
    version = _row_version(page, "mix-grid", "mix")
    for _ in range(5):
        page.keyboard.press("ArrowLeft")
    halfway = _wait_row(page, "mix-grid", "mix", version, f"50% {first} + 50% {second}")
    assert page.inner_text("#mix-value") == "0.5"
    assert _differs(halfway, users[first]) and _differs(halfway, users[second])
    page.screenshot(path=str(shots_dir / "web-mix.png"), full_page=True)


def test_an_image_downloads_as_the_png_shown(session):
    page, *_ = session
    shown = _row_sources(page, "grid", "base")[0]
    with page.expect_download() as download:
        page.click('#grid [data-row="base"] .download >> nth=0')
    saved = Path(download.value.path()).read_bytes()
    assert saved == base64.b64decode(shown.split(",", 1)[1])
    assert download.value.suggested_filename == "ppd-base-seed0.png"
    with Image.open(io.BytesIO(saved)) as image:
        assert image.format == "PNG"


def test_phone_width_has_no_sideways_scrolling(session, shots_dir):
    page, *_ = session
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(200)  # one layout pass
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    page.screenshot(path=str(shots_dir / "web-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1100, "height": 900})


def test_nothing_was_fetched_from_anywhere_else_and_nothing_broke(session, server):
    _, requests, problems, failed = session
    url, _, _ = server
    foreign = [r for r in requests if not r.startswith((url + "/", "data:", "blob:"))]
    assert not foreign, foreign
    # The only failed requests are the ones this session provoked on purpose, each shown on the page above.
    expected = {(401, "/v1/example-pairs"), (404, "/v1/example-pairs"), (422, "/v1/users")}
    assert {(status, httpx.URL(address).path) for status, address in failed} == expected
    # The browser logs each failed request as a console error; nothing else may have gone wrong.
    unexpected = [p for p in problems if "Failed to load resource" not in p]
    assert not unexpected, unexpected
