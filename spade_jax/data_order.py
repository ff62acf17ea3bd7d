"""Which records each process reads, in which order: the read plan.

Pure Python (no TensorFlow): `input_pipeline` turns a plan into tf.data.

A split is a list of shards holding `counts[j]` records each. Training reads
it as a stream of epochs; with P processes, process i reads only its own
share of every epoch, and nothing else:

* Epoch e lays the shards out in an order drawn from (seed, e)
  (`shard_order`) and concatenates their records. Process i owns the
  contiguous records [i * N // P, (i + 1) * N // P) of that concatenation
  (N = the split's records): whole shards, plus at most one partly owned
  shard at each end. So each process reads about N / P records' bytes per
  epoch, plus the prefix of one shard it skips to reach its first record
  (TFRecord files cannot be entered in the middle), as
  `tfds.split_for_jax_process` does with tfds' file instructions. Over
  epochs the shard order changes, so every process sees every part of the
  data.
* Within its share a process shuffles windows: the records of each owned
  piece of a shard, in runs of `window` records from the piece's start, are
  permuted by a seed drawn from (seed, e, shard, piece start, run). A window
  never crosses a shard, so seeking to any position reads at most one
  shard's worth of bytes (the skipped prefix of that shard and the window
  that holds the position): a resumed run reads no more than that before its
  first batch, wherever the step falls in the epoch (`Plan.start`).
* The process's stream is its epochs one after another (R_i = its share's
  size records each); its batch k is stream positions [k * b, (k + 1) * b)
  (b = the per-process batch). Each record's `index` is its position in the
  epoch's concatenation plus e * N: unique within an epoch across processes,
  and together the processes' indices of an epoch are [e * N, (e + 1) * N).
  Crop and flip randomness is keyed by it.

So the order is a function of (seed, P, process index, step): the same
number of processes resumes bit-exactly; another number reads another (still
complete, still disjoint) order, which `describe_change` says in words.

Evaluation reads the shards in their stored order, process i the contiguous
records [i * M, (i + 1) * M) with M = ceil(N / (P * b)) * b, so every
process has the same number of batches; the last ones are completed with
repeats of the split's first records marked invalid. Every record is valid
in exactly one process.
"""
import dataclasses
import hashlib
import math
import struct
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple


def mix(*words: int) -> int:
  """A stable 63-bit hash of integers (the same on every version, host)."""
  data = struct.pack(f'<{len(words)}q', *[int(w) for w in words])
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(),
                        'little') >> 1


def shard_order(seed: int, epoch: int, num_shards: int) -> List[int]:
  """The shards' order in training epoch `epoch` (a permutation)."""
  return sorted(range(num_shards), key=lambda j: mix(seed, epoch, j, -7))


class Piece(NamedTuple):
  """Records [skip, skip + take) of shard `shard`, in stored order."""
  shard: int
  skip: int
  take: int
  valid: bool = True
  # Seed of the piece's window permutations (0: not shuffled).
  key: int = 0
  # Index of the piece's first window (its windows are numbered from 0 at
  # the piece's first owned record).
  first_window: int = 0


def pieces(counts: Sequence[int], order: Sequence[int], lo: int, hi: int,
           valid: bool = True) -> List[Piece]:
  """Records [lo, hi) of the shards laid out in `order`, as pieces."""
  out = []
  start = 0
  for shard in order:
    end = start + counts[shard]
    a, b = max(lo, start), min(hi, end)
    if a < b:
      out.append(Piece(shard, a - start, b - a, valid))
    start = end
  return out


def process_range(num_records: int, process_index: int, process_count: int
                  ) -> Tuple[int, int]:
  """[lo, hi): the training records process i owns in every epoch."""
  return (process_index * num_records // process_count,
          (process_index + 1) * num_records // process_count)


def eval_share(num_records: int, process_index: int, process_count: int,
               local_batch: int) -> Tuple[int, int, int]:
  """(lo, hi, size): process i's evaluation records and its padded size."""
  size = math.ceil(num_records / (process_count * local_batch)) * local_batch
  lo = min(process_index * size, num_records)
  return lo, min(lo + size, num_records), size


@dataclasses.dataclass(frozen=True)
class Plan:
  """The read plan of one process (see the module docstring).

  Attributes:
    counts: records per shard.
    train: shuffled epochs of the process's share, else one ordered pass.
    seed, process_index, process_count, local_batch: as named.
    window: records per shuffled window (<= 1: no shuffling).
  """
  counts: Tuple[int, ...]
  train: bool
  seed: int
  process_index: int
  process_count: int
  local_batch: int
  window: int

  @property
  def num_records(self) -> int:
    return sum(self.counts)

  @property
  def epoch_size(self) -> int:
    """Records of this process per epoch (padding included)."""
    if self.train:
      lo, hi = process_range(self.num_records, self.process_index,
                             self.process_count)
      return hi - lo
    return eval_share(self.num_records, self.process_index,
                      self.process_count, self.local_batch)[2]

  @property
  def span(self) -> int:
    """Index range one epoch covers across all processes."""
    if self.train:
      return self.num_records
    return self.process_count * self.epoch_size

  @property
  def lo(self) -> int:
    if self.train:
      return process_range(self.num_records, self.process_index,
                           self.process_count)[0]
    return eval_share(self.num_records, self.process_index,
                      self.process_count, self.local_batch)[0]

  def epoch_pieces(self, epoch: int) -> List[Piece]:
    """The pieces of epoch `epoch`, in reading order, with window keys."""
    n = self.num_records
    if not self.train:
      lo, hi, size = eval_share(n, self.process_index, self.process_count,
                                self.local_batch)
      order = range(len(self.counts))
      out = pieces(self.counts, order, lo, hi)
      pad = size - (hi - lo)
      while pad > 0:  # Repeats of the split's first records, invalid.
        more = pieces(self.counts, order, 0, min(pad, n), valid=False)
        out += more
        pad -= sum(p.take for p in more)
      return out
    lo, hi = process_range(n, self.process_index, self.process_count)
    out = pieces(self.counts, shard_order(self.seed, epoch, len(self.counts)),
                 lo, hi)
    if self.window <= 1:
      return out
    return [p._replace(key=mix(self.seed, epoch, p.shard, p.skip))
            for p in out]

  def index(self, position: int) -> int:
    """The `index` of the record at stream position `position`."""
    epoch, offset = divmod(position, self.epoch_size)
    return epoch * self.span + self.lo + offset

  def start(self, position: int, num_epochs: Optional[int] = None
            ) -> Tuple[Iterator[Piece], int]:
    """(pieces to read, records to drop) to start at stream `position`.

    The pieces begin at the window holding `position` (whole pieces before
    it are not read at all); the first `drop` records they yield (after
    their windows are permuted) come before `position`.
    """
    if self.epoch_size <= 0:
      raise ValueError(
          f'process {self.process_index} of {self.process_count} owns no '
          f'record of a split of {self.num_records}: use fewer processes or '
          'a larger split.')
    epoch, offset = divmod(position, self.epoch_size)
    window = max(1, self.window) if self.train else 1
    first = []
    for piece in self.epoch_pieces(epoch):
      if first:
        first.append(piece)
        continue
      if offset >= piece.take:
        offset -= piece.take
        continue
      w = offset // window if piece.key else 0
      skip = w * window if piece.key else offset
      first.append(piece._replace(skip=piece.skip + skip,
                                  take=piece.take - skip, first_window=w))
      offset -= skip
    drop = offset if first else 0

    def generate():
      yield from first
      e = epoch + 1
      while num_epochs is None or e < num_epochs:
        yield from self.epoch_pieces(e)
        e += 1

    if num_epochs is not None and epoch >= num_epochs:
      return iter(()), 0
    return generate(), drop


def describe_change(saved: dict, now: dict) -> Optional[str]:
  """What a resumed run's order keeps and loses, or None if nothing changed.

  `saved` and `now` hold data_order_processes, process_count, num_devices
  and global_batch (`run_config.input_order`).
  """
  keys = ('data_order_processes', 'process_count', 'num_devices',
          'global_batch')
  changes = [f'{k} {saved[k]} -> {now[k]}' for k in keys
             if k in saved and saved[k] != now[k]]
  if not changes:
    return None
  what = ', '.join(changes)
  if any(saved.get(k, now[k]) != now[k]
         for k in ('data_order_processes', 'global_batch')):
    keep = ''
    if saved.get('global_batch', now['global_batch']) == now[
        'global_batch'] and saved.get('data_order_processes', 0) % now[
            'process_count'] == 0:
      keep = (' To keep the earlier order, set '
              f'config.data_order_processes={saved["data_order_processes"]}.')
    return (f'Resuming with {what}: the data order from here on differs from '
            "the uninterrupted run's (it is a function of the seed, the "
            'processes whose order is read and the step); each epoch still '
            'reads every record once, the processes disjoint, but bit-exact '
            f'equality with the earlier run is lost.{keep}')
  return (f'Resuming with {what}: the data order is unchanged (it depends '
          'on the seed, config.data_order_processes and the step); results '
          "equal the earlier run's to float32 rounding only, as the batch is "
          'summed in another order.')
