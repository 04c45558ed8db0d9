"""The tiny-dualfocus model: a LLaVA-1.5 shape at a size two CPU cores train in an hour.

The numbers, and why:
- CLIP vision tower at 112 px, patch 14: 8 x 8 = 64 image tokens per image. A 960 px scene
  (padded square, as LLaVA-1.5 does) shrinks 8.6x: a 48-96 px sign is 6-11 px, about one patch,
  and its 10-16 px dot 1-2 px: not resolvable. The crop the pipeline makes around a sign is
  98-146 px wide: the dot is 8-18 px there.
- Vision: width 128, 3 layers, features from the last layer (vision_feature_layer -1; nothing
  computed is thrown away). Projector: LLaVA's 2-layer GELU MLP.
- Language model: Llama, width 128, 3 layers, MLP 384, 2 heads of 64 (vLLM's CPU paged attention wants
  head_dim 64), vocabulary 1024 (a byte-level BPE trained here on the task's words and boxes).
Everything else is as engine/tiny.py builds tiny-llava, so vLLM loads it the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.tiny import _WORDS, LLAVA_CHAT_TEMPLATE, _save_with_vllm_names, _write_generation_config

from .task import COLOUR_NAMES, COUNT, DETAIL, MC_SUFFIX, PRESENCE

IMAGE_SIZE = 112
PATCH = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer():
    """A byte-level BPE over the task's words, the prompts' words and box numbers (0.00-1.00)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.families.base import BOX_INSTRUCTION, MICRO_INSTRUCTION, SCORING_INSTRUCTION
    from engine.families.llava import SYSTEM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    questions = [DETAIL.format(colour=c) for c in COLOUR_NAMES] + [PRESENCE.format(colour=c) for c in COLOUR_NAMES]
    questions += [COUNT, MC_SUFFIX, " yes no 1 2 3 A. B. C. D. " + " ".join(COLOUR_NAMES)]
    prompts = [SYSTEM + " USER: ASSISTANT:"] + [t.format(question=q) for q in questions
                                                 for t in (BOX_INSTRUCTION, MICRO_INSTRUCTION, SCORING_INSTRUCTION)]
    corpus = prompts * 3 + [" ".join(_WORDS)] * 4
    corpus += [f"[0.{a:02d}, 0.{b:02d}, 0.{b:02d}, 1.00]" for a in range(100) for b in range(0, 100, 3)]
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.02)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=IMAGE_TOKENS, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def image_processor():
    from transformers import CLIPImageProcessor

    # LLaVA-1.5 pads to a square itself (engine/families/llava.py); resize + centre-crop keep all of it.
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def save_checkpoint(model, tokenizer, out: Path, meta: dict | None = None) -> None:
    """The checkpoint as vLLM loads LLaVA (bfloat16 safetensors, vLLM's key names), like tiny-llava."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    bf16 = model.to(torch.bfloat16)
    try:
        _save_with_vllm_names(bf16, out, {"model.vision_tower.": "vision_tower.vision_model.",
                                          "model.multi_modal_projector.": "multi_modal_projector.",
                                          "model.language_model.": "language_model.model.",
                                          "lm_head.": "language_model.lm_head."})
    finally:
        model.to(torch.float32)
    config = model.config
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor().save_pretrained(out)
    _write_generation_config(out, eos_token_id=2, bos_token_id=1, pad_token_id=3)
    if meta is not None:
        (out / "training.json").write_text(json.dumps(meta, indent=1))
