"""`dualfocus serve` under a Python audit hook that records every file the server's processes
open for writing, one "PID PATH" line each, in $DUALFOCUS_TEST_WRITES_LOG (for the test that
images are never written to disk). vLLM's engine processes are spawned: they import this file
as __mp_main__, so the hook is installed in them too, but only the parent runs the server."""

import os
import sys

_log = os.open(os.environ["DUALFOCUS_TEST_WRITES_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(event, args):
    if event == "open":
        path, _mode, flags = args
        if isinstance(flags, int) and flags & _WRITING and isinstance(path, (str, bytes, os.PathLike)):
            os.write(_log, f"{os.getpid()} {os.fsdecode(path)}\n".encode())


sys.addaudithook(_record_writes)

if __name__ == "__main__":
    from clients.cli import main

    sys.exit(main())
