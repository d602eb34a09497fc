"""``SuperBatchStream``: a keyed, robust webdataset stream of image-text pairs in super-batches, and
``ResumableBatches``, which runs it through DataLoader workers and records where it stands.

What it guarantees (docs/data.md, "Reading shards", says each in full):

- Keys: every sample keeps its ``__key__`` and shard URL end to end, so reference embeddings join by key.
- Splitting: each (rank, DataLoader worker) keeps its own shards for the whole run, so no two ever read the
  same shard, a worker reads each of its samples once per epoch and a super-batch never holds the same
  (shard, key) twice.
- Skips: bad data never ends the stream; it is skipped and counted under ``SKIP_REASONS``, and the
  ``SuperBatch.skipped`` of all batches sum to every skip.
- Resume: each super-batch carries its worker's ``position`` after it; resumed there, the stream goes on
  exactly as the uninterrupted one, skips included (not behind a shuffle buffer).

Shards are listed by ``data.shardlist``, read by ``data.tarread`` and decoded by ``data.decode``.
"""

from __future__ import annotations

import copy
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.functional import pil_to_tensor

from jestclip.data.decode import DECODE_REASONS, Sample, content_digest, decode_sample, dotted_pairs
from jestclip.data.shardlist import distinct_shards, expand_urls
from jestclip.data.tarread import READ_REASONS, read_shard

__all__ = [
    "SHARD_REASONS",
    "SKIP_REASONS",
    "STREAM_REASONS",
    "NoReadableSampleError",
    "ResumableBatches",
    "SuperBatch",
    "SuperBatchStream",
    "TooFewSamplesError",
    "collate",
    "dead_loader_worker",
]

STREAM_REASONS = ("duplicate_shard", "repeat_in_batch", "dotted_key", "transform_failed:E", "not_kept")
"""What the stream itself counts, beside what reading (``READ_REASONS``) and decoding (``DECODE_REASONS``)
count; all but ``duplicate_shard`` count one sample.

==========================  ==========================================================================
reason                      what was skipped
==========================  ==========================================================================
``duplicate_shard``         a shard listed again, under any name (``distinct_shards``): read once; counted
                            by rank 0, worker 0
``repeat_in_batch``         a sample already in the super-batch being filled (an epoch ended inside it),
                            left out
``dotted_key``              a pair whose key holds a dot (``img_v1.3.jpg`` + ``img_v1.3.txt``):
                            webdataset's key is the name up to the first dot, so such pairs merge into one
                            sample (key ``img_v1``, members ``3.jpg``, ``3.txt``) that has no ``jpg``; each
                            such pair counts once (``dotted_pairs``)
``transform_failed:E``      the stream's transform raised exception ``E`` on the image
``not_kept``                a sample the stream's ``keep`` predicate (a filter's keep list) does not keep;
                            skipped before it is decoded
==========================  ==========================================================================
"""
SKIP_REASONS = READ_REASONS + DECODE_REASONS + STREAM_REASONS
"""Every reason a ``SuperBatch.skipped`` counts under (``transform_failed:E`` names the exception ``E``)."""
SHARD_REASONS = ("bad_shard", "truncated_shard", "duplicate_shard")
"""The reasons that count a shard; every other reason counts one sample."""


class NoReadableSampleError(ValueError):
    """A stream went through every shard it can draw without finding one readable sample (bad input data).

    Re-raised in the main process from a DataLoader worker, torch passes its "Caught ... in DataLoader worker
    process N. Original Traceback ..." text as the message; only the original message is kept, so the error
    stays one line naming the shards.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


# torch's words when a DataLoader worker process dies (the out-of-memory killer's SIGKILL, a bus error on
# shared memory, any signal or exit): from the iterator, or from its SIGCHLD handler at any line of the main
# process
_DEAD_WORKER = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? (?P<pids>[\d, ]+)\) "
    r"(?:is killed by signal: (?P<signal>[^.]*)|exited unexpectedly(?: with exit code (?P<code>-?\d+))?)"
)


def dead_loader_worker(exn: BaseException) -> str | None:
    """What happened when ``exn`` is torch's error for a DataLoader worker that died, else None:
    ``a data loader worker (pid 8398) was killed by signal: Killed (SIGKILL: often the out-of-memory
    killer)``. The worker's data is lost, not bad: a rerun resumes from the last checkpoint."""
    found = _DEAD_WORKER.search(str(exn)) if isinstance(exn, RuntimeError) else None
    if found is None:
        return None
    pids = found["pids"].strip()
    who = f"data loader workers (pids {pids})" if "," in pids else f"a data loader worker (pid {pids})"
    if found["signal"] is not None:
        what = found["signal"].strip()
        oom = " (SIGKILL: often the out-of-memory killer)" if what == "Killed" else ""
        return f"{who} was killed by signal: {what}{oom}"
    code = f" with exit code {found['code']}" if found["code"] is not None else ""
    return f"{who} exited unexpectedly{code}"


class TooFewSamplesError(NoReadableSampleError):
    """A worker's shards hold fewer distinct samples than one super-batch: it cannot be filled without
    repeating a sample (bad input for the batch size)."""


@dataclass
class SuperBatch:
    """B decoded pairs in stream order.

    images: ``[B, 3, H, W]`` (stacked output of the transform); keys, urls, texts, meta: B entries each.
    skipped: samples (and shards) this worker skipped since its previous super-batch, by reason
    (``SKIP_REASONS``); summed over all batches it is every skip.
    digests: B ``content_digest``s of the image and caption bytes (the reference cache checks them).
    position: where the worker that made this batch stands after it (``worker``: its index; ``end``: it has
    nothing more; else ``url`` and ``sample``, the shard it reads and how many of its raw samples it consumed,
    and ``epoch`` and ``shard``, its place in its shard order); None for a stream with a shuffle buffer.
    """

    keys: list[str]
    urls: list[str]
    images: Tensor
    texts: list[str]
    meta: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)
    position: dict[str, Any] | None = None
    digests: list[int] = field(default_factory=list)  # B ``content_digest``s, checked by the reference cache

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> SuperBatch:
        """The batch with its images in page-locked memory (what ``DataLoader(pin_memory=True)`` calls), so
        that their copy to a GPU can overlap the work there."""
        self.images = self.images.pin_memory()
        return self


def _to_tensor(image: Image.Image) -> Tensor:
    return pil_to_tensor(image).float().div_(255.0)


class _Tally:
    """Counts skips into the stream's running counter and into the current shard's."""

    def __init__(self, total: Counter[str]) -> None:
        self.total = total
        self.shard: Counter[str] = Counter()

    def __call__(self, reason: str) -> None:
        self.total[reason] += 1
        self.shard[reason] += 1


class _ShardWatch:
    """Warns once per shard that yields nothing; raises when no shard of a whole pass yields anything.

    pool: every shard this worker can draw; ``required``: raise once all of them were opened in a row without
    a readable sample, or (``end``) when the stream ended having yielded nothing.
    """

    def __init__(self, pool: Sequence[str], required: bool, warned: set[str]) -> None:
        self.pool, self.required, self.warned = set(pool), required, warned
        self.run: dict[str, None] = {}  # shards opened since the last readable sample, in order
        self.run_skips: Counter[str] = Counter()
        self.yielded = 0

    def shard_done(self, url: str, good: int, skips: Counter[str]) -> None:
        if good:
            self.yielded += good
            self.run.clear()
            self.run_skips.clear()
            return
        if url not in self.warned:
            self.warned.add(url)
            warnings.warn(f"shard {url} has no readable sample ({_reasons(skips)})", RuntimeWarning, 2)
        self.run[url] = None
        self.run_skips.update(skips)
        if self.required and len(self.run) >= len(self.pool):
            raise NoReadableSampleError(self._message())

    def end(self) -> None:
        if self.required and self.run and not self.yielded:
            raise NoReadableSampleError(self._message())

    def _message(self) -> str:
        tried = list(self.run)
        names = ", ".join(tried[:5]) + (f" and {len(tried) - 5} more" if len(tried) > 5 else "")
        return f"no readable sample in {len(tried)} shards tried: {names} ({_reasons(self.run_skips)})"


def _reasons(skips: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(skips.items())) or "no samples"


class SuperBatchStream(IterableDataset):
    """Iterable of ``SuperBatch``es of ``batch_size`` pairs; use with ``DataLoader(batch_size=None)``.

    epochs: passes over this worker's shards (None = forever); ignored when ``resampled``.
    resampled: epochs forever, each in a new shard order (shuffled even with ``shuffle_shards=False``).
    transform: PIL image -> ``[3, H, W]`` tensor (default: float in [0, 1]; sizes must then agree).
    shuffle_buffer: shuffle samples within a buffer of this many (0 = keep shard order).
    decode_size: decode JPEGs at a reduced scale that still covers this many pixels on both sides (PIL's
    draft mode; see ``open_image``); set it to the transform's resize target. None: decode in full.
    rank, world_size: default to torch.distributed's when it is initialised, else 0 and 1.
    require_samples: raise ``NoReadableSampleError`` when every shard this worker can draw was opened in a
    row without a readable sample (and, for a finite pass, when it ended with none). Default: only for
    streams that would otherwise loop forever (``resampled`` or ``epochs=None``).
    keep: ``keep(url, key, digest=None) -> bool``, whether to read sample ``key`` of shard ``url``, given its
    ``content_digest`` (e.g. a ``data.keeplist.KeepList``, which raises for a kept sample whose bytes
    changed; ``digest`` None asks membership only, as the memory pool's size estimate does); the others are
    skipped as ``not_kept`` before decoding. None: read all.
    batch_sizes: ``batch_sizes(t)``, this rank's size of super-batch ``t`` (0-based, counted over the whole
    run and every loader worker: the DataLoader hands out its workers' batches round-robin, so worker ``w`` of
    ``n`` builds batches ``w, w + n, ...``), at most ``batch_size`` (a selection schedule's steps:
    ``train.schedule``). Picklable for loader workers. None: ``batch_size`` every time.
    split_workers: deal the shards to the DataLoader workers iterating this stream (False: read them all, as
    a stream does inside another dataset's worker, e.g. the reference cache's, which deals whole shards).
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        *,
        batch_size: int,
        transform: Callable[[Image.Image], Tensor] | None = None,
        epochs: int | None = 1,
        resampled: bool = False,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        require_samples: bool | None = None,
        decode_size: int | None = None,
        keep: Callable[..., bool] | None = None,
        batch_sizes: Callable[[int], int] | None = None,
        split_workers: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if decode_size is not None and decode_size < 1:
            raise ValueError(f"decode_size must be >= 1 or None, got {decode_size}")
        self.urls, self._duplicate_shards = distinct_shards(expand_urls(urls))  # each shard read once
        self.batch_size = batch_size
        self.transform = transform or _to_tensor
        self.epochs = epochs
        self.resampled = resampled
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.decode_size = decode_size
        self.keep = keep
        self.batch_sizes = batch_sizes
        self.split_workers = split_workers
        self.drop_last = drop_last
        self.seed = seed
        self.require_samples = (resampled or epochs is None) if require_samples is None else require_samples
        self._warned: set[str] = set()  # shards already warned about as yielding nothing
        self._resume: dict[str, Any] | None = None  # set by ``resumed``: the recorded workers' positions
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(self.urls) < world_size:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {world_size} ranks (ranks read disjoint "
                "shards); use at least as many shards as ranks"
            )
        self.rank, self.world_size = rank, world_size

    def _worker(self) -> tuple[int, int]:
        """This worker's index and the number of workers; a resumed stream's DataLoader worker ``i`` continues
        the recorded worker ``(next + i) % n`` (the one whose batch came next)."""
        info = get_worker_info() if self.split_workers else None
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._resume is None:
            return worker, n_workers
        recorded = len(self._resume["workers"])
        if n_workers != recorded:
            raise ValueError(f"this stream resumes {recorded} loader workers' positions but runs {n_workers}")
        return (self._resume["next"] + worker) % n_workers, n_workers

    def _start(self) -> dict[str, Any] | None:
        """Where this worker starts: its recorded position when resumed, else None (the beginning)."""
        return None if self._resume is None else self._resume["workers"][self._worker()[0]]

    def _pool(self) -> list[str]:
        """Every shard this worker reads, in any epoch: its own part of the shard list."""
        worker, n_workers = self._worker()
        return self._epoch_shards(0, worker, n_workers)

    def rank_shards(self) -> list[str]:
        """The shards this rank reads, over all its loader workers and epochs: the shard list shuffled by
        ``seed`` (when shards are shuffled), ``[rank::world_size]``. What a rank needs of a reference cache or
        a keep list at startup: its own shards', not the pool's."""
        urls = list(self.urls)
        if self.shuffle_shards or self.resampled:
            random.Random(f"{self.seed}/epoch0").shuffle(urls)
        return urls[self.rank :: self.world_size]

    def _epoch_shards(self, epoch: int, worker: int, n_workers: int) -> list[str]:
        """This worker's shards in epoch ``epoch``'s order. The deal is fixed (epoch 0's, the shard list
        shuffled by ``seed``, dealt to ranks then workers), so ranks and workers never share a shard; later
        epochs reorder a worker's own shards."""
        shuffle = self.shuffle_shards or self.resampled
        mine = self.rank_shards()[worker::n_workers]
        if shuffle and epoch > 0:
            random.Random(f"{self.seed}/{self.rank}/{worker}/epoch{epoch}").shuffle(mine)
        return mine

    def _shard_order(self, start: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """This worker's shards from ``start`` on, each with what reproduces the order from it: its ``epoch``
        and index ``shard`` in that epoch's order."""
        worker, n_workers = self._worker()
        if not self._pool():  # more workers than shards: this one has none (and must not spin)
            return
        epoch, first = (start["epoch"], start["shard"]) if start is not None else (0, 0)
        while self.resampled or self.epochs is None or epoch < self.epochs:
            shards = self._epoch_shards(epoch, worker, n_workers)
            for index in range(first, len(shards)):
                yield shards[index], {"epoch": epoch, "shard": index}
            epoch, first = epoch + 1, 0

    def samples(self, skipped: Counter[str] | None = None) -> Iterator[Sample]:
        """Decoded samples of this rank and worker, transformed; skips are counted into ``skipped``."""
        skipped = Counter() if skipped is None else skipped
        yield from (sample for sample, _ in self._positioned(skipped))

    def _positioned(self, skipped: Counter[str]) -> Iterator[tuple[Sample, dict[str, Any] | None]]:
        """Samples, each with this worker's position before it (None behind a shuffle buffer)."""
        start = self._start()
        if start is not None and start.get("end"):
            return
        decoded = self._decoded(skipped, start)
        if self.shuffle_buffer > 1:
            worker, _ = self._worker()
            rng = random.Random(f"{self.seed}/{self.rank}/{worker}/s")
            yield from ((s, None) for s in _shuffled((s for s, _ in decoded), self.shuffle_buffer, rng))
            return
        yield from decoded

    def _decoded(
        self, skipped: Counter[str], start: dict[str, Any] | None
    ) -> Iterator[tuple[Sample, dict[str, Any]]]:
        tally = _Tally(skipped)
        watch = _ShardWatch(self._pool(), self.require_samples, self._warned)
        offset = start["sample"] if start is not None else 0  # raw samples of the first shard consumed
        worker, _ = self._worker()
        if start is None and self.rank == 0 and worker == 0:
            for _ in range(self._duplicate_shards):
                tally("duplicate_shard")
        shard_read = getattr(self.keep, "shard_read", None)  # a keep list checks a shard it saw whole
        for url, order in self._shard_order(start):
            tally.shard, good, seen = Counter(), 0, set()
            for index, raw in _read_from(url, tally, offset):
                key = raw.get("__key__")
                seen.add(key)
                if self.keep is not None and key and not self.keep(url, key, content_digest(raw)):
                    tally("not_kept")
                    continue
                sample = self._decode(raw, tally)
                if sample is not None:
                    good += 1
                    yield sample, {"worker": worker, "url": url, "sample": index, **order}
            if shard_read is not None and offset == 0:
                shard_read(url, seen)
            watch.shard_done(url, good, tally.shard)
            offset = 0
        watch.end()

    def _decode(self, raw: dict[str, Any], count: Callable[[str], None]) -> Sample | None:
        dotted = dotted_pairs(raw)
        for _ in range(dotted):
            count("dotted_key")
        sample = decode_sample(raw, decode_size=self.decode_size)
        if isinstance(sample, str):
            if not (dotted and sample == "missing_image"):  # else the sample is those pairs, counted above
                count(sample)
            return None
        try:
            image = self.transform(sample.image)
        except Exception as exn:  # a user transform failing on one image must not end the stream
            count(f"transform_failed:{type(exn).__name__}")
            return None
        return Sample(sample.key, sample.url, image, sample.text, sample.meta, sample.digest)

    def __iter__(self) -> Iterator[SuperBatch]:
        # A full batch is held until the next sample arrives, so skips read after it (a bad tail) still go
        # into a batch; ``skipped`` is the one counter the sample generator writes into, emptied per batch.
        # The batch's position is the one before that next sample (whose skips go to the next batch), with
        # the index of this worker's next batch (``batch``: what its size is).
        # A sample already in the batch being filled is left out (``repeat_in_batch``); 2B of them in a row
        # prove that fewer than B distinct samples exist: within one epoch every sample comes once, so a run
        # of repeats longer than 2(B - 1) spans a whole epoch of samples all in the batch.
        skipped: Counter[str] = Counter()
        buffer: list[Sample] = []
        inside: set[tuple[str, str]] = set()
        repeats = 0
        t, stride = self._first_batch(), self._worker()[1]
        size = self._size(t)
        for sample, before in self._positioned(skipped):
            if len(buffer) == size:
                t += stride
                yield collate(buffer, skipped, None if before is None else {**before, "batch": t})
                size = self._size(t)
                buffer = []
                inside.clear()
                skipped.clear()
            if (sample.url, sample.key) in inside:
                skipped["repeat_in_batch"] += 1
                repeats += 1
                if repeats >= 2 * size:
                    raise TooFewSamplesError(self._too_few(len(inside), size))
                continue
            repeats = 0
            inside.add((sample.url, sample.key))
            buffer.append(sample)
        if len(buffer) == size or (buffer and not self.drop_last):
            end = None if self.shuffle_buffer > 1 else {"worker": self._worker()[0], "end": True}
            yield collate(buffer, skipped, end)

    def _first_batch(self) -> int:
        """The index (over the run) of this worker's next super-batch: the recorded one when resumed, else
        the worker's own index (round-robin)."""
        start = self._start()
        if start is None:
            return self._worker()[0]
        if "batch" in start:
            return int(start["batch"])
        if self.batch_sizes is not None:
            raise ValueError(
                "the recorded data position has no batch index (written by an older jestclip): it cannot "
                "resume a stream whose super-batch size changes per step"
            )
        return 0  # every batch has batch_size: the index is not needed

    def _size(self, t: int) -> int:
        """This rank's size of super-batch ``t``."""
        if self.batch_sizes is None:
            return self.batch_size
        size = self.batch_sizes(t)
        if not 1 <= size <= self.batch_size:
            raise ValueError(f"batch_sizes({t}) = {size} is not in [1, batch_size={self.batch_size}]")
        return size

    def _too_few(self, distinct: int, size: int) -> str:
        worker, n_workers = self._worker()
        return (
            f"a super-batch of {size} cannot be filled without repeating a sample: rank "
            f"{self.rank}'s loader worker {worker} reads {len(self._pool())} of {len(self.urls)} shards, "
            f"which hold only {distinct} readable samples; use more shards, fewer ranks or workers "
            f"({self.world_size} x {n_workers}), or a smaller batch"
        )

    def resumed(self, position: dict[str, Any]) -> SuperBatchStream:
        """A copy of this stream that starts where ``position`` (a ``ResumableBatches.position()``) left it;
        a ValueError when it cannot (a shuffle buffer, another kind of stream, shards that changed)."""
        if self.shuffle_buffer > 1:
            raise ValueError(
                f"shuffle_buffer={self.shuffle_buffer}: a stream with a shuffle buffer cannot resume at a "
                "recorded position (the buffer's contents are not recorded); use shuffle_buffer=0"
            )
        workers = list(position["workers"])
        for worker, start in enumerate(workers):
            self._check_start(worker, len(workers), start)
        stream = copy.copy(self)
        stream._resume = {"workers": workers, "next": int(position["next"]) % len(workers)}
        return stream

    def _check_start(self, worker: int, n_workers: int, start: dict[str, Any] | None) -> None:
        """A ValueError unless ``start`` is a position of this kind of stream whose shard is still there."""
        if start is None or start.get("end"):
            return
        where = f"rank {self.rank}'s loader worker {worker}"
        if "rng" in start:
            raise ValueError(
                f"the position recorded for {where} comes from a resampled stream that drew shards with "
                "replacement (jestclip before each worker kept its own shards); it cannot be continued: "
                "start the run again"
            )
        if start.get("worker") != worker or "epoch" not in start:
            raise ValueError(f"the position recorded for {where} is not this stream's: {_brief(start)}")
        shards = self._epoch_shards(start["epoch"], worker, n_workers)
        url = shards[start["shard"]] if start["shard"] < len(shards) else None
        if url != start["url"]:
            raise ValueError(
                f"cannot resume {where}: it was reading shard {start['url']}, but the shard list "
                f"({len(self.urls)} shards) now puts {url} there; the shards changed since the position was "
                "recorded"
            )


def _read_from(url: str, tally: _Tally, offset: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """A shard's raw samples from the ``offset``-th on, numbered. The first ``offset`` (consumed before a
    resume) are re-read from the tar but not yielded, and the skips counted up to the ``offset``-th are
    dropped: they went with the batches before the resume."""
    live = offset == 0

    def count(reason: str) -> None:
        if live:
            tally(reason)

    for index, raw in enumerate(read_shard(url, count)):
        if index >= offset:
            live = True
            yield index, raw


def _brief(position: dict[str, Any]) -> str:
    return str(position)


def _shuffled(items: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    buffer: list[Sample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[Sample], skipped: Counter[str], position: dict[str, Any] | None) -> SuperBatch:
    """``samples`` as one ``SuperBatch`` with ``skipped`` and ``position`` (a ValueError naming two keys when
    their images differ in shape): how the stream, and the memory pool serving its batches, build one."""
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) > 1:
        first = samples[0]
        odd = next(s for s in samples if tuple(s.image.shape) != tuple(first.image.shape))
        raise ValueError(
            f"images differ in size within a batch ({tuple(first.image.shape)} for key {first.key!r}, "
            f"{tuple(odd.image.shape)} for key {odd.key!r} in {odd.url}); pass a transform that resizes"
        )
    return SuperBatch(
        keys=[s.key for s in samples],
        urls=[s.url for s in samples],
        images=torch.stack([s.image for s in samples]),
        texts=[s.text for s in samples],
        meta=[s.meta for s in samples],
        skipped=dict(skipped),
        position=position,
        digests=[s.digest for s in samples],
    )


class ResumableBatches(Iterator[SuperBatch]):
    """A stream's super-batches through ``num_workers`` DataLoader workers (0: in this process), from its
    beginning or from a recorded ``position``; ``position()`` says where it is now.

    The DataLoader hands out its workers' batches round-robin, so batch ``n`` after a position comes from
    worker ``(next + n) % workers``; each batch carries its worker's position after it, recorded here as the
    batch is consumed (batches the workers prefetched but nobody consumed are read again on resume).
    ``pin_memory``: the DataLoader's pin thread puts each batch's images in page-locked memory (for a
    non-blocking copy to a GPU; needs CUDA).
    """

    def __init__(
        self,
        stream: SuperBatchStream,
        num_workers: int,
        position: dict[str, Any] | None = None,
        *,
        pin_memory: bool = False,
    ) -> None:
        self.workers = max(1, num_workers)  # 0 and 1 read the same stream
        if position is not None and "workers" not in position:
            kind = position.get("kind", "unknown")
            raise ValueError(
                f"the data position is of a {kind!r} source, not a stream's: resume with the source that "
                "recorded it (data_in_memory as when the run started)"
            )
        if position is not None:
            recorded = len(position["workers"])
            if recorded != self.workers:
                raise ValueError(
                    f"the data position was recorded with {_workers(recorded)}; resuming with "
                    f"num_workers={num_workers} would read other samples: use num_workers={recorded}"
                )
            stream = stream.resumed(position)
        self._workers: list[dict[str, Any] | None] = [None] * self.workers
        self._next = 0
        if position is not None:
            self._workers, self._next = list(position["workers"]), int(position["next"]) % self.workers
        self._exact = stream.shuffle_buffer <= 1
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self._batches = iter(loader)

    def __next__(self) -> SuperBatch:
        batch = next(self._batches)
        if batch.position is not None:
            worker = batch.position["worker"]
            self._workers[worker] = batch.position
            self._next = (worker + 1) % self.workers
        return batch

    def position(self) -> dict[str, Any] | None:
        """Where the stream stands after the batches consumed so far: per loader worker, where its next batch
        starts (None: at the beginning), and which worker's batch comes next; None for a stream with a
        shuffle buffer."""
        return {"workers": list(self._workers), "next": self._next} if self._exact else None

    def positions(self) -> list[dict[str, Any] | None]:
        """Every rank's ``position()`` in rank order (under torch.distributed a collective: every rank calls
        it)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [self.position()]
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.position())
        return gathered


def _workers(n: int) -> str:
    return "num_workers=0 or 1" if n == 1 else f"num_workers={n}"
