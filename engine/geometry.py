"""Box post-processing: from a box in original-image pixels to the crop the micro pass sees.

The reference's rules (docs/method.md), in order: square the box about its centre,
clip to the image, enlarge by 25 px on every side, clip again, truncate to
integers and crop rows y1:y2, columns x1:x2. Deliberate differences, all for
boxes the reference would mishandle: coordinates are sorted first (a reversed
box is the same region), and a box that lies wholly outside the image or
leaves an empty crop yields no micro pass instead of a crash or a stale crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ENLARGE_PX = 25

BoxOutcome = Literal["ok", "degenerate", "outside", "empty"]


@dataclass(frozen=True)
class CropPlan:
    outcome: BoxOutcome
    # Integer crop rectangle (x1, y1, x2, y2), x2/y2 exclusive; None when there is no crop.
    rect: tuple[int, int, int, int] | None

    @property
    def usable(self) -> bool:
        return self.rect is not None


def sorted_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) with x1 <= x2 and y1 <= y2: a reversed box is the same region."""
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    return x1, y1, x2, y2


def plan_crop(box: tuple[float, float, float, float], width: int, height: int) -> CropPlan:
    """Where to crop for a box given in pixels of the original image (width x height)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = sorted_box(box)
    # Box coordinates are pixel edges: 0..width is the whole image, so x = width is its right edge.
    if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
        return CropPlan("outside", None)
    outcome: BoxOutcome = "degenerate" if x1 == x2 or y1 == y2 else "ok"

    # Square about the centre: side = the longer side.
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) / 2
    x1, y1, x2, y2 = _clip((cx - half, cy - half, cx + half, cy + half), width, height)
    x1, y1, x2, y2 = _clip((x1 - ENLARGE_PX, y1 - ENLARGE_PX, x2 + ENLARGE_PX, y2 + ENLARGE_PX), width, height)
    rect = (int(x1), int(y1), int(x2), int(y2))
    if rect[2] <= rect[0] or rect[3] <= rect[1]:
        return CropPlan("empty", None)
    return CropPlan(outcome, rect)


def _clip(box, width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (
        min(max(x1, 0), width - 1),
        min(max(y1, 0), height - 1),
        min(max(x2, 0), width - 1),
        min(max(y2, 0), height - 1),
    )
