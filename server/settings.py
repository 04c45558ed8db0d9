"""Server settings: what `dualfocus serve` flags set."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine import EngineConfig
from engine.trace import Mode


@dataclass
class ServerSettings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the --model value
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allowed_image_domains: list[str] = field(default_factory=list)  # http(s) image hosts; none: off
    allowed_local_media_path: str | None = None  # file:// images only under this folder; None: off
    max_inflight_requests: int = 64
    drain_seconds: float = 30.0
    # The mode of requests that name none (dualfocus.mode); requests without an image run one pass anyway.
    default_mode: Mode = "dualfocus"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model
