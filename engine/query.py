"""What one request asks of the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from .trace import Mode


@dataclass
class Sampling:
    """The request's sampling parameters; they apply to the answer passes (the box is greedy)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Query:
    question: str
    image: Image.Image | None = None
    mode: Mode = "dualfocus"  # what the client asked for
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def runs_as(self) -> Mode:
        """What the engine runs: DualFocus needs an image to zoom into; without one, one plain pass."""
        return self.mode if self.image is not None else "macro"
