"""`dualfocus ask IMAGE QUESTION`: ask a running server, print the answer and what DualFocus did."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .client import DualFocusClient
from .errors import DualFocusError


def add_parser(sub) -> None:
    p = sub.add_parser("ask", help="ask a running DualFocus server about an image and show where it looked")
    p.add_argument("image", help="image file (PNG, JPEG, WebP)")
    p.add_argument("question")
    p.add_argument(
        "--url",
        default=os.environ.get("DUALFOCUS_URL", "http://127.0.0.1:8000"),
        help="server address (default: $DUALFOCUS_URL or %(default)s)",
    )
    p.add_argument("--api-key", default=os.environ.get("DUALFOCUS_API_KEY"), help="default: $DUALFOCUS_API_KEY")
    p.add_argument(
        "--mode",
        choices=["dualfocus", "auto", "macro"],
        help="dualfocus (always zoom), auto (zoom only when the macro answer is unsure) or macro (one pass) "
        "(default: the server's --default-mode)",
    )
    p.add_argument(
        "--zoom-threshold",
        type=float,
        metavar="0-1",
        help="mode auto: zoom when the macro answer's confidence is below this (default: the server's)",
    )
    p.add_argument(
        "--zoom-threshold-choice",
        type=float,
        metavar="0-1",
        help="mode auto: the same, for a multiple-choice question (default: the server's)",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with the box, the crop and an inset of it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        print(f"error: cannot read image {args.image}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    client = DualFocusClient(args.url, api_key=args.api_key, max_retries=0)
    try:
        result = client.ask(
            args.image,
            args.question,
            mode=args.mode,
            max_tokens=args.max_tokens,
            zoom_threshold=args.zoom_threshold,
            zoom_threshold_choice=args.zoom_threshold_choice,
        )
    except DualFocusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.draw:
        from .draw import draw_focus

        draw_focus(image, result).save(args.draw, "PNG")
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(result.answer)
        print()
        print(trace_table(result))
        if args.draw:
            print(f"\nwrote {args.draw}")
    return 0


def _gate_row(g) -> str:
    aborted = ", box pass aborted" if g.box_aborted else ""
    threshold = f"{'choice ' if g.multiple_choice else ''}threshold {g.threshold}"
    return f"{'yes' if g.zoomed else 'no'}: {g.why} (confidence {g.confidence:.3f}, {threshold}{aborted})"


def trace_table(r) -> str:
    rows = [
        ("mode", r.mode),
        ("chosen", f"{r.chosen}: {r.why}"),
        ("zoom", _gate_row(r.gate) if r.gate else None),
        ("macro answer", r.macro_answer),
        ("micro answer", r.micro_answer),
        ("box", f"{r.box_text} -> pixels {r.box}" if r.box_text else None),
        ("crop", r.crop),
        ("scores (NLL)", ", ".join(f"{k} {v:.3f}" for k, v in r.scores.items()) if r.scores else None),
    ]
    lines = [f"{name:<14}{value}" for name, value in rows if value is not None]
    lines.append(f"{'stage':<14}{'ms':>9}{'prompt':>9}{'cached':>9}")
    lines += [f"{name:<14}{s.ms:>9.1f}{s.prompt_tokens:>9}{s.cached_tokens:>9}" for name, s in r.stages.items()]
    lines.append(
        f"{'usage':<14}prompt {r.usage.prompt_tokens} (cached {r.usage.cached_tokens}), "
        f"completion {r.usage.completion_tokens}"
    )
    return "\n".join(lines)
