r"""Interactive GauGAN-style web app: paint a label map, get an image.

  python -m spade_jax.serve --model MODEL [--classes DATA_OR_JSON] \
      [--host 127.0.0.1] [--port 8000] [--step N] [--max_batch 1] \
      [--max_upload_mb 10]

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
                                     an image whose style the encoder takes
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

Label maps are PNGs whose pixel values are the ids: gray 8- or 16-bit,
palette (the indices), or RGB/RGBA whose three channels are equal (what a
browser canvas writes; alpha must be opaque). 255 is don't-care for models
that have that class. A map of another size than the model's is resized to
it with PIL's nearest neighbour, as spade_jax.synthesize and the data
pipeline do. Ids outside the model's range, undecodable or non-PNG maps,
colour maps, unknown or missing fields and style/seed on a model without a
VAE get 400; bodies over --max_upload_mb get 413 (checked from
Content-Length, before the body is read); unknown paths 404; other methods
405. Example:

  curl -F label=@label.png -F seed=3 http://127.0.0.1:8000/api/synthesize \
      -o image.png

One worker thread owns the device and runs every generation in turn
(requests wait in a queue); with --max_batch N > 1 requests waiting together
are generated as one batch, padded to N. The generator is compiled at start
for the batch sizes used (the model's image size is fixed: maps are resized
to it).
"""
import concurrent.futures
import dataclasses
import email.message
import http.server
import importlib.resources
import io
import ipaddress
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple
import urllib.parse

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from spade_jax import export
from spade_jax import model_io
from spade_jax import models
from spade_jax import synthesizer
from spade_jax import visualize
from spade_jax.synthesizer import Synthesizer

PAGE_FILE = 'serve_page.html'
DONTCARE_VALUE = synthesizer.DONTCARE_VALUE
DEFAULT_MAX_BODY_BYTES = 10 * 2**20
# Decoded images larger than this many pixels are refused (decompression
# bombs: a small PNG can hold a huge image).
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_SEED = 2**32 - 1
FIELDS = ('label', 'instance', 'style', 'seed', 'ids')
# Single-channel PIL modes whose pixel values are the ids.
_MAP_MODES = ('L', 'P', 'I', 'I;16', 'I;16B', 'I;16L')
# How long a request waits for the worker before giving up (503).
RESULT_TIMEOUT_S = 600


class RequestError(Exception):
  """A request the server refuses: HTTP status and a message for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


# ---------------------------------------------------------------------------
# The model and its classes.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Model:
  """A loaded generator and what the page needs to know about it."""
  synth: Synthesizer
  names: List[str]    # One per class id 0..num_classes(config)-1.
  colors: List[List[int]]
  source: str
  step: Optional[int] = None

  @property
  def config(self):
    return self.synth.config

  def info(self) -> Dict:
    """The /api/classes answer."""
    config = self.config
    label_nc = int(config.label_nc)
    dontcare = None
    if config.contain_dontcare_label:
      dontcare = {'id': label_nc, 'value': DONTCARE_VALUE,
                  'name': self.names[label_nc],
                  'color': self.colors[label_nc]}
    h, w = self.synth.image_size
    return {
        'model': os.path.basename(os.path.normpath(self.source)),
        'step': self.step,
        'num_classes': label_nc,
        'names': self.names[:label_nc],
        'colors': self.colors[:label_nc],
        'image_size': [h, w],
        'use_vae': bool(config.use_vae),
        'has_encoder': self.synth.has_encoder,
        'no_instance': bool(config.no_instance),
        'dontcare': dontcare,
        'eraser_id': DONTCARE_VALUE if dontcare else 0,
        'has_samples': config.get('dataset') == 'synthetic',
        'dataset': config.get('dataset', 'custom'),
        'netG': config.netG,
        'max_seed': MAX_SEED,
    }


def class_table(config, classes: Optional[Dict]
                ) -> Tuple[List[str], List[List[int]]]:
  """Names and colours for every class id, filling in what `classes` lacks.

  Missing names are 'class N' (the don't-care class: "don't care"); missing
  colours come from `visualize.default_palette`.
  """
  total = models.num_classes(config)
  classes = classes or {}
  names = list(classes.get('names') or [])
  colors = list(classes.get('colors') or [])
  palette = visualize.default_palette(max(total, 256))
  out_names, out_colors = [], []
  for i in range(total):
    if i < len(names) and names[i]:
      out_names.append(str(names[i]))
    elif i == config.label_nc:
      out_names.append("don't care")
    else:
      out_names.append(f'class {i}')
    color = colors[i] if i < len(colors) else palette[i]
    out_colors.append([int(v) for v in color])
  return out_names, out_colors


def load_model(path: str, step: Optional[int] = None,
               use_ema: bool = True, classes: Optional[str] = None) -> Model:
  """A model folder or a training workdir (latest checkpoint, or `step`).

  `classes` (a built data set folder or a classes.json file) overrides the
  class names and colours the model's folder or training data give; its
  number of classes must be the model's label_nc (ValueError otherwise).
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'{path} does not exist: pass a model folder (from spade_jax.export '
        'or spade_jax.convert) or a training workdir (from spade_jax.main).')
  config = metadata = None
  if classes:  # Checked before the (slower) restore of the variables.
    config = (model_io.load_config(path) if export.is_model_folder(path)
              else export.workdir_config(path))
    metadata = export.read_class_source(classes, config.label_nc)
  config, variables, step = export.load_inference_variables(path, step,
                                                            use_ema, config)
  synth = Synthesizer(config, variables)
  if metadata is None:
    metadata = export.class_metadata(config, path)
  names, colors = class_table(config, metadata)
  return Model(synth=synth, names=names, colors=colors, source=path,
               step=step)


# ---------------------------------------------------------------------------
# Decoding and checking requests.
# ---------------------------------------------------------------------------
def parse_multipart(body: bytes, content_type: str
                    ) -> Dict[str, Tuple[bytes, Optional[str]]]:
  """multipart/form-data -> {field name: (content, file name or None)}."""
  header = email.message.Message()
  header['content-type'] = content_type
  boundary = header.get_param('boundary')
  if not boundary or not isinstance(boundary, str):
    raise RequestError(400, 'multipart/form-data without a boundary '
                       'parameter in Content-Type.')
  delimiter = b'\r\n--' + boundary.encode('latin-1')
  chunks = (b'\r\n' + body).split(delimiter)
  if len(chunks) < 2:
    raise RequestError(400, 'malformed multipart body: the boundary from '
                       'Content-Type does not occur in it.')
  fields = {}
  for chunk in chunks[1:]:
    if chunk.startswith(b'--'):  # The closing delimiter.
      break
    head, sep, content = chunk.partition(b'\r\n\r\n')
    if not sep:
      raise RequestError(400, 'malformed multipart body: a part has no '
                         'blank line after its headers.')
    part = email.message.Message()
    for line in head.split(b'\r\n')[1:]:  # [0]: the rest of the delimiter.
      name, colon, value = line.decode('latin-1').partition(':')
      if colon:
        part[name.strip()] = value.strip()
    name = part.get_param('name', header='content-disposition')
    if not name or not isinstance(name, str):
      raise RequestError(400, 'malformed multipart body: a part has no '
                         'Content-Disposition name.')
    if name in fields:
      raise RequestError(400, f'the field {name!r} is given twice.')
    filename = part.get_param('filename', header='content-disposition')
    fields[name] = (content, filename if isinstance(filename, str) else None)
  else:
    raise RequestError(400, 'malformed multipart body: no closing boundary '
                       '(truncated upload?).')
  return fields


def _open_image(data: bytes, what: str) -> Image.Image:
  if not data:
    raise RequestError(400, f'the {what} is empty.')
  try:
    im = Image.open(io.BytesIO(data))
  except Exception as e:  # pylint: disable=broad-except
    raise RequestError(400, f'cannot decode the {what}: {e}') from None
  w, h = im.size
  if w * h > MAX_IMAGE_PIXELS:
    raise RequestError(400, f'the {what} is {w}x{h} pixels; the limit is '
                       f'{MAX_IMAGE_PIXELS} pixels.')
  try:
    im.load()
  except Exception as e:  # pylint: disable=broad-except
    raise RequestError(400, f'cannot decode the {what}: {e}') from None
  return im


def decode_map(data: bytes, what: str) -> np.ndarray:
  """A PNG of ids -> int64 (H, W) of its pixel values (see the docstring)."""
  im = _open_image(data, what)
  if im.format != 'PNG':
    raise RequestError(400, f'the {what} is a {im.format} image: send a PNG '
                       '(lossless; the pixel values are the ids).')
  mode = im.mode
  arr = np.asarray(im)
  if mode in _MAP_MODES:
    pass
  elif mode in ('RGB', 'RGBA', 'LA'):
    if mode in ('RGBA', 'LA') and (arr[..., -1] != 255).any():
      raise RequestError(400, f'the {what} has transparent pixels: ids need '
                         'opaque pixels (or a gray PNG without alpha).')
    if mode != 'LA':
      differ = int(((arr[..., 0] != arr[..., 1]) |
                    (arr[..., 0] != arr[..., 2])).sum())
      if differ:
        raise RequestError(
            400, f'the {what} is a colour image ({differ} pixels have R, G, '
            'B not all equal): send the ids as a gray PNG, or RGB with equal '
            'channels, not a colourised map.')
    arr = arr[..., 0]
  else:
    raise RequestError(400, f'the {what} has PIL mode {mode}: expected a gray '
                       '8- or 16-bit PNG of ids.')
  if arr.ndim != 2 or arr.size == 0:
    raise RequestError(400, f'the {what} has shape {arr.shape}: expected '
                       '(H, W).')
  return arr.astype(np.int64)


def resize_nearest(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """PIL NEAREST resize of a map, as the data pipeline resizes label maps."""
  h, w = size
  if x.shape[:2] == (h, w):
    return x
  rows = export.pil_nearest_indices(x.shape[0], h)
  cols = export.pil_nearest_indices(x.shape[1], w)
  return x[rows][:, cols]


def map_dataset_ids(raw: np.ndarray, config) -> np.ndarray:
  """Raw data-set ids -> class ids (input_pipeline.map_labels, in numpy)."""
  label = raw
  if config.get('dataset') == 'ade20k':
    label = np.where(raw == 0, config.label_nc, raw - 1)
  if config.contain_dontcare_label:
    label = np.where(raw == DONTCARE_VALUE, config.label_nc, label)
  return label


def check_class_ids(label: np.ndarray, config, what: str) -> np.ndarray:
  """Class ids -> int32 ids 0..num_classes-1; 400 naming any bad ids."""
  try:
    return synthesizer.class_ids(label, config, what)
  except ValueError as e:
    raise RequestError(400, str(e)) from None


@dataclasses.dataclass
class LabelInput:
  label: np.ndarray            # int32 (H, W) class ids at the model's size.
  original_size: Tuple[int, int]


def read_label(fields: Dict, model: Model) -> LabelInput:
  """The checked label map of a request, at the model's size."""
  if 'label' not in fields:
    raise RequestError(400, 'missing the \'label\' field: a PNG of class '
                       'ids (multipart/form-data field "label").')
  ids = fields.get('ids', (b'class', None))[0].decode('latin-1').strip()
  if ids not in ('class', 'dataset'):
    raise RequestError(400, f'ids={ids!r}: expected \'class\' (the model\'s '
                       'class ids) or \'dataset\' (raw data-set ids).')
  raw = decode_map(fields['label'][0], 'label map')
  if ids == 'dataset':
    raw = map_dataset_ids(raw, model.config)
  label = check_class_ids(raw, model.config, 'label map')
  return LabelInput(resize_nearest(label, model.synth.image_size),
                    tuple(raw.shape))


def read_style(data: bytes, model: Model) -> np.ndarray:
  """A style image -> float32 (H, W, 3) in [-1, 1] at the model's size."""
  im = _open_image(data, 'style image').convert('RGB')
  h, w = model.synth.image_size
  if im.size != (w, h):
    im = im.resize((w, h), Image.BICUBIC)
  return (np.asarray(im, np.float32) / 127.5 - 1.0).astype(np.float32)


@dataclasses.dataclass
class Job:
  """One image to generate, checked and at the model's size."""
  label: np.ndarray
  instance: Optional[np.ndarray] = None
  seed: Optional[int] = None
  style: Optional[np.ndarray] = None
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)


def make_job(fields: Dict, model: Model) -> Job:
  """A synthesis request's fields -> a Job (RequestError when unusable)."""
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise RequestError(400, f'unknown fields {unknown}: expected '
                       f'{", ".join(FIELDS)}.')
  config = model.config
  use_vae = bool(config.use_vae)
  for name in ('style', 'seed'):
    if name in fields and not use_vae:
      raise RequestError(400, f'the \'{name}\' field needs a VAE model; this '
                         'one has use_vae=False: each label map gives one '
                         'image.')
  label_in = read_label(fields, model)
  job = Job(label=label_in.label)
  if 'instance' in fields:
    if config.no_instance:
      raise RequestError(400, 'this model uses no instance maps '
                         '(no_instance=True): leave out \'instance\'.')
    instance = decode_map(fields['instance'][0], 'instance map')
    if instance.shape != label_in.original_size:
      raise RequestError(
          400, f'the instance map is {instance.shape[1]}x{instance.shape[0]}'
          f' but the label map is {label_in.original_size[1]}x'
          f'{label_in.original_size[0]}.')
    if instance.min() < 0 or instance.max() > np.iinfo(np.int32).max:
      raise RequestError(400, 'the instance map holds ids outside int32.')
    job.instance = resize_nearest(instance, model.synth.image_size).astype(
        np.int32)
  elif not config.no_instance:
    job.instance = job.label  # As spade_jax.synthesize does.
  if use_vae:
    job.seed = 0
    if 'seed' in fields:
      text = fields['seed'][0].decode('latin-1').strip()
      try:
        job.seed = int(text)
      except ValueError:
        raise RequestError(400, f'seed={text[:40]!r} is not an integer.'
                           ) from None
      if not 0 <= job.seed <= MAX_SEED:
        raise RequestError(400, f'seed={job.seed} is outside 0..{MAX_SEED}.')
    if 'style' in fields:
      if not model.synth.has_encoder:
        raise RequestError(400, 'this VAE model folder holds no encoder: '
                           'style images cannot be used (seeds can).')
      job.style = read_style(fields['style'][0], model)
  return job


def png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def sample_label(model: Model, seed: int) -> np.ndarray:
  """A generated synthetic scene's label map at the model's size."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  size = int(model.config.get('synthetic_size', 96))
  _, label, _ = synthetic.generate_scene(
      synthetic.scene_rng(seed, 'serve', 0), size)
  return resize_nearest(label.astype(np.int32), model.synth.image_size)


# ---------------------------------------------------------------------------
# The worker: one thread owns the device.
# ---------------------------------------------------------------------------
class Worker:
  """Runs every generation on one thread, in arrival order.

  Jobs waiting together are generated as one batch (at most `max_batch`,
  padded to `max_batch` so only batch sizes 1 and max_batch are compiled).

  Attributes:
    jobs_done, batches: counters.
    thread_ids: the thread idents that ran generations (only the worker's).
  """

  def __init__(self, synth: Synthesizer, max_batch: int = 1,
               max_queue: int = 64):
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch}: must be at least 1.')
    self.synth = synth
    self.max_batch = max_batch
    self._queue = queue.Queue(max_queue)
    self._thread = threading.Thread(target=self._run, name='spade-worker',
                                    daemon=True)
    self._lock = threading.Lock()
    self.jobs_done = 0
    self.batches = 0
    self.batch_sizes = []
    self.thread_ids = set()

  @property
  def ident(self) -> Optional[int]:
    return self._thread.ident

  def start(self) -> None:
    self._thread.start()

  def submit(self, job: Job) -> concurrent.futures.Future:
    """Queues a job; its future gets the float (H, W, 3) image in [-1, 1]."""
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      raise RequestError(503, 'the server is busy (the queue is full); try '
                         'again shortly.') from None
    return job.future

  def stop(self, timeout: float = 30) -> None:
    if self._thread.is_alive():
      try:
        self._queue.put(None, timeout=timeout)
      except queue.Full:
        logging.warning('The worker queue stayed full; not waiting for it.')
        return
      self._thread.join(timeout)

  def warm_up(self) -> float:
    """Compiles the generator (and encoder) for the batch sizes used."""
    start = time.time()
    h, w = self.synth.image_size
    blank = np.zeros((h, w), np.int32)
    instance = None if self.synth.config.no_instance else blank
    seed = 0 if self.synth.config.use_vae else None
    batches = [[Job(blank, instance, seed) for _ in range(n)]
               for n in sorted({1, self.max_batch})]
    if self.synth.has_encoder:  # The style path.
      batches.append([Job(blank, instance, seed,
                          style=np.zeros((h, w, 3), np.float32))])
    for jobs in batches:
      for job in jobs:
        self._queue.put(job)
      for job in jobs:
        job.future.result()
    return time.time() - start

  def _run(self) -> None:
    while True:
      job = self._queue.get()
      if job is None:
        return
      batch = [job]
      stop = False
      while len(batch) < self.max_batch:
        try:
          more = self._queue.get_nowait()
        except queue.Empty:
          break
        if more is None:
          stop = True
          break
        batch.append(more)
      self._process(batch)
      if stop:
        return

  def _latent(self, job: Job) -> np.ndarray:
    rng = jax.random.PRNGKey(job.seed or 0)
    if job.style is not None:
      return self.synth.encode(job.style[None], rng)[0]
    return np.asarray(jax.random.normal(rng, (self.synth.config.z_dim,)),
                      np.float32)

  def _process(self, batch: List[Job]) -> None:
    self.thread_ids.add(threading.get_ident())
    ready = []
    for job in batch:
      if not job.future.set_running_or_notify_cancel():
        continue
      try:
        z = self._latent(job) if self.synth.config.use_vae else None
      except Exception as e:  # pylint: disable=broad-except
        job.future.set_exception(e)
        continue
      ready.append((job, z))
    if not ready:
      return
    n = 1 if len(ready) == 1 else self.max_batch
    rows = ready + [ready[0]] * (n - len(ready))
    labels = np.stack([job.label for job, _ in rows])
    instances = None
    if not self.synth.config.no_instance:
      instances = np.stack([job.instance for job, _ in rows])
    z = None
    if self.synth.config.use_vae:
      z = np.stack([zz for _, zz in rows])
    try:
      images = self.synth(labels, instances, z=z)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('Generation failed')
      for job, _ in ready:
        job.future.set_exception(e)
      return
    with self._lock:
      self.jobs_done += len(ready)
      self.batches += 1
      self.batch_sizes.append(len(ready))
    for i, (job, _) in enumerate(ready):
      job.future.set_result(images[i])


# ---------------------------------------------------------------------------
# HTTP.
# ---------------------------------------------------------------------------
def read_page() -> bytes:
  """The page, shipped as package data."""
  try:
    return (importlib.resources.files('spade_jax') / PAGE_FILE).read_bytes()
  except (OSError, ModuleNotFoundError) as e:
    raise FileNotFoundError(
        f'the web page spade_jax/{PAGE_FILE} is missing from the installed '
        f'package ({e}); reinstall spade_jax (pip install -e .).') from None


class Handler(http.server.BaseHTTPRequestHandler):
  """Routes requests; `self.server.app` is the App."""

  server_version = 'spade_jax'
  protocol_version = 'HTTP/1.1'
  timeout = 60  # Seconds a connection may stay silent.

  # path -> (method, name of the method that answers it).
  ROUTES = {
      '/': ('GET', '_index_html'),
      '/index.html': ('GET', '_index_html'),
      '/api/classes': ('GET', '_api_classes'),
      '/api/sample': ('GET', '_api_sample'),
      '/api/synthesize': ('POST', '_api_synthesize'),
      '/api/labelmap': ('POST', '_api_labelmap'),
  }

  # ----- plumbing
  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.info('%s %s', self.address_string(), format % args)

  def log_request(self, code='-', size='-'):
    took = time.time() - getattr(self, '_t0', time.time())
    size = getattr(self, '_size', size)
    self.log_message('"%s" %s %s bytes %.0f ms', self.requestline, code,
                     size, took * 1000)

  def _send(self, status: int, body: bytes, content_type: str,
            headers: Optional[Dict[str, str]] = None) -> None:
    self._size = len(body)
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.send_header('Cache-Control', 'no-store')
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header('Connection', 'close')
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _json(self, status: int, obj, headers=None) -> None:
    self._send(status, json.dumps(obj).encode(), 'application/json', headers)

  def send_error(self, code, message=None, explain=None):
    """Every error, the server's own parse errors included, as JSON."""
    text = message or explain or self.responses.get(code, ('error',))[0]
    try:
      self._json(code, {'error': text})
    except OSError:
      pass

  def _error(self, e: RequestError, headers=None) -> None:
    if e.status >= 500:
      logging.error('%s: %s', self.requestline, e.message)
    self._json(e.status, {'error': e.message}, headers)

  def handle_expect_100(self):
    """Refuses too-large bodies before the client sends them."""
    try:
      if self.command == 'POST':
        self._check_length()
    except RequestError as e:
      self.close_connection = True
      self._t0 = time.time()
      self._error(e)
      return False
    return super().handle_expect_100()

  def _check_length(self) -> int:
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      raise RequestError(411, 'chunked request bodies are not accepted: send '
                         'a Content-Length.')
    text = self.headers.get('Content-Length')
    if text is None:
      raise RequestError(411, 'a POST needs a Content-Length header.')
    try:
      length = int(text)
    except ValueError:
      raise RequestError(400, f'Content-Length {text[:40]!r} is not an '
                         'integer.') from None
    if length < 0:
      raise RequestError(400, f'Content-Length {length} is negative.')
    limit = self.server.app.max_body_bytes
    if length > limit:
      raise RequestError(413, f'the request body is {length} bytes; the '
                         f'limit is {limit} bytes ({limit / 2**20:g} MiB): '
                         'send a smaller label map or style image.')
    return length

  def _read_body(self) -> bytes:
    try:
      length = self._check_length()
    except RequestError as e:
      self.close_connection = True
      if e.status == 413:
        self._drain()
      raise
    data = self.rfile.read(length)
    if len(data) < length:
      self.close_connection = True
      raise RequestError(400, f'the body ended after {len(data)} of '
                         f'{length} bytes.')
    return data

  def _drain(self) -> None:
    """Reads (and drops) a refused body of moderate size, so the client,
    still sending, gets the 413 instead of a reset connection."""
    try:
      left = int(self.headers.get('Content-Length', '0'))
    except ValueError:
      return
    if left > 4 * self.server.app.max_body_bytes:
      return
    self.connection.settimeout(5)
    try:
      while left > 0:
        chunk = self.rfile.read(min(left, 2**20))
        if not chunk:
          break
        left -= len(chunk)
    except OSError:
      pass

  def _fields(self, body: bytes) -> Dict[str, Tuple[bytes, Optional[str]]]:
    content_type = self.headers.get('Content-Type', '')
    kind = content_type.split(';')[0].strip().lower()
    if kind == 'multipart/form-data':
      return parse_multipart(body, content_type)
    if kind == 'image/png':
      return {'label': (body, None)}
    raise RequestError(415, f'Content-Type {kind or "(none)"!r}: send '
                       'multipart/form-data (fields label, instance, style, '
                       'seed, ids) or a bare image/png label map.')

  # ----- methods
  def _dispatch(self) -> None:
    self._t0 = time.time()
    url = urllib.parse.urlsplit(self.path)
    path = url.path
    try:
      route = self.ROUTES.get(path)
      if route is None:
        if self.headers.get('Content-Length', '0') != '0':
          self.close_connection = True  # Its body stays unread.
        raise RequestError(404, f'no such path {path!r}; the API is GET '
                           '/api/classes, GET /api/sample, POST '
                           '/api/synthesize, POST /api/labelmap.')
      allowed, answer = route
      if allowed == 'GET':
        allowed = 'GET, HEAD'
      if self.command not in allowed.split(', '):
        if self.headers.get('Content-Length', '0') != '0':
          self.close_connection = True  # Its body stays unread.
        self._error(RequestError(405, f'{self.command} is not allowed on '
                                 f'{path}; use {allowed}.'),
                    {'Allow': allowed})
        return
      getattr(self, answer)(url)
    except RequestError as e:
      self._error(e)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('Request %s failed', self.requestline)
      self.close_connection = True
      self._json(500, {'error': f'internal error: {type(e).__name__}: {e}'})

  # BaseHTTPRequestHandler calls do_<METHOD>; every method goes through the
  # routes, which answer 405 for the ones a path does not take.
  do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = (
      _dispatch)

  # ----- routes

  def _index_html(self, url) -> None:
    del url
    self._send(200, self.server.app.page, 'text/html; charset=utf-8')

  def _api_classes(self, url) -> None:
    del url
    self._json(200, self.server.app.model.info())

  def _api_sample(self, url) -> None:
    model = self.server.app.model
    if model.config.get('dataset') != 'synthetic':
      raise RequestError(404, 'this model has no sample label maps (only '
                         'models of the synthetic data set do).')
    query = urllib.parse.parse_qs(url.query)
    text = query.get('seed', ['0'])[0]
    try:
      seed = int(text)
    except ValueError:
      raise RequestError(400, f'seed={text[:40]!r} is not an integer.'
                         ) from None
    if not 0 <= seed <= MAX_SEED:
      raise RequestError(400, f'seed={seed} is outside 0..{MAX_SEED}.')
    label = sample_label(model, seed)
    self._json(200, {'height': label.shape[0], 'width': label.shape[1],
                     'ids': label.ravel().tolist(),
                     'original_size': list(label.shape)})

  def _api_labelmap(self, url) -> None:
    del url
    fields = self._fields(self._read_body())
    unknown = sorted(set(fields) - {'label', 'ids'})
    if unknown:
      raise RequestError(400, f'unknown fields {unknown}: expected label, '
                         'ids.')
    got = read_label(fields, self.server.app.model)
    label = got.label
    if self.server.app.model.config.contain_dontcare_label:
      label = np.where(label == self.server.app.model.config.label_nc,
                       DONTCARE_VALUE, label)
    self._json(200, {'height': label.shape[0], 'width': label.shape[1],
                     'ids': label.ravel().tolist(),
                     'original_size': list(got.original_size)})

  def _api_synthesize(self, url) -> None:
    del url
    app_ = self.server.app
    job = make_job(self._fields(self._read_body()), app_.model)
    future = app_.worker.submit(job)
    try:
      image = future.result(timeout=RESULT_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
      future.cancel()
      raise RequestError(503, f'no result within {RESULT_TIMEOUT_S} s; the '
                         'server is overloaded.') from None
    except ValueError as e:  # The Synthesizer's own input checks.
      raise RequestError(400, str(e)) from None
    headers = {}
    if job.seed is not None:
      headers['X-Seed'] = str(job.seed)
    self._send(200, png_bytes(visualize.image_to_uint8(image)), 'image/png',
               headers)


class App:
  """What the handlers share: the model, the worker, the page, limits."""

  def __init__(self, model: Model, max_batch: int = 1,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    self.model = model
    self.worker = Worker(model.synth, max_batch=max_batch)
    self.max_body_bytes = max_body_bytes
    self.page = read_page()
    if model.config.get('dataset') == 'synthetic':
      # Imported now (with TensorFlow, slow) rather than on the page's first
      # sample request.
      from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top,unused-import


class Server(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer holding the App (IPv6 when the host is)."""

  daemon_threads = True

  def __init__(self, app_: App, host: str = '127.0.0.1', port: int = 8000):
    self.app = app_
    if ':' in host:
      self.address_family = socket.AF_INET6
    super().__init__((host, port), Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    if host in ('0.0.0.0', '::'):
      host = '127.0.0.1' if host == '0.0.0.0' else '::1'
    if ':' in host:
      host = f'[{host}]'
    return f'http://{host}:{port}/'

  def start(self, warm_up: bool = True) -> Optional[float]:
    """Starts the worker (compiling first when `warm_up`)."""
    self.app.worker.start()
    return self.app.worker.warm_up() if warm_up else None

  def close(self) -> None:
    """Stops serving (when serve_forever runs) and the worker."""
    self.server_close()
    self.app.worker.stop()


def is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
FLAGS = flags.FLAGS


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
  flags.DEFINE_integer('step', None, 'Checkpoint step of a training workdir '
                       '(default: the latest).')
  flags.DEFINE_bool('use_ema', True, 'Use the EMA generator weights of a '
                    'training workdir when training kept them.')
  flags.DEFINE_integer('max_batch', 1, 'Generate up to this many waiting '
                       'requests as one batch (compiles batch sizes 1 and '
                       'this).')
  flags.DEFINE_float('max_upload_mb', DEFAULT_MAX_BODY_BYTES / 2**20,
                     'Largest request body accepted, in MiB (413 above).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.max_batch < 1:
    raise app.UsageError('--max_batch must be at least 1.')
  if FLAGS.max_upload_mb <= 0:
    raise app.UsageError('--max_upload_mb must be positive.')
  try:
    model = load_model(FLAGS.model, FLAGS.step, FLAGS.use_ema,
                       classes=FLAGS.classes)
    app_ = App(model, max_batch=FLAGS.max_batch,
               max_body_bytes=int(FLAGS.max_upload_mb * 2**20))
  except (FileNotFoundError, ValueError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    return 2
  try:
    server = Server(app_, FLAGS.host, FLAGS.port)
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
    # shutdown() waits for serve_forever(), which runs in this thread.
    threading.Thread(target=server.shutdown, daemon=True).start()

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
