"""spade_jax.serve's page in headless Chromium: paint, synthesize, look; a VAE
model's "New sample" and style image.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium,
/usr/bin/chromedriver) and selenium (the `test` extra); .ci/run installs
them. The screenshot goes to $SPADE_TEST_ARTIFACTS (default tests/artifacts/,
ignored by git).
"""
import base64
import io
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image
import pytest

from export_test import tiny_config
from serve_test import RunningServer
from serve_test import assert_close
from serve_test import decode_png
from serve_test import expected_image
from serve_test import png
from serve_test import post
from spade_jax import serve_app
from synthesize_test import blocky_label
from synthesize_test import pil_nearest
from synthesize_test import save_model

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
ARTIFACTS = pathlib.Path(os.environ.get(
    'SPADE_TEST_ARTIFACTS',
    pathlib.Path(__file__).resolve().parent / 'artifacts'))
SIZE = 64  # The model's image size; the page shows it 8x (512 px).

# Chromium's background connections fail on a closed network; these keep it
# quiet and self-contained.
CHROME_ARGS = ('--headless=new', '--no-sandbox', '--disable-gpu',
               '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update',
               '--disable-sync', '--window-size=1400,900')


def _require_browser():
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
  if missing:
    pytest.skip(f'{", ".join(missing)} missing: install Debian\'s browser '
                'and driver with `apt-get update && apt-get install -y '
                'chromium chromium-driver` (.ci/run does).')
  try:
    import selenium  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.skip('selenium is not installed: pip install -e \'.[test]\'.')


@pytest.fixture(scope='module')
def driver():
  _require_browser()
  # pylint: disable=g-import-not-at-top
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  profile = tempfile.mkdtemp(prefix='spade-chromium-')
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in CHROME_ARGS:
    options.add_argument(arg)
  options.add_argument(f'--user-data-dir={profile}')
  browser = webdriver.Chrome(
      service=Service(executable_path=CHROMEDRIVER), options=options)
  browser.set_script_timeout(60)
  yield browser
  browser.quit()
  shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope='module')
def vae_server(tmp_path_factory):
  """A VAE model with an encoder (custom data: no sample scenes)."""
  folder = save_model(str(tmp_path_factory.mktemp('browser') / 'vae'),
                      tiny_config(dataset='custom', use_vae=True,
                                  no_instance=True, z_dim=16), seed=4)
  model = serve_app.load_model(folder)
  running = RunningServer(model)
  yield running, model
  running.stop()


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  folder = save_model(str(tmp_path_factory.mktemp('browser') / 'model'),
                      tiny_config(dataset='synthetic', crop_size=SIZE,
                                  load_size=SIZE + 8))
  model = serve_app.load_model(folder)
  running = RunningServer(model)
  yield running, model
  running.stop()


def _wait(browser, condition, what, timeout=60):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  try:
    WebDriverWait(browser, timeout).until(lambda b: b.execute_script(
        f'return {condition};'))
  except Exception:  # pylint: disable=broad-except
    status = browser.execute_script(
        'return document.getElementById("status").textContent;')
    pytest.fail(f'timed out waiting for {what}; the page says: {status!r}')


def _results(browser):
  return browser.execute_script('return window.spade.results;')


def _synthesize(browser):
  """Presses Synthesize; returns the new result image (uint8 H, W, 3)."""
  return _press(browser, 'synthesize')


def _press(browser, button_id):
  """Clicks a button that synthesizes; returns the new result image."""
  before = _results(browser)
  browser.find_element('id', button_id).click()
  return _next_result(browser, before)


def _next_result(browser, before):
  """Waits for result number `before` + 1; returns it (uint8 H, W, 3)."""
  _wait(browser, f'window.spade.results > {before} && !window.spade.busy',
        'the synthesized image')
  return _result_image(browser)


def _result_image(browser):
  """The image the page shows (uint8 H, W, 3)."""
  data = browser.execute_async_script('''
      const done = arguments[arguments.length - 1];
      fetch(window.spade.resultUrl).then(r => r.arrayBuffer()).then(b => {
        const u = new Uint8Array(b); let s = '';
        for (let i = 0; i < u.length; i++) s += String.fromCharCode(u[i]);
        done(btoa(s));
      });''')
  src = browser.execute_script(
      'return document.getElementById("result").src === '
      'window.spade.resultUrl;')
  assert src, 'the page does not show the latest result'
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def _ids(browser):
  ids = browser.execute_script('return Array.from(window.spade.ids);')
  return np.asarray(ids, np.int32).reshape(SIZE, SIZE)


def _stroke(browser, canvas, points):
  """Drags the mouse through `points` (CSS px from the canvas centre)."""
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  chain = ActionChains(browser).move_to_element_with_offset(canvas,
                                                            *points[0])
  chain.click_and_hold()
  last = points[0]
  for p in points[1:]:
    chain.move_by_offset(p[0] - last[0], p[1] - last[1])
    last = p
  chain.release().perform()


def _model_pixel(css_offset):
  """The model pixel under a CSS offset from the canvas centre (512 px)."""
  return int((256 + css_offset) // (512 / SIZE))


def test_paint_and_synthesize(driver, server, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  running, model = server
  browser = driver
  browser.get(running.url)
  # Ready, and the first image (of a sample scene) synthesized on load.
  _wait(browser, 'document.body.dataset.ready === "1" && '
        'window.spade.results >= 1 && !window.spade.busy', 'the page')
  buttons = browser.find_elements('css selector', '#palette .cls')
  assert [b.text.split(None, 1)[1] for b in buttons] == model.names
  assert not browser.find_element('id', 'vae').is_displayed()  # No VAE.
  canvas = browser.find_element('id', 'paint')
  assert canvas.size == {'width': 514, 'height': 514}  # 512 + the border.
  sample = _ids(browser)
  assert len(np.unique(sample)) >= 3

  # A blank canvas first: everything class 0.
  browser.find_element('id', 'clear').click()
  assert (_ids(browser) == 0).all()
  blank = _synthesize(browser)

  # Strokes of two classes, a fill, an eraser stroke and its undo.
  browser.find_element('id', 'class-6').click()  # tree
  ActionChains(browser).send_keys(']]').perform()  # Brush 4 -> 6 px.
  _stroke(browser, canvas, [(-150, -150), (-20, -150), (-20, -40)])
  browser.find_element('id', 'class-3').click()  # water
  _stroke(browser, canvas, [(40, 120), (200, 120), (200, 200)])
  ids = _ids(browser)
  assert ids[_model_pixel(-150), _model_pixel(-150)] == 6
  assert ids[_model_pixel(-100), _model_pixel(-20)] == 6  # (row, column)
  assert ids[_model_pixel(120), _model_pixel(100)] == 3
  assert ids[_model_pixel(160), _model_pixel(200)] == 3
  assert 20 < (ids == 6).sum() < 400 and 20 < (ids == 3).sum() < 400
  assert set(np.unique(ids)) == {0, 3, 6}
  browser.find_element('id', 'class-2').click()  # mountain
  browser.find_element('id', 'tool-fill').click()
  _stroke(browser, canvas, [(-200, 200)])  # One click.
  filled = _ids(browser)
  assert set(np.unique(filled)) == {2, 3, 6}  # The blank region, connected.
  np.testing.assert_array_equal(filled == 6, ids == 6)
  browser.find_element('id', 'tool-eraser').click()
  _stroke(browser, canvas, [(100, -200), (100, -100)])
  assert (_ids(browser) == 0).sum() > 10  # The eraser paints class 0.
  ActionChains(browser).key_down(Keys.CONTROL).send_keys('z').key_up(
      Keys.CONTROL).perform()
  np.testing.assert_array_equal(_ids(browser), filled)

  painted = _synthesize(browser)
  assert painted.shape == (SIZE, SIZE, 3)
  # The image follows the painting: it is the server's answer to these ids.
  assert_close(painted, expected_image(model.synth, filled))
  assert np.abs(painted.astype(int) - blank.astype(int)).mean() > 3
  assert browser.execute_script('return window.spade.errors;') == 0

  # The label map the page sends and downloads: a gray PNG of the raw ids,
  # compressed or stored.
  for stored in ('false', 'true'):
    data = browser.execute_async_script(f'''
        const done = arguments[arguments.length - 1];
        const S = window.spade;
        S.grayPng(S.ids, S.W, S.H, {stored}).then(b => b.arrayBuffer())
          .then(b => {{
            const u = new Uint8Array(b); let s = '';
            for (let i = 0; i < u.length; i++) s += String.fromCharCode(u[i]);
            done(btoa(s));
          }});''')
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.mode == 'L'
    np.testing.assert_array_equal(np.asarray(image), filled)

  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  shot = ARTIFACTS / 'serve_page.png'
  assert browser.save_screenshot(str(shot))
  assert Image.open(shot).size[0] >= 1000

  # Upload: a 40x48 map of ids comes back resized to the canvas.
  raw = blocky_label(40, 48, 7).astype(np.uint8)
  Image.fromarray(raw).save(tmp_path / 'upload.png')
  browser.find_element('id', 'label-file').send_keys(
      str(tmp_path / 'upload.png'))
  want = pil_nearest(raw.astype(np.int32), SIZE, SIZE)
  _wait(browser, f'window.spade.ids[{SIZE * SIZE - 1}] === {want[-1, -1]} '
        f'&& window.spade.ids[0] === {want[0, 0]}', 'the uploaded map')
  np.testing.assert_array_equal(_ids(browser), want)
  # A bad upload is reported on the page; the canvas stays.
  Image.fromarray(np.full((8, 8), 99, np.uint8)).save(tmp_path / 'bad.png')
  browser.find_element('id', 'label-file').send_keys(str(tmp_path /
                                                         'bad.png'))
  _wait(browser, 'window.spade.lastError.includes("class ids [99]")',
        'the upload error')
  np.testing.assert_array_equal(_ids(browser), want)

  # Live update: a stroke alone brings a new image.
  browser.find_element('id', 'live').click()
  _wait(browser, '!window.spade.busy', 'the live synthesis')
  before = _results(browser)
  browser.find_element('id', 'tool-brush').click()
  _stroke(browser, canvas, [(-50, 0), (50, 0)])
  _wait(browser, f'window.spade.results > {before} && !window.spade.busy',
        'a live update')


def test_vae_new_sample_and_style_image(driver, vae_server, tmp_path):
  """VAE controls: "New sample" draws a new seed, a style image goes to the
  encoder; each brings the server's image for that seed (and style)."""
  import jax  # pylint: disable=g-import-not-at-top
  running, model = vae_server
  browser = driver
  browser.get(running.url)
  _wait(browser, 'document.body.dataset.ready === "1" && '
        'window.spade.results >= 1 && !window.spade.busy', 'the page')
  assert browser.find_element('id', 'vae').is_displayed()
  assert browser.find_element('id', 'new-sample').is_displayed()
  style_input = browser.find_element('id', 'style-file')
  assert style_input.is_displayed() and style_input.is_enabled()
  assert not browser.find_element('id', 'sample').is_displayed()
  h, w = model.synth.image_size
  blank = np.zeros((h, w), np.int32)  # No sample scenes: a blank canvas.
  z = lambda seed: np.asarray(jax.random.normal(jax.random.PRNGKey(seed),
                                                (model.config.z_dim,)))
  first = _result_image(browser)
  assert browser.execute_script('return window.spade.seed;') == 0
  assert_close(first, expected_image(model.synth, blank, z=z(0)))

  # New sample: a new seed, shown, and its image.
  second = _press(browser, 'new-sample')
  seed = browser.execute_script('return window.spade.seed;')
  assert seed != 0
  assert browser.find_element('id', 'seed').text == str(seed)
  assert np.abs(second.astype(int) - first.astype(int)).mean() > 1
  assert_close(second, expected_image(model.synth, blank, z=z(seed)))

  # A style image: the encoder's sample for it (same seed) replaces z.
  style = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
  path = tmp_path / 'style.png'
  Image.fromarray(style).save(path)
  before = _results(browser)
  style_input.send_keys(str(path))
  third = _next_result(browser, before)
  assert np.abs(third.astype(int) - second.astype(int)).mean() > 1
  assert browser.find_element('id', 'clear-style').is_enabled()
  status, _, body = post(running.url, {'label': png(blank.astype(np.uint8)),
                                       'seed': str(seed),
                                       'style': path.read_bytes()})
  assert status == 200, body
  np.testing.assert_array_equal(third, decode_png(body))

  # "No style image" goes back to the seed's own z.
  np.testing.assert_array_equal(_press(browser, 'clear-style'), second)
  assert browser.execute_script('return window.spade.errors;') == 0
