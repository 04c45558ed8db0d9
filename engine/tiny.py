"""Tiny random-weight checkpoints in the real layouts, built offline.

No model hub is reachable from the machines this project is tested on, so the
tests and `make serve` use checkpoints built here: the same files a real
LLaVA-1.5 or Qwen2-VL checkpoint has (config, safetensors, tokenizer, image
processor, chat template), at a size a 2-core CPU runs. vLLM loads them by
path through the same code path as a real checkpoint. Built with a fixed seed,
so two builds give the same weights and the same answers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .families.llava import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE
from .families.qwen2_vl import CHAT_TEMPLATE as QWEN_CHAT_TEMPLATE

TINY_MODELS = ("tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl")
# Built only when asked for by name (`make bench`, `dualfocus serve --model NAME`), never by default:
# larger, for benchmarks at a shape where the language model's compute dominates (docs/performance.md).
BENCH_MODELS = ("bench-llava-576",)
BUILT_MODELS = (*TINY_MODELS, *BENCH_MODELS)
# Trained checkpoints committed in the repository (training/README.md): served by name, never rebuilt.
TRAINED_MODELS = {"tiny-dualfocus": Path(__file__).resolve().parent.parent / "training" / "tiny-dualfocus"}
# Bump when the recipe changes, so cached builds of an older recipe are rebuilt.
RECIPE_VERSION = "3"
_MANIFEST = "dualfocus-tiny.json"
_SEED = 1234
# Larger than a trained model's 0.02 so that a random model's replies depend on the
# prompt and the image (with 0.02 every prompt gets the same reply), which gives
# the tests different macro and micro answers to fuse.
_TEXT_INIT_STD = 0.2


def cache_dir() -> Path:
    """Where built checkpoints live: $DUALFOCUS_CACHE or ~/.cache/dualfocus."""
    root = os.environ.get("DUALFOCUS_CACHE") or Path.home() / ".cache" / "dualfocus"
    return Path(root) / "models"


def ensure_tiny(name: str, root: Path | None = None) -> Path:
    """Path of tiny checkpoint `name`, built first if missing or corrupt (a trained one: its folder)."""
    if name in TRAINED_MODELS:
        path = TRAINED_MODELS[name]
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{name}: no checkpoint in {path} (see training/README.md)")
        return path
    if name not in BUILT_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join((*BUILT_MODELS, *TRAINED_MODELS))}")
    path = (root or cache_dir()) / name
    if _is_intact(path):
        return path
    # Several processes may ask at once (replicas of a fleet, test workers): one builds, the
    # others wait on the lock and then find the finished build.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_intact(path):
            _build(name, path)
    return path


def _is_intact(path: Path) -> bool:
    """True when the manifest matches the recipe and every file's digest."""
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("recipe") != RECIPE_VERSION:
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (path / name).is_file() and _digest(path / name) == digest for name, digest in files.items()
    )


def _digest(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build(name: str, path: Path) -> None:
    # Build into a sibling folder and swap it in, so a crash mid-build never
    # leaves a half-written checkpoint that looks complete.
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    builders = {
        "tiny-llava": lambda out: build_llava(out, TINY_LLAVA_TEXT),
        "bench-llava-576": lambda out: build_llava(out, BENCH_LLAVA_TEXT),
        "tiny-qwen2-vl": _build_qwen2_vl,
        "tiny-qwen2.5-vl": _build_qwen2_5_vl,
    }
    builders[name](tmp)
    files = {p.name: _digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / _MANIFEST).write_text(json.dumps({"recipe": RECIPE_VERSION, "files": files}, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


# --- tokenizer -------------------------------------------------------------------------------

_WORDS = (
    "a an the of in on at to and or is are was what which where who how many color colour "
    "left right top bottom middle image picture photo question answer region box bounding "
    "coordinate please provide combine information from these two images this asks using "
    "single word phrase chat between curious user artificial intelligence assistant gives "
    "helpful detailed polite answers questions yes no red green blue yellow black white "
    "circle square triangle sign text number car dog cat person table sky tree house "
    "option options hint choose letter system user"
).split()


def _train_tokenizer(special_tokens: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained in-process on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(_WORDS)] * 4
    corpus += [f"[{a / 100:.2f}, {b / 100:.2f}, 0.{a:02d}, 0.{b:02d}]" for a in range(100) for b in range(0, 100, 7)]
    corpus += [f"({a},{b}),({b},{a}) {a} {b}" for a in range(0, 1001, 37) for b in range(0, 1001, 53)]
    corpus += [" ".join(_WORDS[i:] + _WORDS[:i]) + " A. B. C. D. ? : ." for i in range(len(_WORDS))]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _seeded():
    import torch

    torch.manual_seed(_SEED)
    return torch


# --- LLaVA-1.5 shape: tiny-llava and bench-llava-576 -----------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """The language model's size; its head size is 64 (the CPU paged attention rejects 16)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // 64

    def parameters(self, vocab_size: int) -> int:
        """Weights in the language model: attention, SwiGLU MLP, two norms a layer; embeddings and head."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return self.num_hidden_layers * per_layer + h + 2 * vocab_size * h


TINY_LLAVA_TEXT = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2)
# Where the language model's prefill of a 576-token image is most of a request's time on a 2-core CPU
# (measured with loadtests/prefill_sweep.py; docs/performance.md, "At a compute-bound shape").
BENCH_LLAVA_TEXT = LlamaShape(hidden_size=768, intermediate_size=2048, num_hidden_layers=14)


def llava_parts(text: LlamaShape):
    """The tokenizer and config of a LLaVA-1.5-shaped model with language model `text` (no weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = _train_tokenizer(specials, vocab_size=1024)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    # CLIP at 336 px / patch 14: 24 x 24 = 576 image tokens, as LLaVA-1.5 has. The tower stays tiny at
    # every size: what the shapes differ in is the language model's work.
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        projection_dim=64,
    )
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_attention_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=_TEXT_INIT_STD,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "bfloat16"  # what vLLM's CPU backend computes in
    return tokenizer, config


def build_llava(out: Path, text: LlamaShape) -> None:
    """Write a random-weight LLaVA-1.5-shaped checkpoint with language model `text` into `out`."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    tokenizer, config = llava_parts(text)
    torch = _seeded()
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    _save_with_vllm_names(
        model,
        out,
        {
            "model.vision_tower.": "vision_tower.vision_model.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        },
    )
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # LLaVA-1.5 pads to a square itself (engine/families/llava.py); the CLIP
    # processor then resizes and centre-crops a square, which keeps all of it.
    CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out)
    _write_generation_config(out, eos_token_id=2, bos_token_id=1, pad_token_id=3)


# --- tiny-qwen2-vl ---------------------------------------------------------------------------


_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|box_start|>",
    "<|box_end|>",
]


def _qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(_QWEN_SPECIALS, vocab_size=1024)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}


def _qwen_text_config(tokenizer, ids: dict[str, int]) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        initializer_range=_TEXT_INIT_STD,
        # head_dim 64 -> rotary half-dim 32, split over (time, height, width).
        rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )


def _save_qwen(model, config, tokenizer, ids: dict[str, int], out: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _save_with_vllm_names(model, out, {})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # At most 576 merged image tokens per image, like tiny-llava.
    Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=576 * 28 * 28).save_pretrained(out)
    _write_generation_config(
        out, eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"]
    )


def _build_qwen2_vl(out: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer, ids = _qwen_tokenizer()
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, ids),
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=256,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    torch = _seeded()
    _save_qwen(Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval(), config, tokenizer, ids, out)


def _build_qwen2_5_vl(out: Path) -> None:
    """Qwen2.5-VL: Qwen2-VL's text model and tokens; a vision tower with windowed attention
    (one full-attention block of two) and a SwiGLU MLP, boxes in resized-input pixels."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer, ids = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, ids),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=256,
            fullatt_block_indexes=[1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    torch = _seeded()
    _save_qwen(Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval(), config, tokenizer, ids, out)


def _save_with_vllm_names(model, out: Path, renames: dict[str, str]) -> None:
    """Write model.safetensors, renaming key prefixes to the names vLLM loads."""
    from safetensors.torch import save_file

    state = {}
    for key, tensor in model.state_dict().items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        state[key] = tensor.detach().contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_generation_config(out: Path, **ids: int) -> None:
    (out / "generation_config.json").write_text(json.dumps(ids, indent=1))
