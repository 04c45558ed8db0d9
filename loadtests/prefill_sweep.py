"""Where does prefill dominate a request's time? A LLaVA-1.5-shaped random-weight model (576 image
tokens, tiny vision tower) at several language-model sizes, each built by engine/tiny.py's builder and
served by this service in turn; per size, requests one at a time (nothing else in flight):

- text-1: a short text-only question, 1-token answer: a request's fixed cost (HTTP, Python,
  scheduling, one forward of ~40 tokens).
- text-600: a text-only prompt of about as many tokens as an image question (~600, words in an order
  no earlier request had, so nothing is cached), 1-token answer: the fixed cost + the language
  model's prefill of ~600 tokens, without any image work.
- image-1: a question about an image the server has not seen, macro mode, 1-token answer: the fixed
  cost + image work (decoding, preprocessing, vision tower) + the prefill of the image's 576 tokens
  and the prompt (~600 tokens).
- image-16: the same streamed with max_tokens 16: time to the first token, then decode steps.

    python -m loadtests.prefill_sweep                        # the sizes in docs/performance.md
    python -m loadtests.prefill_sweep --sizes 768x14,1024x16 --requests 2

Shares of a 1-token image answer: fixed = text-1 / image-1, language-model prefill =
(text-600 - text-1) per prompt token x the image prompt's tokens / image-1, image work = the rest. Writes
loadtests/results/prefill-sweep-<time>.json and prints a table. Sizes are HIDDENxLAYERS (intermediate
size 8/3 x hidden rounded up to a multiple of 256, as Llama's; heads of 64); "tiny" is tiny-llava's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

from . import scenes, systems
from .bench import ROOT, serve_command, start, stop
from .loadgen import git_revision, machine


def parse_size(text: str):
    """'tiny' or HIDDENxLAYERS -> an engine.tiny.LlamaShape."""
    from engine.tiny import TINY_LLAVA_TEXT, LlamaShape

    if text == "tiny":
        return TINY_LLAVA_TEXT
    hidden, layers = (int(x) for x in text.lower().split("x"))
    if hidden % 64:
        raise ValueError(f"{text}: hidden size must be a multiple of 64 (heads of 64)")
    return LlamaShape(hidden_size=hidden, intermediate_size=-(-8 * hidden // 3 // 256) * 256, num_hidden_layers=layers)


async def measure(port: int, requests: int, seed: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
    model = (await client.models.list()).data[0].id
    items = scenes.synthetic(2 * requests + 1, seed=seed)

    async def text_1() -> float:
        t0 = time.perf_counter()
        await client.chat.completions.create(model=model, max_tokens=1, messages=[
            {"role": "user", "content": "What is the colour of the sky in the picture of the house?"}])
        return time.perf_counter() - t0

    async def text_600(seed: int) -> tuple[float, int]:
        words = [w for _ in range(12) for w in scenes.QUESTIONS[seed % len(scenes.QUESTIONS)].split()]
        random.Random(seed).shuffle(words)  # a first block no earlier prompt had: no prefix-cache hit
        t0 = time.perf_counter()
        r = await client.chat.completions.create(model=model, max_tokens=1, messages=[
            {"role": "user", "content": " ".join(words * 6)}])
        return time.perf_counter() - t0, r.usage.prompt_tokens

    await systems.ours(client, model, items[-1], "macro", 1, stream=False)  # warm-up
    await text_1()
    await text_600(seed)
    text = [await text_1() for _ in range(requests)]
    long_text = [await text_600(seed + 1 + k) for k in range(requests)]
    image_1 = [await systems.ours(client, model, item, "macro", 1, stream=False) for item in items[:requests]]
    image_16 = [await systems.ours(client, model, item, "macro", 16, stream=True) for item in items[requests:-1]]
    await client.close()
    decode = [(s.latency_s - s.ttft_s) / (s.output_tokens - 1) for s in image_16 if s.ttft_s and s.output_tokens > 1]
    out = {
        "text_1_s": statistics.median(text),
        "text_600_s": statistics.median(t for t, _ in long_text),
        "text_600_prompt_tokens": statistics.median(n for _, n in long_text),
        "image_1_s": statistics.median(s.latency_s for s in image_1),
        "image_1_prompt_tokens": statistics.median(s.prompt_tokens for s in image_1),
        "image_16_ttft_s": statistics.median(s.ttft_s for s in image_16 if s.ttft_s),
        "image_16_s": statistics.median(s.latency_s for s in image_16),
        "image_16_output_tokens": statistics.median(s.output_tokens for s in image_16),
        "decode_s_per_token": statistics.median(decode) if decode else None,
    }
    # Shares of a 1-token answer about an image: fixed cost, the language model's prefill, image work.
    out["fixed_share"] = out["text_1_s"] / out["image_1_s"]
    # (the text prompt's prefill scaled to the image prompt's length: the two differ by a few tokens)
    per_token = (out["text_600_s"] - out["text_1_s"]) / out["text_600_prompt_tokens"]
    out["lm_prefill_share"] = per_token * out["image_1_prompt_tokens"] / out["image_1_s"]
    out["image_work_share"] = 1 - out["fixed_share"] - out["lm_prefill_share"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.prefill_sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", default="tiny,512x8,768x14,1024x16,1024x24",
                   help="language-model sizes, HIDDENxLAYERS or tiny (default: %(default)s)")
    p.add_argument("--requests", type=int, default=3, help="of each kind per size; medians (default: %(default)s)")
    p.add_argument("--port", type=int, default=8730)
    args = p.parse_args(argv)
    from engine.tiny import build_llava, llava_parts

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server it started
    out = ROOT / "loadtests" / "results" / f"prefill-sweep-{time.strftime('%Y%m%d-%H%M%S')}.json"

    shapes = [(name, parse_size(name)) for name in args.sizes.split(",")]
    logs = ROOT / "loadtests" / "results" / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    results = {"command": "python -m loadtests.prefill_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
               "git": git_revision(), "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "sizes": []}
    print(f"{'size':>8s} {'LM params':>10s} {'build s':>8s} {'text-1 s':>9s} {'text-600 s':>10s} {'image-1 s':>10s} "
          f"{'fixed %':>8s} {'prefill %':>9s} {'image %':>8s} {'TTFT s':>7s} {'decode ms/tok':>13s}", flush=True)
    for i, (name, shape) in enumerate(shapes):
        tokenizer, _ = llava_parts(shape)
        params = shape.parameters(len(tokenizer))
        with tempfile.TemporaryDirectory(prefix="prefill-sweep-") as tmp:  # hundreds of MB each: not kept
            t0 = time.perf_counter()
            build_llava(Path(tmp), shape)
            built_s = time.perf_counter() - t0
            server = start([*serve_command(None), "--port", str(args.port), "--model", tmp, "--served-model-name",
                            f"llava-{name}", "--kv-cache-gib", "2"], args.port, logs / f"prefill-sweep-{name}.log")
            try:
                row = asyncio.run(measure(args.port, args.requests, seed=1000 + i))
            finally:
                stop(server)
        row = {"size": name, "load_average_1m": os.getloadavg()[0], "hidden_size": shape.hidden_size,
               "intermediate_size": shape.intermediate_size, "layers": shape.num_hidden_layers,
               "lm_parameters": params, "build_s": round(built_s, 1), **row}
        results["sizes"].append(row)
        out.write_text(json.dumps(results, indent=2))  # after each size: a stopped sweep keeps what it measured
        decode = row["decode_s_per_token"]
        print(f"{name:>8s} {params / 1e6:9.0f}M {built_s:8.1f} {row['text_1_s']:9.3f} {row['text_600_s']:10.3f} "
              f"{row['image_1_s']:10.3f} {100 * row['fixed_share']:7.0f}% {100 * row['lm_prefill_share']:8.0f}% "
              f"{100 * row['image_work_share']:7.0f}% {row['image_16_ttft_s']:7.3f} "
              f"{1000 * decode if decode else float('nan'):13.1f}", flush=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
