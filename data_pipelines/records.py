"""The TFRecord format shared by the builders and the input pipeline.

A built data set (see `metadata.py` for its two layouts) holds sharded
`tf.train.Example` records, each with:
  image      bytes   the image file's encoded bytes (JPEG or PNG), as released
  label      bytes   grayscale PNG of the raw label map, values as released
                     (no data-set mapping applied: the reader maps 255 and
                     shifts); 8-bit, 16-bit where the ids need it
  instance   bytes   16-bit grayscale PNG of the instance map (8- or 16-bit
                     in the earlier layout), b'' or absent when none
  file_name  bytes   the example's base name (no extension), e.g. b'000000017914'
  height     int64   image height
  width      int64   image width
"""
import functools
import os
import struct
from typing import Dict, List, NamedTuple, Optional, Tuple

import tensorflow as tf

from data_pipelines import metadata

# The metadata file and its contents live in metadata.py (no TensorFlow);
# they are part of this format.
INFO_FILE = metadata.INFO_FILE
DatasetInfo = metadata.DatasetInfo


def shard_path(data_dir: str, split: str, index: int, num_shards: int) -> str:
  """A shard of the earlier layout (test data sets write it)."""
  return os.path.join(data_dir,
                      metadata.legacy_shard_name(split, index, num_shards))


def shard_paths(data_dir: str, split: str, num_shards: int) -> List[str]:
  return [shard_path(data_dir, split, i, num_shards) for i in range(num_shards)]


def shard_sizes(num_examples: int, num_shards: int) -> List[int]:
  """Records per shard as `data_pipelines.writer` writes them (contiguous)."""
  starts = [i * num_examples // num_shards for i in range(num_shards + 1)]
  return [b - a for a, b in zip(starts, starts[1:])]


# A TFRecord frame: uint64 length, uint32 CRC of it, data, uint32 CRC of data.
_FRAME_HEADER = 12
_FRAME_FOOTER = 4


class ShardScan(NamedTuple):
  """What the record frames of a shard file say (data not read)."""
  offsets: Tuple[int, ...]  # Byte offset of every complete record.
  size: int  # File size in bytes.
  truncated_at: Optional[int]  # Offset of a cut-off last record, if any.

  @property
  def num_records(self) -> int:
    return len(self.offsets)


@functools.lru_cache(maxsize=4096)
def _scan(path: str, size: int, mtime_ns: int) -> ShardScan:
  del mtime_ns  # Part of the cache key only.
  offsets = []
  truncated_at = None
  # Local files unbuffered: each header read reads its 12 bytes, not a
  # buffer of the data (a process scanning every shard reads ~12 bytes per
  # record); others (gs://, ...) through GFile.
  if '://' in path:
    opener = lambda: tf.io.gfile.GFile(path, 'rb')
  else:
    opener = lambda: open(path, 'rb', buffering=0)  # pylint: disable=consider-using-with
  with opener() as f:
    pos = 0
    while pos < size:
      header = f.read(_FRAME_HEADER)
      end = pos + _FRAME_HEADER + _FRAME_FOOTER
      if len(header) == _FRAME_HEADER:
        end += struct.unpack('<Q', header[:8])[0]
      if len(header) < _FRAME_HEADER or end > size:
        truncated_at = pos
        break
      offsets.append(pos)
      pos = end
      f.seek(pos)
  return ShardScan(tuple(offsets), size, truncated_at)


def scan_shard(path: str) -> ShardScan:
  """The record offsets of a TFRecord file, reading only their 12-byte headers.

  Fast (the data is skipped, not read or checked) and cached while the file
  is unchanged (same size and modification time).
  """
  stat = tf.io.gfile.stat(path)
  return _scan(path, int(stat.length), int(stat.mtime_nsec))


def _bytes(v: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int(v: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))


def encode_example(image: bytes, label: bytes, instance: bytes, file_name: str,
                   height: int, width: int) -> bytes:
  """Serializes one example (already-encoded image, label and instance files)."""
  features = {
      'image': _bytes(image),
      'label': _bytes(label),
      'instance': _bytes(instance or b''),
      'file_name': _bytes(file_name.encode('utf-8')),
      'height': _int(height),
      'width': _int(width),
  }
  return tf.train.Example(
      features=tf.train.Features(feature=features)).SerializeToString()


FEATURE_SPEC = {
    'image': tf.io.FixedLenFeature([], tf.string),
    'label': tf.io.FixedLenFeature([], tf.string),
    'instance': tf.io.FixedLenFeature([], tf.string, default_value=b''),
    'file_name': tf.io.FixedLenFeature([], tf.string),
    'height': tf.io.FixedLenFeature([], tf.int64),
    'width': tf.io.FixedLenFeature([], tf.int64),
}


def parse_example(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Parses one serialized record into its (still encoded) fields."""
  return tf.io.parse_single_example(serialized, FEATURE_SPEC)
