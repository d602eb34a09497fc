"""Data: webdataset shards with sample keys kept end to end, super-batches, the reference-embedding cache.

``loader`` streams keyed samples and super-batches, ``shards`` writes shards, ``refcache`` stores a frozen
reference model's embeddings next to each shard. The benchmark that produces shards is ``jestclip.benchmark``.
"""

from jestclip.data.loader import (
    NoReadableSampleError,
    Sample,
    SuperBatch,
    SuperBatchStream,
    decode_sample,
    expand_urls,
    open_image,
    read_shard,
)
from jestclip.data.shards import Pair, png_bytes, shard_name, write_shard

__all__ = [
    "NoReadableSampleError",
    "Pair",
    "Sample",
    "SuperBatch",
    "SuperBatchStream",
    "decode_sample",
    "expand_urls",
    "open_image",
    "png_bytes",
    "read_shard",
    "shard_name",
    "write_shard",
]
