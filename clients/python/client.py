"""DualFocusClient and AsyncDualFocusClient: the openai SDK plus images, traces and typed errors."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .errors import BadRequest, DualFocusError, translate
from .result import AskResult

ImageInput = str | Path | bytes | Image.Image


def image_data_url(image: ImageInput) -> str:
    """A base64 data: URL for a path, raw bytes or a PIL image."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        data, fmt = buf.getvalue(), "png"
    else:
        if isinstance(image, (str, Path)):
            try:
                data = Path(image).read_bytes()
            except OSError as e:
                raise BadRequest(f"cannot read image {image}: {e.strerror}") from None
        else:
            data = bytes(image)
        try:
            fmt = (Image.open(io.BytesIO(data)).format or "").lower()
        except (UnidentifiedImageError, OSError):
            raise BadRequest(
                f"{image if isinstance(image, (str, Path)) else 'the bytes given'} is not an image this client can read"
            ) from None
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode()


def _request(
    model: str,
    image: ImageInput | None,
    question: str,
    mode: str | None,
    max_tokens: int,
    trace: bool,
    zoom_threshold: float | None = None,
    zoom_threshold_choice: float | None = None,
    **sampling,
) -> dict:
    # The image before the question (the server reads the parts in any order): routers that match
    # request bodies by prefix (the Gateway API Inference Extension's endpoint picker) then find every
    # question about one image sharing a long prefix (docs/deploy.md, "Many replicas").
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    content.append({"type": "text", "text": question})
    options: dict[str, Any] = {"return_trace": trace}
    if mode is not None:  # else the server's default mode
        options["mode"] = mode
    if zoom_threshold is not None:  # else the server's
        options["zoom_threshold"] = zoom_threshold
    if zoom_threshold_choice is not None:
        options["zoom_threshold_choice"] = zoom_threshold_choice
    return dict(
        model=model,
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": content}],
        extra_body={"dualfocus": options},
        **sampling,
    )


def _v1(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class DualFocusClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ):
        self.base_url = base_url
        self._openai = openai.OpenAI(
            base_url=_v1(base_url), api_key=api_key or "none", timeout=timeout, max_retries=max_retries
        )
        self._model = model

    @property
    def model(self) -> str:
        """The served model (asked of the server once, unless given)."""
        if self._model is None:
            try:
                self._model = self._openai.models.list().data[0].id
            except openai.OpenAIError as e:
                raise translate(e, self.base_url) from None
        return self._model

    def ask(
        self,
        image: ImageInput | None,
        question: str,
        mode: str | None = None,
        max_tokens: int = 128,
        trace: bool = True,
        zoom_threshold: float | None = None,
        zoom_threshold_choice: float | None = None,
        **sampling,
    ) -> AskResult:
        """Ask one question about one image (None: a text-only question). `mode`: dualfocus (always
        zoom), auto (zoom only when the macro answer is unsure: below `zoom_threshold`, or for a
        multiple-choice question `zoom_threshold_choice`, where given, else the server's) or macro (one
        pass); None: the server's default mode."""
        request = _request(
            self.model, image, question, mode, max_tokens, trace, zoom_threshold, zoom_threshold_choice, **sampling
        )
        try:
            return AskResult.from_response(self._openai.chat.completions.create(**request))
        except openai.OpenAIError as e:
            raise translate(e, self.base_url) from None

    def ask_many(
        self, items: Iterable[tuple[ImageInput | None, str]], concurrency: int = 8, progress: bool = True, **options
    ) -> list[AskResult | DualFocusError]:
        """Ask many (image, question) pairs, `concurrency` at a time. Results keep the input order;
        a failed item's place holds its error instead of stopping the others."""
        items = list(items)

        def one(item):
            try:
                return self.ask(*item, **options)
            except DualFocusError as e:
                return e

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(tqdm(pool.map(one, items), total=len(items), disable=not progress, desc="dualfocus"))


class AsyncDualFocusClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ):
        self.base_url = base_url
        self._openai = openai.AsyncOpenAI(
            base_url=_v1(base_url), api_key=api_key or "none", timeout=timeout, max_retries=max_retries
        )
        self._model = model

    async def model(self) -> str:
        if self._model is None:
            try:
                self._model = (await self._openai.models.list()).data[0].id
            except openai.OpenAIError as e:
                raise translate(e, self.base_url) from None
        return self._model

    async def ask(
        self,
        image: ImageInput | None,
        question: str,
        mode: str | None = None,
        max_tokens: int = 128,
        trace: bool = True,
        zoom_threshold: float | None = None,
        zoom_threshold_choice: float | None = None,
        **sampling,
    ) -> AskResult:
        """As DualFocusClient.ask."""
        model = await self.model()
        request = _request(
            model, image, question, mode, max_tokens, trace, zoom_threshold, zoom_threshold_choice, **sampling
        )
        try:
            return AskResult.from_response(await self._openai.chat.completions.create(**request))
        except openai.OpenAIError as e:
            raise translate(e, self.base_url) from None

    async def ask_many(
        self, items: Iterable[tuple[ImageInput | None, str]], concurrency: int = 8, progress: bool = True, **options
    ) -> list[AskResult | DualFocusError]:
        items = list(items)
        limit = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(items), disable=not progress, desc="dualfocus")

        async def one(item):
            async with limit:
                try:
                    return await self.ask(*item, **options)
                except DualFocusError as e:
                    return e
                finally:
                    bar.update(1)

        try:
            return await asyncio.gather(*(one(item) for item in items))
        finally:
            bar.close()

    async def close(self) -> None:
        await self._openai.close()
