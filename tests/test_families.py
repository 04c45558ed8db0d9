"""Per family: follow-up prompts extend earlier ones token for token; boxes map to the original image."""

import pytest
from PIL import Image
from transformers import AutoTokenizer

from engine.families import FAMILIES, detect_family, make_adapter
from engine.families.qwen2_vl import Qwen25VLAdapter
from engine.query import Turn

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def llava(tiny_llava_path):
    import json

    cfg = json.loads((tiny_llava_path / "preprocessor_config.json").read_text())
    return make_adapter("auto", "llava", AutoTokenizer.from_pretrained(tiny_llava_path), cfg)


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_qwen2_vl_path):
    return AutoTokenizer.from_pretrained(tiny_qwen2_vl_path)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, qwen_tokenizer):
    return make_adapter(request.param, "qwen2_vl", qwen_tokenizer, {"min_pixels": 3136, "max_pixels": 12845056,
                                                                     "patch_size": 14, "merge_size": 2})


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_micro_prompt_extends_box_prompt_and_reply(which, llava, qwen):
    a = {"llava": llava, "qwen": qwen}[which]
    box_prompt = a.box_prompt(a.conversation_prefix([], 1), QUESTION)
    reply = a.encode(_box_text(a)) + a.stop_token_ids[:1]  # as generated: the reply and its stop token
    micro = a.micro_prompt(box_prompt, reply, QUESTION)
    shared = box_prompt + a.strip_stop(reply)
    assert micro[: len(shared)] == shared
    # The micro prompt carries exactly two images: the full one (in the box prompt) and the crop.
    assert micro.count(_image_id(a)) == 2 and box_prompt.count(_image_id(a)) == 1


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_scoring_prompt_shares_micro_prompt_through_the_crop_image(which, llava, qwen):
    a = {"llava": llava, "qwen": qwen}[which]
    box_prompt = a.box_prompt(a.conversation_prefix([], 1), QUESTION)
    reply = a.encode(_box_text(a)) + a.stop_token_ids[:1]
    micro = a.micro_prompt(box_prompt, reply, QUESTION)
    scoring = a.scoring_prompt(box_prompt, reply, QUESTION)
    crop_at = [i for i, t in enumerate(micro) if t == _image_id(a)][1]
    end = crop_at + 1 + (1 if a.name != "llava" else 0)  # Qwen closes the image with <|vision_end|>
    assert scoring[:end] == micro[:end]
    assert scoring[end:] != micro[end:]  # the instructions differ after the crop


def test_llava_prompt_is_vicuna_v1(llava):
    text = llava.tokenizer.decode(llava.macro_prompt(llava.conversation_prefix([], 1), QUESTION))
    assert text == ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
                    "What colour is the square? ASSISTANT:")
    box_prompt = llava.box_prompt(llava.conversation_prefix([], 1), QUESTION)
    micro = llava.micro_prompt(box_prompt, llava.encode("[0.10, 0.20, 0.30, 0.40]"), QUESTION)
    assert llava.tokenizer.decode(micro).endswith(
        "ASSISTANT:[0.10, 0.20, 0.30, 0.40]</s>USER: <image>\nPlease combine the information from these two "
        "images and answer this question: What colour is the square? ASSISTANT:")


IMAGE = Image.new("RGB", (64, 48), (10, 200, 30))
# Conversations as (history, images in the question's turn): every shape a request can take.
CONVERSATIONS = {
    "one image": ([], 1),
    "system first": ([Turn("system", "Answer in one word.")], 1),
    "two images": ([Turn("system", "Be brief.")], 2),
    "follow-up, text only": ([Turn("user", "What is this?", [IMAGE]), Turn("assistant", "A square.")], 0),
    "follow-up, new image": ([Turn("system", "Be brief."), Turn("user", "What is this?", [IMAGE]),
                              Turn("assistant", "A square.")], 1),
    "image two turns ago": ([Turn("user", "Look.", [IMAGE]), Turn("assistant", "I see."),
                             Turn("user", "Is it big?"), Turn("assistant", "No.")], 0),
}


def _messages(history, question_images, question):
    """The conversation as OpenAI messages, for the checkpoint's own chat template."""
    def content(text, images):
        return [{"type": "image_url", "image_url": {"url": "data:,"}}] * images + [{"type": "text", "text": text}]

    return ([{"role": t.role, "content": content(t.text, len(t.images)) if t.role == "user" else t.text}
             for t in history] + [{"role": "user", "content": content(question, question_images)}])


@pytest.mark.parametrize("shape", list(CONVERSATIONS))
@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_every_pass_extends_the_conversation_prefix_token_for_token(which, shape, llava, qwen):
    a = {"llava": llava, "qwen": qwen}[which]
    history, question_images = CONVERSATIONS[shape]
    prefix = a.conversation_prefix(history, question_images)
    shared = prefix.ids(a)
    images = sum(len(t.images) for t in history) + question_images
    assert shared.count(_image_id(a)) == images  # every image of the conversation is in the prefix
    box = a.box_prompt(prefix, QUESTION)
    macro = a.macro_prompt(prefix, QUESTION)
    assert box[: len(shared)] == shared and macro[: len(shared)] == shared
    reply = a.encode(_box_text(a)) + a.stop_token_ids[:1]
    micro = a.micro_prompt(box, reply, QUESTION)
    scoring = a.scoring_prompt(box, reply, QUESTION)
    assert micro[: len(box)] == box and scoring[: len(box)] == box
    assert micro.count(_image_id(a)) == images + 1  # and the crop


# The tiny LLaVA's template (vicuna_v1, for stock vLLM) has no system messages; system turns are
# checked by test_system_messages_replace_the_default_system.
@pytest.mark.parametrize("shape", [s for s, (history, _) in CONVERSATIONS.items()
                                   if all(t.role != "system" for t in history)])
@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_the_macro_prompt_is_the_checkpoint_chat_template(which, shape, llava, qwen):
    """Rendered as the tiny checkpoint's own chat template renders the same messages."""
    a = {"llava": llava, "qwen": qwen}[which]
    history, question_images = CONVERSATIONS[shape]
    prompt = a.tokenizer.decode(a.macro_prompt(a.conversation_prefix(history, question_images), QUESTION))
    expected = a.tokenizer.apply_chat_template(_messages(history, question_images, QUESTION), tokenize=False,
                                               add_generation_prompt=True)
    assert prompt.removeprefix(a.tokenizer.bos_token or "") == expected


def test_system_messages_replace_the_default_system(llava, qwen):
    history = [Turn("system", "Answer in one word."), Turn("system", "Never guess.")]
    text = llava.tokenizer.decode(llava.macro_prompt(llava.conversation_prefix(history, 1), QUESTION))
    assert text.startswith("<s>Answer in one word.\nNever guess. USER: <image>\n") and "curious" not in text
    text = qwen.tokenizer.decode(qwen.macro_prompt(qwen.conversation_prefix(history, 1), QUESTION))
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>system\nNever guess.")
    assert "helpful assistant" not in text


def test_single_image_prompt_ids_are_unchanged_by_the_conversation_rendering(llava):
    """The one-image prompt is tokenised as the reference does: text split at the image."""
    ids = llava.macro_prompt(llava.conversation_prefix([], 1), QUESTION)
    from engine.families.llava import SYSTEM

    expected = ([llava.tokenizer.bos_token_id] + llava.encode(f"{SYSTEM} USER: ") + [_image_id(llava)]
                + llava.encode(f"\n{QUESTION} ASSISTANT:"))
    assert ids == expected


def test_llava_pads_to_square_with_the_processor_mean(llava):
    from PIL import Image

    padded = llava.model_image(Image.new("RGB", (200, 100), (255, 0, 0)))
    assert padded.size == (200, 200)
    assert padded.getpixel((100, 10)) == (122, 116, 104)  # int(mean * 255) of CLIP's mean
    assert padded.getpixel((100, 100)) == (255, 0, 0)


def test_llava_box_maps_to_the_original_image(llava):
    box = llava.parse_box("[0.25, 0.50, 0.75, 1.00]", 640, 480)
    assert box.normalized == (0.25, 0.5, 0.75, 1.0)
    assert box.pixels == (160, 240, 480, 480)
    assert llava.parse_box("no numbers here", 640, 480) is None


def test_qwen2_vl_box_is_on_a_0_1000_grid(qwen_tokenizer):
    a = make_adapter("qwen2_vl", "qwen2_vl", qwen_tokenizer, {})
    box = a.parse_box("(100,250),(600,1000)", 640, 480)
    assert box.pixels == pytest.approx((64, 120, 384, 480))
    box_prompt = a.tokenizer.decode(a.box_prompt(a.conversation_prefix([], 1), QUESTION))
    assert box_prompt.endswith("<|im_start|>assistant\n<|box_start|>")
    closed = a.tokenizer.decode(a.close_reply(a.encode("(1,2),(3,4)") + a.stop_token_ids[:1]))
    assert closed == "(1,2),(3,4)<|box_end|><|im_end|>\n"


def test_qwen2_5_vl_box_is_in_pixels_of_the_resized_input(qwen_tokenizer):
    a = Qwen25VLAdapter(qwen_tokenizer, {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2})
    # 640x480 -> nearest multiples of 28 within the budget: 644 x 476.
    assert a.resized_size(480, 640) == (476, 644)
    box = a.parse_box('[{"bbox_2d": [161, 119, 483, 476]}]', 640, 480)
    assert box.pixels == pytest.approx((161 / 644 * 640, 119 / 476 * 480, 483 / 644 * 640, 480))
    # A large image is scaled down to the pixel budget first.
    processor = {"min_pixels": 3136, "max_pixels": 100352, "patch_size": 14, "merge_size": 2}
    small = Qwen25VLAdapter(qwen_tokenizer, processor)
    h, w = small.resized_size(1000, 2000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 100352


@pytest.mark.parametrize("family,text", [
    ("llava", "[0.12, 0.40, 0.55, 0.83]"),
    ("qwen2_vl", "(120,400),(550,830)"),
    ("qwen2_5_vl", '[{"bbox_2d": [12, 40, 55, 83]}]'),
])
def test_box_grammar_accepts_the_family_format_and_nothing_loose(family, text, llava, qwen_tokenizer):
    import re

    a = llava if family == "llava" else FAMILIES[family](qwen_tokenizer, {})
    assert re.fullmatch(a.box_regex, text)
    assert not re.fullmatch(a.box_regex, text + " and more")


def test_family_detection_and_override():
    assert detect_family("llava") == "llava"
    assert detect_family("qwen2_5_vl") == "qwen2_5_vl"
    with pytest.raises(ValueError, match="--family"):
        detect_family("gpt2")
    with pytest.raises(ValueError, match="unknown family"):
        make_adapter("nope", "llava", None, {})


def _box_text(a):
    return {"llava": "[0.12, 0.40, 0.55, 0.83]", "qwen2_vl": "(120,400),(550,830)",
            "qwen2_5_vl": '[{"bbox_2d": [12, 40, 55, 83]}]'}[a.name]


def _image_id(a):
    return a.token_id("<image>" if a.name == "llava" else "<|image_pad|>")


@pytest.mark.parametrize("n", [0, 5, 9, 10, 28, 99, 100, 476, 644, 1000, 1023, 4096])
def test_up_to_matches_exactly_the_integers_up_to_n(n):
    import re

    from engine.families.qwen2_vl import up_to

    pattern = re.compile(up_to(n))
    assert [i for i in range(0, 3 * n + 20) if pattern.fullmatch(str(i))] == list(range(n + 1))
    assert not pattern.fullmatch("0" + str(n)) or n == 0 and not pattern.fullmatch("00")


def test_qwen2_5_vl_box_grammar_keeps_the_box_in_the_image(qwen_tokenizer):
    import re

    a = Qwen25VLAdapter(qwen_tokenizer, {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2})
    regex = a.box_regex_for(640, 480)  # resized to 644 x 476
    assert re.fullmatch(regex, '[{"bbox_2d": [644, 476, 0, 12]}]')
    assert not re.fullmatch(regex, '[{"bbox_2d": [645, 10, 20, 30]}]')
    assert not re.fullmatch(regex, '[{"bbox_2d": [10, 477, 20, 30]}]')
    box = a.parse_box('[{"bbox_2d": [644, 476, 644, 476]}]', 640, 480)
    assert box.pixels == pytest.approx((640, 480, 640, 480))
