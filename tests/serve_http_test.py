"""spade_jax.serve under hostile requests: limits, framing, Host and Origin,
logs; and serve_app.App answering without sockets.

Every request goes to an in-process server on 127.0.0.1; counts and sizes
are small, and every wait has a generous deadline (nothing here measures
speed).
"""
import concurrent.futures
import http.client
import io
import json
import logging
import socket
import struct
import threading
import time
import warnings
import zlib

import numpy as np
from PIL import Image
import pytest

from export_test import tiny_config
from serve_test import RunningServer
from serve_test import assert_close
from serve_test import decode_png
from serve_test import expected_image
from serve_test import multipart
from serve_test import png
from serve_test import post
from serve_test import request
from spade_jax import serve
from spade_jax import serve_app
from synthesize_test import blocky_label
from synthesize_test import save_model

DEADLINE_S = 120  # For anything that should answer; never a measurement.


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  folder = save_model(str(tmp_path_factory.mktemp('http') / 'model'),
                      tiny_config(dataset='custom'))
  return serve_app.load_model(folder)


@pytest.fixture(scope='module')
def server(model):
  running = RunningServer(model, allowed_hosts=['spade.example'])
  yield running
  running.stop()


def _address(url):
  host, port = url.split('//')[1].strip('/').split(':')
  return host, int(port)


def _connect(url, timeout=DEADLINE_S):
  return socket.create_connection(_address(url), timeout=timeout)


def _responses(sock):
  """Every response on `sock` until the server closes it: [(status, body)].

  Read from one buffered file, so that pipelined answers are not lost.
  """
  out = []
  reader = sock.makefile('rb')
  while True:
    try:
      line = reader.readline()
    except ConnectionError:
      return out
    if not line:
      return out
    status = int(line.split()[1])
    headers = {}
    while (line := reader.readline().strip()):
      name, _, value = line.decode('latin-1').partition(':')
      headers[name.strip().lower()] = value.strip()
    out.append((status, reader.read(int(headers.get('content-length', 0)))))
    if headers.get('connection', '').lower() == 'close':
      return out


def _closed(sock) -> bool:
  """True when the server closed `sock` (EOF or reset), waiting for it."""
  try:
    return sock.recv(1) == b''
  except ConnectionError:
    return True


def _get(path, host='127.0.0.1', extra=b''):
  return (f'GET {path} HTTP/1.1\r\nHost: {host}\r\n'.encode() + extra +
          b'\r\n')


def _label():
  return png(blocky_label(32, 32, 2).astype(np.uint8))


def _error(body):
  return json.loads(body)['error']


# ---------------------------------------------------------------------------
# The app without HTTP.
# ---------------------------------------------------------------------------
def test_app_answers_without_sockets(model):
  app = serve_app.App(model)
  app.start(warm_up=False)
  try:
    label = blocky_label(32, 32, 3).astype(np.uint8)
    deadline = time.monotonic() + DEADLINE_S
    image, headers = app.synthesize({'label': png(label)}, deadline)
    assert headers == {}
    assert_close(decode_png(image),
                 expected_image(model.synth, label.astype(np.int32)))
    answer = app.labelmap({'label': png(label)}, deadline)
    np.testing.assert_array_equal(np.reshape(answer['ids'], (32, 32)), label)
    assert app.classes()['num_classes'] == 8
    with pytest.raises(serve_app.RequestError) as e:
      app.synthesize({'label': png(label), 'colour': b'red'}, deadline)
    assert e.value.status == 400 and "unknown fields ['colour']" in str(
        e.value)
  finally:
    app.stop()


# ---------------------------------------------------------------------------
# Uploads: pixels before decoding, formats, concurrent decodes.
# ---------------------------------------------------------------------------
def _png_header_only(width, height):
  """A PNG whose header says width x height but that holds no pixels."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data)))
  return (b'\x89PNG\r\n\x1a\n' +
          chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0,
                                     0)) +
          chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


def _ico_holding(png_bytes, size=0):
  """An ICO whose directory says size x size (0: 256) holding `png_bytes`."""
  return (struct.pack('<HHH', 0, 1, 1) +
          struct.pack('<BBBBHHII', size, size, 0, 0, 1, 32, len(png_bytes),
                      22) + png_bytes)


def test_pixels_are_checked_before_decoding_and_only_png_jpeg_opened(server):
  huge = _png_header_only(10000, 10000)
  limit = serve_app.DEFAULT_MAX_PIXELS
  # The header alone is refused: the map's pixel data is missing, so had it
  # been decoded the answer would be a decode error instead.
  for fields in ({'label': huge}, {'label': _label(), 'instance': huge}):
    status, _, body = post(server.url, fields)
    assert status == 400, body
    assert (f'is 10000x10000 = 100000000 pixels; the limit is {limit} '
            'pixels') in _error(body)
  # An ICO (Pillow would decode its embedded PNG while opening it) is not
  # opened at all, as a label map or as a style image.
  ico = _ico_holding(png(np.zeros((300, 300), np.uint8)))
  with warnings.catch_warnings():  # The size in its directory is wrong.
    warnings.simplefilter('ignore', UserWarning)
    assert Image.open(io.BytesIO(ico)).format == 'ICO'  # A valid ICO.
  status, _, body = post(server.url, {'label': ico})
  assert status == 400
  assert 'the label map is not a PNG file' in _error(body)
  with pytest.raises(serve_app.RequestError, match='style image: it is not '
                     'a PNG or JPEG'):
    serve_app.open_image(ico, 'style image', limit)
  # The limit is the App's: a small one refuses a small map.
  app = serve_app.App(server.app.model, max_pixels=100)
  with pytest.raises(serve_app.RequestError, match='32x32 = 1024 pixels; '
                     'the limit is 100 pixels'):
    app.labelmap({'label': _label()}, time.monotonic() + DEADLINE_S)


@pytest.fixture(scope='module')
def strict(model):
  """One decode at a time, a short request deadline."""
  running = RunningServer(model, limits=serve.Limits(request_timeout_s=4),
                          max_decodes=1)
  yield running
  running.stop()


def _post_retrying(url, fields, tries=3):
  """A POST to the strict server, retried when load made it miss its
  short deadline (503)."""
  for _ in range(tries):
    got = post(url, fields)
    if got[0] != 503:
      break
  return got


def test_decodes_are_bounded_and_waits_end_at_the_deadline(strict,
                                                           monkeypatch):
  slots = strict.app.decode_slots
  assert slots.acquire(timeout=DEADLINE_S)  # The one decode slot, taken.
  try:
    status, _, body = post(strict.url, {'label': _label()})
    assert status == 503 and 'busy decoding other uploads' in _error(body)
  finally:
    slots.release()
  status, _, body = _post_retrying(strict.url, {'label': _label()})
  assert status == 200, body

  # The worker busy past the deadline: 503, and the server still serves.
  gate = threading.Event()

  class Gated:

    def __init__(self, synth):
      self._synth = synth

    def __getattr__(self, name):
      return getattr(self._synth, name)

    def __call__(self, *args, **kwargs):
      gate.wait(DEADLINE_S)
      return self._synth(*args, **kwargs)

  monkeypatch.setattr(strict.worker, 'synth', Gated(strict.worker.synth))
  try:
    status, _, body = post(strict.url, {'label': _label()})
    assert status == 503 and 'no image within the request deadline' in (
        _error(body))
  finally:
    gate.set()
  monkeypatch.undo()
  status, _, body = _post_retrying(strict.url, {'label': _label()})
  assert status == 200, body


def test_a_request_still_arriving_at_the_deadline_is_dropped(strict):
  with _connect(strict.url) as sock:
    sock.sendall(b'POST /api/labelmap HTTP/1.1\r\nHost: 127.0.0.1\r\n')
    sock.settimeout(0.5)
    closed, stop = False, time.monotonic() + DEADLINE_S
    while not closed and time.monotonic() < stop:
      try:
        sock.sendall(b'X-Slow: 1\r\n')  # Never idle, never finished.
        closed = sock.recv(1) == b''
      except socket.timeout:
        pass
      except ConnectionError:
        closed = True
    assert closed


# ---------------------------------------------------------------------------
# Multipart: part headers and fields bounded; many parts refused.
# ---------------------------------------------------------------------------
def _form_with_disposition(disposition):
  boundary = 'hostileBoundary'
  body = (f'--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n'
          f'abc\r\n--{boundary}--\r\n').encode()
  return body, f'multipart/form-data; boundary={boundary}'


def test_quadratic_part_headers_are_refused_and_others_keep_answering(
    server):
  """1 MB of ';' in a Content-Disposition took half a minute of CPU with
  email.message; here it is over the part-header limit (413), and an
  unclosed quote with 200k ';' (under it) is parsed in linear time."""
  attacks = [
      ('form-data; name="label"' + ';' * 1_000_000, 413,
       "a multipart part's headers or a text field is over"),
      ('form-data; name="label' + ';' * 200_000, 400, 'Content-Disposition '
       'name'),
  ]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    pending = [pool.submit(request, server.url, '/api/synthesize', 'POST',
                           *_form_with_disposition(d)) for d, _, _ in attacks]
    # A normal request answers while they are in flight (or done).
    status, _, body = post(server.url, {'label': _label()})
    assert status == 200, body
    for future, (_, want, message) in zip(pending, attacks):
      status, _, body = future.result(timeout=DEADLINE_S)
      assert status == want, body[:300]
      assert message in _error(body)

  field = server.server.limits.max_field_bytes
  parts = server.server.limits.max_parts
  for fields in ({'label': _label(), 'ids': 'c' * (field + 1)},
                 dict({'label': _label()},
                      **{f'f{i}': 'x' for i in range(parts + 1)})):
    status, _, body = post(server.url, fields)
    assert status == 413 and f'more than {parts} parts' in _error(body)
  body, content_type = multipart({'label': _label()})
  twice = body[:-len(b'--spadeTestBoundary7MA4YWxkTrZu0gW--\r\n')] + body
  status, _, answer = request(server.url, '/api/synthesize', 'POST', twice,
                              content_type)
  assert status == 400 and "the field 'label' is given twice" in _error(
      answer)


# ---------------------------------------------------------------------------
# Connections: a burst, slow clients, the connection limit.
# ---------------------------------------------------------------------------
def test_a_burst_of_connections_gets_no_resets(server):
  def call(_):
    return request(server.url, '/api/classes')[0]

  with concurrent.futures.ThreadPoolExecutor(40) as pool:
    statuses = list(pool.map(call, range(120)))
  assert statuses == [200] * 120


def test_slow_clients_take_no_threads(server):
  before = threading.active_count()
  socks = []
  try:
    for _ in range(30):  # Each holds an upload it never finishes.
      sock = _connect(server.url)
      sock.sendall(b'POST /api/synthesize HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                   b'Content-Type: image/png\r\nContent-Length: 900000\r\n'
                   b'\r\n' + b'\0' * 100_000)
      socks.append(sock)
    status, _, body = post(server.url, {'label': _label()})
    assert status == 200, body
    assert threading.active_count() - before < 5
  finally:
    for sock in socks:
      sock.close()


def test_connections_over_the_limit_get_503(model):
  running = RunningServer(model, limits=serve.Limits(max_connections=3))
  idle = [_connect(running.url) for _ in range(3)]
  try:
    for sock in idle:  # Served (keep-alive), then left open.
      sock.sendall(_get('/api/classes'))
    # Each answered: the 3 connections are open and served.
    for sock in idle:
      assert int(sock.makefile('rb').readline().split()[1]) == 200
    with _connect(running.url) as extra:
      extra.sendall(_get('/api/classes'))
      answers = _responses(extra)
      assert [s for s, _ in answers] == [503]
      assert '3 connections open (--max_connections)' in _error(
          answers[0][1])
      assert _closed(extra)
    idle.pop().close()
    stop = time.monotonic() + DEADLINE_S
    while True:  # Served again once the server has seen the close.
      with _connect(running.url) as sock:
        sock.sendall(_get('/api/classes', extra=b'Connection: close\r\n'))
        statuses = [s for s, _ in _responses(sock)]
      if statuses != [503] or time.monotonic() > stop:
        break
      time.sleep(0.2)
    assert statuses == [200]
  finally:
    for sock in idle:
      sock.close()
    running.stop()


# ---------------------------------------------------------------------------
# Framing: no desync.
# ---------------------------------------------------------------------------
def test_oversize_headers_close_the_connection(server):
  limit = server.server.limits.max_header_bytes
  with _connect(server.url) as sock:
    sock.sendall(_get('/api/classes', extra=b'X-Long: ' +
                      b'a' * (limit + 6000) + b'\r\n') +
                 _get('/api/nothing'))
    answers = _responses(sock)
    assert [s for s, _ in answers] == [431]
    assert f'over {limit} bytes' in _error(answers[0][1])
    assert _closed(sock)


def test_a_body_is_never_parsed_as_a_request(server):
  hidden = _get('/api/nothing')
  with _connect(server.url) as sock:
    sock.sendall(_get('/api/classes', extra=b'Content-Length: %d\r\n' %
                      len(hidden)) + hidden +
                 _get('/api/classes', extra=b'Connection: close\r\n'))
    answers = _responses(sock)
  assert [s for s, _ in answers] == [200, 200]  # No 404 for the body.
  assert all(json.loads(b)['num_classes'] == 8 for _, b in answers)


@pytest.mark.parametrize('lengths', [(b'5', b'5'), (b'8_4',), (b'+5',),
                                     (b'5, 5',)])
def test_bad_content_lengths_are_refused(server, lengths):
  headers = b''.join(b'Content-Length: %s\r\n' % v for v in lengths)
  with _connect(server.url) as sock:
    sock.sendall(b'POST /api/labelmap HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                 b'Content-Type: image/png\r\n' + headers + b'\r\n' +
                 b'12345' + _get('/api/nothing'))
    answers = _responses(sock)
    assert [s for s, _ in answers] == [400]
    assert 'Content-Length' in _error(answers[0][1])
    assert _closed(sock)


# ---------------------------------------------------------------------------
# Host and Origin.
# ---------------------------------------------------------------------------
def _status(url, method, path, headers, body=None):
  conn = http.client.HTTPConnection(*_address(url), timeout=DEADLINE_S)
  conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
  for k, v in headers.items():
    conn.putheader(k, v)
  if body is not None:
    conn.putheader('Content-Length', str(len(body)))
  conn.endheaders(body)
  response = conn.getresponse()
  out = response.status, response.read()
  conn.close()
  return out


def test_only_loopback_or_allowed_hosts_are_served(server):
  port = _address(server.url)[1]
  for host in (f'127.0.0.1:{port}', f'localhost:{port}', f'[::1]:{port}',
               'LocalHost', f'spade.example:{port}'):
    status, body = _status(server.url, 'GET', '/api/classes', {'Host': host})
    assert status == 200, (host, body)
  for host in ('evil.example', f'evil.example:{port}', '127.0.0.1.nip.io',
               '', 'a b', '127.0.0.1:99999'):
    status, body = _status(server.url, 'GET', '/api/classes', {'Host': host})
    assert status == 421, (host, body)
    assert 'is not served here' in _error(body)
  assert 'spade.example' in serve.allowed_host_names('0.0.0.0',
                                                     ['Spade.Example'])
  assert '192.168.1.5' in serve.allowed_host_names('192.168.1.5')


def test_posts_only_from_the_same_origin(server):
  port = _address(server.url)[1]
  body = _label()
  own = {'Host': f'127.0.0.1:{port}', 'Content-Type': 'image/png'}
  for origin, want in [(None, 200), (f'http://127.0.0.1:{port}', 200),
                       ('http://evil.example', 403), ('null', 403),
                       (f'http://localhost:{port}', 403),
                       (f'https://127.0.0.1:{port}', 403),
                       ('http://127.0.0.1', 403)]:
    headers = dict(own)
    if origin is not None:
      headers['Origin'] = origin
    status, answer = _status(server.url, 'POST', '/api/synthesize', headers,
                             body)
    assert status == want, (origin, answer[:200])
    if want == 403:
      assert "only this server's own page may post" in _error(answer)
  # GETs (the page, the classes) load from anywhere the Host allows.
  status, _ = _status(server.url, 'GET', '/api/classes',
                      {'Host': own['Host'], 'Origin': 'http://evil.example'})
  assert status == 200


# ---------------------------------------------------------------------------
# Logs.
# ---------------------------------------------------------------------------
def test_printable_escapes_control_characters():
  assert serve.printable('GET /\x1b[31m\x07\r\n\x7f\x9b\\ ok é') == (
      'GET /\\x1b[31m\\x07\\x0d\\x0a\\x7f\\x9b\\x5c ok é')


def test_log_lines_escape_control_bytes(server, caplog):
  # The access log goes through absl's logger, whose own level earlier tests
  # may have set: INFO on it too.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO,
                                                      logger='absl'):
    for line, want in [(b'GET /a\x1b[2J\x07b HTTP/1.1', 404),
                       (b'GET /a\rb HTTP/1.1', 400)]:  # Bare CR: refused.
      with _connect(server.url) as sock:
        sock.sendall(line + b'\r\nHost: 127.0.0.1\r\nConnection: close'
                     b'\r\n\r\n')
        assert [s for s, _ in _responses(sock)] == [want]
    # Logged as the answer is written; wait for the records.
    stop = time.monotonic() + DEADLINE_S
    while time.monotonic() < stop and not (
        _logged(caplog, '/a\\x1b[2J\\x07b') and _logged(caplog, ' 400 ')):
      time.sleep(0.1)
  assert _logged(caplog, '"GET /a\\x1b[2J\\x07b HTTP/1.1" 404')
  assert _logged(caplog, 'Bare CR')
  text = '\n'.join(r.getMessage() for r in caplog.records)
  for raw in ('\x1b', '\x07', '\r'):
    assert raw not in text


def _logged(caplog, text):
  return any(text in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# Label maps: 16-bit colour types, colour maps in the model's class colours.
# ---------------------------------------------------------------------------
def _png16(samples, color_type):
  """uint16 (H, W, C) -> a 16-bit-per-sample PNG of `color_type` (2 RGB,
  4 gray+alpha, 6 RGBA), written by hand: Pillow writes none of them."""
  h, w = samples.shape[:2]
  rows = samples.astype('>u2').reshape(h, -1).tobytes()
  stride = len(rows) // h
  raw = b''.join(b'\0' + rows[i * stride:(i + 1) * stride] for i in range(h))

  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data)))
  return (b'\x89PNG\r\n\x1a\n' +
          chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, color_type, 0, 0,
                                     0)) +
          chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def test_16_bit_colour_maps_are_refused_not_cut(server):
  ids = np.zeros((32, 32), np.uint16)
  ids[:, 16:] = 5  # Ids 0 and 5: their high bytes are both 0.
  opaque = np.full_like(ids, 65535)
  for samples, color_type, kind in [
      (np.stack([ids] * 3, -1), 2, 'RGB'),
      (np.stack([ids] * 3 + [opaque], -1), 6, 'RGBA'),
      (np.stack([ids, opaque], -1), 4, 'gray')]:
    data = _png16(samples, color_type)
    for path in ('/api/synthesize', '/api/labelmap'):
      status, _, body = post(server.url, {'label': data}, path)
      assert status == 400, (kind, body)
      assert f'16-bit-per-channel {kind}' in _error(body)
  # The same ids as a 16-bit gray PNG are read exactly.
  status, _, body = post(server.url, {'label': png(ids)}, '/api/labelmap')
  assert status == 200, body
  np.testing.assert_array_equal(np.reshape(json.loads(body)['ids'],
                                           (32, 32)), ids)


def test_colour_maps_in_the_class_colours_decode_to_their_classes(server):
  model = server.app.model
  status, _, body = request(server.url, '/api/classes')
  colors = np.asarray(json.loads(body)['colors'], np.uint8)
  ids = blocky_label(32, 32, 6).astype(np.uint8)
  assert len(np.unique(ids)) >= 4
  rgb = colors[ids]
  assert (rgb[..., 0] != rgb[..., 1]).any()  # A colour map, not gray.
  for path in ('/api/labelmap', '/api/synthesize'):
    gray = post(server.url, {'label': png(ids)}, path)
    for fields in ({'label': png(rgb)},
                   {'label': png(np.dstack([rgb, np.full_like(ids, 255)]))},
                   {'label': png(rgb), 'ids': 'dataset'}):
      status, _, body = post(server.url, fields, path)
      assert status == 200, body
      assert body == gray[2]  # The same answer as the ids themselves.
  status, _, body = post(server.url, {'label': png(rgb)}, '/api/labelmap')
  np.testing.assert_array_equal(np.reshape(json.loads(body)['ids'],
                                           (32, 32)), ids)
  # A colour that is no class colour is named.
  rgb[3, 4] = [1, 2, 3]
  status, _, body = post(server.url, {'label': png(rgb)})
  assert status == 400
  assert '(1, 2, 3): 1 pixels, first at (row 3, col 4)' in _error(body)
  assert model.palette.shape == (8, 3)


def test_chunked_bodies_are_decoded_and_bounded(server):
  label = _label()
  chunked = b'%x\r\n%s\r\n0\r\n\r\n' % (len(label), label)
  with _connect(server.url) as sock:
    sock.sendall(b'POST /api/labelmap HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                 b'Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n'
                 b'Connection: close\r\n\r\n' + chunked)
    answers = _responses(sock)
  assert [s for s, _ in answers] == [200], answers
  assert json.loads(answers[0][1])['height'] == 32
  # Over the limit: refused, whichever layer counts it first.
  limit = server.server.limits.max_body_bytes
  block = b'\0' * 2**20
  with _connect(server.url) as sock:
    sock.sendall(b'POST /api/labelmap HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                 b'Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n'
                 b'Connection: close\r\n\r\n')
    try:
      for _ in range(limit // len(block) + 2):
        sock.sendall(b'%x\r\n%s\r\n' % (len(block), block))
      sock.sendall(b'0\r\n\r\n')
    except ConnectionError:
      pass  # Refused while sending.
    answers = _responses(sock)
  assert [s for s, _ in answers] == [413], answers
  assert f'the limit is {limit} bytes' in _error(answers[0][1])
