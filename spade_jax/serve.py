r"""Interactive GauGAN-style web app: paint a label map, get an image.

  python -m spade_jax.serve --model MODEL [--classes DATA_OR_JSON] \
      [--host 127.0.0.1] [--port 8000] [--step N] [--max_batch 1] \
      [--allowed_hosts NAME,...] [limits, see below]

MODEL is a model folder (`spade_jax.export` or `spade_jax.convert`) or a
training workdir (`python -m spade_jax.main ... --workdir DIR`; its latest
checkpoint, or --step, with the EMA weights when training kept them). The
server listens on 127.0.0.1 unless --host says otherwise (it has no
authentication: expose it to other machines knowingly), prints the URL to
open, and logs each request. Ctrl-C or SIGTERM stops it.

Class names and colours come from --classes when given: a built data set
folder (its dataset_info.json) or a classes.json file (see `model_io.py`),
whose number of classes must be the model's label_nc (else an error names
both). Without it: the model folder's classes.json (written by
`spade_jax.export`, or `spade_jax.convert --data_dir`), or for a workdir its
training data's dataset_info.json, or the synthetic set's own; classes still
unnamed are 'class N' in the default palette.

The page (`serve_page.html`) paints class ids on a canvas at the model's
resolution: brush, fill, eraser, undo, label-map upload and download, a
"Synthesize" button and a "live update" switch; for VAE models a style image
and a "New sample" (new seed) button. The eraser paints the don't-care class
when the model has one (sent as 255), else class 0, the class a cleared
canvas holds. Synthetic-set models start from a generated sample scene.

HTTP API (every 4xx/5xx answer is JSON {"error": "..."}):

  GET  /                 the page
  GET  /api/classes      JSON: num_classes (label_nc), names, colors (one per
                         class id), image_size [H, W], use_vae, has_encoder,
                         no_instance, dontcare (null, or {id, value, name,
                         color}), eraser_id, has_samples, dataset, netG, ...
  POST /api/synthesize   -> image/png of the model's size (RGB). The body is
                         multipart/form-data with the fields
                           label     (required) a PNG of class ids
                           instance  (optional) a PNG of instance ids, same
                                     size as the label map; without it a model
                                     that uses instance maps gets the label
                                     map itself (as spade_jax.synthesize does)
                           style     (optional, VAE models with an encoder)
                                     a PNG or JPEG image whose style the
                                     encoder takes
                           seed      (optional, VAE models) integer 0..2**32-1
                                     of the z draw (default 0); with a style
                                     image it seeds the encoder's sample
                           ids       (optional) 'class' (default): pixel
                                     values are the model's class ids;
                                     'dataset': raw ids as the data set stores
                                     them, mapped like the data pipeline
                                     (ADE20K's shift)
                         or a bare PNG body (Content-Type: image/png) as the
                         label. Responses carry X-Seed for VAE models.
  POST /api/labelmap     the same label (and ids) fields -> JSON {height,
                         width, ids: [row-major class ids], original_size}:
                         the page's upload, decoded, checked and resized.
  GET  /api/sample?seed=N  JSON like /api/labelmap: a generated synthetic
                         scene (dataset='synthetic' models only).

Label maps are PNGs (the rules of `label_maps.py`, shared with
spade_jax.synthesize and the data-set builder): gray 8- or 16-bit, palette
(the indices) or RGB/RGBA whose three channels are equal (what a browser
canvas writes; alpha must be opaque) hold the ids; an 8-bit RGB(A) map in
the model's class colours (those /api/classes lists) holds the classes of
those colours. 16-bit colour PNGs are refused (Pillow would keep only their
high byte). 255 is don't-care for models that have that class. A map of
another size than the model's is resized to it with PIL's nearest
neighbour, as spade_jax.synthesize and the data pipeline do. Ids outside
the model's range, colours that are no class colour, undecodable or non-PNG
maps, unknown, repeated or missing fields and style/seed on a model without
a VAE get 400; unknown paths 404; other methods 405. Example:

  curl -F label=@label.png -F seed=3 http://127.0.0.1:8000/api/synthesize \
      -o image.png

Security and limits. Only requests whose Host header names a loopback
address, the --host address or one of --allowed_hosts are answered (421
otherwise: a page on another site cannot reach the server through DNS
rebinding), and a POST that carries an Origin header must come from the
page's own origin (403 otherwise: other sites' pages cannot post to it).
Each limit is a flag:
  --max_upload_mb        request body (413; from Content-Length, before the
                         body is read, when it is over 4 times the limit)
  --max_header_kb        request line and headers (431, connection closed)
  --max_field_kb         each multipart part's headers and each text field
                         (413); --max_parts: number of parts (413)
  --max_pixels           pixels of an upload, read from its header before it
                         is decoded (400); label and instance maps must be
                         PNGs, style images PNG or JPEG (others are not even
                         opened)
  --max_decodes          uploads decoded at once (503 when none frees in time)
  --max_connections      open connections (as many more get a 503, and the
                         rest wait in the --backlog queue)
  --request_timeout_s    the whole request: an upload still arriving after it
                         is dropped; an answer not ready by then is a 503
  --idle_timeout_s       a keep-alive connection left silent is closed
Request lines are logged with control characters escaped.

The HTTP stack is waitress (the WSGI server) with werkzeug (requests,
routing, multipart parsing). Waitress is a mature pure-Python server with
no dependencies, made for exactly this shape: a fixed pool of threads fed
by one asynchronous loop that reads each request in full (so a slow client
holds a socket, not a thread) with limits on connections, header and body
sizes, strict Content-Length and chunked parsing, keep-alive and pipelining.
The app is synchronous (one device worker; decodes in a bounded pool), so
an ASGI stack would add an event loop without a use. Werkzeug's form parser
streams parts with limits on part count and size. This module is only the
HTTP layer; `serve_app` holds the model, the request checks and the worker.
"""
import dataclasses
import ipaddress
import json
import logging as std_logging
import signal
import sys
import threading
import time
from typing import Dict, Iterable, Optional, Tuple
import urllib.parse

from absl import app
from absl import flags
from absl import logging
import waitress.channel
import waitress.server
import waitress.parser
import waitress.task
import waitress.utilities
import werkzeug.exceptions
import werkzeug.routing
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from spade_jax import serve_app
from spade_jax import xla_cpu
from spade_jax.serve_app import RequestError


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request and the server as a whole may take (see the flags)."""
  max_body_bytes: int = 10 * 2**20
  max_header_bytes: int = 64 * 2**10
  # Werkzeug's parser reads the body in 64 KiB blocks and counts a block
  # against this limit, so it must be well above that.
  max_field_bytes: int = 256 * 2**10
  max_parts: int = 16
  max_connections: int = 100
  backlog: int = 1024
  request_timeout_s: float = 120.0
  idle_timeout_s: float = 60.0
  threads: int = 4

  def __post_init__(self):
    if self.max_field_bytes < 128 * 2**10:
      raise ValueError(f'max_field_bytes={self.max_field_bytes}: must be at '
                       'least 128 KiB (the multipart parser reads 64 KiB '
                       'blocks).')
    for name in ('max_body_bytes', 'max_header_bytes', 'max_parts',
                 'max_connections', 'backlog', 'request_timeout_s',
                 'idle_timeout_s', 'threads'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name}={getattr(self, name)}: must be positive.')


LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1')
ROUTES = werkzeug.routing.Map([
    werkzeug.routing.Rule('/', endpoint='page', methods=['GET']),
    werkzeug.routing.Rule('/index.html', endpoint='page', methods=['GET']),
    werkzeug.routing.Rule('/api/classes', endpoint='classes',
                          methods=['GET']),
    werkzeug.routing.Rule('/api/sample', endpoint='sample', methods=['GET']),
    werkzeug.routing.Rule('/api/synthesize', endpoint='synthesize',
                          methods=['POST']),
    werkzeug.routing.Rule('/api/labelmap', endpoint='labelmap',
                          methods=['POST']),
], strict_slashes=False)
# Bodies up to this many times --max_upload_mb are read before the 413, so
# that a client that sends its whole body first gets the answer.
DRAIN_FACTOR = 4
# The WSGI environ key of the time (time.monotonic()) a request's first byte
# arrived; the request deadline counts from it.
STARTED_KEY = 'spade_jax.started'


def printable(text: str) -> str:
  """`text` with control characters (C0, DEL, C1) as \\xNN escapes."""
  return ''.join(
      f'\\x{ord(c):02x}' if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or
      c == '\\' else c for c in text)


def split_host(value: str) -> Optional[Tuple[str, Optional[int]]]:
  """'name:port' (Host header) -> (lowercase name, port), None if malformed."""
  try:
    parts = urllib.parse.urlsplit('//' + value)
    return parts.hostname or None, parts.port
  except ValueError:
    return None


def allowed_host_names(host: str, extra: Iterable[str] = ()) -> frozenset:
  """The names a Host header may give: loopback, `host` itself, `extra`."""
  names = set(LOOPBACK_NAMES) | {h.strip().lower() for h in extra if h.strip()}
  if host not in ('0.0.0.0', '::', ''):
    names.add(host.strip('[]').lower())
  return frozenset(names)


def is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


# ---------------------------------------------------------------------------
# The WSGI application.
# ---------------------------------------------------------------------------
class WebApp:
  """The WSGI callable: checks Host and Origin, routes, answers in JSON."""

  def __init__(self, app_: serve_app.App, limits: Limits = Limits(),
               allowed_hosts: frozenset = frozenset(LOOPBACK_NAMES)):
    self.app = app_
    self.limits = limits
    self.allowed_hosts = allowed_hosts

  def __call__(self, environ, start_response):
    started = environ.get(STARTED_KEY, time.monotonic())
    request = Request(environ)
    request.max_content_length = self.limits.max_body_bytes
    request.max_form_memory_size = self.limits.max_field_bytes
    request.max_form_parts = self.limits.max_parts
    try:
      response = self.answer(request, started + self.limits.request_timeout_s)
    except RequestError as e:
      response = self.error(e)
    except werkzeug.exceptions.HTTPException as e:
      response = self.error(RequestError(e.code, self.describe(e)))
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('Request %s failed', printable(_request_line(environ)))
      response = self.error(RequestError(
          500, f'internal error: {type(e).__name__}: {e}'))
    finally:
      request.close()  # Uploads werkzeug spooled to temporary files.
    response.headers['Cache-Control'] = 'no-store'
    self.log(environ, response, started)
    return response(environ, start_response)

  def describe(self, e: werkzeug.exceptions.HTTPException) -> str:
    if isinstance(e, werkzeug.exceptions.RequestEntityTooLarge):
      return (f'a multipart part\'s headers or a text field is over '
              f'{self.limits.max_field_bytes} bytes, or the form has more '
              f'than {self.limits.max_parts} parts.')
    return f'{e.name}: {e.description}'

  @staticmethod
  def error(e: RequestError) -> Response:
    if e.status >= 500:
      logging.error('%s', e.message)
    return _json(e.status, {'error': e.message})

  def log(self, environ, response: Response, started: float) -> None:
    logging.info('%s "%s" %s %s bytes %.0f ms',
                 environ.get('REMOTE_ADDR', '-'),
                 printable(_request_line(environ)), response.status_code,
                 response.content_length,
                 (time.monotonic() - started) * 1000)

  def check_host(self, request: Request) -> None:
    value = request.headers.get('Host', '')
    host = split_host(value)
    if host is None or host[0] not in self.allowed_hosts:
      raise RequestError(421, f'the Host {printable(value[:100])!r} is not '
                         'served here: use a loopback address, the --host '
                         'address, or start the server with --allowed_hosts '
                         'naming it.')
    origin = request.headers.get('Origin')
    if request.method == 'POST' and origin is not None:
      parts = urllib.parse.urlsplit(origin)
      try:
        port = parts.port or (80 if parts.scheme == 'http' else None)
      except ValueError:
        port = None
      if (parts.scheme, parts.hostname, port) != ('http', host[0],
                                                   host[1] or 80):
        raise RequestError(403, f'a POST from the origin '
                           f'{printable(origin[:100])!r}: only this '
                           "server's own page may post to it.")

  def answer(self, request: Request, deadline: float) -> Response:
    self.check_host(request)
    adapter = ROUTES.bind_to_environ(request.environ)
    try:
      endpoint, _ = adapter.match()
    except werkzeug.exceptions.NotFound:
      raise RequestError(404, f'no such path {printable(request.path)!r}; '
                         'the API is GET /api/classes, GET /api/sample, '
                         'POST /api/synthesize, POST /api/labelmap.'
                         ) from None
    except werkzeug.exceptions.MethodNotAllowed as e:
      allowed = ', '.join(sorted(e.valid_methods or ()))
      response = self.error(RequestError(
          405, f'{request.method} is not allowed on '
          f'{printable(request.path)}; use {allowed}.'))
      response.headers['Allow'] = allowed
      return response
    if endpoint == 'page':
      return Response(self.app.page, content_type='text/html; charset=utf-8')
    if endpoint == 'classes':
      return _json(200, self.app.classes())
    if endpoint == 'sample':
      return _json(200, self.app.sample(request.args.get('seed', '0')))
    fields = self.fields(request)
    if endpoint == 'labelmap':
      return _json(200, self.app.labelmap(fields, deadline))
    image, headers = self.app.synthesize(fields, deadline)
    return Response(image, content_type='image/png', headers=headers)

  def fields(self, request: Request) -> Dict[str, bytes]:
    """A POST's form -> {field name: bytes}; 4xx for unusable bodies."""
    length = request.content_length
    if length is None:
      raise RequestError(411, 'a POST needs a Content-Length header.')
    limit = self.limits.max_body_bytes
    if length > limit:
      raise RequestError(413, _too_large(length, limit))
    kind = request.mimetype
    if kind == 'image/png':
      return {'label': request.get_data()}
    if kind != 'multipart/form-data':
      raise RequestError(415, f'Content-Type {kind or "(none)"!r}: send '
                         'multipart/form-data (fields label, instance, style,'
                         ' seed, ids) or a bare image/png label map.')
    if not request.mimetype_params.get('boundary'):
      raise RequestError(400, 'multipart/form-data without a boundary '
                         'parameter in Content-Type.')
    form, files = request.form, request.files
    if not form and not files and length:
      raise RequestError(400, 'malformed multipart body: no complete part '
                         'or no closing boundary (truncated upload?).')
    out = {}
    for multidict, read in ((form, lambda v: v.encode('utf-8')),
                            (files, lambda f: f.read())):
      for name, values in multidict.lists():
        if not name:
          raise RequestError(400, 'malformed multipart body: a part has no '
                             'Content-Disposition name.')
        if name in out or len(values) > 1:
          raise RequestError(400, f'the field {name!r} is given twice.')
        out[name] = read(values[0])
    return out


def _json(status: int, obj) -> Response:
  return Response(json.dumps(obj), status=status,
                  content_type='application/json')


def _too_large(length, limit: int) -> str:
  return (f'the request body is {length} bytes; the limit is {limit} bytes '
          f'({limit / 2**20:g} MiB, --max_upload_mb): send a smaller label '
          'map or style image.')


def _request_line(environ) -> str:
  return (f'{environ.get("REQUEST_METHOD", "-")} '
          f'{environ.get("REQUEST_URI", "-")} '
          f'{environ.get("SERVER_PROTOCOL", "-")}')


# ---------------------------------------------------------------------------
# Waitress, with JSON errors and a deadline on reading a request.
# ---------------------------------------------------------------------------
class _Parser(waitress.parser.HTTPRequestParser):
  """Notes when a request's first byte arrived."""

  def __init__(self, adj):
    super().__init__(adj)
    self.started = time.monotonic()


class _ServiceUnavailable(waitress.utilities.Error):
  code = 503
  reason = 'Service Unavailable'


class _OverloadedParser(_Parser):
  """Refuses its request (503) once the headers are in: it arrived on a
  connection past --max_connections."""

  def received(self, data):
    consumed = super().received(data)
    if self.headers_finished and not self.error and not self.empty:
      self.error = _ServiceUnavailable('too many connections')
      self.completed = True
    return consumed


class _Task(waitress.task.WSGITask):

  def get_environment(self):
    environ = super().get_environment()
    environ[STARTED_KEY] = self.request.started
    return environ


class _ErrorTask(waitress.task.ErrorTask):
  """Waitress's own refusals (bad framing, oversize headers or bodies) in
  the app's JSON form; the connection is closed after them."""

  def execute(self):
    error = self.request.error
    message = f'{error.reason}: {str(error.body).rstrip(".")}.'
    limits = self.channel.server.limits
    if isinstance(error, waitress.utilities.RequestEntityTooLarge):
      message = _too_large(self.request.content_length or 'over '
                           f'{self.channel.adj.max_request_body_size - 1}',
                           limits.max_body_bytes)
    elif isinstance(error, _ServiceUnavailable):
      message = (f'the server has {limits.max_connections} connections open '
                 '(--max_connections): try again shortly.')
    elif isinstance(error, waitress.utilities.RequestHeaderFieldsTooLarge):
      message = (f'the request line and headers are over '
                 f'{limits.max_header_bytes} bytes (--max_header_kb).')
    body = json.dumps({'error': message}).encode()
    self.status = f'{error.code} {error.reason}'
    self.response_headers.extend([('Content-Type', 'application/json'),
                                  ('Cache-Control', 'no-store')])
    self.set_close_on_finish()
    self.content_length = len(body)
    self.write(body)
    logging.info('%s "-" %d %s', self.channel.addr[0], error.code,
                 printable(message))


class _Channel(waitress.channel.HTTPChannel):
  """A connection; one past --max_connections answers its request with a
  503 and closes."""
  parser_class = _Parser
  task_class = _Task
  error_task_class = _ErrorTask

  def __init__(self, server, sock, addr, adj, map=None):  # pylint: disable=redefined-builtin
    # Counted before this one joins them.
    if len(server.active_channels) >= server.limits.max_connections:
      self.parser_class = _OverloadedParser
    super().__init__(server, sock, addr, adj, map)


class _WaitressServer(waitress.server.TcpWSGIServer):
  """One listening socket; closes connections whose request is late."""

  channel_class = _Channel

  def __init__(self, application, limits: Limits, **kwargs):
    self.limits = limits
    super().__init__(application, **kwargs)

  def maintenance(self, now):
    super().maintenance(now)
    late = time.monotonic() - self.limits.request_timeout_s
    for channel in list(self.active_channels.values()):
      request = channel.request  # The request still being read.
      if request is not None and not request.completed and (
          request.started < late):
        logging.info('%s: closing a connection whose request did not arrive '
                     'within %g s.', channel.addr[0],
                     self.limits.request_timeout_s)
        channel.will_close = True


class _EscapeControl(std_logging.Filter):
  """Escapes control characters in waitress's own log records."""

  def filter(self, record):
    record.msg = printable(record.getMessage())
    record.args = ()
    return True


_ESCAPE_CONTROL = _EscapeControl()


class Server:
  """The web app on waitress: `serve_forever` in one thread, `shutdown`
  from another, then `close`."""

  def __init__(self, app_: serve_app.App, host: str = '127.0.0.1',
               port: int = 8000, limits: Limits = Limits(),
               allowed_hosts: Iterable[str] = ()):
    self.app = app_
    self.limits = limits
    self.web_app = WebApp(app_, limits, allowed_host_names(host,
                                                           allowed_hosts))
    self._stopping = threading.Event()
    std_logging.getLogger('waitress').addFilter(_ESCAPE_CONTROL)  # Once.
    self._server = _WaitressServer(
        self.web_app, limits, host=host, port=port, map={},
        threads=limits.threads,
        # Up to max_connections more get a 503 (_Channel); past those, the
        # rest wait in the backlog. Waitress counts its listening socket and
        # its wake-up pipe too.
        connection_limit=2 * limits.max_connections + 2,
        backlog=limits.backlog,
        max_request_header_size=limits.max_header_bytes,
        # Waitress refuses bodies of this size and more from the headers,
        # before reading them (the client, still sending, may see a reset
        # connection rather than the 413). Bodies up to it are read (to a
        # temporary file past 512 KiB) so that WebApp answers a 413 the
        # client reads.
        max_request_body_size=DRAIN_FACTOR * limits.max_body_bytes + 1,
        channel_timeout=limits.idle_timeout_s,
        cleanup_interval=max(1, min(30, limits.request_timeout_s / 4)),
        ident='spade_jax', clear_untrusted_proxy_headers=False,
        expose_tracebacks=False)

  @property
  def url(self) -> str:
    host, port = self._server.effective_host, self._server.effective_port
    if host in ('0.0.0.0', '::'):
      host = '127.0.0.1' if host == '0.0.0.0' else '::1'
    if ':' in host:
      host = f'[{host}]'
    return f'http://{host}:{port}/'

  def start(self, warm_up: bool = True) -> Optional[float]:
    """Starts the worker (compiling first when `warm_up`)."""
    return self.app.start(warm_up)

  def serve_forever(self) -> None:
    """Serves until `shutdown` (from another thread or a signal handler)."""
    while not self._stopping.is_set():
      self._server.asyncore.loop(timeout=0.5, map=self._server._map,  # pylint: disable=protected-access
                                 use_poll=True, count=1)

  def shutdown(self) -> None:
    self._stopping.set()
    self._server.pull_trigger()

  def close(self) -> None:
    """Closes every connection, the socket, the threads and the worker."""
    self._stopping.set()
    for channel in list(self._server.active_channels.values()):
      channel.close()
    self._server.close()
    self._server.task_dispatcher.shutdown(timeout=10)
    self.app.stop()


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
FLAGS = flags.FLAGS
_DEFAULTS = Limits()


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('model', None, 'Model folder (spade_jax.export / '
                      'convert) or training workdir (spade_jax.main).')
  flags.DEFINE_string('classes', None, 'Class names and colours: a built '
                      'data set folder (its dataset_info.json) or a '
                      'classes.json file; overrides what the model holds. '
                      "Its number of classes must be the model's label_nc.")
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: '
                      'every interface; the server has no authentication).')
  flags.DEFINE_integer('port', 8000, 'Port to listen on (0: any free one).')
  flags.DEFINE_list('allowed_hosts', [], 'Host names (or addresses) other '
                    'than loopback and --host that clients may use to reach '
                    'the server (the Host header); others get 421.')
  flags.DEFINE_integer('step', None, 'Checkpoint step of a training workdir '
                       '(default: the latest).')
  flags.DEFINE_bool('use_ema', True, 'Use the EMA generator weights of a '
                    'training workdir when training kept them.')
  flags.DEFINE_integer('max_batch', 1, 'Generate up to this many waiting '
                       'requests as one batch (compiles batch sizes 1 and '
                       'this).')
  flags.DEFINE_float('max_upload_mb', _DEFAULTS.max_body_bytes / 2**20,
                     'Largest request body accepted, in MiB (413 above).')
  flags.DEFINE_integer('max_header_kb', _DEFAULTS.max_header_bytes // 2**10,
                       'Largest request line plus headers, in KiB (431).')
  flags.DEFINE_integer('max_field_kb', _DEFAULTS.max_field_bytes // 2**10,
                       'Largest multipart part header block or text field, '
                       'in KiB (413); at least 128.')
  flags.DEFINE_integer('max_parts', _DEFAULTS.max_parts,
                       'Most parts in a multipart form (413).')
  flags.DEFINE_integer('max_pixels', serve_app.DEFAULT_MAX_PIXELS,
                       'Most pixels in an uploaded image, checked from its '
                       'header before decoding (400).')
  flags.DEFINE_integer('max_decodes', serve_app.DEFAULT_MAX_DECODES,
                       'Uploads decoded at the same time (others wait; 503 '
                       'at the request deadline).')
  flags.DEFINE_integer('max_connections', _DEFAULTS.max_connections,
                       'Open connections served at once (as many more get '
                       'a 503; the rest wait in the listen backlog).')
  flags.DEFINE_integer('backlog', _DEFAULTS.backlog,
                       'Listen backlog: connections waiting to be accepted.')
  flags.DEFINE_float('request_timeout_s', _DEFAULTS.request_timeout_s,
                     'Deadline of a whole request, from its first byte: '
                     'reading it and answering it (503 when the answer is '
                     'late).')
  flags.DEFINE_float('idle_timeout_s', _DEFAULTS.idle_timeout_s,
                     'A connection silent this long is closed.')


def limits_from_flags() -> Limits:
  return Limits(max_body_bytes=int(FLAGS.max_upload_mb * 2**20),
                max_header_bytes=FLAGS.max_header_kb * 2**10,
                max_field_bytes=FLAGS.max_field_kb * 2**10,
                max_parts=FLAGS.max_parts,
                max_connections=FLAGS.max_connections,
                backlog=FLAGS.backlog,
                request_timeout_s=FLAGS.request_timeout_s,
                idle_timeout_s=FLAGS.idle_timeout_s)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.apply_cpu_defaults()  # Before anything starts JAX.
  if FLAGS.max_batch < 1:
    raise app.UsageError('--max_batch must be at least 1.')
  for name in ('max_pixels', 'max_decodes'):
    if FLAGS[name].value < 1:
      raise app.UsageError(f'--{name} must be positive.')
  try:
    limits = limits_from_flags()
  except ValueError as e:
    raise app.UsageError(f'a limit flag: {e}') from None
  try:
    model = serve_app.load_model(FLAGS.model, FLAGS.step, FLAGS.use_ema,
                                 classes=FLAGS.classes)
    app_ = serve_app.App(model, max_batch=FLAGS.max_batch,
                         max_pixels=FLAGS.max_pixels,
                         max_decodes=FLAGS.max_decodes)
  except (FileNotFoundError, ValueError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    return 2
  try:
    server = Server(app_, FLAGS.host, FLAGS.port, limits, FLAGS.allowed_hosts)
  except OSError as e:
    print(f'ERROR: cannot listen on {FLAGS.host}:{FLAGS.port}: {e}. Pick '
          'another --port (0: any free one).', file=sys.stderr)
    return 2
  if not is_loopback(FLAGS.host):
    logging.warning('Listening on %s: other machines can reach this server, '
                    'which has no authentication.', FLAGS.host)
  config = model.config
  logging.info('Model %s: netG=%s, label_nc=%d, image %s, use_vae=%s, '
               'instance maps: %s', FLAGS.model, config.netG, config.label_nc,
               model.synth.image_size, config.use_vae,
               not config.no_instance)
  took = server.start(warm_up=True)
  logging.info('Compiled the generator in %.1f s.', took)

  stopping = []

  def on_signal(signum, frame):
    del frame
    if stopping:  # A second Ctrl-C: stop waiting.
      raise KeyboardInterrupt
    stopping.append(signum)
    logging.info('%s: stopping.', signal.Signals(signum).name)
    server.shutdown()

  # Both set explicitly: a shell's background job inherits an ignored SIGINT.
  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  print(f'Serving {FLAGS.model} at {server.url} (open it in a browser; '
        'Ctrl-C stops).', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    logging.info('Interrupted again: stopping now.')
  finally:
    server.close()
  print('Stopped.', flush=True)
  return 0


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['model'])
  app.run(main)
