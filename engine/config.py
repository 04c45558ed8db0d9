"""Engine settings, and how they become vLLM engine arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .gate import DEFAULT_CHOICE_THRESHOLD, DEFAULT_MAX_BOX_AREA, DEFAULT_THRESHOLD, check_share

DEFAULT_MODEL = "tiny-llava"
CPU_BLOCK_SIZE = 32  # the CPU attention backend wants multiples of 32


@dataclass
class EngineConfig:
    """What the DualFocus engine runs. Unset fields keep vLLM's defaults."""

    # A tiny-* name (built locally if missing; tiny-dualfocus is trained, in training/), a checkpoint folder,
    # or a hub name.
    model: str = DEFAULT_MODEL
    family: str = "auto"  # auto | llava | qwen2_vl | qwen2_5_vl
    max_model_len: int | None = 4096
    kv_cache_gib: float | None = None  # KV cache size; None: 4 GiB on CPU, vLLM's memory fraction on GPU
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # vLLM's choice; "ray" for several nodes
    # vLLM keeps processed images (pixel tensors) for reuse, once in this process and once in
    # the engine core: RSS grows by up to twice this. A request's passes reuse its images within
    # seconds, so a small cache does; vLLM's default of 4 GiB mostly holds images seen once.
    mm_processor_cache_gib: float = 0.5
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: on for CPU (no graphs to capture there)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # Tokens per KV block: the prefix cache shares whole blocks, so each follow-up pass recomputes
    # up to a block of its earlier pass's prompt. None: 32 on CPU (vLLM's CPU default, 128, makes
    # every fork recompute up to 127 tokens), vLLM's choice elsewhere (16 on GPU).
    block_size: int | None = None
    # "auto": the checkpoint's dtype, except float32 on an x86 CPU without AVX-512 (cpu_dtype below).
    dtype: str = "auto"
    seed: int = 0
    box_max_tokens: int = 64
    # Images one request may carry, over all its turns; each DualFocus follow-up adds the crop.
    max_images_per_request: int = 4
    # Threads per lane for image work (engine/image_work.py); None: one per two cores, at most 4.
    image_threads: int | None = None
    # Mode auto's gate (engine/gate.py): zoom only when the macro answer's confidence is below
    # zoom_threshold (zoom_threshold_choice for a multiple-choice question) and the box covers at most
    # zoom_max_box_area of the image (thresholds: calibrated on tiny-dualfocus).
    zoom_threshold: float = DEFAULT_THRESHOLD
    zoom_threshold_choice: float = DEFAULT_CHOICE_THRESHOLD
    zoom_max_box_area: float = DEFAULT_MAX_BOX_AREA
    zoom_early_box: bool = False  # ZoomGate.early_box
    # Any further vllm.AsyncEngineArgs field, passed through unchanged.
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_share("zoom_threshold", self.zoom_threshold)
        check_share("zoom_threshold_choice", self.zoom_threshold_choice)
        check_share("zoom_max_box_area", self.zoom_max_box_area)

    def resolve_model(self) -> str:
        # A name of engine/tiny.py's means "build it if missing" (tiny-dualfocus: the trained one in training/):
        # only then is the builder imported.
        from .tiny import BUILT_MODELS, TRAINED_MODELS, ensure_tiny

        if self.model in BUILT_MODELS or self.model in TRAINED_MODELS:
            return str(ensure_tiny(self.model))
        return str(Path(self.model).expanduser()) if Path(self.model).expanduser().exists() else self.model

    def engine_args(self):
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        enforce_eager = current_platform.is_cpu() if self.enforce_eager is None else self.enforce_eager
        kwargs = dict(
            model=self.resolve_model(),
            max_model_len=self.max_model_len,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            data_parallel_size=self.data_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
            mm_processor_cache_gb=self.mm_processor_cache_gib,
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=enforce_eager,
            dtype=cpu_dtype(self.dtype) if current_platform.is_cpu() else self.dtype,
            seed=self.seed,
            # Follow-up passes of started requests go ahead of new requests' first passes.
            scheduling_policy="priority",
            # A DualFocus follow-up carries the request's images and the crop.
            limit_mm_per_prompt={"image": self.max_images_per_request + 1},
            # Grammars (the box; JSON answers) with xgrammar, and JSON answers compact: free whitespace
            # between tokens is valid JSON but lets an answer spend its token budget on it.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            runner="generate",
            disable_log_stats=False,
        )
        # vLLM's CPU default (a fraction of all memory) fails to start beside other processes.
        kv_cache_gib = self.kv_cache_gib
        if kv_cache_gib is None and current_platform.is_cpu():
            kv_cache_gib = 4
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        block_size = self.block_size
        if block_size is None and current_platform.is_cpu():
            block_size = CPU_BLOCK_SIZE
        if block_size is not None:
            kwargs["block_size"] = block_size
        for name in ("gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        kwargs.update(self.extra)
        return AsyncEngineArgs(**kwargs)


def cpu_dtype(dtype: str, capability: str | None = None) -> str:
    """The dtype to compute in on a CPU whose vector extension torch reports as `capability`
    ("AVX2", "AVX512", ...; None: this one's). "auto" is float32 on an x86 CPU without AVX-512: vLLM's CPU backend
    then cannot build its oneDNN bf16 matmuls and falls back to torch's, at a few GFLOP/s, so the
    bf16 checkpoints the project builds served 2.5x slower than in float32 on such a machine
    (docs/performance.md, "float32 on such a CPU"). A dtype named explicitly is kept."""
    if dtype != "auto":
        return dtype
    if capability is None:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    return "float32" if capability in ("AVX2", "NO AVX") else "auto"  # x86 below AVX-512
