"""`dualfocus convert-llava SRC DST`: a checkpoint in the original LLaVA code layout -> the layout vLLM loads.

The released DualFocus checkpoints (DualFocus-LLaVA-1.5-7B/13B, DualFocus-ShareGPT4V-13B) ship
in haotian-liu/LLaVA's layout: `LlavaLlamaForCausalLM`, Llama weights under `model.*`, the
projector as `model.mm_projector.{0,2}.*`, and the CLIP vision tower named by `mm_vision_tower`
(fetched separately by the original code, occasionally also stored in the checkpoint). vLLM's
LLaVA model is `LlavaForConditionalGeneration` (the llava-hf layout). What changes:

- tensor names (see `_rename`); the vision tower's comes from --vision-tower or the checkpoint;
- the tokenizer gets an `<image>` token (the original code splices images in at a sentinel id,
  -200, that no tokenizer has). If that id lies past the vocabulary, embed_tokens and lm_head get
  one row each, the MEAN of the existing rows: the image row of embed_tokens is never read (image
  features replace it) and the new lm_head row's logit is the mean of all logits, so greedy
  decoding never picks it, and it shifts every log-probability by at most log(1 + 1/V) (Jensen:
  exp(mean logit) <= the mean of exp(logit)), 3e-5 for Llama's V = 32000;
- config.json becomes a LlavaConfig (Llama text config, CLIP vision config, image token, feature
  layer), with the vicuna_v1 chat template; the image processor is the tower's CLIP processor.
  Pad-to-square stays where the project does it, in engine/families/llava.py.

Weights are streamed: each output tensor is read from its source file when it is written, and
output shards are written tensor by tensor (safetensors' format by hand: a header, then raw
bytes), so the memory needed is about one tensor, not the model. Sources: safetensors files
(mmap), or PyTorch .bin shards opened with torch.load(mmap=True).
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from .families.llava import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE

if TYPE_CHECKING:
    import torch

# torch and transformers are imported where used: `dualfocus --help` and the other
# subcommands should not pay for them.

IMAGE_TOKEN = "<image>"
DEFAULT_SHARD_BYTES = 4 << 30
_ARCHITECTURE = "LlavaLlamaForCausalLM"
_MODEL_TYPES = ("llava", "llava_llama")
# mm_vision_select_feature -> vLLM's vision_feature_select_strategy (and tokens beyond the patches).
_SELECT_FEATURE = {"patch": ("default", 0), "cls_patch": ("full", 1)}
# Llama fields of the original config.json that the text config keeps (the rest are LLaVA's).
_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
)


@cache
def _dtype_codes() -> dict:
    """torch dtype -> safetensors' name for it."""
    import torch

    return {
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float32: "F32",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


class LayoutError(ValueError):
    """The source is not a checkpoint this converter knows how to convert."""


# --- reading weights, one tensor at a time --------------------------------------------------------


class WeightFiles:
    """The tensors of a checkpoint folder by name, each loaded only when asked for.

    Reads `*.safetensors` (through safe_open, which maps the file) or else PyTorch `*.bin`
    files (torch.load with mmap=True: tensors stay on disk until touched)."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = weight_files(folder)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for file in files:
            for name in self._handle(file).keys():
                self._where[name] = file

    def _handle(self, file: Path):
        if file not in self._open:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[file] = safe_open(str(file), framework="pt")
            else:
                import torch

                try:
                    self._open[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:  # whatever torch says, say which file it was
                    raise LayoutError(f"cannot read {file} as PyTorch weights: {e}") from None
        return self._open[file]

    def names(self) -> list[str]:
        return list(self._where)

    def shape_dtype(self, name: str) -> tuple[list[int], torch.dtype]:
        h = self._handle(self._where[name])
        if isinstance(h, dict):
            return list(h[name].shape), h[name].dtype
        piece = h.get_slice(name)
        return list(piece.get_shape()), _dtype_of(piece.get_dtype())

    def load(self, name: str) -> torch.Tensor:
        h = self._handle(self._where[name])
        return h[name] if isinstance(h, dict) else h.get_tensor(name)


def weight_files(folder: Path) -> list[Path]:
    """The files holding a checkpoint's weights: as its index lists them, else by name. safetensors
    first (a folder may hold both formats); other .bin files (training_args.bin) are not weights."""
    for index, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        if (folder / index).is_file():
            return sorted({folder / f for f in json.loads((folder / index).read_text())["weight_map"].values()})
        if found := sorted(folder.glob(pattern)):
            return found
    return []


def _dtype_of(code: str) -> torch.dtype:
    for dtype, c in _dtype_codes().items():
        if c == code:
            return dtype
    raise LayoutError(f"unsupported tensor dtype {code}")


# --- writing weights, one tensor at a time --------------------------------------------------------


@dataclass
class OutTensor:
    name: str
    shape: list[int]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def write_shards(tensors: list[OutTensor], out: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` as safetensors shards of at most max_shard_bytes (a bigger tensor gets a
    shard of its own), plus model.safetensors.index.json when there is more than one shard.
    Each tensor is loaded, written and dropped before the next: the header (names, dtypes,
    shapes, offsets) is known beforehand, so nothing else needs to be in memory."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        _write_safetensors(out / file, shard)
        weight_map.update({t.name: file for t in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return names


def _write_safetensors(path: Path, tensors: list[OutTensor]) -> None:
    # The format: u64 little-endian header length, the JSON header, then the tensors' bytes
    # back to back in header order (https://github.com/huggingface/safetensors#format).
    import torch

    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _dtype_codes()[t.dtype],
            "shape": t.shape,
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            tensor = t.load()
            if list(tensor.shape) != t.shape or tensor.dtype != t.dtype:
                raise AssertionError(f"{t.name}: planned {t.shape} {t.dtype}, got {list(tensor.shape)} {tensor.dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor


# --- the conversion -------------------------------------------------------------------------------

# Original name prefix -> vLLM's (what engine/tiny.py writes for tiny-llava).
_RENAMES = (
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),
)
# Tensors nobody reads: rotary tables older transformers saved, CLIP's position-id buffers.
_DROPPED = (".rotary_emb.inv_freq", ".position_ids")


def _rename(name: str) -> str | None:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def check_layout(config: dict, src: Path) -> None:
    """Refuse what this converter does not know, saying what it found and what it expects."""
    arch, model_type = config.get("architectures") or [], config.get("model_type")
    if arch == ["LlavaForConditionalGeneration"]:
        raise LayoutError(f"{src} is already in the llava-hf layout vLLM loads; serve it as it is")
    if arch != [_ARCHITECTURE] or model_type not in _MODEL_TYPES:
        raise LayoutError(
            f"{src}: unknown layout (architectures={arch}, model_type={model_type!r}); this converter reads the "
            f"original LLaVA code layout: architectures=['{_ARCHITECTURE}'], model_type 'llava' or 'llava_llama' "
            "(LLaVA-1.5, DualFocus-LLaVA-1.5-7B/13B, DualFocus-ShareGPT4V-13B)"
        )
    checks = [
        (config.get("mm_vision_tower") or config.get("vision_tower"), "has no mm_vision_tower: not a LLaVA checkpoint"),
        (
            config.get("mm_projector_type", "linear") == "mlp2x_gelu",
            f"mm_projector_type {config.get('mm_projector_type', 'linear')!r} is not supported: vLLM's LLaVA has "
            "LLaVA-1.5's projector, 'mlp2x_gelu'",
        ),
        (
            config.get("mm_vision_select_feature", "patch") in _SELECT_FEATURE,
            f"mm_vision_select_feature {config.get('mm_vision_select_feature')!r} "
            f"is not one of {list(_SELECT_FEATURE)}",
        ),
        (
            not config.get("mm_use_im_start_end"),
            "mm_use_im_start_end is true: images wrapped in <im_start>/<im_end> tokens are not supported",
        ),
        (
            config.get("image_aspect_ratio") == "pad",
            f"image_aspect_ratio {config.get('image_aspect_ratio')!r}: only LLaVA-1.5's 'pad' (pad to a square, "
            "then one 336 px image) is what the served model does",
        ),
    ]
    for ok, problem in checks:
        if not ok:
            raise LayoutError(f"{src}: {problem}")


def _vision_config(folder: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise LayoutError(f"cannot read the vision tower's config.json in {folder}: {e}") from None
    if config.model_type == "clip":  # a whole CLIP model (as openai/clip-vit-large-patch14-336)
        return config.vision_config
    if config.model_type == "clip_vision_model":
        return config
    raise LayoutError(f"{folder}: the vision tower must be a CLIP checkpoint, found model_type {config.model_type!r}")


def _image_processor(folder: Path, image_size: int):
    from transformers import CLIPImageProcessor

    if (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(folder)
    # CLIP's own settings, as LLaVA-1.5 uses them.
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def convert(
    src: str | Path,
    dst: str | Path,
    vision_tower: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert the original-layout checkpoint in `src` into `dst` (a new folder). Returns dst.
    Everything is checked before anything is written; LayoutError says what does not fit."""
    from transformers import AddedToken

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not (src / "config.json").is_file():
        raise LayoutError(f"{src} has no config.json: not a checkpoint folder")
    if dst.exists() and any(dst.iterdir()):
        raise LayoutError(f"{dst} exists and is not empty; choose a new folder")
    config = json.loads((src / "config.json").read_text())
    check_layout(config, src)
    tower, vision = _find_tower(config, vision_tower)
    plan = _plan(src, WeightFiles(src), WeightFiles(tower))
    _check_shapes(plan, config, vision, src)

    # The tokenizer, unchanged but for the image token, with the vicuna_v1 template.
    tokenizer = _load_tokenizer(src)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    vocab = config["vocab_size"]
    new_vocab = max(vocab, image_id + 1)  # a checkpoint with padded rows may have room already

    tensors = []
    for name, (files, original) in plan.items():
        shape, dtype = files.shape_dtype(original)
        load: Callable[[], torch.Tensor] = functools.partial(files.load, original)
        if new_vocab > vocab and name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            shape, load = [new_vocab, shape[1]], _with_mean_rows(load, new_vocab - vocab)
        tensors.append(OutTensor(name, shape, dtype, load))

    # Write into a sibling folder and move it into place at the end, so an interrupted
    # conversion never leaves a folder that looks like a complete checkpoint.
    tmp = dst.with_name(dst.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"converting {src} ({len(tensors)} tensors, vision tower from {tower}) -> {dst}")
    try:
        shards = write_shards(tensors, tmp, max_shard_bytes)
        _llava_config(config, vision, image_id, new_vocab).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _image_processor(tower, vision.image_size).save_pretrained(tmp)
        # Only the special ids: the original's sampling defaults (if any) must not become vLLM's.
        (tmp / "generation_config.json").write_text(
            json.dumps(
                {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}, indent=1
            )
        )
        (tmp / "dualfocus-convert.json").write_text(
            json.dumps(
                {
                    "source": str(src),
                    "vision_tower": str(tower),
                    "image_token": IMAGE_TOKEN,
                    "image_token_index": image_id,
                    "vocab_size": {"source": vocab, "converted": new_vocab},
                    "rows_added": "mean of the existing rows" if new_vocab > vocab else None,
                    "shards": shards,
                },
                indent=1,
            )
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        dst.rmdir()  # empty, checked above
    tmp.rename(dst)
    log(
        f"wrote {dst}: {len(shards)} shard(s), image token {IMAGE_TOKEN} = {image_id}, "
        f"vocabulary {vocab} -> {new_vocab}"
    )
    return dst


def _find_tower(config: dict, vision_tower: str | Path | None):
    """The CLIP folder (--vision-tower, else mm_vision_tower if that is a local folder) and its
    vision config. The original code fetches the tower by name; here it must be on disk."""
    name = config.get("mm_vision_tower") or config.get("vision_tower")
    where = vision_tower or name
    if not where:
        raise LayoutError("config.json names no vision tower (mm_vision_tower); pass --vision-tower FOLDER")
    tower = Path(where).expanduser()
    if not (tower / "config.json").is_file():
        raise LayoutError(
            f"the vision tower {name!r} is needed (for its config, and its weights unless the checkpoint has "
            f"them): download it, e.g. `hf download {name} --local-dir clip`, and pass "
            "--vision-tower clip" + (f" ({tower} has no config.json)" if vision_tower else "")
        )
    return tower, _vision_config(tower)


def _plan(src: Path, weights: WeightFiles, tower_weights: WeightFiles) -> dict[str, tuple[WeightFiles, str]]:
    """Output name -> (files, source name). The tower folder's vision weights first; any in the
    checkpoint replace them, as the original code loads the checkpoint over the tower."""
    plan = {
        "vision_tower." + name: (tower_weights, name)
        for name in tower_weights.names()
        if name.startswith("vision_model.") and not name.endswith(_DROPPED)
    }
    unknown = []
    for name in weights.names():
        if name.endswith(_DROPPED):
            continue
        new = _rename(name)
        if new is None:
            unknown.append(name)
        else:
            plan[new] = (weights, name)
    if unknown:
        raise LayoutError(
            f"{src}: tensors this converter does not know (not LLaVA-1.5's layout?): "
            f"{', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return plan


def _check_shapes(plan: dict, config: dict, vision, src: Path) -> None:
    """The tensors vLLM's LLaVA cannot do without, with shapes that make one model."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    if config.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise LayoutError(
            f"mm_hidden_size {config['mm_hidden_size']} differs from the vision tower's hidden size "
            f"{vision.hidden_size}: wrong --vision-tower?"
        )
    required = {
        "language_model.model.embed_tokens.weight": [vocab, hidden],
        "language_model.model.norm.weight": [hidden],
        "multi_modal_projector.linear_1.weight": [hidden, vision.hidden_size],
        "multi_modal_projector.linear_1.bias": [hidden],
        "multi_modal_projector.linear_2.weight": [hidden, hidden],
        "multi_modal_projector.linear_2.bias": [hidden],
        "vision_tower.vision_model.embeddings.patch_embedding.weight": [
            vision.hidden_size,
            vision.num_channels,
            vision.patch_size,
            vision.patch_size,
        ],
        **({} if config.get("tie_word_embeddings") else {"language_model.lm_head.weight": [vocab, hidden]}),
    }
    for name, shape in required.items():
        if name not in plan:
            where = "the --vision-tower folder" if name.startswith("vision_tower.") else "SRC"
            raise LayoutError(f"{src}: no tensor for {name} (is {where} complete?)")
        files, original = plan[name]
        found = files.shape_dtype(original)[0]
        if found != shape:
            raise LayoutError(f"{src}: {original} has shape {found}, expected {shape} (wrong --vision-tower?)")


def _llava_config(config: dict, vision, image_id: int, vocab: int):
    """The LlavaConfig vLLM reads: the Llama fields, the CLIP config, the image token and features."""
    from transformers import LlamaConfig, LlavaConfig

    select_strategy, extra_tokens = _SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")]
    text = LlamaConfig(**{k: config[k] for k in _TEXT_FIELDS if k in config})
    text.vocab_size = vocab
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2 + extra_tokens,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )
    llava.architectures = ["LlavaForConditionalGeneration"]
    llava.dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
    return llava


def _load_tokenizer(src: Path):
    """The checkpoint's Llama tokenizer, tokenising as the original code's did.

    The original code loads the slow (SentencePiece) LlamaTokenizer. Two details carry over:
    - by class, not AutoTokenizer: transformers 5 maps model_type "llava" to a generic backend
      whose conversion drops SentencePiece's leading "▁" (so "A chat" would not begin with "▁A");
    - `legacy`: whether text right after a special token (`</s>USER:`) also gets the leading
      "▁". Checkpoints without the key were made when the slow tokenizer defaulted to True.
    """
    from transformers import LlamaTokenizer

    config_file = src / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    try:
        return LlamaTokenizer.from_pretrained(src, legacy=tokenizer_config.get("legacy", True))
    except (OSError, ValueError, TypeError) as e:
        raise LayoutError(
            f"cannot load the Llama tokenizer in {src} (tokenizer.model or tokenizer.json): {e}"
        ) from None


def _with_mean_rows(load: Callable[[], torch.Tensor], rows: int) -> Callable[[], torch.Tensor]:
    def extended() -> torch.Tensor:
        import torch

        weight = load()
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
        return torch.cat([weight, mean.expand(rows, -1)])

    return extended


# --- command line -----------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-llava",
        help="convert a checkpoint in the original LLaVA layout (DualFocus-LLaVA-1.5-7B/13B, DualFocus-ShareGPT4V-13B) "
        "into the layout vLLM loads",
        description="Convert a checkpoint in haotian-liu/LLaVA's layout (LlavaLlamaForCausalLM, model.mm_projector.*, "
        "a CLIP ViT-L/14-336 tower named by mm_vision_tower, image_aspect_ratio 'pad') into vLLM's "
        "LlavaForConditionalGeneration layout, with an <image> token and the vicuna_v1 chat template. "
        "Streams tensor by tensor: memory stays around the largest tensor. Serve the result with "
        "`dualfocus serve --model DST`.",
    )
    p.add_argument(
        "src", help="the original checkpoint folder (config.json, *.safetensors or pytorch_model*.bin, tokenizer)"
    )
    p.add_argument("dst", help="the folder to write (must not exist, or be empty)")
    p.add_argument(
        "--vision-tower",
        metavar="PATH",
        help="a local copy of the CLIP tower the checkpoint names in mm_vision_tower "
        "(openai/clip-vit-large-patch14-336); needed unless mm_vision_tower is itself a local folder. "
        "Tower weights stored in the checkpoint, if any, take precedence, as in the original code",
    )
    p.add_argument(
        "--max-shard-gib",
        type=float,
        default=DEFAULT_SHARD_BYTES / (1 << 30),
        help="largest output shard (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    try:
        convert(args.src, args.dst, args.vision_tower, max_shard_bytes=int(args.max_shard_gib * (1 << 30)))
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
