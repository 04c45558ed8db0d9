"""Image work off the event loop: the bounded pool itself, the server's decoding and the engine's
model images run on it, and a big image's decode does not hold up a small request (no vLLM)."""

import asyncio
import base64
import hashlib
import threading

import pytest
from PIL import Image

from engine.families.llava import LlavaAdapter
from engine.image_work import BIG_PIXELS, THREAD_NAME_PREFIX, ImageWorkers
from engine.program import model_image
from engine.runner import ModelImage
from server import images
from server.settings import ServerSettings

from .conftest import data_url, scene
from .fakes import CharTokenizer

_WAIT_S = 30  # generous: a deadlock, not a slow machine, is what these waits catch


def _on_pool_thread() -> bool:
    return threading.current_thread().name.startswith(THREAD_NAME_PREFIX)


async def test_jobs_run_on_pool_threads_and_their_errors_reach_the_caller():
    workers = ImageWorkers(2)
    try:
        assert await workers.run(_on_pool_thread, pixels=100) is True
        assert await workers.run(_on_pool_thread, pixels=BIG_PIXELS + 1) is True
        with pytest.raises(ValueError, match="bad pixels"):
            await workers.run(_raise, ValueError("bad pixels"), pixels=100)
    finally:
        workers.shutdown()


def _raise(error: Exception) -> None:
    raise error


async def test_no_more_jobs_than_threads_reach_a_lane_and_a_cancelled_caller_keeps_its_slot():
    workers = ImageWorkers(1)
    release = threading.Event()
    started: list[str] = []

    def job(name: str) -> str:
        started.append(f"{name} on {threading.current_thread().name}")
        assert release.wait(_WAIT_S)
        return name

    big = BIG_PIXELS + 1
    try:
        first = asyncio.create_task(workers.run(job, "first", pixels=big))
        second = asyncio.create_task(workers.run(job, "second", pixels=big))
        while not started:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        # The second waits for a slot on the event loop, not in the pool's queue.
        assert len(started) == 1 and workers._big.pool._work_queue.qsize() == 0
        first.cancel()  # the caller leaves, but its job still holds the only thread...
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0.1)
        assert len(started) == 1 and workers._big.pool._work_queue.qsize() == 0  # ...so the slot stays taken
        # A small image's job has its own lane: it runs while both big ones wait or work.
        assert await asyncio.wait_for(workers.run(threading.current_thread, pixels=640 * 480), _WAIT_S) \
            is not threading.main_thread()
        release.set()
        assert await asyncio.wait_for(second, _WAIT_S) == "second"
        assert [s.split(" on ")[0] for s in started] == ["first", "second"]
        assert all("-big" in s for s in started)
    finally:
        release.set()
        workers.shutdown()


def _settings() -> ServerSettings:
    return ServerSettings()


async def test_a_data_url_is_decoded_on_a_pool_thread(monkeypatch):
    decoded_on = []
    original = images.load_pixels

    def recording_load(image: Image.Image) -> Image.Image:
        decoded_on.append(threading.current_thread().name)
        return original(image)

    monkeypatch.setattr(images, "load_pixels", recording_load)
    workers = ImageWorkers(2)
    try:
        picture = scene(320, 200, seed=3)
        url = data_url(picture)
        image, image_id = await images.load_image(url, _settings(), workers)
    finally:
        workers.shutdown()
    assert len(decoded_on) == 1 and decoded_on[0].startswith(THREAD_NAME_PREFIX)
    assert image.mode == "RGB" and image.size == (320, 200) and image.tobytes() == picture.tobytes()
    # The id is the file's digest: the same file always gets it, another file another.
    assert image_id == hashlib.blake2b(base64.b64decode(url.split(",", 1)[1]), digest_size=16).hexdigest()


async def test_refusals_raised_on_a_pool_thread_reach_the_request_as_4xx():
    workers = ImageWorkers(1)
    try:
        with pytest.raises(images.APIError) as e:
            await images.load_image("data:image/png;base64,bm90IGFuIGltYWdl", _settings(), workers)
    finally:
        workers.shutdown()
    assert e.value.status == 400 and e.value.code == "image_not_an_image"


async def test_a_big_image_being_decoded_does_not_hold_up_a_small_request(monkeypatch):
    """The big images' decodes are held open until the small request has been decoded and has
    done its event-loop work: on the event loop (or in one shared lane) this would deadlock."""
    small_done = threading.Event()
    order: list[str] = []
    original = images.load_pixels

    def load(image: Image.Image) -> Image.Image:
        if image.size == (2400, 1800):  # a big one: finish only after the small request has
            order.append("big decoding")
            assert small_done.wait(_WAIT_S), "the small request did not progress while big images decoded"
        return original(image)

    monkeypatch.setattr(images, "load_pixels", load)
    monkeypatch.setattr("engine.image_work.BIG_PIXELS", 2400 * 1800 - 1)
    workers = ImageWorkers(2)
    big_url = data_url(scene(2400, 1800, seed=1), "JPEG")
    try:
        # As many big images as the big lane has threads, and one more waiting for a slot.
        bigs = [asyncio.create_task(images.load_image(big_url, _settings(), workers)) for _ in range(3)]
        while len(order) < 2:
            await asyncio.sleep(0.01)
        small, _ = await images.load_image(data_url(scene(64, 48, seed=2)), _settings(), workers)
        order.append("small decoded")
        small_done.set()
        decoded = await asyncio.wait_for(asyncio.gather(*bigs), _WAIT_S)
    finally:
        small_done.set()
        workers.shutdown()
    assert small.size == (64, 48) and all(image.size == (2400, 1800) for image, _ in decoded)
    assert order == ["big decoding", "big decoding", "small decoded", "big decoding"]


async def test_the_program_pads_crops_and_hashes_on_a_pool_thread(monkeypatch):
    adapter = LlavaAdapter(CharTokenizer(), {})
    workers = ImageWorkers(1)
    threads = []
    pad = adapter.model_image

    def recording_pad(image: Image.Image) -> Image.Image:
        threads.append(threading.current_thread().name)
        return pad(image)

    monkeypatch.setattr(adapter, "model_image", recording_pad)
    picture = scene(300, 200, seed=5)
    try:
        full = await model_image(workers, adapter, picture)
        crop = await model_image(workers, adapter, picture, (10, 20, 110, 170))
    finally:
        workers.shutdown()
    assert len(threads) == 2 and all(t.startswith(THREAD_NAME_PREFIX) for t in threads)
    assert full.image.size == (300, 300) and crop.image.size == (150, 150)  # padded square
    assert crop.image.crop((25, 0, 125, 150)).tobytes() == picture.crop((10, 20, 110, 170)).tobytes()
    assert full == ModelImage.of(pad(picture)) and crop.uuid != full.uuid


async def test_with_the_files_digest_content_ids_are_derived_from_it_per_crop():
    adapter = LlavaAdapter(CharTokenizer(), {})
    workers = ImageWorkers()
    picture = scene(300, 200, seed=6)
    try:
        full = await model_image(workers, adapter, picture, image_id="file-a")
        again = await model_image(workers, adapter, picture.copy(), image_id="file-a")
        crop = await model_image(workers, adapter, picture, (10, 20, 110, 170), "file-a")
        other_crop = await model_image(workers, adapter, picture, (10, 20, 110, 171), "file-a")
        other_file = await model_image(workers, adapter, picture, image_id="file-b")
    finally:
        workers.shutdown()
    assert full.image.tobytes() == ModelImage.of(adapter.model_image(picture)).image.tobytes()  # same pixels
    assert full.uuid == again.uuid and len({full.uuid, crop.uuid, other_crop.uuid, other_file.uuid}) == 4
    assert full.uuid != ModelImage.of(full.image).uuid  # not the pixel hash: that is what it saves


def test_the_content_id_is_the_hash_of_all_pixels_as_before():
    """Hashing in strips of rows gives the id hashing tobytes() in one piece gave (ids stay stable)."""
    image = scene(333, 517, seed=7)  # more rows than a strip, and not a multiple of one
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    assert ModelImage.of(image).uuid == digest.hexdigest()
    assert ModelImage.of(scene(333, 517, seed=8)).uuid != ModelImage.of(image).uuid


async def test_every_image_of_a_conversation_gets_its_own_files_digest():
    from server.chat_completions.protocol import ChatCompletionRequest
    from server.chat_completions.serving import to_query

    from .fakes import FakeEngine

    settings = _settings()
    first, second = data_url(scene(64, 48, seed=1)), data_url(scene(80, 60, seed=2))
    request = ChatCompletionRequest.model_validate({
        "model": settings.model_name,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}},
                                         {"type": "text", "text": "Look at this."}]},
            {"role": "assistant", "content": "I see shapes."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": second}},
                                         {"type": "text", "text": "And this one?"}]},
        ],
    })
    engine = FakeEngine()
    try:
        query = await to_query(request, settings, engine)
    finally:
        engine.shutdown()

    def digest(url: str) -> str:
        return hashlib.blake2b(base64.b64decode(url.split(",", 1)[1]), digest_size=16).hexdigest()

    assert [image.size for image in query.all_images] == [(64, 48), (80, 60)]
    assert query.all_image_ids == [digest(first), digest(second)] and query.image_ids == [digest(second)]
    assert query.question == "And this one?"
