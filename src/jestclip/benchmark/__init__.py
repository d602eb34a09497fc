"""The offline curation benchmark builder: Debian/npm sources -> drawings -> rendered, captioned shards.

``sources`` says where the raw material lives and installs it, ``catalog`` enumerates the drawings each
source ships, ``render`` draws them as square RGB images, and ``builder`` plans the ``pool`` / ``curated`` /
``eval`` parts and writes them as webdataset shards (with ``jestclip.data``'s shard writer); ``corrupt``
derives a noisier pool from a built one (a seeded share of captions swapped). Training only
reads the shards, through ``jestclip.data``; nothing in the library imports this package.
"""

from jestclip.benchmark.builder import SOURCES, BuildConfig, Entry, Plan, build, plan, write_plan
from jestclip.benchmark.catalog import Drawing
from jestclip.benchmark.corrupt import corrupt_captions
from jestclip.benchmark.render import RenderError
from jestclip.benchmark.sources import SourcePaths, install_sources, missing_sources

__all__ = [
    "SOURCES",
    "BuildConfig",
    "Drawing",
    "Entry",
    "Plan",
    "RenderError",
    "SourcePaths",
    "build",
    "corrupt_captions",
    "install_sources",
    "missing_sources",
    "plan",
    "write_plan",
]
