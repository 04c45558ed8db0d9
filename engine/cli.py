"""The engine's subcommands (build-tiny, demo, convert-llava) and the engine flags every command
that starts an engine shares. The `dualfocus` command assembles them (clients/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import json

from .config import CPU_BLOCK_SIZE, DEFAULT_MODEL, EngineConfig
from .image_work import BIG_PIXELS, default_threads
from .trace import MODES


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, shared by every subcommand that starts an engine."""
    d = EngineConfig()
    g = p.add_argument_group("engine (passed through to vLLM)")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="tiny-llava, tiny-qwen2-vl or tiny-qwen2.5-vl (built locally if missing), a checkpoint folder, "
        "or a hub name (default: %(default)s)",
    )
    g.add_argument(
        "--family",
        default="auto",
        choices=["auto", "llava", "qwen2_vl", "qwen2_5_vl"],
        help="model family; auto reads config.json's model_type (default: %(default)s)",
    )
    g.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context length (default: %(default)s)")
    g.add_argument(
        "--kv-cache-gib",
        type=float,
        default=d.kv_cache_gib,
        help="KV cache size in GiB (default: 4 on CPU; on GPU, vLLM's memory fraction)",
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=None, help="GPU memory fraction (GPU only)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per layer (default: %(default)s)")
    g.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        help="stages of layers, e.g. one per node (default: %(default)s)",
    )
    g.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas in this server; a request's passes stay on one (default: %(default)s)",
    )
    g.add_argument(
        "--distributed-executor-backend",
        choices=["mp", "ray", "uni"],
        default=None,
        help="how vLLM runs its workers; ray for several nodes (default: vLLM's choice)",
    )
    g.add_argument(
        "--mm-processor-cache-gib",
        type=float,
        default=d.mm_processor_cache_gib,
        help="processed-image cache, held twice (this process and the engine core) (default: %(default)s)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="turn vLLM's prefix cache off (DualFocus's follow-ups then recompute the image)",
    )
    g.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip graph capture (default: on for CPU, off for GPU)",
    )
    g.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in a batch (default: vLLM's)")
    g.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        help="tokens per KV-cache block; the prefix cache shares whole blocks, so each DualFocus follow-up "
        f"recomputes up to one block of the earlier prompt (default: {CPU_BLOCK_SIZE} on CPU, vLLM's on GPU)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="what the model computes in; auto: the checkpoint's dtype, but float32 on a CPU without AVX-512, "
        "where vLLM has no fast bf16 matmuls (default: %(default)s)",
    )
    g.add_argument(
        "--kv-events-config",
        type=_kv_events_config,
        default=None,
        metavar="JSON",
        help="vLLM's KV-cache event publisher, e.g. '{\"enable_kv_cache_events\": true, "
        '"publisher": "zmq", "endpoint": "tcp://*:5557"}\' (what vllm-router\'s '
        "kv_aware policy subscribes to; default: off)",
    )
    g.add_argument(
        "--max-images-per-request",
        type=int,
        default=d.max_images_per_request,
        help="images a request may carry over all its turns; more is a 400. DualFocus zooms into the most "
        "recent; vLLM is told one more per prompt, for the crop (default: %(default)s)",
    )
    g.add_argument(
        "--image-threads",
        type=_positive_int,
        default=d.image_threads,
        help="threads decoding, padding, cropping and hashing images off the event loop, for images over "
        f"{BIG_PIXELS // 1_000_000} megapixels and again for the rest; also how many such jobs run at once in "
        f"each (default: {default_threads()} on this machine)",
    )
    g = p.add_argument_group(
        "mode auto (adaptive DualFocus: the micro pass and fusion run only when the macro answer is unsure)"
    )
    g.add_argument(
        "--zoom-threshold",
        type=_share,
        default=d.zoom_threshold,
        metavar="0-1",
        help="zoom when the macro answer's confidence (the geometric-mean probability of its tokens) is below "
        "this: 0 never zooms, 1 nearly always; a request may set its own (dualfocus.zoom_threshold). "
        "The default is calibrated on tiny-dualfocus; calibrate another model with loadtests/auto_calibrate.py "
        "(docs/performance.md) (default: %(default)s)",
    )
    g.add_argument(
        "--zoom-threshold-choice",
        type=_share,
        default=d.zoom_threshold_choice,
        metavar="0-1",
        help="--zoom-threshold for a multiple-choice question (options listed in it): a letter's probability is "
        "on another scale than an open answer's. tiny-dualfocus never changes a letter when it zooms, hence its "
        "default; a request may set its own (dualfocus.zoom_threshold_choice) (default: %(default)s)",
    )
    g.add_argument(
        "--zoom-max-box-area",
        type=_share,
        default=d.zoom_max_box_area,
        metavar="0-1",
        help="zoom only into boxes covering at most this share of the image: a bigger box gives the micro pass "
        "nearly the picture the macro pass saw; 1 lifts the limit. Not calibrated (default: %(default)s)",
    )
    g.add_argument(
        "--zoom-early-box",
        action="store_true",
        help="start the box pass as soon as the macro prompt is prefilled (for questions whose threshold is "
        "above 0) and abort it when the answer is confident: a zoomed request does not wait for the answer, "
        "but every such request pays for the box's prompt and a few of its tokens (default: the box pass runs "
        "only after an unsure answer)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _kv_events_config(text: str):
    from vllm.config import KVEventsConfig

    return KVEventsConfig(**json.loads(text))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        family=args.family,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        mm_processor_cache_gib=args.mm_processor_cache_gib,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        dtype=args.dtype,
        extra={"kv_events_config": args.kv_events_config} if args.kv_events_config else {},
        max_images_per_request=args.max_images_per_request,
        image_threads=args.image_threads,
        zoom_threshold=args.zoom_threshold,
        zoom_threshold_choice=args.zoom_threshold_choice,
        zoom_max_box_area=args.zoom_max_box_area,
        zoom_early_box=args.zoom_early_box,
    )


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from .tiny import TINY_MODELS, ensure_tiny

    for name in args.names or TINY_MODELS:
        print(name, ensure_tiny(name), flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from .engine import DualFocusEngine
    from .query import Query, Sampling

    image = Image.open(args.image) if args.image else _demo_image()

    async def run() -> None:
        engine = DualFocusEngine.create(engine_config(args))
        try:
            await engine.warm_up()
            result = await engine.answer(
                Query(args.question, [image], mode=args.mode, sampling=Sampling(max_tokens=args.max_tokens))
            )
            print(json.dumps({"answer": result.answer, "trace": result.trace.to_dict()}, indent=2))
        finally:
            engine.shutdown()

    asyncio.run(run())
    return 0


def _demo_image():
    """A synthetic scene: a red square and a blue disc on grey."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 80, 220, 240), fill=(220, 30, 30))
    draw.ellipse((400, 260, 560, 420), fill=(30, 60, 220))
    return image


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-tiny",
        help="build the embedded tiny checkpoints (offline, deterministic); prints 'NAME PATH' per checkpoint",
    )
    p.add_argument(
        "names", nargs="*", help="which to build (default: every tiny-* one; bench-llava-576 only when named)"
    )
    p.set_defaults(func=cmd_build_tiny)

    p = sub.add_parser("demo", help="answer one question in-process through the engine and print the trace")
    p.add_argument("--image", help="image file (default: a synthetic scene)")
    p.add_argument("--question", default="What colour is the square?", help="default: %(default)r")
    p.add_argument(
        "--mode",
        choices=list(MODES),
        default="dualfocus",
        help="dualfocus (always zoom), auto (zoom when unsure) or macro (one pass) (default: %(default)s)",
    )
    p.add_argument("--max-tokens", type=int, default=32, help="default: %(default)s")
    add_engine_args(p)
    p.set_defaults(func=cmd_demo)

    from . import convert_llava

    convert_llava.add_parser(sub)


if __name__ == "__main__":
    # `python -m engine.cli` still runs the whole command (scripts written before `python -m
    # clients`); importing this module does not import the command above it.
    import sys

    from clients.cli import main

    sys.exit(main())
