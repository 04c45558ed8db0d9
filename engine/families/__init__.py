"""Model-family adapters, detected from the checkpoint's config (overridable by name)."""

from __future__ import annotations

from .base import FamilyAdapter, ParsedBox
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {
    "llava": LlavaAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
}
# config.json's model_type -> family
_MODEL_TYPES = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}


def detect_family(model_type: str) -> str:
    try:
        return _MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(
            f"no DualFocus adapter for model_type {model_type!r}; pass --family with one of: {', '.join(FAMILIES)}"
        ) from None


def make_adapter(family: str, model_type: str, tokenizer, image_processor_config: dict) -> FamilyAdapter:
    name = detect_family(model_type) if family == "auto" else family
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: auto, {', '.join(FAMILIES)}")
    return FAMILIES[name](tokenizer, image_processor_config)


__all__ = ["FAMILIES", "FamilyAdapter", "ParsedBox", "detect_family", "make_adapter"]
