"""`carvana serve`'s page as a person uses it, in headless Chromium at a desktop's 1400 px and a phone's
390 px: the picture choices reach the server, and the cutout with its download link fits the window."""

from __future__ import annotations

import io
import shutil
import urllib.parse
import urllib.request

import numpy as np
import pytest
from helpers import NEEDS_CHROMIUM, call, chromium, photos_of, running
from PIL import Image

PIXELS = """const img = arguments[0], canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const g = canvas.getContext("2d"); g.drawImage(img, 0, 0);
return Array.from(g.getImageData(arguments[1], arguments[2], 1, 1).data);"""  # one pixel's RGBA
INSIDE = """const r = arguments[0].getBoundingClientRect();
return r.left >= 0 && r.right <= window.innerWidth + 0.5 && r.width > 0;"""


@NEEDS_CHROMIUM
@pytest.mark.parametrize("width", [1400, 390])
def test_the_page_offers_the_picture_choices_and_fits_the_window(tiny_run, tmp_path, width):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    photo = tmp_path / "a-car-photo-with-a-rather-long-file-name-from-a-phone.jpg"
    shutil.copy(photos_of(tiny_run)[0], photo)
    cfg = tiny_run.updated({"serve.max_wait_ms": 0})
    with running(cfg) as (url, _), chromium(width, 844) as browser:
        browser.get(url + "/")
        for shown, (output, colour) in enumerate((("rgba", None), ("composite", "#00ff00")), 1):
            Select(browser.find_element(By.ID, "output")).select_by_value(output)
            if colour:
                browser.execute_script(
                    "arguments[0].value = arguments[1]", browser.find_element(By.ID, "background"), colour
                )
            browser.find_element(By.ID, "pick").send_keys(str(photo))
            WebDriverWait(browser, 120).until(
                lambda b, n=shown: len(b.find_elements(By.CSS_SELECTOR, "img.checker")) == n
            )
            result = browser.find_elements(By.CSS_SELECTOR, "img.checker")[0]  # the newest row comes first
            WebDriverWait(browser, 30).until(
                lambda b, img=result: b.execute_script("return arguments[0].complete", img)
            )
            link = browser.find_elements(By.PARTIAL_LINK_TEXT, "download a-car-photo")[0]
            assert browser.execute_script(INSIDE, result) and browser.execute_script(INSIDE, link), (output, width)
            # the page asked for what its choices say: its picture is the server's answer to that query
            query = urllib.parse.urlencode({"output": output, "background": colour or "#ffffff"})
            status, _, answer = call(f"{url}/v1/cutout?{query}", photo.read_bytes(), "image/jpeg")
            assert status == 200, answer
            direct = np.asarray(Image.open(io.BytesIO(answer)).convert("RGBA"))
            ys, xs = np.nonzero(direct[..., 3] == 255)  # the car (every pixel of a composite)
            for x, y in ((0, 0), (xs[len(xs) // 2], ys[len(ys) // 2]), (1917, 1279)):
                pixel = browser.execute_script(PIXELS, result, int(x), int(y))
                # a canvas keeps no colour under alpha 0: there the alpha alone
                expected = direct[y, x].tolist() if direct[y, x, 3] else [0, 0, 0, 0]
                assert pixel == expected, (output, x, y)
            assert direct[0, 0, 3] == 0 or output == "composite"  # the page showed background and car
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )  # no sideways scroll
