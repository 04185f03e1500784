"""The reward server bounded, authenticated and isolated (issue 31 part 2), in-process (FastAPI's TestClient)."""

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from g2rpo.rewards.remote import TOKEN_ENV, RemoteReward, auth_headers
from g2rpo.rewards.serve import Batcher, build_app, main
from g2rpo.rewards.wire import Limits, encode_images


class Brightness:
    def score(self, images, prompts):
        if "poison" in prompts:
            raise ValueError("unknown prompt 'poison'")
        return images.flatten(1).mean(1)


def _png(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_every_limit_is_checked_before_decoding_and_named():
    limits = Limits(max_body_bytes=4096, max_images=2, max_pixels=16 * 16, max_tokens=64)
    with TestClient(build_app({"b": Brightness()}, limits=limits)) as client:  # runs the batchers
        images = encode_images(torch.rand(1, 3, 8, 8))
        ok = client.post("/score", json={"reward": "b", "prompts": ["a"], "images": images})
        assert ok.status_code == 200 and len(ok.json()["scores"]) == 1
        r = client.post("/score", content=b"x" * 5000)
        assert r.status_code == 413 and "over the server's limit of 4096" in r.json()["detail"]
        for images, prompts, message in (
                ({"format": "raw", "dtype": "float32", "shape": [2**32, 2**32, 1], "data": ""}, ["a"],
                 "4294967296 images, over the server's limit of 2 per request"),  # np.prod overflowed to 0 here
                ({"format": "raw", "dtype": "float32", "shape": [1, 3, 20000, 20000], "data": ""}, ["a"],
                 "20000x20000 pixels per image, over the server's limit of 256"),
                ({"format": "png", "data": [_png((17, 17))]}, ["a"], "17x17 pixels per image, over the server"),
                ({"format": "png", "data": [_png((2, 2))] * 3}, ["a"] * 3, "3 prompts, over the server's limit of 2")):
            r = client.post("/score", json={"reward": "b", "prompts": prompts, "images": images})
            assert r.status_code == 422 and message in r.json()["detail"], r.text
        r = client.post("/v1/chat/completions", json={"model": "j", "messages": [], "max_tokens": 65})
        assert r.status_code == 404  # no judge j; with one, max_tokens is checked first:
        judge_app = TestClient(build_app({}, {"j": object()}, limits=limits))
        hi = [{"role": "user", "content": "hi"}]
        r = judge_app.post("/v1/chat/completions", json={"model": "j", "messages": hi, "max_tokens": 65})
        assert r.status_code == 422 and "max_tokens 65 is over the server's limit of 64" in r.json()["detail"]
        big = f"data:image/png;base64,{_png((40, 40))}"
        r = judge_app.post("/v1/chat/completions", json={"model": "j", "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]})
        assert r.status_code == 422 and "40x40 pixels per image, over the server's limit" in r.json()["detail"]


def test_a_token_is_required_when_set_and_sent_by_the_clients(monkeypatch):
    client = TestClient(build_app({"b": Brightness()}, token="s3cret"))
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer s3cret"}).json()["rewards"] == ["b"]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert auth_headers(None) == {} and RemoteReward("http://x", "b", token="s3cret").headers == {
        "Authorization": "Bearer s3cret"}
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert RemoteReward("http://x", "b").headers == {"Authorization": "Bearer from-env"}


def test_serving_beyond_loopback_needs_a_token_or_insecure(capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as err:
        main(["--reward", "clip", "--host", "0.0.0.0"])
    assert err.value.code == 2 and "--host 0.0.0.0 serves beyond this machine: give --token" in capsys.readouterr().err


def test_one_bad_request_in_a_batch_fails_only_itself():
    """Batched with others, a request the reward cannot score failed the whole batch (119 of 131 valid requests of
    another client failed); the batch is retried one request at a time."""
    async def go():
        batcher = Batcher(Brightness(), max_batch=64, wait_s=0.2, executor=ThreadPoolExecutor(1))
        worker = asyncio.create_task(batcher.run())
        images = [torch.full((1, 1, 2, 2), v) for v in (0.1, 0.2, 0.3)]
        results = await asyncio.gather(batcher.submit(images[0], ["a"]), batcher.submit(images[1], ["poison"]),
                                       batcher.submit(images[2], ["c"]), return_exceptions=True)
        worker.cancel()
        return results

    good1, bad, good2 = asyncio.run(go())
    assert good1 == pytest.approx([0.1]) and good2 == pytest.approx([0.3])
    assert isinstance(bad, ValueError) and "poison" in str(bad)
