"""Conversations through the HTTP service, as real OpenAI clients send them: the openai SDK,
LangChain's ChatOpenAI and LiteLLM (its openai/ and hosted_vllm/ providers)."""

import json
import os

# LiteLLM fetches a model price map from the network at import unless told to use its own copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import httpx
import openai
import pytest

from .conftest import RunningServer, data_url, scene

pytestmark = pytest.mark.server
MODEL = "tiny-llava"
TRACE = {"dualfocus": {"return_trace": True}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=RunningServer.API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def block(server):
    """vLLM's KV-cache block size (the prefix cache serves whole blocks), from its own metrics."""
    sizes = {int(dict(labels)["block_size"]) for (name, labels) in server.metrics() if name == "vllm:cache_config_info"}
    assert len(sizes) == 1
    return sizes.pop()


def image_part(image):
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def user(text, *images):
    return {"role": "user", "content": [*(image_part(i) for i in images), {"type": "text", "text": text}]}


def check_logprobs(logprobs, answer, top):
    entries = logprobs.content
    assert entries and all(e.logprob <= 0 and len(e.top_logprobs) == top for e in entries)
    assert all(bytes(e.bytes) == e.token.encode() for e in entries)
    spelt = "".join(e.token for e in entries if e.token not in ("<s>", "</s>", "<unk>", "<pad>", "<image>"))
    assert spelt.replace("\ufffd", "") == answer.replace("\ufffd", "")


def test_system_history_and_two_images_zoom_into_the_latest(client, block):
    first, second = scene(640, 480, seed=60), scene(320, 240, seed=61)
    messages = [{"role": "system", "content": "You answer in one word."},
                user("What is in this picture?", first),
                {"role": "assistant", "content": "Shapes."},
                user("And in this one, what colour is the disc?", second)]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, logprobs=True, top_logprobs=2,
                                       extra_body=TRACE)
    answer, trace = r.choices[0].message.content, r.dualfocus
    assert trace["mode"] == "dualfocus" and trace["zoomed_image"] == 1
    x1, y1, x2, y2 = trace["box"]["pixels"]  # in the second image's pixels
    assert 0 <= x1 <= x2 <= second.width and 0 <= y1 <= y2 <= second.height
    assert answer == (trace["micro_answer"] if trace["chosen"] == "micro" else trace["macro_answer"])
    check_logprobs(r.choices[0].logprobs, answer, 2)
    # Both images and the system text are in every pass: the box prompt holds 2 x 576 image tokens.
    assert trace["stages"]["box"]["prompt_tokens"] > 2 * 576
    assert trace["stages"]["micro"]["cached_tokens"] >= trace["stages"]["box"]["prompt_tokens"] // block * block


def test_a_follow_up_question_reads_the_image_from_the_prefix_cache(client, block):
    image = scene(672, 672, seed=62)  # 576 image tokens
    turn1 = [{"role": "system", "content": "Be brief."}, user("What is in the picture?", image)]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=8, extra_body=TRACE)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And what colour is it?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8, extra_body=TRACE)
    trace = r2.dualfocus
    assert trace["mode"] == "dualfocus" and trace["zoomed_image"] == 0  # turn 2 has no image of its own
    assert trace["box"]["outcome"] in ("ok", "degenerate")
    # Turn 2's first pass finds turn 1's image in the cache: its tokens, in whole blocks, at least.
    assert trace["stages"]["box"]["cached_tokens"] >= 576 // block * block > 0
    assert r2.usage.prompt_tokens_details.cached_tokens == sum(s["cached_tokens"] for s in trace["stages"].values())


def test_streamed_conversation_with_logprobs_and_usage(client):
    image = scene(seed=63)
    messages = [{"role": "developer", "content": "Answer briefly."}, user("Describe it.", image),
                {"role": "assistant", "content": "Two shapes."}, {"role": "user", "content": "Which is larger?"}]
    for mode in ("dualfocus", "macro"):  # macro second: its prompt is the DualFocus macro pass's, cached
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, stream=True, logprobs=True, top_logprobs=1,
            stream_options={"include_usage": True}, extra_body={"dualfocus": {"mode": mode, "return_trace": True}})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert text and entries, mode
        check_logprobs(openai.types.chat.chat_completion.ChoiceLogprobs(content=entries), text, 1)
        if mode == "macro":  # token by token, each chunk with its own tokens' logprobs
            assert sum(1 for c in chunks if c.choices and c.choices[0].logprobs) > 2
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        assert final.dualfocus["mode"] == mode


def test_json_schema_answers(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue", "grey"]}},
              "required": ["colour"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[user("What colour is the square?", scene(seed=64))], max_tokens=40, extra_body=TRACE,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["colour"] in ("red", "blue", "grey")
    assert json.loads(r.dualfocus["macro_answer"]) and json.loads(r.dualfocus["micro_answer"])
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi in JSON."}],
                                       max_tokens=24, response_format={"type": "json_object"})
    # Any object: a random model may not close it within max_tokens, but it is one from the first token.
    content = r.choices[0].message.content
    assert content.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict))


def test_sampling_fields_real_clients_send_are_accepted(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Count.", "name": "ann"}], max_tokens=6,
                  temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    same = client.chat.completions.create(**kwargs, seed=3, user="u-1", metadata={"k": "v"}, store=False,
                                          presence_penalty=0.0, frequency_penalty=0.0, parallel_tool_calls=False)
    assert same.choices[0].message.content == plain  # fields that change nothing change nothing
    client.chat.completions.create(**kwargs, frequency_penalty=2.0, presence_penalty=2.0)  # accepted
    banned = client.chat.completions.create(**kwargs, logit_bias={str(t): -100 for t in range(3, 800)})
    assert banned.choices[0].message.content != plain  # applied


# --- refusals: a clear 4xx, and the server keeps serving ---------------------------------------

BAD = {
    "image in an assistant turn": ([user("hi"), {"role": "assistant", "content": [image_part(scene(32, 32))]},
                                    user("and?")], {}, "cannot carry images"),
    "image in a system message": ([{"role": "system", "content": [image_part(scene(32, 32))]}, user("hi")], {},
                                  "cannot carry images"),
    "tool message without a tool call": ([user("hi"), {"role": "tool", "content": "42", "tool_call_id": "x"}], {},
                                         "tool"),
    "assistant tool call": ([user("hi"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, user("and?")], {}, "tool"),
    "empty conversation": ([], {}, "messages"),
    "ends with an assistant turn": ([user("hi"), {"role": "assistant", "content": "hello"}], {}, "last user turn"),
    "too many images": ([user("which?", *[scene(64, 48, seed=i) for i in range(5)])], {}, "at most 4 image"),
    "audio part": ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                                 {"type": "text", "text": "hi"}]}], {}, "input_audio"),
    "tools": ([user("hi")], {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    "tool_choice": ([user("hi")], {"tool_choice": "required"}, "tool_choice"),
    "n > 1": ([user("hi")], {"n": 2}, "n: "),
    "top_logprobs without logprobs": ([user("hi")], {"top_logprobs": 2}, "logprobs"),
    "history longer than the context": ([user("tell " * 3000), {"role": "assistant", "content": "ok"}, user("and?")],
                                        {"max_tokens": 8}, "length"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conversations_are_a_clear_400_and_the_server_keeps_serving(server, case):
    messages, extra, says = BAD[case]
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {RunningServer.API_KEY}"},
                   json={"model": MODEL, "messages": messages, "max_tokens": 4, **extra})
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error", error


def test_context_overflow_says_how_long_the_prompt_was(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {RunningServer.API_KEY}"},
                   json={"model": MODEL, "messages": BAD["history longer than the context"][0], "max_tokens": 4})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "4096" in message and any(w.isdigit() and int(w) > 4096 for w in
                                                              message.replace("(", " ").replace(")", " ").split())
    ok = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                    headers={"Authorization": f"Bearer {RunningServer.API_KEY}"},
                    json={"model": MODEL, "messages": [user("hi")], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# --- other real clients -------------------------------------------------------------------------

def sdk_answer(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs).choices[0].message.content


def test_langchain_chat_openai_invoke_and_stream(server, client):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    image = scene(seed=65)
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key=RunningServer.API_KEY, max_tokens=8,
                     temperature=0, max_retries=0)
    messages = [SystemMessage("You are terse."),
                HumanMessage(content=[{"type": "text", "text": "What is on the left?"}, image_part(image)])]
    expected = sdk_answer(client, [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": [{"type": "text", "text": "What is on the left?"},
                                                                image_part(image)]}], max_tokens=8, temperature=0)
    reply = llm.invoke(messages)
    assert reply.content == expected and reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in llm.stream(messages))
    assert streamed == expected


@pytest.mark.parametrize("provider", ["openai", "hosted_vllm"])
def test_litellm_completion(server, client, provider):
    import litellm

    image = scene(seed=66)
    messages = [{"role": "system", "content": "You are terse."}, user("What colour is the disc?", image),
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And the square?"}]
    expected = sdk_answer(client, messages, max_tokens=8, temperature=0)
    r = litellm.completion(model=f"{provider}/{MODEL}", messages=messages, api_base=server.base_url + "/v1",
                           api_key=RunningServer.API_KEY, max_tokens=8, temperature=0, num_retries=0)
    assert r.choices[0].message.content == expected and r.usage.prompt_tokens > 576
