"""OpenAI messages -> the engine's conversation: earlier turns, and the question with its images.

What DualFocus does with each shape is in docs/method.md ("Conversations"); what is
refused, and why, in docs/server.md ("Request fields"). Every refusal is a 400 that
names the message and the field.
"""

from __future__ import annotations

import asyncio
from typing import cast

from PIL import Image

from engine import Turn
from engine.image_work import ImageWorkers
from engine.query import Role

from ..errors import APIError
from ..images import load_image
from ..settings import ServerSettings
from .protocol import ChatCompletionRequest, ContentPart, Message

# Roles as the engine has them (tool and function messages were refused by _image_urls).
_ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """Request fields that ask for something this server cannot do: a 400 naming the field,
    never a silent answer that ignored it."""
    if req.tools or req.functions:
        field = "tools" if req.tools else "functions"
        raise APIError(
            400,
            f"{field}: this server does not call tools; send the request without them",
            param=field,
            code="tools_not_supported",
        )
    for field in ("tool_choice", "function_call"):
        value = getattr(req, field)
        if value is not None and value not in ("none", "auto"):  # "auto"/"none" with no tools ask for nothing
            raise APIError(400, f"{field}: this server does not call tools", param=field, code="tools_not_supported")
    if req.audio is not None or (req.modalities and set(req.modalities) != {"text"}):
        raise APIError(400, "modalities: this server answers in text only", param="modalities")
    if req.web_search_options is not None:
        raise APIError(400, "web_search_options: this server does not search the web", param="web_search_options")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if (
        req.response_format is not None
        and req.response_format.type == "json_schema"
        and req.response_format.json_schema is None
    ):
        raise APIError(
            400, "response_format.json_schema is required for type json_schema", param="response_format.json_schema"
        )


async def to_conversation(
    messages: list[Message], settings: ServerSettings, workers: ImageWorkers
) -> tuple[list[Turn], Turn]:
    """(earlier turns, the question): the last message is the question, and must be a user
    message with text. Images are decoded on `workers`; each turn carries its files' digests."""
    if not messages:
        raise APIError(400, "messages is empty: send at least one user message", param="messages")
    urls = [_image_urls(m, i) for i, m in enumerate(messages)]  # each message's shape checked first
    last = messages[-1]
    if last.role != "user":
        raise APIError(
            400,
            f"the last message is a {last.role} message: DualFocus answers the last user turn, "
            "so the conversation must end with one",
            param=f"messages.{len(messages) - 1}.role",
        )
    count = sum(len(u) for u in urls)
    max_images = settings.engine.max_images_per_request
    if count > max_images:
        raise APIError(
            400,
            f"at most {max_images} image(s) per request (over all messages), got {count}",
            param="messages",
            code="too_many_images",
        )
    texts = [_text(message, i) for i, message in enumerate(messages)]
    # All of a request's images are fetched and decoded side by side; the first failure, in
    # message order, is the error (the others still finish: nothing is left running).
    loaded_all = await asyncio.gather(
        *(load_image(url, settings, workers) for message_urls in urls for url in message_urls), return_exceptions=True
    )
    for outcome in loaded_all:
        if isinstance(outcome, BaseException):
            raise outcome
    loaded = iter(cast(list[tuple[Image.Image, str]], loaded_all))
    turns = []
    for message, text, message_urls in zip(messages, texts, urls, strict=True):
        images = [next(loaded) for _ in message_urls]
        digests: list[str | None] = [digest for _, digest in images]
        turns.append(Turn(_ROLES[message.role], text, [image for image, _ in images], digests))
    question = turns.pop()
    if not question.text.strip():
        raise APIError(
            400,
            "the last user message has no text: ask a question about the image",
            param=f"messages.{len(messages) - 1}.content",
        )
    question.text = question.text.strip()
    return turns, question


def _image_urls(message: Message, index: int) -> list[str]:
    param = f"messages.{index}"
    if message.role in ("tool", "function"):
        raise APIError(
            400,
            f"{param}: a {message.role} message answers a tool call, and this server makes none",
            param=f"{param}.role",
            code="tools_not_supported",
        )
    if message.tool_calls or message.function_call:
        raise APIError(
            400,
            f"{param}: an assistant message with tool calls; this server does not call tools",
            param=f"{param}.tool_calls",
            code="tools_not_supported",
        )
    parts = message.content if isinstance(message.content, list) else []
    for j, part in enumerate(parts):
        _check_part(message, part, f"{param}.content.{j}")
    urls = [p.image_url.url for p in parts if p.type == "image_url" and p.image_url is not None]
    if urls and message.role != "user":
        raise APIError(
            400,
            f"{param}: a {message.role} message cannot carry images; send them in a user message",
            param=f"{param}.content",
        )
    return urls


def _check_part(message: Message, part: ContentPart, param: str) -> None:
    if part.type == "text" and part.text is not None:
        return
    if part.type == "image_url" and part.image_url is not None:
        return
    if part.type == "refusal" and part.refusal is not None and message.role == "assistant":
        return
    if part.type in ("text", "image_url", "refusal"):
        raise APIError(400, f"{param}: a {part.type} part without its {part.type} field", param=param)
    raise APIError(
        400,
        f"{param}: content part type {part.type!r} is not supported here (text and image_url are)",
        param=f"{param}.type",
    )


def _text(message: Message, index: int) -> str:
    content = message.content
    if content is None:
        raise APIError(
            400, f"messages.{index}: a {message.role} message without content", param=f"messages.{index}.content"
        )
    if isinstance(content, str):
        return content
    return "\n".join(p.text or p.refusal or "" for p in content if p.type in ("text", "refusal"))
