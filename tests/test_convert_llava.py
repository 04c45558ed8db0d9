"""`dualfocus convert-llava`: a tiny checkpoint in the original LLaVA code layout, made here, converted,
loaded by vLLM, and checked against a direct PyTorch forward pass of the original layout."""

import io
import json
import math
import subprocess
import sys
import threading
import time

import pytest
import pytest_asyncio
import torch
from PIL import Image

from engine.convert_llava import LayoutError, WeightFiles, convert

from .conftest import scene

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --- a tiny checkpoint in the original layout --------------------------------------------------------

def _sentencepiece_model() -> bytes:
    """A Llama-style SentencePiece model (BPE, byte fallback, dummy prefix), trained here."""
    import sentencepiece as spm

    from engine.tiny import _WORDS

    corpus = [" ".join(_WORDS)] * 4 + [
        " ".join(_WORDS[i:] + _WORDS[:i]) + " A. B. C. D. ? : . USER: ASSISTANT: [0.12, 0.40, 0.55, 0.83]"
        for i in range(len(_WORDS))]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, vocab_size=600, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    return out.getvalue()


def build_clip_tower(folder, with_weights=True):
    """A whole CLIP model (text and vision), as openai/clip-vit-large-patch14-336 is published, at
    LLaVA-1.5's geometry (336 px, patch 14: 576 patches) and a tiny width."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=336, patch_size=14),
        projection_dim=32)
    torch.manual_seed(1)
    model = CLIPModel(config)
    config.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD).save_pretrained(folder)
    if with_weights:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def build_original(folder, tower_folder, fmt="bin", embed_tower=None, vocab_size=600):
    """LLaVA-1.5 as haotian-liu/LLaVA saves it: Llama + model.mm_projector.{0,2}, the tower elsewhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "vocab_size": vocab_size, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02, "torch_dtype": "float32",
        "use_cache": True, "transformers_version": "4.31.0",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 64, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(2)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings")}, initializer_range=0.1))
    state = dict(llama.state_dict())
    state["model.mm_projector.0.weight"] = torch.randn(256, 64) * 0.1
    state["model.mm_projector.0.bias"] = torch.randn(256) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(256, 256) * 0.1
    state["model.mm_projector.2.bias"] = torch.randn(256) * 0.1
    for i in range(2):  # transformers 4.31 saved these buffers; nothing reads them
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 64, 2) / 64))
    if embed_tower is not None:
        state.update({"model.vision_tower.vision_tower." + k: v for k, v in embed_tower.state_dict().items()
                      if k.startswith("vision_model.")})
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves):
        shard = f"pytorch_model-{i + 1:05d}-of-00002.bin" if fmt == "bin" else f"model-{i + 1:05d}-of-00002.safetensors"
        if fmt == "bin":
            torch.save({k: state[k] for k in half}, folder / shard)
        else:
            from safetensors.torch import save_file

            save_file({k: state[k] for k in half}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in half})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # A Llama tokenizer as LLaVA-1.5 ships it: the SentencePiece model and a slow-tokenizer config.
    (folder / "tokenizer.model").write_bytes(_sentencepiece_model())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": 2048, "padding_side": "right"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (folder / "training_args.bin").write_bytes(b"not weights: the converter must not read it")
    return config


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    build_clip_tower(root / "clip")
    build_original(root / "llava-v1.5-tiny", root / "clip")
    return root


@pytest.fixture(scope="module")
def converted(original):
    return convert(original / "llava-v1.5-tiny", original / "converted", original / "clip",
                   max_shard_bytes=1 << 20, log=lambda _: None)


# --- the original layout's forward pass, written out -------------------------------------------------

def expand2square(image, fill):
    """LLaVA-1.5's "pad" aspect mode: centre on a square of the mean colour."""
    w, h = image.size
    if w == h:
        return image
    square = Image.new(image.mode, (max(w, h),) * 2, fill)
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def original_prompt_ids(src, question):
    """As the original code tokenises `SYSTEM USER: <image>\\n{q} ASSISTANT:`: pieces split at <image>,
    each tokenised with a BOS that is kept only for the first, the image at the sentinel -200."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    first, second = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:".split("<image>")
    return [sp.bos_id()] + sp.encode(first) + [-200] + sp.encode(second)


@torch.inference_mode()
def original_next_token_logits(src, tower, image, question):
    """Next-token logits of LlavaLlamaForCausalLM from its own files: CLIPVisionModel
    (hidden_states[-2], CLS dropped), the projector Linear-GELU-Linear, image features spliced in
    at the sentinel, Llama on the embeddings. float32 throughout."""
    from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    config = json.loads((src / "config.json").read_text())
    state = {}
    for shard in sorted(src.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    llama = LlamaForCausalLM(LlamaConfig(**{k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")})).eval()
    llama.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith("model.mm_projector.") and not k.endswith("rotary_emb.inv_freq")})
    clip = CLIPVisionModel.from_pretrained(tower).eval()
    processor = CLIPImageProcessor.from_pretrained(tower)
    padded = expand2square(image.convert("RGB"), tuple(int(c * 255) for c in processor.image_mean))
    pixels = processor(padded, return_tensors="pt")["pixel_values"]
    features = clip(pixels, output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]][:, 1:]
    linear, gelu = torch.nn.functional.linear, torch.nn.functional.gelu
    x = linear(features[0], state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
    x = linear(gelu(x), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    ids = original_prompt_ids(src, question)
    at = ids.index(-200)
    embed = llama.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(ids[:at])), x, embed(torch.tensor(ids[at + 1:]))])
    return llama(inputs_embeds=embeds[None]).logits[0, -1].float(), ids


def tensors_of(folder) -> dict:
    files = WeightFiles(folder)
    return {name: files.load(name) for name in files.names()}


def picture():
    """Not square, so the pad-to-square matters; 336 wide, so CLIP's resize is the identity."""
    return scene(336, 224)


# --- conversion, without an engine -----------------------------------------------------------------

def test_converted_checkpoint_has_vllm_names_config_and_tokenizer(original, converted):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    assert config["image_token_index"] == 600 and config["text_config"]["vocab_size"] == 601
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 576 and config["vision_config"]["hidden_size"] == 64
    assert config["text_config"]["model_type"] == "llama" and config["text_config"]["hidden_size"] == 256

    # 1 MiB shards: several, with an index naming every tensor.
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((converted / s).is_file() for s in shards)
    tensors = tensors_of(converted)
    assert set(tensors) == set(index["weight_map"])
    src = original / "llava-v1.5-tiny"
    state = {}
    for shard in src.glob("pytorch_model-*.bin"):
        state.update(torch.load(shard, weights_only=True))
    clip = torch.load(original / "clip" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(tensors["multi_modal_projector.linear_2.weight"], state["model.mm_projector.2.weight"])
    assert torch.equal(tensors["language_model.model.layers.1.mlp.down_proj.weight"],
                       state["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(tensors["vision_tower.vision_model.encoder.layers.2.self_attn.q_proj.weight"],
                       clip["vision_model.encoder.layers.2.self_attn.q_proj.weight"])
    assert not any(k.startswith(("text_model", "visual_projection")) or "rotary_emb" in k for k in tensors)
    # The vocabulary grew by the image token's row: the mean of the others, in both matrices.
    for name, original_name in (("language_model.lm_head.weight", "lm_head.weight"),
                                ("language_model.model.embed_tokens.weight", "model.embed_tokens.weight")):
        assert torch.equal(tensors[name][:600], state[original_name])
        assert torch.allclose(tensors[name][600], state[original_name].mean(0))

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.convert_tokens_to_ids("<image>") == 600 and len(tokenizer) == 601
    # The Llama tokenizer is unchanged: as SentencePiece itself (BOS, leading "▁", byte fallback) ...
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    for text in ("What colour is the square? ASSISTANT:", "\nWhere? [0.12, 0.40, 0.55, 0.83]", "caf\u00e9 \u2192 42"):
        assert tokenizer.encode(text) == [1] + sp.encode(text)
    # ... and, as its `"legacy": false` says, no "▁" after a special token.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("B</s>USER:", add_special_tokens=False))
    assert pieces[0].startswith("▁") and pieces[pieces.index("</s>") + 1] == "US"
    assert tokenizer.encode("x <image>\ny", add_special_tokens=False).count(600) == 1
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert rendered == f"{SYSTEM} USER: <image>\nHi? ASSISTANT:"
    assert json.loads((converted / "preprocessor_config.json").read_text())["image_mean"] == CLIP_MEAN
    assert json.loads((converted / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                              "pad_token_id": 0}


def test_tokenizers_without_the_legacy_key_keep_the_old_default(original, tmp_path):
    """Checkpoints saved before the key existed tokenised with legacy=True: "▁" after special tokens too."""
    from engine.convert_llava import _load_tokenizer

    src = original / "llava-v1.5-tiny"
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    config = json.loads((src / "tokenizer_config.json").read_text())
    del config["legacy"]
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = _load_tokenizer(tmp_path / "tok")
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("B</s>USER:", add_special_tokens=False))
    assert pieces[pieces.index("</s>") + 1] == "▁USER"


def test_the_adapter_builds_the_original_prompt_ids(original, converted):
    """Serving builds prompts with engine/families/llava.py: the same ids as the original code."""
    from transformers import AutoTokenizer

    from engine.families import make_adapter

    adapter = make_adapter("auto", "llava", AutoTokenizer.from_pretrained(converted), {})
    question = "What colour is the square?"
    expected = [600 if t == -200 else t for t in original_prompt_ids(original / "llava-v1.5-tiny", question)]
    assert adapter.macro_prompt(adapter.conversation_prefix([], 1), question) == expected


def test_tower_in_the_checkpoint_and_safetensors_sources_give_the_same_result(original, converted, tmp_path):
    """Variant: safetensors shards holding the vision tower too; the tower folder has only its
    config and processor (the tower's own weights, if any, would be overridden by the checkpoint's)."""
    tower = build_clip_tower(tmp_path / "clip-config-only", with_weights=False)
    tower.load_state_dict(torch.load(original / "clip" / "pytorch_model.bin", weights_only=True))
    build_original(tmp_path / "src", None, fmt="safetensors", embed_tower=tower)
    out = convert(tmp_path / "src", tmp_path / "out", tmp_path / "clip-config-only", log=lambda _: None)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    a, b = tensors_of(converted), tensors_of(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _refusal(tmp_path, original, edit=None, drop=None, **kwargs):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(original / "llava-v1.5-tiny", src)
    config = json.loads((src / "config.json").read_text())
    if edit:
        config.update(edit)
    (src / "config.json").write_text(json.dumps(config))
    if drop:
        for shard in src.glob("pytorch_model-*.bin"):
            state = torch.load(shard, weights_only=True)
            torch.save({k: v for k, v in state.items() if not k.startswith(drop)}, shard)
    with pytest.raises(LayoutError) as e:
        convert(src, tmp_path / "dst", kwargs.get("tower", original / "clip"), log=lambda _: None)
    assert not (tmp_path / "dst").exists()
    return str(e.value)


@pytest.mark.parametrize("edit, drop, expected", [
    ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}, None,
     "unknown layout (architectures=['Qwen2VLForConditionalGeneration'], model_type='qwen2_vl')"),
    ({"architectures": ["LlavaForConditionalGeneration"]}, None, "already in the llava-hf layout"),
    ({"mm_projector_type": "linear"}, None, "mm_projector_type 'linear' is not supported"),
    ({"image_aspect_ratio": "anyres"}, None, "image_aspect_ratio 'anyres'"),
    ({"mm_use_im_start_end": True}, None, "mm_use_im_start_end"),
    (None, "model.mm_projector.", "no tensor for multi_modal_projector.linear_1.weight (is SRC complete?)"),
    ({"mm_hidden_size": 1024}, None, "mm_hidden_size 1024 differs from the vision tower's hidden size 64"),
])
def test_unknown_layouts_are_refused_with_a_clear_message(tmp_path, original, edit, drop, expected):
    assert expected in _refusal(tmp_path, original, edit, drop)


def test_unexpected_tensors_and_a_missing_tower_are_refused(tmp_path, original):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(original / "llava-v1.5-tiny", src)
    shard = next(src.glob("pytorch_model-*.bin"))
    torch.save({**torch.load(shard, weights_only=True), "model.vision_resampler.weight": torch.zeros(2)}, shard)
    with pytest.raises(LayoutError, match="tensors this converter does not know .*model.vision_resampler.weight"):
        convert(src, tmp_path / "dst", original / "clip", log=lambda _: None)
    with pytest.raises(LayoutError, match="the vision tower 'openai/clip-vit-large-patch14-336' is needed"):
        convert(original / "llava-v1.5-tiny", tmp_path / "dst", None, log=lambda _: None)
    with pytest.raises(LayoutError, match="exists and is not empty"):
        convert(original / "llava-v1.5-tiny", original / "clip", original / "clip", log=lambda _: None)


def test_cli_converts(original, tmp_path, capsys):
    from clients.cli import main

    assert main(["convert-llava", str(original / "llava-v1.5-tiny"), str(tmp_path / "out"),
                 "--vision-tower", str(original / "clip")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out'}: 1 shard(s), image token <image> = 600, vocabulary 600 -> 601" in printed
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out.converting").exists()


def test_cli_refuses_with_a_message_and_exit_status(tmp_path):
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    out = subprocess.run([sys.executable, "-m", "clients", "convert-llava", str(tmp_path / "qwen"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert "error:" in out.stderr and "unknown layout" in out.stderr and "LlavaLlamaForCausalLM" in out.stderr
    assert not (tmp_path / "out").exists()


def _anon_rss_bytes() -> int:
    """Anonymous resident memory (what the process really holds; mapped weight files are page cache)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_conversion_streams_memory_stays_near_one_tensor(tmp_path, original):
    """A 24-layer model of about 400 MB: converting it must not hold the model in memory."""
    from safetensors.torch import save_file

    src = tmp_path / "big"
    src.mkdir()
    config = json.loads((original / "llava-v1.5-tiny" / "config.json").read_text())
    config.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=8)
    (src / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).write_bytes((original / "llava-v1.5-tiny" / name).read_bytes())
    h, f, v = 512, 2048, config["vocab_size"]
    total = 0
    for layer in range(24):  # one shard per layer, about 16 MB each
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                  "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
                  "input_layernorm": (h,), "post_attention_layernorm": (h,)}
        shard = {f"{p}{n}.weight": torch.randn(*s) for n, s in shapes.items()}
        total += sum(t.nbytes for t in shard.values())
        save_file(shard, str(src / f"model-{layer:05d}.safetensors"))
        del shard
    save_file({"model.embed_tokens.weight": torch.randn(v, h), "lm_head.weight": torch.randn(v, h),
               "model.norm.weight": torch.ones(h), "model.mm_projector.0.weight": torch.randn(h, 64),
               "model.mm_projector.0.bias": torch.zeros(h), "model.mm_projector.2.weight": torch.randn(h, h),
               "model.mm_projector.2.bias": torch.zeros(h)}, str(src / "model-rest.safetensors"))
    assert total > 350e6
    largest = f * h * 4  # 4 MB

    convert(original / "llava-v1.5-tiny", tmp_path / "warm", original / "clip", log=lambda _: None)  # imports done
    base, peak, done = _anon_rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss_bytes())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        convert(src, tmp_path / "out", original / "clip", max_shard_bytes=100 << 20, log=lambda _: None)
    finally:
        done.set()
        watcher.join()
    grew = peak[0] - base
    print(f"\nconverting {total / 1e6:.0f} MB of weights: anonymous memory grew by {grew / 1e6:.1f} MB")
    assert grew < 64e6 + 4 * largest, f"memory grew by {grew / 1e6:.0f} MB converting {total / 1e6:.0f} MB"
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) >= 4


# --- vLLM loads it, and agrees with the original forward pass ---------------------------------------

# Own event loop for this module's engine: the in-process engine binds to the loop it first runs in.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(converted):
    from engine import DualFocusEngine, EngineConfig

    # float32 on both sides, so the comparison measures the conversion, not rounding.
    eng = DualFocusEngine.create(EngineConfig(model=str(converted), dtype="float32", kv_cache_gib=1,
                                              max_model_len=2048))
    yield eng
    eng.shutdown()


# Tolerance on next-token log-probabilities, float32 on both sides: vLLM's CPU kernels (fused QKV,
# its attention and RMSNorm) sum in other orders than transformers' eager code, which moves
# log-probs by ~1e-5 over ~700 positions here (measured: 6e-6). 1e-4 leaves room for other CPUs'
# kernels without hiding a real error: a wrong layer, a missing bias or a shifted image token moves
# them by 1e-2 or more on this model.
TOL = 1e-4


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_next_token_logprobs_match_the_original_forward_pass(engine, original):
    from vllm import SamplingParams

    from engine.runner import ModelImage

    question = "What colour is the square?"
    image = picture()
    logits, original_ids = original_next_token_logits(original / "llava-v1.5-tiny", original / "clip", image,
                                                        question)
    ids = engine.adapter.macro_prompt(engine.adapter.conversation_prefix([], 1), question)
    assert ids == [600 if t == -200 else t for t in original_ids]
    prompt = {"prompt_token_ids": ids,
              "multi_modal_data": {"image": [ModelImage.of(engine.adapter.model_image(image)).image]}}
    final = None
    async for out in engine.llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=20), "logits"):
        final = out
    assert len(final.prompt_token_ids) == len(ids) - 1 + 576  # the image token became 576 positions
    top = final.outputs[0].logprobs[0]  # token id -> Logprob: vLLM's top 20
    assert 600 not in top  # the image token's row is never a contender
    got = {t: lp.logprob for t, lp in top.items()}
    best = max(got, key=got.get)
    assert best == int(logits.argmax())  # the same greedy token

    # 1. The original model, exactly: log-prob differences to the best token (the added row cancels).
    reference = torch.log_softmax(logits, dim=-1)
    relative = max(abs((got[t] - got[best]) - (reference[t] - reference[best]).item()) for t in got)
    # 2. Absolute log-probs: vLLM's softmax also counts the image token's row, whose logit is the
    #    mean logit; that shifts every log-prob alike, by at most log(1 + 1/V) (docs in the converter).
    with_row = torch.log_softmax(torch.cat([logits, logits.mean()[None]]), dim=-1)
    absolute = max(abs(got[t] - with_row[t].item()) for t in got)
    shift = (reference[best] - with_row[best]).item()
    print(f"\nlogprobs over vLLM's top {len(got)}: max |difference to the original| relative to the best token "
          f"{relative:.1e}; absolute, with the image row {absolute:.1e}; the row's shift {shift:.1e} "
          f"(bound log(1 + 1/600) = {math.log1p(1 / 600):.1e})")
    assert relative < TOL and absolute < TOL
    assert 0 < shift <= math.log1p(1 / 600)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="module")
async def test_the_converted_model_runs_dualfocus(engine):
    """The whole program on it: the box grammar over the grown vocabulary, the crop, fusion scoring."""
    from engine import Query, Sampling

    result = await engine.answer(Query("Where is the red square?", [picture()], sampling=Sampling(max_tokens=8)))
    t = result.trace
    assert t.mode == "dualfocus" and t.box.outcome in ("ok", "degenerate") and t.box.text.startswith("[")
    assert {"macro", "box"} <= set(t.stages) and t.stages["box"].prompt_tokens > 576
    assert result.answer == (t.micro_answer if t.chosen == "micro" else t.macro_answer)
