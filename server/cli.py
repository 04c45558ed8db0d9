"""`dualfocus serve`: its flags, and the process around the app (uvicorn, signals, exit status).

The exit policy lives here, not in the app: if the engine fails to start the process exits 1
at once; if it dies later, /health answers 503 for a moment (probes see it), then the server
stops and exits 1, so a supervisor restarts it: nothing in the process can revive vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import Literal

from engine.cli import add_engine_args, engine_config
from engine.trace import MODES

from .logs import configure_logging
from .settings import ServerSettings

log = logging.getLogger("dualfocus.server")
# How long /health answers 503 after the engine died, before the process stops.
DEATH_GRACE_S = 2.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = ServerSettings()
    p = sub.add_parser("serve", help="serve the OpenAI chat completions API (DualFocus for requests with an image)")
    p.add_argument("--host", default=d.host, help="default: %(default)s")
    p.add_argument("--port", type=int, default=d.port, help="default: %(default)s")
    p.add_argument(
        "--api-key",
        default=os.environ.get("DUALFOCUS_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DUALFOCUS_API_KEY, else none)",
    )
    p.add_argument("--served-model-name", help="the model name clients send (default: the --model value)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="default: %(default)s")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="default: %(default)s")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=d.max_image_pixels,
        help="checked from the image header before decoding (default: %(default)s)",
    )
    p.add_argument(
        "--allowed-image-domains",
        default="",
        help="comma-separated hosts (and their subdomains) http(s) image URLs may come from; "
        "non-public addresses are refused whatever the list (default: none, http(s) off)",
    )
    p.add_argument(
        "--allowed-local-media-path", help="folder file:// image URLs may read from (default: none, file:// off)"
    )
    p.add_argument(
        "--max-inflight-requests",
        type=int,
        default=d.max_inflight_requests,
        help="beyond this, 429 with Retry-After (default: %(default)s)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=d.drain_seconds,
        help="on SIGTERM, how long in-flight requests may finish (default: %(default)s)",
    )
    p.add_argument(
        "--default-mode",
        choices=list(MODES),
        default=d.default_mode,
        help="the mode of requests whose dualfocus extension names none: dualfocus (always zoom), auto (zoom "
        "only when the macro answer is unsure, see --zoom-threshold) or macro (one pass); requests without "
        "an image run one pass whatever the mode (default: %(default)s)",
    )
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(
        ServerSettings(
            engine=engine_config(args),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            served_model_name=args.served_model_name,
            max_body_bytes=args.max_body_bytes,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            allowed_image_domains=[d.strip().lower() for d in args.allowed_image_domains.split(",") if d.strip()],
            allowed_local_media_path=args.allowed_local_media_path,
            max_inflight_requests=args.max_inflight_requests,
            drain_seconds=args.drain_seconds,
            default_mode=args.default_mode,
        )
    )


def serve(settings: ServerSettings) -> int:
    """Run the server until SIGTERM/SIGINT (exit status 0 after a clean drain) or engine failure (1)."""
    import uvicorn

    from engine import DualFocusEngine

    from .app import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # As uvicorn's, without re-raising the signal at the end: a SIGTERM that
            # drained cleanly is a normal stop, and exits 0.
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    exit_status = 0

    def on_engine_failure(what: Literal["start", "died"]) -> None:
        nonlocal exit_status
        if what == "start":
            # Nothing to serve: exit at once so a supervisor restarts or reports it (vLLM's
            # half-started processes would hold an orderly exit up).
            os._exit(1)
        log.error("exiting with status 1 in %.0f s", DEATH_GRACE_S)
        exit_status = 1
        asyncio.get_running_loop().call_later(DEATH_GRACE_S, server.handle_exit, signal.SIGTERM, None)

    configure_logging()
    app = create_app(settings, lambda: DualFocusEngine.create(settings.engine), on_engine_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_seconds),
    )
    server = Server(config)
    server.run()
    return exit_status
