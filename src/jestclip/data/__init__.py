"""Data: webdataset shards with sample keys kept end to end, super-batches, the reference-embedding cache.

``stream`` serves keyed super-batches (``SuperBatchStream``), reading shards through ``shardlist`` (which
shards) and ``tarread`` (one shard's samples) and decoding through ``decode``; ``loader`` re-exports their
names. ``shards`` writes shards; ``refcache`` is the format of a frozen reference model's embeddings stored
next to each shard and reads them, ``caching`` writes them; ``keeplist`` filters by them.
The benchmark that produces shards is ``jestclip.benchmark``.
"""

from jestclip.data.decode import Sample, decode_sample, open_image
from jestclip.data.shardlist import expand_urls
from jestclip.data.shards import Pair, png_bytes, shard_name, write_shard
from jestclip.data.stream import NoReadableSampleError, SuperBatch, SuperBatchStream
from jestclip.data.tarread import read_shard

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
