"""Does image work on a thread leave the event loop free? (docs/performance.md)

    python -m loadtests.imagework_gil [--repeats 3]

Runs each step of a 35-megapixel JPEG's way through this service (decode, pad to square,
content hash, crop of a quarter and its padding) on a pool thread, the way the server runs
it, while the event loop wakes every millisecond; prints how long the step took and the
longest the loop waited for its wake-up. A step that holds the GIL shows a gap near its own
duration; one that releases it shows gaps of a few milliseconds. For comparison, the first
line is the loop alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable

from engine.families.llava import LlavaAdapter
from engine.runner import ModelImage
from server.images import decode_image

from .bigimages import big_jpeg
from .loadgen import machine


async def loop_gaps_while(step: Callable[[], object] | None) -> tuple[float, float, float]:
    """(step seconds, longest loop gap, p99 loop gap) with `step` on a thread (None: just the loop, 0.5 s)."""
    gaps: list[float] = []
    done = False

    async def tick():
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    gaps.clear()
    t0 = time.perf_counter()
    if step is None:
        await asyncio.sleep(0.5)
    else:
        await asyncio.to_thread(step)
    seconds = time.perf_counter() - t0
    done = True
    await ticker
    gaps.sort()
    return seconds, gaps[-1], gaps[int(0.99 * (len(gaps) - 1))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.imagework_gil", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--repeats", type=int, default=3, help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    data = big_jpeg(seed=0)
    adapter = LlavaAdapter(None, {})
    state: dict = {}

    def step_decode():
        state["image"] = decode_image(data, 40_000_000)

    def step_pad():
        state["padded"] = adapter.model_image(state["image"])

    def step_hash():
        ModelImage.of(state["padded"])

    def step_crop():
        w, h = state["image"].size
        ModelImage.of(adapter.model_image(state["image"].crop((0, 0, w // 2, h // 2))))

    steps = {"(loop alone)": None, "decode": step_decode, "pad to square": step_pad, "content hash": step_hash,
             "crop, pad, hash": step_crop}
    rows = []

    async def run():
        for repeat in range(args.repeats):
            for name, step in steps.items():
                seconds, worst, p99 = await loop_gaps_while(step)
                rows.append({"step": name, "repeat": repeat, "seconds": seconds, "max_gap_s": worst, "p99_gap_s": p99})
                if not args.json:
                    print(f"{name:16s} {seconds * 1000:7.0f} ms   loop gap max {worst * 1000:6.1f} ms  "
                          f"p99 {p99 * 1000:5.1f} ms", flush=True)

    asyncio.run(run())
    if args.json:
        print(json.dumps({"machine": machine(), "jpeg_bytes": len(data), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
