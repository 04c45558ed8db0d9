"""What one benchmark request is, per system under test.

- `ours`: one chat request to this service (mode `dualfocus`, `auto` or `macro`), trace on.
- `stock_chat`: one plain chat request to any OpenAI-compatible server (stock vLLM).
- `stock_dualfocus`: the DualFocus steps orchestrated by a client over stock vLLM's OpenAI
  server, as a user without this project would: box (structured outputs) and macro at once,
  micro as a second chat turn with [full, crop], and two prompt-logprob scoring requests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import openai

from engine.fusion import decide, parse_question, pick_by_score
from engine.geometry import plan_crop
from server.chat_completions.protocol import DualFocusTrace

from .scenes import Item, from_data_url, to_data_url

BOX = "Please provide the bounding box coordinate of the region this question asks: {q}"
MICRO = "Please combine the information from these two images and answer this question: {q}"
SCORE = "{q}\nAnswer the question using a single word or phrase."
LLAVA_BOX_REGEX = r"\[(?:0\.\d{2}|1\.00), (?:0\.\d{2}|1\.00), (?:0\.\d{2}|1\.00), (?:0\.\d{2}|1\.00)\]"


@dataclass
class Sample:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    trace: DualFocusTrace | None = None  # this service's, when it returned one
    extra: dict = field(default_factory=dict)


def _user(text: str, *image_urls: str) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in image_urls),
                                        {"type": "text", "text": text}]}


async def ours(client: openai.AsyncOpenAI, model: str, item: Item, mode: str, max_tokens: int,
               stream: bool, zoom_threshold: float | None = None,
               zoom_threshold_choice: float | None = None) -> Sample:
    t0 = time.perf_counter()
    options: dict = {"mode": mode, "return_trace": True}
    if zoom_threshold is not None:  # mode auto: this request's thresholds
        options["zoom_threshold"] = zoom_threshold
    if zoom_threshold_choice is not None:
        options["zoom_threshold_choice"] = zoom_threshold_choice
    kwargs = dict(model=model, max_tokens=max_tokens, messages=[_user(item.question, item.image_url)],
                  extra_body={"dualfocus": options})
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        u = r.usage
        return Sample(True, time.perf_counter() - t0, None, u.completion_tokens, u.prompt_tokens,
                      u.prompt_tokens_details.cached_tokens or 0, trace=_trace(r))
    ttft, trace, usage = None, None, None
    async for chunk in await client.chat.completions.create(**kwargs, stream=True,
                                                            stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        trace = _trace(chunk) or trace
        usage = chunk.usage or usage
    return Sample(True, time.perf_counter() - t0, ttft, usage.completion_tokens, usage.prompt_tokens,
                  usage.prompt_tokens_details.cached_tokens or 0, trace=trace)


def _trace(response) -> DualFocusTrace | None:
    raw = getattr(response, "dualfocus", None)
    return DualFocusTrace.model_validate(raw) if raw else None


async def stock_chat(client: openai.AsyncOpenAI, model: str, item: Item, max_tokens: int, stream: bool) -> Sample:
    t0 = time.perf_counter()
    kwargs = dict(model=model, max_tokens=max_tokens, temperature=0, messages=[_user(item.question, item.image_url)])
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        cached = (r.usage.prompt_tokens_details.cached_tokens or 0) if r.usage.prompt_tokens_details else 0
        return Sample(True, time.perf_counter() - t0, None, r.usage.completion_tokens, r.usage.prompt_tokens, cached)
    ttft, usage = None, None
    async for chunk in await client.chat.completions.create(**kwargs, stream=True,
                                                            stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - t0
        usage = chunk.usage or usage
    return Sample(True, time.perf_counter() - t0, ttft, usage.completion_tokens, usage.prompt_tokens)


async def stock_dualfocus(client: openai.AsyncOpenAI, model: str, item: Item, max_tokens: int) -> Sample:
    """DualFocus by hand over stock vLLM (tiny-llava's box format)."""
    t0 = time.perf_counter()
    q = item.question
    prompt_tokens = output_tokens = cached = 0

    def count(r):
        nonlocal prompt_tokens, output_tokens, cached
        prompt_tokens += r.usage.prompt_tokens
        output_tokens += r.usage.completion_tokens
        details = r.usage.prompt_tokens_details
        cached += (details.cached_tokens or 0) if details else 0

    box_turn = _user(BOX.format(q=q), item.image_url)
    box_req = client.chat.completions.create(model=model, messages=[box_turn], max_tokens=64, temperature=0,
                                             extra_body={"structured_outputs": {"regex": LLAVA_BOX_REGEX}})
    macro_req = client.chat.completions.create(model=model, messages=[_user(q, item.image_url)],
                                               max_tokens=max_tokens, temperature=0)
    box, macro = await asyncio.gather(box_req, macro_req)
    count(box), count(macro)
    box_text = box.choices[0].message.content
    nums = [float(x) for x in box_text.strip("[]").split(",")]
    plan = plan_crop((nums[0] * item.width, nums[1] * item.height, nums[2] * item.width, nums[3] * item.height),
                     item.width, item.height)
    macro_text = macro.choices[0].message.content
    if not plan.usable:
        return Sample(True, time.perf_counter() - t0, None, output_tokens, prompt_tokens, cached,
                      extra={"chosen": "macro"})
    crop_url = to_data_url(from_data_url(item.image_url).crop(plan.rect))
    history = [box_turn, {"role": "assistant", "content": box_text}]
    micro = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0,
        messages=[*history, _user(MICRO.format(q=q), crop_url)])
    count(micro)
    micro_text = micro.choices[0].message.content
    question = parse_question(q)
    decision = decide(question, macro_text, micro_text)
    chosen = decision.chosen
    if decision.candidates is not None:
        async def score(text):
            r = await client.chat.completions.create(
                model=model, max_tokens=1, temperature=0,
                messages=[*history, _user(SCORE.format(q=question.stem), crop_url),
                          {"role": "assistant", "content": text}],
                extra_body={"prompt_logprobs": 0, "add_generation_prompt": False, "continue_final_message": True})
            count(r)
            return _reply_nll(r.prompt_logprobs, text)

        nlls = await asyncio.gather(*map(score, decision.candidates.values()))  # one per candidate, in order
        scores = dict(zip(decision.candidates, nlls, strict=True))
        chosen, _ = pick_by_score(scores)
    return Sample(True, time.perf_counter() - t0, None, output_tokens, prompt_tokens, cached,
                  extra={"chosen": chosen})


def _reply_nll(prompt_logprobs: list, text: str) -> float:
    """Mean NLL of the trailing prompt tokens that spell `text` (the assistant reply)."""
    rows, spelled = [], ""
    for entry in reversed(prompt_logprobs):
        if entry is None or len(spelled) >= len(text):
            break
        logprob = next(iter(entry.values()))  # prompt_logprobs=0: the prompt token's own
        rows.append(logprob["logprob"])
        spelled = (logprob.get("decoded_token") or "") + spelled
    return -sum(rows) / max(1, len(rows))
