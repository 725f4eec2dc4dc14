"""A tfds random-access source served from memory, for tests under tfds.testing.mock_data.

`tfds.testing.mock_data`'s own data-source mock cannot read batches (`__getitems__`), and
reads random pixels; this one serves chosen images, serialized by tfds' own feature
serializer exactly as a prepared ArrayRecord dataset returns them with RAW_BYTES.
"""

import io

import PIL.Image
import tensorflow_datasets as tfds


def png_bytes(image):
  buf = io.BytesIO()
  PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, "PNG")
  return buf.getvalue()


def serialized_records(builder, images):
  """tfds-serialized examples (what RAW_BYTES random access returns) holding PNG images."""
  features = builder.info.features
  extra = {k: "x" for k in features.keys() if k != "image"}
  return [features.serialize_example({"image": io.BytesIO(png_bytes(x)), **extra})
          for x in images]


class FakeRecords:
  """A random-access record sequence like ArrayRecordDataSource."""

  def __init__(self, records):
    self.records = list(records)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]

  def __getitems__(self, keys):
    return [self.records[k] for k in keys]


def mock_record_data(images):
  """tfds.testing.mock_data whose `as_data_source` serves `images` (RAW_BYTES only)."""

  def as_data_source(builder, split=None, *, decoders=None, deserialize_method=None, **kw):
    assert deserialize_method == tfds.decode.DeserializeMethod.RAW_BYTES
    return FakeRecords(serialized_records(builder, images))
  return tfds.testing.mock_data(as_data_source_fn=as_data_source)
