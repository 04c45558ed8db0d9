"""`make eval`: serve a model, run the generated zoom-in task through it in both modes, stop the server.

    python -m training.evaluate --model tiny-dualfocus --questions 400 --out eval-out
    python -m training.evaluate --model tiny-dualfocus --mode all --zoom-threshold 1 --zoom-threshold-choice 1 \
        --out EVAL_DIR

(the second also runs mode auto at thresholds 1, what `python -m loadtests.auto_calibrate EVAL_DIR`
replays to calibrate the zoom thresholds; docs/performance.md, "Adaptive DualFocus (mode auto)").

The table it prints is `dualfocus eval --generate` (clients/eval/generated.py) against a server this
command starts on a free local port and stops afterwards; docs/paper.md quotes a run of it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from clients.eval.harness import MODES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-dualfocus", help="what the server serves (default: %(default)s)")
    p.add_argument("--questions", type=int, default=400, help="generated test questions (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which generated test set (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="answers and summary (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--mode", choices=list(MODES), default="both",
                   help="as `dualfocus eval --mode`: all adds mode auto (default: %(default)s)")
    p.add_argument("--zoom-threshold", type=float, metavar="0-1",
                   help="mode auto's threshold, as `dualfocus eval --zoom-threshold` (default: the server's)")
    p.add_argument("--zoom-threshold-choice", type=float, metavar="0-1",
                   help="the same for multiple-choice questions, as `dualfocus eval` (default: the server's)")
    args = p.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "clients", "serve", "--model", args.model,
                               "--port", str(port), "--max-inflight-requests", str(4 * args.concurrency)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        if not _wait_ready(port, server):
            print(f"error: the server did not start; see {log.name}", file=sys.stderr)
            return 1
        threshold = [] if args.zoom_threshold is None else ["--zoom-threshold", str(args.zoom_threshold)]
        if args.zoom_threshold_choice is not None:
            threshold += ["--zoom-threshold-choice", str(args.zoom_threshold_choice)]
        return subprocess.call([sys.executable, "-m", "clients", "eval", "--generate", str(args.questions),
                                "--seed", str(args.seed), "--out", str(args.out), "--concurrency",
                                str(args.concurrency), "--mode", args.mode, *threshold,
                                "--url", f"http://127.0.0.1:{port}"])
    finally:
        server.terminate()
        server.wait(timeout=60)


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 300) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


if __name__ == "__main__":
    raise SystemExit(main())
