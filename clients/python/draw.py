"""Where the model looked: the image with its box and crop drawn, and the crop as an inset."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageOps

from .result import AskResult

BOX_COLOUR = (255, 40, 40)
CROP_COLOUR = (255, 210, 0)


def draw_focus(image: Image.Image, result: AskResult) -> Image.Image:
    """A copy of `image` with the model's box (red, labelled with the choice) and the crop the
    micro pass saw (yellow); the crop, enlarged, as an inset in the top-left corner."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 200))
    if result.crop:
        draw.rectangle(_inclusive(result.crop), outline=CROP_COLOUR, width=width)
    if result.box:
        x1, y1, x2, y2 = result.box
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=BOX_COLOUR, width=width)
        label = f"box - chosen: {result.chosen}"
        tx, ty = x1, max(0, y1 - 14)
        draw.rectangle(draw.textbbox((tx, ty), label), fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=BOX_COLOUR)
    if result.crop:
        crop = image.convert("RGB").crop(result.crop)
        side = max(32, min(out.size) // 3)
        inset = ImageOps.contain(crop, (side, side))
        inset = ImageOps.expand(inset, border=width, fill=CROP_COLOUR)
        out.paste(inset, (width, width))
        draw.text((2 * width, inset.height + width), "crop (what the micro pass saw)", fill=CROP_COLOUR)
    return out


def _inclusive(rect):
    x1, y1, x2, y2 = rect
    return x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)
