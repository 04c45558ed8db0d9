import pytest
from PIL import Image, ImageDraw

from engine.tiny import ensure_tiny


@pytest.fixture(scope="session")
def tiny_llava_path():
    return ensure_tiny("tiny-llava")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_path():
    return ensure_tiny("tiny-qwen2-vl")


def scene(width=640, height=480, seed=0):
    """A synthetic scene: coloured shapes on grey, varied by seed."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 10, height // 6, width // 3, height // 2), fill=(200 - 7 * seed % 200, 30, 30))
    draw.ellipse((width // 2, height // 2, width - width // 8, height - height // 10), fill=(30, 60 + 11 * seed % 190, 220))
    return image
