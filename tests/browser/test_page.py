"""The page in a real browser (Debian's chromium, driven by Playwright) against the running service.

Screenshots of each state go to test-output/screenshots/; the assertions check the layout
(elements visible, inside the viewport, not overlapping) as well as the content.
"""

import os
import shutil

import pytest

from tests.helpers import OUTPUT_DIR, image_bytes, noise_png, post_images, require

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = OUTPUT_DIR / "screenshots"
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    require(os.path.exists(CHROMIUM), "chromium", "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    # No script errors, no CSP violations. (A 4xx answer from the API is logged by the browser
    # as a failed resource: that is the page working, e.g. reporting a refused file.)
    assert not [e for e in errors if "the server responded with a status of 4" not in e], errors


def files(tmp_path, items):
    paths = []
    for name, data in items:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    return paths


def inside_viewport(page, selector):
    box = page.locator(selector).first.bounding_box()
    width = page.viewport_size["width"]
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 1


def test_upload_files_and_watch_results_arrive(url_stack, page, tmp_path):
    stack, _ = url_stack
    page.goto(stack.url + "/")
    page.screenshot(path=SHOTS / "1-empty.png", full_page=True)
    names = ["=1+2.png"] + [f"photo{i}.png" for i in range(1, 4)]  # a name a spreadsheet would run as a formula
    items = [(n, noise_png(i)) for i, n in enumerate(names)] + [("notes.jpg", b"this is text, not a picture")]
    page.set_input_files("#images", files(tmp_path, items))
    assert page.locator("#previews li").count() == 5  # previews before submitting
    page.screenshot(path=SHOTS / "2-selected.png", full_page=True)
    page.click("#submit")
    page.wait_for_url("**/batches/*")
    page.wait_for_selector("#downloads:not([hidden])", timeout=60_000)
    page.wait_for_timeout(500)  # let the bars finish their width transition
    page.screenshot(path=SHOTS / "3-results.png", full_page=True)
    track = page.locator("#progress").bounding_box()["width"]
    assert abs(page.locator("#bar-done").bounding_box()["width"] / track - 0.8) < 0.02
    assert abs(page.locator("#bar-failed").bounding_box()["width"] / track - 0.2) < 0.02
    # Each prediction row: the label and its percentage on one line, the bar below, inside the card.
    row = page.locator(".card.done .pred.best").first
    label, bar = row.locator(".label").bounding_box(), row.locator(".track").bounding_box()
    assert bar["y"] >= label["y"] + label["height"] - 1 and bar["width"] > 100

    assert "4 done, 1 failed" in page.inner_text("#status-line")
    cards = page.locator(".card")
    assert cards.count() == 5
    done = page.locator(".card.done")
    assert done.count() == 4 and done.first.locator(".pred").count() == 3
    assert "%" in done.first.locator(".pred").first.inner_text()
    bad = page.locator(".card.failed")
    assert "not an image" in bad.inner_text()
    assert page.locator("#share-link").input_value() == page.url
    # Layout: the grid is inside the page, cards do not overlap.
    boxes = [cards.nth(i).bounding_box() for i in range(cards.count())]
    for a in boxes:
        for b in boxes:
            if a is not b:
                assert (
                    a["x"] + a["width"] <= b["x"] + 1
                    or b["x"] + b["width"] <= a["x"] + 1
                    or a["y"] + a["height"] <= b["y"] + 1
                    or b["y"] + b["height"] <= a["y"] + 1
                )
    assert inside_viewport(page, ".results")
    # Downloads: CSV and JSON of the batch.
    with page.expect_download() as dl:
        page.click("#dl-csv")
    csv_text = open(dl.value.path()).read()
    assert csv_text.startswith('"source","status"') and csv_text.count("\n") == 4 * 3 + 1
    assert '"\'=1+2.png"' in csv_text and '"=1+2.png"' not in csv_text  # escaped, not a formula


def test_paste_urls(url_stack, page):
    stack, images = url_stack
    page.goto(stack.url + "/")
    page.fill("#urls", "\n".join(images.url(i) for i in range(3)) + "\nftp://nope/x.jpg")
    page.select_option("#top_k", "2")
    page.click("#submit")
    page.wait_for_selector("#downloads:not([hidden])", timeout=60_000)
    page.screenshot(path=SHOTS / "4-urls.png", full_page=True)
    assert page.locator(".card.done").count() == 3
    assert page.locator(".card.done").first.locator(".pred").count() == 2
    assert "http and https" in page.locator(".card.failed").inner_text()


def test_the_cancel_button_stops_an_unfinished_batch(stack_factory, page):
    stack = stack_factory()  # no worker: the batch stays unfinished until cancelled
    batch = post_images(stack, [(f"{i}.png", noise_png(i)) for i in range(3)]).json()
    page.goto(f"{stack.url}/batches/{batch['batch_id']}")
    page.click("#cancel")
    page.wait_for_function("document.querySelectorAll('.card.cancelled').length === 3", timeout=30_000)
    assert "3 cancelled" in page.locator("#status-line").inner_text()
    assert page.locator("#cancel").is_hidden()  # nothing left to cancel


def test_a_single_bad_file_shows_the_error_on_the_form(url_stack, page, tmp_path):
    stack, _ = url_stack
    page.goto(stack.url + "/")
    page.set_input_files("#images", files(tmp_path, [("cat.jpg", b"<html>nope</html>")]))
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "not an image" in page.inner_text("#form-error")
    page.screenshot(path=SHOTS / "5-form-error.png", full_page=True)


def test_phone_width_and_keyboard(url_stack, browser, tmp_path):
    stack, _ = url_stack
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(stack.url + "/")
        # Keyboard only: Tab reaches the file picker, then the URL box, the top-k choice, the button.
        order = []
        while "submit" not in order and len(order) < 10:
            page.keyboard.press("Tab")
            order.append(page.evaluate("document.activeElement.id"))
        assert [i for i in order if i in ("images", "urls", "top_k", "submit")] == ["images", "urls", "top_k", "submit"]
        focus_ring = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert focus_ring != "none"  # the focused button shows it
        for sel in ("#dropzone", "#urls", "#submit"):
            assert inside_viewport(page, sel), sel
        assert page.evaluate("document.documentElement.scrollWidth") <= 391  # no sideways scrolling
        page.screenshot(path=SHOTS / "6-phone-form.png", full_page=True)
        # Real photo file names are long: they must not push the probabilities off the screen.
        long_names = ["in1k_n03770679_minivan.jpg", "IMG_20261201_093512_HDR_portrait_parking_lot_by_the_sea.jpg"]
        page.set_input_files(
            "#images", files(tmp_path, [(long_names[0], image_bytes("JPEG")), (long_names[1], noise_png(1))])
        )
        page.fill("#urls", "")
        page.focus("#submit")
        page.keyboard.press("Enter")  # the focused button submits
        page.wait_for_selector("#downloads:not([hidden])", timeout=60_000)
        assert page.evaluate("document.documentElement.scrollWidth") <= 391
        for card in range(2):  # every probability on screen
            assert inside_viewport(page, f".card.done >> nth={card} >> .pred >> nth=0")
        # This test's model is never sure: the answer says so.
        assert page.locator(".card.done .unsure").count() == 2
        assert page.locator(".card.done .unsure").first.inner_text() == "Not sure"
        page.screenshot(path=SHOTS / "7-phone-results.png", full_page=True)
    finally:
        context.close()
