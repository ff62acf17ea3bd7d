"""spade_jax.serve: the HTTP API, its checks, the single worker, the CLI.

Servers run in-process on a free loopback port with tiny random-init models;
their images are compared with what the Synthesizer gives for the same input.
"""
import concurrent.futures
import contextlib
import io
import json
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import http.client

import numpy as np
from PIL import Image
import pytest

from data_pipelines import records
from data_pipelines import scenes
from export_test import make_workdir
from export_test import tiny_config
from spade_jax import export
from spade_jax import model_io
from spade_jax import serve
from spade_jax import serve_app
from spade_jax import visualize
from spade_jax.synthesizer import Synthesizer
from synthesize_test import blocky_label
from synthesize_test import pil_nearest
from synthesize_test import save_model


# ---------------------------------------------------------------------------
# Helpers (also used by serve_browser_test.py).
# ---------------------------------------------------------------------------
def png(array, **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array)).save(buf, format='PNG', **kwargs)
  return buf.getvalue()


def multipart(fields):
  """{name: bytes | str} -> (body, content type) of multipart/form-data."""
  boundary = 'spadeTestBoundary7MA4YWxkTrZu0gW'
  out = []
  for name, value in fields.items():
    if isinstance(value, str):
      value = value.encode()
      disposition = f'form-data; name="{name}"'
    else:
      disposition = f'form-data; name="{name}"; filename="{name}.bin"'
    out.append(f'--{boundary}\r\nContent-Disposition: {disposition}\r\n'
               'Content-Type: application/octet-stream\r\n\r\n'.encode())
    out.append(value + b'\r\n')
  out.append(f'--{boundary}--\r\n'.encode())
  return b''.join(out), f'multipart/form-data; boundary={boundary}'


def request(url, path, method='GET', body=None, content_type=None,
            headers=None):
  """(status, headers, body bytes); HTTP errors are returned, not raised."""
  req = urllib.request.Request(url.rstrip('/') + path, data=body,
                               method=method, headers=dict(headers or {}))
  if content_type:
    req.add_header('Content-Type', content_type)
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, r.headers, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers, e.read()


def post(url, fields, path='/api/synthesize'):
  body, content_type = multipart(fields)
  return request(url, path, 'POST', body, content_type)


def decode_png(data):
  return np.asarray(Image.open(io.BytesIO(data)))


class RunningServer:
  """A serve.Server on 127.0.0.1:0, serving from a thread.

  `limits` (serve.Limits) and `allowed_hosts` go to the Server, the other
  keyword arguments to the serve_app.App.
  """

  def __init__(self, model, limits=serve.Limits(), allowed_hosts=(),
               **kwargs):
    self.app = serve_app.App(model, **kwargs)
    self.server = serve.Server(self.app, '127.0.0.1', 0, limits,
                               allowed_hosts)
    self.server.start(warm_up=True)
    self.thread = threading.Thread(target=self.server.serve_forever,
                                   daemon=True)
    self.thread.start()
    self.url = self.server.url
    self.worker = self.server.app.worker

  def stop(self):
    self.server.shutdown()
    self.thread.join(60)
    self.server.close()


def expected_image(synth, label, instance=None, z=None):
  """What the server should answer: the Synthesizer's uint8 image."""
  if instance is None and not synth.config.no_instance:
    instance = label
  out = synth(label[None], None if instance is None else instance[None],
              z=None if z is None else z[None])
  return visualize.image_to_uint8(out[0])


def assert_close(got, want):
  assert got.shape == want.shape
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


# ---------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('serve')


@pytest.fixture(scope='module')
def plain(root):
  """A synthetic-set model with instance maps (no classes.json)."""
  folder = save_model(str(root / 'plain'), tiny_config(dataset='synthetic'))
  model = serve_app.load_model(folder)
  running = RunningServer(model)
  yield running, model
  running.stop()


@pytest.fixture(scope='module')
def vae(root):
  """A custom-data VAE model with a don't-care class, no instance maps."""
  config = tiny_config(dataset='custom', use_vae=True, no_instance=True,
                       contain_dontcare_label=True, z_dim=16)
  folder = save_model(str(root / 'vae'), config, seed=4)
  model = serve_app.load_model(folder)
  running = RunningServer(model)
  yield running, model
  running.stop()


# ---------------------------------------------------------------------------
# API.
# ---------------------------------------------------------------------------
def test_page_and_classes(plain):
  running, _ = plain
  status, headers, body = request(running.url, '/')
  assert status == 200 and headers['Content-Type'].startswith('text/html')
  assert b'<canvas id="paint"' in body and b'api/synthesize' in body
  status, _, body = request(running.url, '/api/classes')
  assert status == 200
  info = json.loads(body)
  assert info['num_classes'] == 8
  assert info['names'] == list(scenes.CLASS_NAMES)
  assert info['colors'] == [list(c) for c in scenes.CLASS_COLORS]
  assert info['image_size'] == [32, 32]
  assert info['use_vae'] is False and info['has_encoder'] is False
  assert info['no_instance'] is False
  assert info['dontcare'] is None and info['eraser_id'] == 0
  assert info['has_samples'] is True


def test_synthesize_matches_synthesizer(plain):
  running, model = plain
  synth = model.synth
  raw = blocky_label(40, 48, 1).astype(np.uint8)  # Resized to 32x32.
  status, headers, body = post(running.url, {'label': png(raw)})
  assert status == 200, body
  assert headers['Content-Type'] == 'image/png'
  got = decode_png(body)
  assert got.shape == (32, 32, 3)
  label = pil_nearest(raw.astype(np.int32), 32, 32)
  assert_close(got, expected_image(synth, label))

  # An instance map of its own gives another image, the Synthesizer's.
  instance = (raw.astype(np.int32) * 3 + (np.arange(48) >= 20)).astype(
      np.uint16)
  status, _, body = post(running.url, {'label': png(raw),
                                       'instance': png(instance)})
  assert status == 200, body
  with_instance = decode_png(body)
  assert_close(with_instance, expected_image(
      synth, label, pil_nearest(instance.astype(np.int32), 32, 32)))
  assert np.abs(with_instance.astype(int) - got.astype(int)).max() > 5

  # The same ids as an RGB PNG with equal channels, and as a bare PNG body.
  rgb = np.repeat(raw[..., None], 3, axis=2)
  status, _, body = post(running.url, {'label': png(rgb)})
  assert status == 200, body
  np.testing.assert_array_equal(decode_png(body), got)
  status, _, body = request(running.url, '/api/synthesize', 'POST', png(raw),
                            'image/png')
  assert status == 200, body
  np.testing.assert_array_equal(decode_png(body), got)


def _raw_http(url, lines, body=b''):
  """Sends a hand-written request; returns (status, JSON body)."""
  host, port = url.split('//')[1].strip('/').split(':')
  conn = http.client.HTTPConnection(host, int(port), timeout=60)
  conn.putrequest(lines[0], lines[1], skip_accept_encoding=True)
  for k, v in lines[2:]:
    conn.putheader(k, v)
  conn.endheaders(body or None)
  r = conn.getresponse()
  out = r.status, json.loads(r.read())
  conn.close()
  return out


def test_bad_requests_get_json_errors_and_server_keeps_serving(plain):
  running, model = plain
  url = running.url
  good = png(blocky_label(32, 32, 2).astype(np.uint8))
  jpeg = io.BytesIO()
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(jpeg, format='JPEG')
  colour = np.zeros((32, 32, 3), np.uint8)
  colour[..., 0] = 5
  out_of_range = blocky_label(32, 32, 3).astype(np.uint8)
  out_of_range[:4, :4] = 9
  out_of_range[-2:, -2:] = 200
  body_limit = running.server.limits.max_body_bytes

  multipart_cases = [
      ({'label': b'this is not a png'}, 400,
       'the label map is not a PNG file'),
      ({'label': jpeg.getvalue()}, 400, 'the label map is not a PNG file'),
      ({'label': png(colour)}, 400, 'the label map has 1 colour(s) that are '
       'not class colours of the palette (8 classes): (5, 0, 0): 1024 '
       'pixels'),
      ({'label': png(out_of_range)}, 400,
       "class ids [9, 200] at 20 pixels, outside this model's range 0..7"),
      ({'instance': good}, 400, "missing the 'label' field"),
      ({'label': good, 'style': good}, 400,
       "'style' field needs a VAE model"),
      ({'label': good, 'seed': '3'}, 400, "'seed' field needs a VAE model"),
      ({'label': good, 'colour': 'red'}, 400, "unknown fields ['colour']"),
      ({'label': good, 'ids': 'rgb'}, 400, "ids='rgb'"),
      ({'label': good, 'instance': png(np.zeros((8, 8), np.uint8))}, 400,
       'the instance map is 8x8 but the label map is 32x32'),
      ({'label': good + b'\0' * (body_limit + 1)}, 413,
       f'the limit is {body_limit} bytes'),
  ]
  for fields, status, message in multipart_cases:
    got, headers, body = post(url, fields)
    assert got == status, (fields.keys(), body[:300])
    assert headers['Content-Type'] == 'application/json'
    assert message in json.loads(body)['error'], body

  other_cases = [
      (('GET', '/api/synthesize'), None, None, 405, 'use POST'),
      (('DELETE', '/'), None, None, 405, 'DELETE is not allowed on /'),
      (('GET', '/api/nothing'), None, None, 404, "no such path '/api/nothing'"),
      (('POST', '/api/synthesize'), b'{}', 'application/json', 415,
       "Content-Type 'application/json'"),
      (('POST', '/api/synthesize'), b'--x\r\nContent-Disposition: '
       b'form-data; name="label"\r\n\r\nabc', 'multipart/form-data; '
       'boundary=x', 400, 'no closing boundary'),
      (('GET', '/api/sample?seed=abc'), None, None, 400,
       "seed='abc' is not an integer"),
  ]
  for (method, path), body, content_type, status, message in other_cases:
    got, headers, answer = request(url, path, method, body, content_type)
    assert got == status, (method, path, answer[:300])
    assert message in json.loads(answer)['error'], answer
  _, headers, _ = request(url, '/api/synthesize')
  assert headers['Allow'] == 'POST'

  # Refused from the headers alone: a huge Content-Length, none at all.
  status, answer = _raw_http(url, ['POST', '/api/synthesize',
                                   ('Content-Length', str(10**12)),
                                   ('Content-Type', 'image/png')])
  assert status == 413 and 'the limit is' in answer['error']
  status, answer = _raw_http(url, ['POST', '/api/synthesize',
                                   ('Content-Type', 'image/png')])
  assert status == 411 and 'Content-Length' in answer['error']

  # Still serving.
  status, _, body = post(url, {'label': good})
  assert status == 200
  assert decode_png(body).shape == (32, 32, 3)


def test_concurrent_requests_share_one_worker(plain):
  running, model = plain
  worker = running.worker
  before = worker.jobs_done
  labels = [blocky_label(32, 32, 10 + i).astype(np.uint8) for i in range(4)]
  start = threading.Barrier(4)

  def call(label):
    start.wait()
    return post(running.url, {'label': png(label)})

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(call, labels))
  for label, (status, _, body) in zip(labels, answers):
    assert status == 200, body
    assert_close(decode_png(body), expected_image(model.synth,
                                                  label.astype(np.int32)))
  assert worker.jobs_done - before == 4
  # Every generation (warm-up included) ran on the worker thread alone.
  assert worker.thread_ids == {worker.ident}
  assert worker.ident != threading.get_ident()


def test_worker_batches_waiting_jobs(plain):
  _, model = plain
  worker = serve_app.Worker(model.synth, max_batch=4)
  labels = [blocky_label(32, 32, 20 + i).astype(np.int32) for i in range(5)]
  jobs = [serve_app.Job(label, label) for label in labels[:4]]
  futures = [worker.submit(job) for job in jobs]  # Queued before start.
  worker.start()
  try:
    for label, future in zip(labels, futures):
      got = visualize.image_to_uint8(future.result(timeout=120))
      assert_close(got, expected_image(model.synth, label))
    alone = worker.submit(serve_app.Job(labels[4], labels[4]))
    assert_close(visualize.image_to_uint8(alone.result(timeout=120)),
                 expected_image(model.synth, labels[4]))
  finally:
    worker.stop()
  assert worker.batch_sizes == [4, 1]
  assert worker.thread_ids == {worker.ident}


def test_vae_seeds_style_and_dontcare(vae):
  running, model = vae
  url = running.url
  status, _, body = request(url, '/api/classes')
  info = json.loads(body)
  assert info['use_vae'] is True and info['has_encoder'] is True
  assert info['names'] == [f'class {i}' for i in range(8)]
  palette = visualize.default_palette(256)
  assert info['colors'] == palette[:8].tolist()
  assert info['dontcare'] == {'id': 8, 'value': 255, 'name': "don't care",
                              'color': palette[8].tolist()}
  assert info['eraser_id'] == 255 and info['has_samples'] is False

  label = blocky_label(32, 32, 5).astype(np.uint8)
  label[:6] = 255  # Don't-care rows are fine.
  images = {}
  for seed in ('1', '2', '1'):
    status, headers, body = post(url, {'label': png(label), 'seed': seed})
    assert status == 200, body
    assert headers['X-Seed'] == seed
    images.setdefault(seed, []).append(decode_png(body).astype(int))
  np.testing.assert_array_equal(images['1'][0], images['1'][1])
  assert np.abs(images['1'][0] - images['2'][0]).mean() > 1
  # The z of seed 1 is jax.random.normal(PRNGKey(1)).
  import jax  # pylint: disable=g-import-not-at-top
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (16,)))
  ids = np.where(label == 255, 8, label).astype(np.int32)
  assert_close(images['1'][0].astype(np.uint8),
               expected_image(model.synth, ids, z=z))

  style = np.random.default_rng(0).integers(0, 256, (50, 60, 3), np.uint8)
  status, _, body = post(url, {'label': png(label), 'seed': '1',
                               'style': png(style)})
  assert status == 200, body
  assert np.abs(decode_png(body).astype(int) - images['1'][0]).mean() > 1

  for fields, message in [
      ({'seed': '-1'}, 'outside 0..4294967295'),
      ({'seed': 'x'}, "seed='x' is not an integer"),
      ({'style': b'not an image'}, 'cannot decode the style image'),
      ({'instance': png(label)}, 'uses no instance maps'),
  ]:
    status, _, body = post(url, dict(label=png(label), **fields))
    assert status == 400 and message in json.loads(body)['error'], body
  bad = label.copy()
  bad[0, 0] = 9
  status, _, body = post(url, {'label': png(bad)})
  assert status == 400
  assert "[9] at 1 pixel, outside this model's range 0..7, or 8 or 255" in (
      json.loads(body)['error'])
  status, _, body = request(url, '/api/sample')
  assert status == 404 and 'no sample label maps' in json.loads(body)['error']


def test_labelmap_and_sample(plain, vae):
  running, _ = plain
  raw = blocky_label(40, 48, 1).astype(np.uint8)
  status, _, body = post(running.url, {'label': png(raw)}, '/api/labelmap')
  assert status == 200, body
  got = json.loads(body)
  assert (got['height'], got['width'], got['original_size']) == (32, 32,
                                                                 [40, 48])
  np.testing.assert_array_equal(np.reshape(got['ids'], (32, 32)),
                                pil_nearest(raw.astype(np.int32), 32, 32))
  status, _, body = request(running.url, '/api/sample?seed=4')
  assert status == 200
  sample = np.reshape(json.loads(body)['ids'], (32, 32))
  assert sample.min() >= 0 and sample.max() < 8
  assert len(np.unique(sample)) >= 3  # A scene, not a blank map.
  # The page shows don't-care as 255; data-set ids are mapped on request.
  vae_running, _ = vae
  label = np.full((32, 32), 255, np.uint8)
  label[0, :3] = [0, 3, 7]
  status, _, body = post(vae_running.url, {'label': png(label)},
                         '/api/labelmap')
  ids = json.loads(body)['ids']
  assert ids[:4] == [0, 3, 7, 255] and set(ids[4:]) == {255}


def test_export_writes_classes_and_cli_serves_a_workdir(root, plain):
  # A model folder of the synthetic set: its names and colours.
  _, model = plain
  out = str(root / 'exported')
  export.export(model.source, out, with_jax_export=False)
  assert model_io.load_classes(out) == {
      'names': list(scenes.CLASS_NAMES),
      'colors': [list(c) for c in scenes.CLASS_COLORS]}

  # A training workdir of a built data set: its dataset_info.json's.
  data = root / 'data'
  data.mkdir()
  names = [f'thing{i}' for i in range(8)]
  colors = [[i * 30, 255 - i * 30, 7] for i in range(8)]
  records.DatasetInfo(dataset='custom', label_nc=8,
                      contain_dontcare_label=False, has_instance=False,
                      class_names=names, colors=colors).save(str(data))
  workdir = str(root / 'run')
  make_workdir(workdir, tiny_config(dataset='custom', data_dir=str(data),
                                    no_instance=True))
  out = str(root / 'exported_run')
  export.export(workdir, out, with_jax_export=False)
  assert model_io.load_classes(out) == {'names': names, 'colors': colors}

  # The CLI serves the workdir itself (its latest checkpoint) and stops on
  # SIGTERM.
  with _cli_server('--model', workdir) as (proc, line):
    assert line.startswith(f'Serving {workdir} at http://127.0.0.1:'), line
    url = line.split(' at ')[1].split()[0]
    status, _, body = request(url, '/api/classes')
    info = json.loads(body)
    assert (info['names'], info['colors'], info['step']) == (names, colors, 3)
    status, _, body = post(url, {'label': png(np.zeros((32, 32),
                                                       np.uint8))})
    assert status == 200 and decode_png(body).shape == (32, 32, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'Stopped.' in stdout
  assert '"GET /api/classes HTTP/1.1" 200' in stderr  # Requests are logged.
  assert '"POST /api/synthesize HTTP/1.1" 200' in stderr


def test_classes_option_overrides_the_model_and_checks_label_nc(
    plain, dataset_folder, tmp_path):
  _, model = plain  # A synthetic-set model: the set's names without it.
  folder = model.source
  data, names, colors = dataset_folder(tmp_path / 'data', 8)
  info = serve_app.load_model(folder, classes=str(data)).info()
  assert (info['names'], info['colors']) == (names, colors)
  # A classes.json file (here without colours: the default palette).
  model_io.save_classes(str(tmp_path), names[::-1], None)
  info = serve_app.load_model(
      folder, classes=str(tmp_path / model_io.CLASSES_FILE)).info()
  assert info['names'] == names[::-1]
  assert info['colors'] == visualize.default_palette(256)[:8].tolist()

  other, _, _ = dataset_folder(tmp_path / 'other', 5)
  with pytest.raises(ValueError) as e:
    serve_app.load_model(folder, classes=str(other))
  assert f'the data set {other} has 5 classes' in str(e.value)
  assert 'label_nc=8' in str(e.value)
  short = tmp_path / 'short'
  short.mkdir()
  model_io.save_classes(str(short), names[:3], colors)
  with pytest.raises(ValueError) as e:
    serve_app.load_model(folder, classes=str(short / model_io.CLASSES_FILE))
  assert 'has 3 class names but the model has label_nc=8' in str(e.value)
  for path, message in [(tmp_path / 'none', 'does not exist'),
                        (short, 'is not a built data set folder')]:
    with pytest.raises(FileNotFoundError, match=message):
      serve_app.load_model(folder, classes=str(path))


def test_cli_classes_flag_and_ctrl_c(plain, dataset_folder, tmp_path):
  """--classes names the classes; Ctrl-C stops the server."""
  _, model = plain
  data, names, colors = dataset_folder(tmp_path / 'data', 8)
  with _cli_server('--model', model.source, '--classes', str(data),
                   '--max_upload_mb', '0.5', '--allowed_hosts',
                   'spade.example') as (proc, line):
    url = line.split(' at ')[1].split()[0]
    assert url.startswith('http://127.0.0.1:')  # Loopback by default.
    status, _, body = request(url, '/')
    assert status == 200 and b'<canvas' in body
    # The limit flags reach the server.
    status, _, body = request(url, '/api/classes',
                              headers={'Host': 'spade.example'})
    assert status == 200, body
    status, _, body = request(url, '/api/synthesize', 'POST',
                              b'\0' * 2**20, 'image/png')
    assert status == 413 and 'the limit is 524288 bytes' in body.decode()
    status, _, body = request(url, '/api/classes')
    info = json.loads(body)
    assert (info['names'], info['colors']) == (names, colors)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'SIGINT: stopping.' in stderr and 'Stopped.' in stdout


@contextlib.contextmanager
def _cli_server(*args):
  """`python -m spade_jax.serve ARGS --port 0` -> (process, its first line).

  The process is killed on leaving if it is still running.
  """
  proc = subprocess.Popen(
      [sys.executable, '-m', 'spade_jax.serve', *args, '--port', '0'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    yield proc, _read_line(proc, timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


def _read_line(proc, timeout):
  """The first stdout line of `proc`, or a failure with its stderr."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    ready, _, _ = select.select([proc.stdout], [], [], 1)
    if ready:
      line = proc.stdout.readline()
      if line:
        return line.strip()
    if proc.poll() is not None:
      break
  proc.kill()
  _, stderr = proc.communicate()
  pytest.fail(f'the server printed no URL: {stderr[-3000:]}')


def test_cli_reports_a_missing_model_and_mismatched_classes(
    plain, dataset_folder, tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.serve', '--model',
       str(tmp_path / 'none')], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert f'ERROR: {tmp_path / "none"} does not exist' in proc.stderr
  _, model = plain
  other, _, _ = dataset_folder(tmp_path / 'other', 5)
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.serve', '--model', model.source,
       '--classes', str(other)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert (f'ERROR: the data set {other} has 5 classes (label_nc in '
          'dataset_info.json) but the model has label_nc=8') in proc.stderr
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.serve', '--model', model.source,
       '--max_field_kb', '8'], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'max_field_bytes=8192: must be at least 128 KiB' in proc.stderr


# ---------------------------------------------------------------------------
# A model converted from the shared reference checkpoint.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def reference(root, reference_dir, dataset_folder):
  """The shared fixture converted with --data_dir's names, being served."""
  pytest.importorskip('torch', reason='converting .pth checkpoints needs '
                      "PyTorch: pip install -e '.[torch]'")
  from spade_jax import convert  # pylint: disable=g-import-not-at-top
  opt = json.loads((reference_dir / 'opt.json').read_text())
  data, names, colors = dataset_folder(root / 'reference_data',
                                       opt['label_nc'],
                                       opt['contain_dontcare_label'])
  out = str(root / 'reference_model')
  convert.convert(str(reference_dir), str(reference_dir / 'opt.json'), out,
                  data_dir=str(data))
  running = RunningServer(serve_app.load_model(out))
  yield running, out, opt, names, colors
  running.stop()


def test_converted_reference_model_serves_its_images(reference,
                                                     reference_dir):
  running, out, opt, names, colors = reference
  label_nc = opt['label_nc']
  status, _, body = request(running.url, '/api/classes')
  assert status == 200
  info = json.loads(body)
  assert info['num_classes'] == label_nc
  assert info['image_size'] == [int(opt['crop_size'] / opt['aspect_ratio']),
                                opt['crop_size']]
  assert (info['names'], info['colors']) == (names[:label_nc],
                                             colors[:label_nc])
  assert info['dontcare'] == {'id': label_nc, 'value': 255,
                              'name': names[label_nc],
                              'color': colors[label_nc]}
  assert info['use_vae'] is False and info['no_instance'] is False
  assert info['netG'] == 'spade'

  # The recorded inputs, as PNGs (don't-care as 255, 16-bit instance ids),
  # against Synthesizer.load on the folder, both as uint8 the way serve
  # makes them.
  io_arrays = np.load(reference_dir / 'io.npz')
  labels, instances = io_arrays['label'], io_arrays['instance']
  assert (labels == label_nc).any() and instances.max() > 255
  floats = Synthesizer.load(out)(labels, instances)
  want = visualize.image_to_uint8(floats)
  # This untrained generator's outputs are tiny (|x| < 0.01), so its uint8
  # pixels are 127 or 128: the sign of each output. Those whose float value
  # lies clearly off a rounding boundary must come out exactly the same.
  levels = (np.asarray(floats, np.float64) + 1) * 127.5
  clear = np.abs(levels - np.floor(levels) - 0.5) > 1e-3
  assert clear.mean() > 0.95
  # Its outputs also barely depend on the label map (the two examples' uint8
  # images are nearly the same), so the float path is checked too: the
  # request's fields decode to the recorded maps, and the worker that
  # answered gives Synthesizer.load's floats for them.
  scale = np.abs(floats).max()
  for i in range(len(labels)):
    label = np.where(labels[i] == label_nc, 255, labels[i]).astype(np.uint8)
    fields = {'label': png(label),
              'instance': png(instances[i].astype(np.uint16))}
    status, _, body = post(running.url, fields)
    assert status == 200, body
    got = decode_png(body)
    assert_close(got, want[i])
    np.testing.assert_array_equal(got[clear[i]], want[i][clear[i]])

    job = serve_app.make_job(fields, running.app.model)
    np.testing.assert_array_equal(job.label, labels[i])
    np.testing.assert_array_equal(job.instance, instances[i])
    image = running.worker.submit(job).result(timeout=120)
    assert np.abs(image - floats[i]).max() < 1e-4 * scale
