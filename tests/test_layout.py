"""The packages import one another one way only (docs/architecture.md): each check imports a
package in a fresh interpreter and looks at what else came in."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules_after_importing(*names: str) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {list(names)!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout))


# The `dualfocus` command's assembler imports every package by design (it sits above them all).
ASSEMBLER = "clients.cli"


def every_module(package: str) -> list[str]:
    names = [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(ROOT / package)])
             if not m.name.endswith("__main__")]
    return [package] + [name for name in names if name != ASSEMBLER]


@pytest.mark.parametrize("package, never", [
    ("engine", {"server", "clients", "vllm"}),  # vLLM only inside the functions that run it
    ("server", {"clients", "vllm"}),
    ("clients", {"engine", "vllm"}),  # the client needs no engine: only the trace's models
])
def test_a_package_does_not_import_what_sits_above_it(package, never):
    loaded = modules_after_importing(*every_module(package))
    assert not loaded & never, loaded & never


@pytest.mark.parametrize("module", ["clients", "engine.cli"])  # engine.cli: as scripts called it before
def test_the_dualfocus_command_assembles_every_subcommand(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.startswith("usage: dualfocus ")
    for command in ("build-tiny", "demo", "convert-llava", "serve", "ask", "eval"):
        assert command in out
