"""CPU-heavy image work (decoding, padding, cropping, hashing) on small thread pools.

The event loop that would otherwise run this work also drives every stream: a 35-megapixel
JPEG takes about a second of CPU from decode to content hash, and every other request waited
for it. On a thread it does not hold the loop, because Pillow's decoders, converters, paste and
crop and hashlib's digest release the GIL while they run (measured: docs/performance.md).

Two lanes, each `threads` threads: jobs on images of more than BIG_PIXELS go to one, the rest to
the other, so a small request's few milliseconds never queue behind big images' seconds.

Bounded: at most `threads` jobs per lane are handed to its pool at once; later callers wait
(without holding a thread or queueing in the pool) for a slot. A slot is freed when its job has
finished, not when its caller stops waiting, so cancelled requests cannot pile work up. What the
waiting requests hold (their request bodies, opened images) is bounded by the in-flight limit.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from PIL import Image

T = TypeVar("T")

THREAD_NAME_PREFIX = "image-work"
# 4 megapixels: about 2048x2048; a camera photo or a scan is more, a screenshot or a web image less.
BIG_PIXELS = 4_000_000


def as_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB; itself if it is already (convert() would copy it: 100 MB for a 35-megapixel photo)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def default_threads() -> int:
    """Per lane: one for each two cores, at most four. The engine needs the cores, and on a small
    machine big images done one at a time finish sooner than two fighting for the same CPU."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class _Lane:
    def __init__(self, threads: int, name: str):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"{THREAD_NAME_PREFIX}-{name}")
        self.slots = asyncio.Semaphore(threads)


class ImageWorkers:
    def __init__(self, threads: int | None = None):
        self.threads = threads or default_threads()
        if self.threads < 1:
            raise ValueError(f"image threads must be at least 1, got {threads}")
        self._small = _Lane(self.threads, "small")
        self._big = _Lane(self.threads, "big")

    async def run(self, fn: Callable[..., T], *args, pixels: int) -> T:
        """`fn(*args)` on a pool thread, once a slot in the lane for an image of `pixels` is free.
        Exceptions are raised here."""
        lane = self._big if pixels > BIG_PIXELS else self._small
        loop = asyncio.get_running_loop()
        await lane.slots.acquire()
        try:
            job: Future[T] = lane.pool.submit(functools.partial(fn, *args))
        except BaseException:
            lane.slots.release()
            raise
        job.add_done_callback(lambda _: _free_slot(loop, lane.slots))
        return await asyncio.wrap_future(job)

    def shutdown(self) -> None:
        for lane in (self._small, self._big):
            lane.pool.shutdown(wait=False, cancel_futures=True)


def _free_slot(loop: asyncio.AbstractEventLoop, slots: asyncio.Semaphore) -> None:
    # Called on the pool thread when the job ends (or at once, if it was cancelled before it started).
    try:
        loop.call_soon_threadsafe(slots.release)
    except RuntimeError:  # the loop has closed: nobody is waiting for the slot
        pass
