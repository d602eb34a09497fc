"""A memory-resident pool: the shards decoded once, held in memory and served as the stream's super-batches.

For a pool that fits in memory at the model's input size. ``MemoryPool.from_stream(stream)`` decodes every
shard of a ``SuperBatchStream`` once, in shard order, through the stream's own reading and decoding (so the
same samples are kept and the same skip reasons counted), and holds, per readable sample, the image as the
transform left it before ``ToTensor`` (uint8 ``[3, H, W]``), its key, shard URL, caption and metadata. It then
serves ``SuperBatch``es with the stream's guarantees, shaped like torchtitan's map-style datasets (filters and
processing, a seeded global shuffle per epoch, a slice per rank, repeat):

- Order: epoch ``e`` is a permutation of the N samples seeded by ``(seed, e)`` (``epoch_order``), the way
  ``SuperBatchStream`` seeds its shard order. The epochs are laid end to end and super-batch ``t`` is global
  positions ``[t·B, (t+1)·B)``; rank ``r`` of ``W`` holds the ``r``-th ``B / W`` of them. So ranks are
  disjoint in every step, the union over ranks does not depend on ``W``, and every sample comes once per
  epoch. A super-batch that straddles an epoch boundary holds no sample twice: ``epoch_order`` swaps the
  samples that the previous epoch's tail already put into that super-batch out of the new epoch's head (with
  samples from the middle of the epoch, so each epoch's order depends only on its own seed and its
  predecessor's). Needs N >= B when B divides N, else N >= 2B.
- Sizes that change per step (a selection schedule, ``batch_sizes``): super-batch ``t`` is positions
  ``[start(t), start(t) + B_t)`` with ``start(t)`` the sum of the sizes before it (``Layout``), so a step
  that draws fewer candidates leaves the rest for the next one: no sample is dropped or repeated because the
  size changed. Straddling super-batches are handled as above with their own sizes (``straddled_order``).
  Needs N >= 2 B_max.
- Skips: the decode's skips are counted under the stream's reasons (``stream.SKIP_REASONS``) once per epoch,
  when they would have been read: the skips read before a sample in shard order (a shard's trailing ones:
  before the next shard's first sample; the pool's last ones: with its last sample) go into the ``skipped`` of
  the super-batch, and rank, that serves it. Summed over an epoch's batches and ranks they are the skips of
  one finite pass of the stream over the shards, so a run's skip counts per sample read are the stream's.
- Resume: a position is ``{"kind": "pool", "version": 1, "epoch", "index", "batch", ...}``: the epoch and the
  index in it of the next super-batch's first sample (the same on every rank), that super-batch's number
  ``batch`` (what its size is), with the pool's size and a fingerprint
  of its key list, the super-batch size, the world size and the seed it was recorded with;
  ``batches(position)`` continues exactly where it was recorded and refuses (one line) a position of another
  pool, world size, super-batch size, seed or kind. Positions are arithmetic: after ``t`` super-batches,
  ``divmod(start(t), N)`` (``divmod(t·B, N)`` at a constant B).

What equals what: with a torchvision ``Compose`` that contains a ``ToTensor`` (open_clip's transforms, where
it is followed by ``Normalize``), the stages before it run once at load time on the PIL image and the result
is kept as uint8; per batch the pool converts to float, divides by 255 and applies the stages after it,
exactly the operations ``ToTensor`` and ``Normalize`` apply per image, so the served images are bitwise the
stream's (``tests/data/test_pool.py``). Any other transform is applied once at load time and its output kept
as it is (float32 images take 4x the memory). A random augmentation would be drawn once, not per epoch: the
pool is for deterministic (evaluation-style) transforms, which is what ``jestclip train`` uses.

Every rank decodes and holds the whole pool (the next epochs' permutations need every sample); the memory
check counts the ranks on this machine (``LOCAL_WORLD_SIZE``). Decoding runs in the calling process.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import json
import os
import random
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from jestclip.data.decode import IMAGE_EXTENSIONS, Sample
from jestclip.data.progress import progress as progress_bar
from jestclip.data.stream import SuperBatch, SuperBatchStream, collate

__all__ = [
    "MEMORY_FRACTION",
    "POSITION_VERSION",
    "Layout",
    "MemoryPool",
    "PoolBatches",
    "SplitTransform",
    "available_memory",
    "check_pool_size",
    "epoch_order",
    "keys_fingerprint",
    "split_transform",
    "straddled_order",
]

POSITION_VERSION = 1
# The share of this machine's available memory (MemAvailable, or the cgroup's limit) that the pools of all
# its ranks may take; the rest is for the model, the optimiser, the step's activations and the OS.
MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class SplitTransform:
    """A transform split into what runs once per sample at load time and what runs per batch.

    store: PIL image -> the tensor kept in memory. finish: stacked stored tensors ``[n, ...]`` -> the batch
    ``[n, 3, H, W]`` bitwise as ``torch.stack([transform(image) ...])`` would have made it. ``exact_uint8``:
    whether ``store`` keeps uint8 (the transform was split at its ``ToTensor``).
    """

    store: Callable[[Image.Image], Tensor]
    finish: Callable[[Tensor], Tensor]
    exact_uint8: bool


def split_transform(transform: Callable[[Image.Image], Tensor]) -> SplitTransform:
    """Split ``transform`` at its ``ToTensor`` (a torchvision ``Compose`` holding one, e.g. open_clip's
    ``MaybeToTensor``): the stages before it and ``pil_to_tensor`` at load time (uint8), then per batch
    ``.to(default float dtype).div(255)`` (what ``ToTensor`` does to uint8) and the stages after it
    (``Normalize`` on the whole batch, any other stage per image). Any other transform: applied whole at load
    time, its output kept (``finish`` only stacks)."""
    stages = list(transform.transforms) if isinstance(transform, T.Compose) else []
    cut = next((i for i, stage in enumerate(stages) if isinstance(stage, T.ToTensor)), None)
    if cut is None:
        return SplitTransform(store=transform, finish=lambda images: images, exact_uint8=False)
    before, after = stages[:cut], stages[cut + 1 :]

    def store(image: Image.Image) -> Tensor:
        for stage in before:
            image = stage(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise ValueError(f"the transform's stages before ToTensor made {_described(image)}, not RGB")
        return pil_to_tensor(image)

    def finish(images: Tensor) -> Tensor:
        out = images.to(torch.get_default_dtype()).div(255)
        for stage in after:
            if isinstance(stage, T.Normalize):
                out = stage(out)  # elementwise per channel: the same operations as per image
            else:
                out = torch.stack([stage(image) for image in out])
        return out

    return SplitTransform(store=store, finish=finish, exact_uint8=True)


def _described(image: Any) -> str:
    return f"a {image.mode} image" if isinstance(image, Image.Image) else f"a {type(image).__name__}"


def epoch_order(n: int, size: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order of samples ``0 .. n-1`` for super-batches of ``size`` (see the module
    docstring): ``random.Random(f"{seed}/pool/epoch{epoch}")``'s shuffle, with the samples that epoch
    ``epoch - 1``'s last ``(epoch·n) mod size`` positions hold swapped out of this epoch's first
    ``size - (epoch·n) mod size`` positions (the super-batch they share), each for the first sample after
    those positions, and before this epoch's own tail, that is not among them. A ValueError when the pool is
    too small for that (``n < size``, or ``n < 2·size`` when ``size`` does not divide ``n``)."""
    check_pool_size(n, size)
    layout = Layout(size)
    return straddled_order(n, seed, epoch, layout.straddle(epoch * n), layout.straddle((epoch + 1) * n)[0])


def straddled_order(n: int, seed: int, epoch: int, straddle: tuple[int, int], own_tail: int) -> list[int]:
    """``epoch_order`` for super-batches of any sizes: ``straddle`` is ``(shared, head)`` of the super-batch
    this epoch starts in (``Layout.straddle``: the previous epoch's positions in it, this epoch's), and
    ``own_tail`` this epoch's positions in the super-batch the next epoch starts in (its swaps stay out of
    them, so that the next epoch can read them from the plain shuffle)."""
    order = _shuffled(n, seed, epoch)
    shared, head = straddle  # positions of the previous epoch / of this one in the super-batch it starts in
    if epoch == 0 or shared == 0:
        return order
    taken = set(_shuffled(n, seed, epoch - 1)[n - shared :])  # untouched by that epoch's own swaps
    clashes = [i for i in range(head) if order[i] in taken]
    partners = (j for j in range(head, n - own_tail) if order[j] not in taken)
    for i, j in zip(clashes, partners, strict=False):
        order[i], order[j] = order[j], order[i]
    return order


def _shuffled(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}/pool/epoch{epoch}").shuffle(order)
    return order


class Layout:
    """Where each super-batch starts in the pool's sequence of samples, its epochs laid end to end:
    super-batch ``t`` holds positions ``[start(t), start(t) + size(t))``. ``sizes(t)`` (None: ``size`` every
    time, by arithmetic) gives the global size of super-batch ``t`` under a selection schedule; their starts
    are summed as far as they are asked for."""

    def __init__(self, size: int, sizes: Callable[[int], int] | None = None) -> None:
        self.size, self.sizes = size, sizes
        self._starts = [0]  # start(t) for t < len(_starts), with sizes

    def size_of(self, t: int) -> int:
        return self.size if self.sizes is None else self.sizes(t)

    def start(self, t: int) -> int:
        if self.sizes is None:
            return t * self.size
        while len(self._starts) <= t:
            self._starts.append(self._starts[-1] + self.size_of(len(self._starts) - 1))
        return self._starts[t]

    def batch_at(self, position: int) -> int:
        """The super-batch that holds global ``position``."""
        if self.sizes is None:
            return position // self.size
        while self._starts[-1] <= position:
            self.start(len(self._starts))
        return bisect.bisect_right(self._starts, position) - 1

    def straddle(self, boundary: int) -> tuple[int, int]:
        """``(shared, head)`` of the super-batch holding position ``boundary`` (an epoch's first): how many of
        its positions come before ``boundary`` and how many from it on; ``(0, 0)`` when one starts there."""
        t = self.batch_at(boundary)
        shared = boundary - self.start(t)
        return (shared, self.size_of(t) - shared) if shared else (0, 0)


def check_pool_size(n: int, size: int, *, changing: bool = False) -> None:
    """A ValueError unless super-batches of ``size`` can be served from ``n`` samples without repeating one
    within a super-batch: ``n >= size`` when ``size`` divides ``n`` (epochs never share a super-batch), else
    ``n >= 2·size`` (what the swaps at an epoch boundary need); ``n >= 2·size`` when the sizes change per step
    (``changing``: any epoch boundary may fall inside a super-batch; ``size`` the largest)."""
    need = size if n % size == 0 and not changing else 2 * size
    if n < need:
        raise ValueError(
            f"the pool holds {n} readable samples, too few for super-batches of {size} without repeating a "
            f"sample in one across an epoch boundary (needs {need}); use a smaller super-batch or more data"
        )


def available_memory() -> int:
    """Bytes of memory this process can still use: the smaller of the kernel's ``MemAvailable`` and what
    the cgroup (container) limit leaves (Linux); elsewhere the free physical pages."""
    available = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.exists() and used.exists() and limit.read_text().strip() != "max":
        available = min(available, int(limit.read_text()) - int(used.read_text()))
    return available


def _gib(n: float) -> str:
    """Bytes in GiB, MiB or KiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _image_members(url: str, keep: Callable[..., bool] | None = None) -> int:
    """Image members of a shard whose key ``keep(url, key)`` keeps (None: all), read from its tar headers
    (nothing decoded): an upper bound on its readable samples (0 for a shard that cannot be opened; the
    members before the cut for a truncated one)."""
    count = 0
    try:
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                tar.members = []
                key, ext = base_plus_ext(info.name)
                image = info.isreg() and key is not None and ext.lower() in IMAGE_EXTENSIONS
                count += image and (keep is None or keep(url, key))
    except Exception:  # the decode pass counts the shard's problem as a skip reason
        pass
    return count


def keys_fingerprint(keys: Sequence[str]) -> str:
    """A digest of the key list in pool order (what a position's ``index`` refers to)."""
    digest = hashlib.sha1()
    for key in keys:
        digest.update(key.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:16]


def _one_pass(stream: SuperBatchStream, split: SplitTransform) -> SuperBatchStream:
    """The stream's own reading, filtering and decoding as one pass in shard order (rank 0 of 1, one
    sample at a time), its images through the stored part of the transform only."""
    reader = copy.copy(stream)
    reader.batch_size, reader.transform, reader.epochs, reader.resampled = 1, split.store, 1, False
    reader.shuffle_shards, reader.shuffle_buffer, reader.drop_last = False, 0, False
    reader.rank, reader.world_size, reader.require_samples = 0, 1, True
    reader._resume, reader._warned = None, set()
    return reader


def _check_fits(capacity: int, first: Sample, local: int, memory_fraction: float) -> None:
    """A ValueError naming the estimate when ``local`` pools of ``capacity`` samples the size of ``first``
    would take more than ``memory_fraction`` of ``available_memory()``."""
    per_sample = first.image.nbytes + _record_bytes(first)
    need = max(capacity, 1) * per_sample * local
    budget = memory_fraction * available_memory()
    if need > budget:
        ranks = f" x {local} ranks on this machine" if local > 1 else ""
        raise ValueError(
            f"data_in_memory: the pool would take ~{_gib(need)} (up to {capacity:,} samples x "
            f"{per_sample:,} bytes{ranks}) but only {_gib(budget)} is allowed ({memory_fraction:g} of "
            f"the {_gib(budget / memory_fraction)} available); stream it (data_in_memory=false)"
        )


def _hold(
    first: Sample,
    decoded: Iterator[Sample],
    skipped: Counter[str],
    capacity: int,
    advance: Callable[[int], Any],
) -> tuple[Tensor, list[Sample], dict[int, dict[str, int]]]:
    """Every decoded sample from ``first`` on: their images in one tensor allocated for ``capacity`` rows,
    the samples without their images, and the skips counted before each (``skipped`` is the counter the
    decode fills; skips after the last sample go with it)."""
    images = torch.empty((max(capacity, 1), *first.image.shape), dtype=first.image.dtype)
    samples: list[Sample] = []
    skips: dict[int, dict[str, int]] = {}
    sample: Sample | None = first
    while sample is not None:
        n = len(samples)
        if n == len(images):  # more readable samples than image members counted: cannot happen
            images = torch.cat([images, torch.empty_like(images[: n // 2 + 1])])
        images[n] = sample.image
        samples.append(dataclasses.replace(sample, image=None))
        if skipped:
            skips[n] = dict(skipped)
            skipped.clear()
        advance(1)
        sample = next(decoded, None)
    if skipped:  # read after the last sample
        skips[len(samples) - 1] = dict(Counter(skips.get(len(samples) - 1, {})) + skipped)
    return images[: len(samples)], samples, skips


class MemoryPool:
    """Every readable sample of a stream's shards, decoded once and held in memory; ``batches()`` serves
    them as super-batches (see the module docstring). Build with ``from_stream``.

    images: ``[N, ...]`` what ``split.store`` kept (uint8 ``[N, 3, H, W]`` for open_clip's transforms);
    samples: the N decoded ``Sample``s in shard order, their ``image`` None (it is row ``i`` of ``images``);
    skips: sample index -> the skips counted with it (see the module docstring); batch_size: this rank's share
    ``B / W`` of a super-batch (the largest, under a selection schedule); batch_sizes: this rank's share of
    super-batch ``t`` under a selection schedule (``SuperBatchStream``'s; None: ``batch_size`` every time).
    """

    def __init__(
        self,
        *,
        images: Tensor,
        samples: list[Sample],
        urls: list[str],
        skips: dict[int, dict[str, int]],
        split: SplitTransform,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        batch_sizes: Callable[[int], int] | None = None,
    ) -> None:
        self.images, self.samples, self.urls, self.skips, self.split = images, samples, urls, skips, split
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.batch_sizes = batch_sizes
        self.super_batch = batch_size * world_size
        check_pool_size(len(samples), self.super_batch, changing=batch_sizes is not None)
        self.fingerprint = keys_fingerprint([s.key for s in samples])
        global_sizes = None if batch_sizes is None else (lambda t: world_size * self.local_size(t))
        self.layout = Layout(self.super_batch, global_sizes)
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def from_stream(
        cls,
        stream: SuperBatchStream,
        *,
        progress: bool = False,
        memory_fraction: float = MEMORY_FRACTION,
        local_ranks: int | None = None,
    ) -> MemoryPool:
        """Decode ``stream``'s shards once (all of them, in order, on every rank) and hold them; super-batches
        of the stream's ``batch_size`` for its rank and world size, seeded by its seed.

        Before decoding, the pool's size is estimated from the shards' tar headers (image members) and the
        first sample; a ValueError names it when the ``local_ranks`` pools of this machine (default:
        torchrun's ``LOCAL_WORLD_SIZE``, else 1) would take more than ``memory_fraction`` of
        ``available_memory()``. The images tensor is allocated once for the image members counted (the rows
        of samples the decode skips stay allocated). ``progress``: a bar while decoding and a one-line summary
        (stderr).
        """
        split = split_transform(stream.transform)
        capacity = sum(_image_members(url, stream.keep) for url in stream.urls)
        started = time.perf_counter()
        skipped: Counter[str] = Counter()
        decoded = _one_pass(stream, split).samples(skipped)
        first = next(decoded, None)
        if first is None:  # require_samples raised unless the pass ended without one
            raise ValueError(f"no readable sample in the {len(stream.urls)} shards of the pool")
        local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        _check_fits(capacity, first, local, memory_fraction)
        bar = progress_bar(total=capacity, desc="pool", unit="img", disable=not progress, leave=False)
        with bar:
            images, samples, skips = _hold(first, decoded, skipped, capacity, bar.update)
        pool = cls(
            images=images,
            samples=samples,
            urls=list(stream.urls),
            skips=skips,
            split=split,
            batch_size=stream.batch_size,
            seed=stream.seed,
            rank=stream.rank,
            world_size=stream.world_size,
            batch_sizes=stream.batch_sizes,
        )
        if progress:
            tqdm.write(pool.summary(time.perf_counter() - started), file=sys.stderr)
        return pool

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    def memory_bytes(self) -> int:
        """Bytes the pool holds (an estimate beyond the images: ``sys.getsizeof`` of each sample's record,
        key, caption and metadata, the latter by its JSON text)."""
        return self.images.nbytes + sum(_record_bytes(s) for s in self.samples)

    def skipped(self) -> dict[str, int]:
        """The decode's skips by reason (what one epoch counts)."""
        total: Counter[str] = Counter()
        for reasons in self.skips.values():
            total.update(reasons)
        return dict(total)

    def summary(self, seconds: float | None = None) -> str:
        """One line: what was loaded, its size, the skips and (given) the seconds it took."""
        shape = "x".join(str(d) for d in self.images.shape[1:])
        dtype = str(self.images.dtype).removeprefix("torch.")
        skipped = self.skipped()
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items()))
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        return (
            f"pool: {len(self):,} samples from {len(self.urls)} shards in memory "
            f"({_gib(self.memory_bytes())}; images {shape} {dtype}), {sum(skipped.values()):,} skipped"
            + (f" ({reasons})" if reasons else "")
            + f"; decoded{took}"
        )

    def local_size(self, t: int) -> int:
        """This rank's size of super-batch ``t``."""
        if self.batch_sizes is None:
            return self.batch_size
        size = self.batch_sizes(t)
        if not 1 <= size <= self.batch_size:
            raise ValueError(f"batch_sizes({t}) = {size} is not in [1, batch_size={self.batch_size}]")
        return size

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s sample order (``epoch_order``, for the layout's super-batch sizes), cached for
        the current and next epoch."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            n, layout = len(self), self.layout
            straddle, own_tail = layout.straddle(epoch * n), layout.straddle((epoch + 1) * n)[0]
            self._orders[epoch] = straddled_order(n, self.seed, epoch, straddle, own_tail)
        return self._orders[epoch]

    def position_after(self, batches: int) -> dict[str, Any]:
        """The position after ``batches`` super-batches from the beginning."""
        epoch, index = divmod(self.layout.start(batches), len(self))
        return self._position(epoch, index, batches)

    def _position(self, epoch: int, index: int, batch: int) -> dict[str, Any]:
        return {
            "kind": "pool",
            "version": POSITION_VERSION,
            "epoch": epoch,
            "index": index,
            "batch": batch,
            "samples": len(self),
            "keys": self.fingerprint,
            "super_batch": self.super_batch,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def batches(self, position: dict[str, Any] | None = None) -> PoolBatches:
        """The super-batches from the beginning or from a recorded ``position`` (a ValueError, one line,
        when it is not this pool's: see the module docstring)."""
        if position is None:
            return PoolBatches(self, (0, 0, 0))
        self._check(position)
        batch = position.get("batch")
        if batch is None:  # recorded before positions held it: every super-batch had the same size
            if self.batch_sizes is not None:
                raise ValueError(
                    "the pool's data position has no batch index (written by an older jestclip): it cannot "
                    "resume a run whose super-batch size changes per step"
                )
            batch = (position["epoch"] * len(self) + position["index"]) // self.super_batch
        if self.layout.start(batch) != position["epoch"] * len(self) + position["index"]:
            raise ValueError(
                f"the pool's data position (epoch {position['epoch']}, index {position['index']}) is not "
                f"where super-batch {batch} starts under this run's super-batch sizes"
            )
        return PoolBatches(self, (position["epoch"], position["index"], batch))

    def _check(self, position: dict[str, Any]) -> None:
        if not isinstance(position, dict) or position.get("kind") != "pool":
            fields = sorted(position) if isinstance(position, dict) else type(position).__name__
            raise ValueError(
                f"the data position (fields {fields}) is a stream's, not a memory-resident pool's: resume "
                "with data_in_memory=false"
            )
        if position.get("version") != POSITION_VERSION:
            raise ValueError(
                f"the pool's data position has version {position.get('version')!r}; this jestclip reads "
                f"version {POSITION_VERSION}"
            )
        recorded = (position.get("samples"), position.get("keys"))
        if recorded != (len(self), self.fingerprint):
            raise ValueError(
                f"cannot resume: the data position was recorded on a pool of {recorded[0]} samples (keys "
                f"{recorded[1]}) but the pool now holds {len(self)} (keys {self.fingerprint}); the shards "
                "changed since"
            )
        for key in ("world_size", "super_batch", "seed"):
            if position.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the data position was recorded with {key} {position.get(key)} but this "
                    f"run has {getattr(self, key)}"
                )
        epoch, index = position.get("epoch"), position.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int) and epoch >= 0 and 0 <= index < len(self)):
            raise ValueError(f"the pool's data position (epoch, index) is out of range: {position!r}")

    def take(self, epoch: int, index: int, batch: int = 0) -> SuperBatch:
        """This rank's share of super-batch ``batch``, which starts at ``index`` of epoch ``epoch``, built as
        the stream builds its batches (``stream.collate``); its position is the next super-batch's."""
        size = self.local_size(batch)
        start = index + self.rank * size
        picks: list[int] = []
        while len(picks) < size:  # at most one epoch boundary (B <= N)
            e, i = epoch + start // len(self), start % len(self)
            run = self.order(e)[i : i + size - len(picks)]
            picks += run
            start += len(run)
        skipped: Counter[str] = Counter()
        for i in picks:
            if i in self.skips:
                skipped.update(self.skips[i])
        rows = self.images[torch.tensor(picks, dtype=torch.long)].unbind(0)
        samples = [
            dataclasses.replace(self.samples[i], image=row, meta=dict(self.samples[i].meta))
            for i, row in zip(picks, rows, strict=True)
        ]
        after = divmod(epoch * len(self) + index + size * self.world_size, len(self))
        served = collate(samples, skipped, self._position(*after, batch + 1))
        served.images = self.split.finish(served.images)
        return served


def _record_bytes(sample: Sample) -> int:
    """Bytes of a sample's record beyond its image, as Python holds it (metadata estimated by its JSON)."""
    parts = (sample, sample.key, sample.text, json.dumps(sample.meta))
    return sum(sys.getsizeof(x) for x in parts) + sys.getsizeof({}) + 8


class PoolBatches(Iterator[SuperBatch]):
    """A pool's super-batches for this rank, forever, from a start ``(epoch, index)``; ``position()`` says
    where the next one starts. No DataLoader and no workers: the samples are in memory."""

    def __init__(self, pool: MemoryPool, start: tuple[int, int, int]) -> None:
        self.pool = pool
        self.epoch, self.index, self.batch = start

    def __next__(self) -> SuperBatch:
        served = self.pool.take(self.epoch, self.index, self.batch)
        self.epoch, self.index, self.batch = (served.position[k] for k in ("epoch", "index", "batch"))
        return served

    def position(self) -> dict[str, Any]:
        """Where the next super-batch starts (the same on every rank)."""
        return self.pool._position(self.epoch, self.index, self.batch)

    def positions(self) -> list[dict[str, Any]]:
        """Every rank's ``position()`` in rank order: they are equal, so no collective is needed."""
        return [self.position()] * self.pool.world_size
