"""The reference implementation's way, as a baseline: sequential Hugging Face transformers
calls per question, no batching, no KV reuse between calls, same tiny weights.

Per question, as the reference's evaluation code: macro generate, box generate, micro
generate with [full, crop], and two scoring forward passes, each call encoding its images
again. A random-weight model rarely writes a parsable box without a grammar, so an
unparsable box is replaced by the centre half of the image: the point is what the work
costs, and that keeps the micro pass and scoring in every question.

    python -m loadtests.reference_hf --questions 16 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from PIL import Image

from engine.config import cpu_dtype
from engine.families import make_adapter
from engine.geometry import plan_crop
from engine.tiny import BUILT_MODELS, ensure_tiny

from .loadgen import git_revision, machine
from .scenes import from_data_url, synthetic


class ReferencePipeline:
    def __init__(self, model_path):
        from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

        # The dtype our engine computes in on this CPU (engine/config.py, cpu_dtype), for a like comparison.
        dtype = torch.float32 if cpu_dtype("auto") == "float32" else torch.bfloat16
        self.model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.processor = CLIPImageProcessor.from_pretrained(model_path)
        self.adapter = make_adapter("llava", "llava", self.tokenizer, self.processor.to_dict())
        self.image_token = self.model.config.image_token_index
        self.image_seq = self.model.config.image_seq_length

    def _inputs(self, ids: list[int], images: list[Image.Image]):
        expanded = []
        for t in ids:  # the processor's job in the reference: one placeholder -> 576 image tokens
            expanded += [t] * self.image_seq if t == self.image_token else [t]
        pixels = self.processor([self.adapter.model_image(i) for i in images], return_tensors="pt")["pixel_values"]
        return torch.tensor([expanded]), pixels.to(torch.bfloat16)

    @torch.inference_mode()
    def generate(self, ids, images, max_new_tokens) -> list[int]:
        input_ids, pixels = self._inputs(ids, images)
        # A random model may reply with the image placeholder (ours cannot: its box pass is grammar-guided);
        # in the micro prompt, which extends the box reply, it would ask for an image that is not there.
        out = self.model.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                  suppress_tokens=[self.image_token])
        return out[0, input_ids.shape[1]:].tolist()

    @torch.inference_mode()
    def score(self, ids, images, reply) -> float:
        input_ids, pixels = self._inputs(ids + reply, images)
        logits = self.model(input_ids=input_ids, pixel_values=pixels).logits[0].float()
        logprobs = torch.log_softmax(logits[-len(reply) - 1:-1], dim=-1)
        return -logprobs[torch.arange(len(reply)), torch.tensor(reply)].mean().item()

    def answer(self, image: Image.Image, question: str, max_tokens: int) -> dict:
        a = self.adapter
        w, h = image.size
        prefix = a.conversation_prefix([], 1)  # one image, no earlier turns: the reference's prompts
        macro = self.generate(a.macro_prompt(prefix, question), [image], max_tokens)
        box_prompt = a.box_prompt(prefix, question)
        box = self.generate(box_prompt, [image], 24)
        parsed = a.parse_box(self.tokenizer.decode(box, skip_special_tokens=True), w, h)
        pixels = parsed.pixels if parsed else (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
        plan = plan_crop(pixels, w, h)
        rect = plan.rect if plan.usable else (0, 0, w, h)
        crop = image.crop(rect)
        micro = self.generate(a.micro_prompt(box_prompt, box, question), [image, crop], max_tokens)
        prefix = a.scoring_prompt(box_prompt, box, question)
        scores = {name: self.score(prefix, [image, crop], a.strip_stop(reply) or reply)
                  for name, reply in (("macro", macro), ("micro", micro))}
        return {"box_parsed": parsed is not None, "scores": scores}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.reference_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava", help="a name of engine/tiny.py's or a LLaVA checkpoint's path")
    p.add_argument("--questions", type=int, default=16, help="default: %(default)s")
    p.add_argument("--max-tokens", type=int, default=16, help="default: %(default)s")
    p.add_argument("--out", help="write the JSON result here (default: print it)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pipeline = ReferencePipeline(ensure_tiny(args.model) if args.model in BUILT_MODELS else args.model)
    items = synthetic(args.questions)
    pipeline.answer(from_data_url(items[0].image_url), items[0].question, args.max_tokens)  # warm-up
    latencies = []
    for item in items:
        t0 = time.perf_counter()
        pipeline.answer(from_data_url(item.image_url), item.question, args.max_tokens)
        latencies.append(time.perf_counter() - t0)
    result = {"command": " ".join(sys.argv), "git": git_revision(), "machine": machine(), "system": "reference-hf",
              "summary": {"requests": len(latencies), "requests_per_s": len(latencies) / sum(latencies),
                          "latency_s": {"p50": statistics.median(latencies), "mean": statistics.mean(latencies)}}}
    text = json.dumps(result, indent=2)
    if args.out:
        open(args.out, "w").write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
