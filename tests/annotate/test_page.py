"""The annotation page in a real headless Chromium (Debian's package, driven by Playwright): a box gives a
mask, a click changes it, saving writes it, and a reload shows what was saved."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images, write_three_blobs
from PIL import Image

from sam4med.annotate.server import create_app
from sam4med.annotate.session import AnnotationSession
from sam4med.engine.metrics import dice

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("SAM4MED_SCREENSHOT")  # where to keep the page's picture (the README's)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@contextmanager
def serving(session: AnnotationSession) -> Iterator[str]:
    """The app on a free local port in a thread, stopped (and the session's prefetch finished) afterwards."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(session), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        session.wait_for_prefetch()


def page_point(page, x: float, y: float) -> tuple[float, float]:
    """Where image pixel (x, y) is on the screen, from the overlay canvas's place and size."""
    rect = page.eval_on_selector("#overlay", "c => { const r = c.getBoundingClientRect(); "
                                             "return [r.left, r.top, r.width / c.width, r.height / c.height]; }")
    return rect[0] + (x + 0.5) * rect[2], rect[1] + (y + 0.5) * rect[3]


def draw_box(page, truth: np.ndarray) -> list[int]:
    """Drag the box tool over the true object's box; the objects' areas once the mask has come back."""
    ys, xs = np.nonzero(truth)
    page.mouse.move(*page_point(page, xs.min(), ys.min()))
    page.mouse.down()
    page.mouse.move(*page_point(page, xs.max(), ys.max()), steps=5)
    page.mouse.up()
    page.wait_for_function("document.querySelectorAll('#objects .area').length === 1 && "
                           "Number(document.querySelector('#objects .area').dataset.area) > 0", timeout=30_000)
    return object_areas(page)


def object_areas(page) -> list[int]:
    return [int(a) for a in page.eval_on_selector_all("#objects .area", "items => items.map(i => i.dataset.area)")]


def test_box_click_save_and_reload_in_a_real_browser(browser, tmp_path, click_model):
    truths = write_images(tmp_path / "scans", count=2)
    with serving(AnnotationSession(tmp_path / "scans", click_model, correction="global")) as url:
        check_the_page(browser, url, truths["case0"], tmp_path / "scans", screenshot=SCREENSHOT)
        assert "1 / 2 annotated" in page_text(browser, url)


def test_a_real_polyp_in_a_real_browser(browser, tmp_path, click_model, shared_data):
    """Kvasir-SEG (seen in LiteMedSAM's training): the largest polyp of the first image, boxed on the page."""
    from sam4med.engine.imageio import read_mask
    from sam4med.engine.objects import connected_components

    source = shared_data / "kvasir_seg"
    first = sorted((source / "images").iterdir())[0]
    (tmp_path / "polyps").mkdir()
    shutil.copy(first, tmp_path / "polyps" / first.name)
    labels = connected_components(read_mask(next((source / "masks").glob(first.stem + ".*"))))
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    with serving(AnnotationSession(tmp_path / "polyps", click_model, correction="global")) as url:
        check_the_page(browser, url, labels == largest, tmp_path / "polyps", first.stem)


def check_the_page(browser, url: str, truth: np.ndarray, folder: Path, image_id: str = "case0",
                   screenshot: str | None = None) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("#stage[data-ready='0']", timeout=60_000)
    assert page.inner_text("#progress-text").startswith("0 / ")

    ys, xs = np.nonzero(truth)
    [boxed] = draw_box(page, truth)

    page.keyboard.press("n")  # negative click tool (the sessions correct globally, so the mask changes at once)
    page.mouse.click(*page_point(page, xs.mean(), ys.mean()))
    page.wait_for_function(f"Number(document.querySelector('#objects .area').dataset.area) !== {boxed}", timeout=30_000)
    [clicked] = object_areas(page)
    assert clicked != boxed

    page.keyboard.press("Control+z")  # back to the box's mask, and save it
    assert object_areas(page) == [boxed]
    page.keyboard.press("s")
    page.wait_for_selector("#stage[data-saved='0']", timeout=30_000)
    saved = np.asarray(Image.open(folder / "masks" / f"{image_id}.png")) > 0
    assert dice(saved, truth) >= 0.9 and int(saved.sum()) == boxed
    assert page.inner_text("#progress-text").startswith("1 / ")
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=screenshot)

    page.reload()
    page.wait_for_selector("#stage[data-ready='0']", timeout=60_000)
    assert object_areas(page) == [boxed]  # what was saved comes back
    page.keyboard.press("o")  # a second object, painted with the brush
    page.keyboard.press("r")
    page.mouse.move(*page_point(page, 5, 5))
    page.mouse.down()
    page.mouse.move(*page_point(page, 25, 5), steps=5)
    page.mouse.up()
    areas = object_areas(page)
    assert len(areas) == 2 and areas[0] == boxed and areas[1] > 20
    assert page.evaluate("fetch('/api/images/../../etc/passwd').then(r => r.status)") == 404
    assert page.evaluate("fetch('/static/..%2f..%2f__init__.py').then(r => r.status)") == 404
    assert not errors, errors
    page.close()


def page_text(browser, url: str) -> str:
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#stage[data-ready='0']", timeout=60_000)
    text = page.inner_text("#progress-text")
    page.close()
    return text


def test_everything_fills_the_page_and_a_click_selects_one_in_a_real_browser(browser, tmp_path, click_model):
    """Three objects: one boxed by hand, then Everything (A) adds the two others, a click with the box tool selects
    one of them, and saving writes the three as one label image."""
    truths = write_three_blobs(tmp_path / "blobs")
    with serving(AnnotationSession(tmp_path / "blobs", click_model, prefetch=False)) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_selector("#stage[data-ready='0']", timeout=60_000)
        [boxed] = draw_box(page, truths[0])
        page.keyboard.press("a")
        page.wait_for_selector("#stage[data-found='2']", timeout=120_000)
        areas = object_areas(page)
        assert areas[0] == boxed and len(areas) == 3 and min(areas) > 0
        ys, xs = np.nonzero(truths[2])
        page.mouse.click(*page_point(page, xs.mean(), ys.mean()))  # the box tool, no drag: selects the object there
        selected = page.eval_on_selector_all("#objects li",
                                             "items => items.findIndex(i => i.classList.contains('selected'))")
        page.keyboard.press("s")
        page.wait_for_selector("#stage[data-saved='0']", timeout=30_000)
        labels = np.asarray(Image.open(tmp_path / "blobs" / "masks" / "a.png"))
        scores = [max(dice(labels == value, truth) for value in np.unique(labels) if value) for truth in truths]
        assert min(scores) >= 0.9, scores
        assert dice(labels == selected + 1, truths[2]) >= 0.9  # the object clicked is the one selected
        assert not errors, errors
        page.close()


def test_a_volume_slice_boxed_and_propagated_in_a_real_browser(browser, tmp_path, click_model):
    import SimpleITK as sitk

    from conftest import write_disc_volume

    truth = write_disc_volume(tmp_path / "scan" / "disc.nrrd")
    with serving(AnnotationSession(tmp_path / "scan" / "disc.nrrd", click_model)) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(url)
        page.wait_for_selector("#stage[data-ready='0']", timeout=60_000)
        page.click("#image-list li:nth-child(6)")  # slice 5
        page.wait_for_selector("#stage[data-ready='5']", timeout=60_000)
        draw_box(page, truth[5])
        page.fill("#first-slice", "2")
        page.fill("#last-slice", "9")
        page.click("#propagate")
        page.wait_for_selector("#stage[data-propagated='5']", timeout=120_000)
        assert page.inner_text("#progress-text").startswith("8 / 12")
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scan" / "masks" / "disc.nii.gz"))) > 0
        assert dice(labels, truth) >= 0.9
        page.click("#image-list li:nth-child(4)")  # slice 3 shows the propagated mask
        page.wait_for_selector("#stage[data-ready='3']", timeout=60_000)
        assert object_areas(page) == [int(labels[3].sum())]
        page.close()
