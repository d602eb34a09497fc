"""The loader's public names, from the modules that hold them: ``data.decode`` (a sample's bytes to a
``Sample``), ``data.shardlist`` (which shards), ``data.tarread`` (one shard's raw samples) and
``data.stream`` (super-batches, their positions and resume).

Kept so that ``from jestclip.data.loader import ...`` goes on working; each name is the same object as in its
module. The skip reasons are listed where they are counted: ``stream.SKIP_REASONS``.
"""

from jestclip.data.decode import (
    DECODE_REASONS,
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    Sample,
    caption_is_empty,
    content_digest,
    decode_sample,
    dotted_pairs,
    open_image,
    to_rgb,
)
from jestclip.data.shardlist import SHARD_SUFFIXES, distinct_shards, expand_urls, file_identity, shard_files
from jestclip.data.stream import (
    SHARD_REASONS,
    SKIP_REASONS,
    STREAM_REASONS,
    NoReadableSampleError,
    ResumableBatches,
    SuperBatch,
    SuperBatchStream,
    TooFewSamplesError,
    dead_loader_worker,
)
from jestclip.data.tarread import READ_REASONS, read_shard

__all__ = [
    "DECODE_REASONS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "READ_REASONS",
    "SHARD_REASONS",
    "SHARD_SUFFIXES",
    "SKIP_REASONS",
    "STREAM_REASONS",
    "NoReadableSampleError",
    "ResumableBatches",
    "Sample",
    "SuperBatch",
    "SuperBatchStream",
    "TooFewSamplesError",
    "caption_is_empty",
    "content_digest",
    "dead_loader_worker",
    "decode_sample",
    "distinct_shards",
    "dotted_pairs",
    "expand_urls",
    "file_identity",
    "open_image",
    "read_shard",
    "shard_files",
    "to_rgb",
]
