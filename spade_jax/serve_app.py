"""The web app without HTTP: the model, its request checks, the worker.

`spade_jax.serve` puts this behind an HTTP server; everything here takes and
gives plain values (a request's fields as {name: bytes}, answers as dicts and
PNG bytes, refusals as `RequestError` with an HTTP status), so it is tested
without sockets. `App` is what the HTTP layer calls: one `Worker` thread owns
the device and runs every generation in turn; decoding uploads is bounded in
size (pixels, read from the header before decoding) and in how many run at
once; every wait is bounded by the request's deadline.
"""
import concurrent.futures
import contextlib
import dataclasses
import importlib.resources
import io
import os
import queue
import threading
import time
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

from absl import logging
import jax
import numpy as np
import PIL
from PIL import Image

from data_pipelines import scenes
from spade_jax import label_maps
from spade_jax import model_io
from spade_jax import models
from spade_jax import synthesizer
from spade_jax import train_state
from spade_jax import visualize
from spade_jax.synthesizer import Synthesizer

PAGE_FILE = 'serve_page.html'
# Uploads whose header gives more pixels than this are refused before they
# are decoded (decompression bombs: a small PNG can hold a huge image).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Uploads decoded at the same time (each can take ~8 bytes a pixel).
DEFAULT_MAX_DECODES = 2
# The formats an upload may have: label and instance maps are PNGs (checked
# after opening, for a clear message), style images PNG or JPEG.
IMAGE_FORMATS = ('PNG', 'JPEG')
MAX_SEED = 2**32 - 1
FIELDS = ('label', 'instance', 'style', 'seed', 'ids')


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

  @property
  def palette(self) -> np.ndarray:
    """uint8 (num_classes, 3): the class colours; RGB maps in them decode
    to the class ids."""
    return np.asarray(self.colors, np.uint8)

  def info(self) -> Dict:
    """The /api/classes answer."""
    config = self.config
    label_nc = int(config.label_nc)
    dontcare = None
    if config.contain_dontcare_label:
      dontcare = {'id': label_nc, 'value': label_maps.DONT_CARE,
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
        'eraser_id': label_maps.DONT_CARE if dontcare else 0,
        'has_samples': config.dataset == 'synthetic',
        'dataset': config.dataset,
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
    config = model_io.load_config(path)
    metadata = model_io.read_class_source(classes, config.label_nc)
  config, variables, step = train_state.load_inference_variables(
      path, step, use_ema, config)
  synth = Synthesizer(config, variables)
  if metadata is None:
    metadata = model_io.class_metadata(config, path)
  names, colors = class_table(config, metadata)
  return Model(synth=synth, names=names, colors=colors, source=path,
               step=step)


# ---------------------------------------------------------------------------
# Decoding and checking requests.
# ---------------------------------------------------------------------------
def open_image(data: bytes, what: str, max_pixels: int,
               formats: Tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
  """PNG or JPEG bytes -> a decoded PIL image, its size checked first.

  Only the `formats` plugins are tried (others, ICO for one, may decode an
  embedded image while opening), and the pixel count the header gives is
  checked against `max_pixels` before any pixel is decoded.
  """
  if not data:
    raise RequestError(400, f'the {what} is empty.')
  try:
    with warnings.catch_warnings():  # The size is checked below.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data), formats=formats)
  except Image.DecompressionBombError as e:
    raise RequestError(400, f'the {what} is too large: {e} The limit is '
                       f'{max_pixels} pixels (--max_pixels).') from None
  except PIL.UnidentifiedImageError:
    raise RequestError(400, f'cannot decode the {what}: it is not a '
                       f'{" or ".join(formats)} file.') from None
  except Exception as e:  # pylint: disable=broad-except
    raise RequestError(400, f'cannot decode the {what}: {e}') from None
  check_pixels(im.size, what, max_pixels)
  try:
    im.load()
  except Exception as e:  # pylint: disable=broad-except
    raise RequestError(400, f'cannot decode the {what}: {e}') from None
  return im


def check_pixels(size: Tuple[int, int], what: str, max_pixels: int) -> None:
  w, h = size
  if w * h > max_pixels:
    raise RequestError(400, f'the {what} is {w}x{h} pixels; the limit is '
                       f'{max_pixels} pixels (--max_pixels).')


def decode_map(data: bytes, what: str,
               max_pixels: int = DEFAULT_MAX_PIXELS,
               palette: Optional[np.ndarray] = None
               ) -> Tuple[np.ndarray, bool]:
  """A label or instance map PNG -> (int32 (H, W) ids, whether `palette`
  turned colours into them); `label_maps.read_label_map`'s rules, its
  refusals as 400."""
  try:
    return label_maps.read_label_map(data, palette=palette,
                                     max_pixels=max_pixels, name=what)
  except label_maps.LabelMapError as e:
    raise RequestError(400, str(e)) from None


def map_dataset_ids(raw: np.ndarray, config) -> np.ndarray:
  """Raw data-set ids -> class ids (`label_maps.dataset_to_class_ids`)."""
  return label_maps.dataset_to_class_ids(
      raw, dataset=config.dataset,
      label_nc=int(config.label_nc),
      contain_dontcare_label=bool(config.contain_dontcare_label))


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


def read_label(fields: Dict[str, bytes], model: Model,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LabelInput:
  """The checked label map of a request, at the model's size."""
  if 'label' not in fields:
    raise RequestError(400, 'missing the \'label\' field: a PNG of class '
                       'ids (multipart/form-data field "label").')
  ids = fields.get('ids', b'class').decode('latin-1').strip()
  if ids not in ('class', 'dataset'):
    raise RequestError(400, f'ids={ids!r}: expected \'class\' (the model\'s '
                       'class ids) or \'dataset\' (raw data-set ids).')
  raw, by_palette = decode_map(fields['label'], 'label map', max_pixels,
                               model.palette)
  if ids == 'dataset' and not by_palette:  # Colours give class ids.
    raw = map_dataset_ids(raw, model.config)
  label = check_class_ids(raw, model.config, 'label map')
  return LabelInput(label_maps.resize_nearest(label, model.synth.image_size),
                    tuple(raw.shape))


def read_style(data: bytes, model: Model,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """A style image -> float32 (H, W, 3) in [-1, 1] at the model's size."""
  im = open_image(data, 'style image', max_pixels).convert('RGB')
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


def make_job(fields: Dict[str, bytes], model: Model,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Job:
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
  label_in = read_label(fields, model, max_pixels)
  job = Job(label=label_in.label)
  if 'instance' in fields:
    if config.no_instance:
      raise RequestError(400, 'this model uses no instance maps '
                         '(no_instance=True): leave out \'instance\'.')
    instance, _ = decode_map(fields['instance'], 'instance map', max_pixels)
    if instance.shape != label_in.original_size:
      raise RequestError(
          400, f'the instance map is {instance.shape[1]}x{instance.shape[0]}'
          f' but the label map is {label_in.original_size[1]}x'
          f'{label_in.original_size[0]}.')
    if instance.min() < 0 or instance.max() > np.iinfo(np.int32).max:
      raise RequestError(400, 'the instance map holds ids outside int32.')
    job.instance = label_maps.resize_nearest(
        instance, model.synth.image_size).astype(np.int32)
  elif not config.no_instance:
    job.instance = job.label  # As spade_jax.synthesize does.
  if use_vae:
    job.seed = 0
    if 'seed' in fields:
      job.seed = parse_seed(fields['seed'].decode('latin-1').strip())
    if 'style' in fields:
      if not model.synth.has_encoder:
        raise RequestError(400, 'this VAE model folder holds no encoder: '
                           'style images cannot be used (seeds can).')
      job.style = read_style(fields['style'], model, max_pixels)
  return job


def png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def sample_label(model: Model, seed: int) -> np.ndarray:
  """A generated synthetic scene's label map at the model's size."""
  size = int(model.config.synthetic_size)
  _, label, _ = scenes.generate_scene(
      scenes.scene_rng(seed, 'serve', 0), size)
  return label_maps.resize_nearest(label.astype(np.int32),
                                  model.synth.image_size)


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




def read_page() -> bytes:
  """The page, shipped as package data."""
  try:
    return (importlib.resources.files('spade_jax') / PAGE_FILE).read_bytes()
  except (OSError, ModuleNotFoundError) as e:
    raise FileNotFoundError(
        f'the web page spade_jax/{PAGE_FILE} is missing from the installed '
        f'package ({e}); reinstall spade_jax (pip install -e .).') from None


def parse_seed(text: str) -> int:
  try:
    seed = int(text)
  except ValueError:
    raise RequestError(400, f'seed={text[:40]!r} is not an integer.') from None
  if not 0 <= seed <= MAX_SEED:
    raise RequestError(400, f'seed={seed} is outside 0..{MAX_SEED}.')
  return seed


def ids_answer(label: np.ndarray, original_size) -> Dict:
  """The JSON answer holding a label map (/api/labelmap, /api/sample)."""
  return {'height': label.shape[0], 'width': label.shape[1],
          'ids': label.ravel().tolist(),
          'original_size': list(original_size)}


class App:
  """The server's answers, without HTTP: the model, the worker, the limits.

  Each answering method takes the request's `deadline` (a time.monotonic()
  value): a wait for a decode slot or for the worker that would pass it is a
  503.
  """

  def __init__(self, model: Model, max_batch: int = 1,
               max_pixels: int = DEFAULT_MAX_PIXELS,
               max_decodes: int = DEFAULT_MAX_DECODES):
    if max_decodes < 1:
      raise ValueError(f'max_decodes={max_decodes}: must be at least 1.')
    self.model = model
    self.worker = Worker(model.synth, max_batch=max_batch)
    self.max_pixels = max_pixels
    self.decode_slots = threading.BoundedSemaphore(max_decodes)
    self.page = read_page()

  def start(self, warm_up: bool = True) -> Optional[float]:
    """Starts the worker (compiling first when `warm_up`): seconds taken."""
    self.worker.start()
    return self.worker.warm_up() if warm_up else None

  def stop(self) -> None:
    self.worker.stop()

  @contextlib.contextmanager
  def decoding(self, deadline: float) -> Iterator[None]:
    """Holds one of the decode slots; 503 when none frees before `deadline`."""
    if not self.decode_slots.acquire(timeout=_left(deadline)):
      raise RequestError(503, 'the server is busy decoding other uploads; '
                         'try again shortly.')
    try:
      yield
    finally:
      self.decode_slots.release()

  def classes(self) -> Dict:
    return self.model.info()

  def sample(self, seed_text: str) -> Dict:
    if self.model.config.dataset != 'synthetic':
      raise RequestError(404, 'this model has no sample label maps (only '
                         'models of the synthetic data set do).')
    label = sample_label(self.model, parse_seed(seed_text))
    return ids_answer(label, label.shape)

  def labelmap(self, fields: Dict[str, bytes], deadline: float) -> Dict:
    """The page's upload: the label map decoded, checked and resized."""
    unknown = sorted(set(fields) - {'label', 'ids'})
    if unknown:
      raise RequestError(400, f'unknown fields {unknown}: expected label, '
                         'ids.')
    with self.decoding(deadline):
      got = read_label(fields, self.model, self.max_pixels)
    label, config = got.label, self.model.config
    if config.contain_dontcare_label:
      label = np.where(label == config.label_nc, label_maps.DONT_CARE, label)
    return ids_answer(label, got.original_size)

  def synthesize(self, fields: Dict[str, bytes], deadline: float
                 ) -> Tuple[bytes, Dict[str, str]]:
    """A synthesis request -> (PNG bytes, extra response headers)."""
    with self.decoding(deadline):
      job = make_job(fields, self.model, self.max_pixels)
    future = self.worker.submit(job)
    try:
      image = future.result(timeout=_left(deadline))
    except concurrent.futures.TimeoutError:
      future.cancel()
      raise RequestError(503, 'no image within the request deadline '
                         '(--request_timeout_s); the server is busy.'
                         ) from None
    except ValueError as e:  # The Synthesizer's own input checks.
      raise RequestError(400, str(e)) from None
    headers = {} if job.seed is None else {'X-Seed': str(job.seed)}
    return png_bytes(visualize.image_to_uint8(image)), headers


def _left(deadline: float) -> float:
  return max(0.0, deadline - time.monotonic())
