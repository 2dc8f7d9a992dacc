"""The demo page: its functions on small models, then the page itself in
headless Chromium, every tab, inpainting with a mask drawn by the mouse.
`KD_DEMO_SCREENSHOTS=docs/images` also saves a picture of each tab."""

import os
import shutil
import socket
import time

import numpy as np
import pytest

from conftest import BACKEND
from conftest import cli_main
from conftest import tiny_model
from keras_diffusion import demo

pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")


@pytest.fixture(scope="module")
def conditional():
    return tiny_model(num_classes=3)  # 16x16x1, shown 16x larger


def _upscaled(image, scale=16):
    return (np.repeat(np.repeat(image, scale, 0), scale, 1) * 255).round().astype(np.uint8)


def test_generate_shows_a_grid_and_the_time(conditional):
    grid, line = demo.generate(conditional, labels="0, 2", num=4, steps=2, guidance=2.0)
    # four 16x16 tiles with 2-pixel borders, each pixel 16x16 on the page
    assert grid.shape == ((16 + 4) * 16, (4 * 18 + 2) * 16, 3) and grid.dtype == np.uint8
    assert line.startswith("4 images, dpmpp_2m, 2 steps: ") and line.endswith(" s")
    for kwargs, message in [
        (dict(labels="5"), "label"),
        (dict(prompt="a cat"), "this model takes no prompt: leave it empty and give labels."),
        (dict(num=0), "the number of images must be from 1 to 64; got 0."),
        (dict(steps=0), "steps must be a whole number from 1 to 1000; got 0."),
    ]:
        with pytest.raises(ValueError, match=message):
            demo.generate(conditional, **dict(dict(num=2, steps=2), **kwargs))
    with pytest.raises(ValueError, match="this model has no classes: leave the labels empty."):
        demo.generate(tiny_model(), labels="1", num=2, steps=2)


def test_inpaint_fills_only_the_painted_part(conditional):
    image = np.zeros((16, 16, 1), np.float32)
    image[4:12, 4:12] = 1.0
    background = np.repeat(_upscaled(image), 4, axis=-1)  # RGBA, as the editor sends it
    layer = np.zeros_like(background)
    layer[0:128, 0:128, 3] = 255  # the top-left quarter painted over
    grid, line = demo.inpaint(conditional, {"background": background, "layers": [layer]}, steps=3)
    assert line.startswith("RePaint, 3 steps: ")
    tiles = [grid[2 * 16:18 * 16, left * 16:(left + 16) * 16, 0] for left in (2, 20)]
    holed, filled = (tile[::16, ::16] / 255.0 for tile in tiles)
    assert np.all(holed[:8, :8] == pytest.approx(0.5, abs=0.003))  # the hole, shown grey
    known = np.ones((16, 16), bool)
    known[:8, :8] = False
    np.testing.assert_allclose(filled[known], image[..., 0][known], atol=1 / 255)

    with pytest.raises(ValueError, match="the mask is empty: paint over the part of the image"):
        demo.inpaint(conditional, {"background": background, "layers": [np.zeros_like(layer)]})
    with pytest.raises(ValueError, match="the image is 50x50 pixels; this model works on 16x16 "
                                         r"images \(or 256x256, as this page shows them\)."):
        demo.inpaint(conditional, {"background": np.zeros((50, 50, 4), np.uint8), "layers": []})
    with pytest.raises(ValueError, match="the image is missing: upload an image or pick one"):
        demo.inpaint(conditional, None)


def test_denoise_and_img2img_check_their_settings(conditional):
    image = _upscaled(np.full((16, 16, 1), 0.5, np.float32))[..., 0]  # greyscale upload
    grid, line = demo.denoise(conditional, image, sigma=0.2, steps=2)
    assert grid.shape[1] == (3 * 18 + 2) * 16  # noisy | denoised | clean
    assert line.startswith("sigma 0.200, 2 steps: ") and "dB noisy" in line
    grid, line = demo.denoise(conditional, image, sigma=0, steps=2)
    assert grid.shape[1] == (2 * 18 + 2) * 16 and "(estimated)" in line
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 1\] \(0: the image is noisy "
                                         r"already\); got 1.5."):
        demo.denoise(conditional, image, sigma=1.5)
    grid, line = demo.img2img(conditional, image, strength=0.5, steps=4, labels="1")
    assert grid.shape[1] == (2 * 18 + 2) * 16 and line.startswith("strength 0.5, 4 steps: ")
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]; got 0."):
        demo.img2img(conditional, image, strength=0)


def test_uploads_become_model_images(conditional):
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 255  # red, twice the model's size
    image = demo.to_model_image(colour, conditional)
    assert image.shape == (16, 16, 1)
    np.testing.assert_allclose(image, 0.299, atol=1e-6)
    with pytest.raises(ValueError, match="must be a greyscale or colour image; got an array of "
                                         r"shape \(16, 16, 2\)."):
        demo.to_model_image(np.zeros((16, 16, 2), np.uint8), conditional)


def test_the_demo_command_comes_up_offline_without_test_images(monkeypatch, capsys, tmp_path):
    """A newcomer's `keras-diffusion demo --model mnist_conditional`, offline
    and without --data-dir: the page is served without test images, and one
    warning says why."""
    import keras

    def no_network():
        raise OSError("name resolution failed")

    monkeypatch.delenv("KERAS_DIFFUSION_DATA_DIR", raising=False)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", no_network)
    served = {}
    monkeypatch.setattr(demo, "launch", lambda model, **kwargs: served.update(kwargs, model=model))
    with pytest.warns(UserWarning) as caught:
        assert cli_main("demo", "--model", "mnist_conditional") == 0
    messages = [str(w.message) for w in caught if "test images" in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("the demo page comes up without test images to pick: could not "
                                  "load 'mnist' from keras.datasets (OSError: name resolution failed)")
    assert messages[0].endswith("the inpaint, denoise and img2img tabs take uploads.")
    assert served["examples"] is None and served["model"].num_classes == 10
    assert "no test images" in capsys.readouterr().out
    # a data directory without the file, and a model whose dataset is unknown
    with pytest.warns(UserWarning, match=f"{tmp_path / 'mnist.npz'} not found"):
        assert demo.test_images("mnist_conditional", tmp_path) is None
    model_file = tmp_path / "model.keras"
    tiny_model().save(model_file)
    with pytest.warns(UserWarning, match=f"not known which built-in dataset {model_file} was"):
        assert demo.test_images(str(model_file)) is None


def test_the_page_without_test_images_asks_for_uploads(conditional):
    def page_text(examples):
        app = demo.build_app(conditional, examples=examples)
        return " ".join(str(block.value) for block in app.blocks.values()
                        if type(block).__name__ == "Markdown")

    upload = "No test images to pick here: upload an image in the inpaint, denoise and img2img tabs."
    assert upload in page_text(None)
    assert upload not in page_text(np.zeros((2, 16, 16, 1), np.float32))


# ------------------------------------------------------------ in a browser
def _chromium():
    """Paths of Chromium and its WebDriver: Debian's `chromium` and
    `chromium-driver`, which CI installs; elsewhere the test is skipped,
    but never in CI."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
    pytest.skip("headless Chromium is not installed (apt install chromium chromium-driver)")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _output_size(browser, elem_id):
    return browser.execute_script(
        f"const img = document.querySelector('#{elem_id} img');"
        "return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] "
        ": null;")


def _pick_example(browser, By):
    """Click the first test image shown in the open tab."""
    example = _wait(lambda: [element for element in browser.find_elements(
        By.CSS_SELECTOR, ".gallery-item, [data-testid='examples'] button, table.table tr td")
        if element.is_displayed()], "the examples")[0]
    example.click()


def _open_tab(browser, By, name):
    browser.find_element(By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']").click()


def _screenshot(browser, name):
    """With KD_DEMO_SCREENSHOTS=DIR, a picture of the page for the docs."""
    folder = os.environ.get("KD_DEMO_SCREENSHOTS")
    if folder:
        from PIL import Image

        path = os.path.join(folder, f"demo_{name}.png")
        browser.save_screenshot(path)
        page = np.asarray(Image.open(path).convert("L"))
        rows = np.flatnonzero(page.min(axis=1) < 250)  # down to the last row with content
        Image.open(path).crop((0, 0, page.shape[1], rows[-1] + 24)).save(path)


@pytest.mark.skipif(BACKEND != "torch", reason="the page is the same on every backend (its "
                                                "functions are tested on each); run under PyTorch")
def test_the_page_works_in_a_browser(data_dir):
    selenium = pytest.importorskip("selenium", reason="selenium is in the dev extra")
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By

    browser_path, driver_path = _chromium()
    import keras_diffusion as kd

    model = kd.load_model("mnist_conditional")
    port = _free_port()
    app = demo.launch(model, examples=demo.test_images("mnist_conditional", data_dir),
                      port=port, block=False)
    options = selenium.webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1280,1600", "--enable-unsafe-swiftshader"):
        options.add_argument(argument)
    browser = selenium.webdriver.Chrome(
        service=selenium.webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(lambda: browser.find_elements(By.ID, "generate-button"), "the page")
        browser.find_element(By.CSS_SELECTOR, "#generate-labels textarea").send_keys("3, 7")
        browser.find_element(By.ID, "generate-button").click()
        # eight 28x28 digits in a row, 2-pixel borders, each pixel 9x9 on the page
        assert _wait(lambda: _output_size(browser, "generate-output"), "samples") == [
            (8 * 30 + 2) * 9, 32 * 9]
        assert "8 images, dpmpp_2m, 20 steps: " in browser.find_element(
            By.ID, "generate-timing").text

        _screenshot(browser, "generate")

        _open_tab(browser, By, "Inpaint")
        _pick_example(browser, By)
        canvas = _wait(lambda: [element for element in browser.find_elements(
            By.CSS_SELECTOR, "#inpaint-editor canvas") if element.is_displayed()], "the canvas")[0]
        time.sleep(1)  # the example is drawn on the canvas
        strokes = ActionChains(browser).move_to_element_with_offset(canvas, -40, -40)
        strokes.click_and_hold()
        for _ in range(8):
            strokes.move_by_offset(10, 10)
        strokes.release().perform()
        browser.find_element(By.ID, "inpaint-button").click()
        # the image with its hole, then the result
        assert _wait(lambda: _output_size(browser, "inpaint-output"), "the inpainted image") == [
            (2 * 30 + 2) * 9, 32 * 9]
        assert "RePaint, 25 steps: " in browser.find_element(By.ID, "inpaint-timing").text
        _screenshot(browser, "inpaint")

        # noisy | denoised | clean, then image | result
        for tab, button, width, line in (("Denoise", "denoise", 3, "sigma 0.200, 10 steps: "),
                                         ("img2img", "img2img", 2, "strength 0.5, 50 steps: ")):
            _open_tab(browser, By, tab)
            _pick_example(browser, By)
            time.sleep(0.5)
            browser.find_element(By.ID, f"{button}-button").click()
            assert _wait(lambda: _output_size(browser, f"{button}-output"), tab) == [
                (width * 30 + 2) * 9, 32 * 9]
            assert line in browser.find_element(By.ID, f"{button}-timing").text
            _screenshot(browser, button)
    finally:
        browser.quit()
        app.close()


def test_the_demo_command_refuses_bad_arguments(capsys):
    for argv, message in ((["--model", "m.keras", "--port", "0"], "--port must be from 1 to 65535; got 0"),
                          (["--model", "missing.keras"], "model file not found: missing.keras")):
        assert cli_main("demo", *argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == f"keras-diffusion demo: error: {message}"
