"""`python -m g2rpo.rewards.serve`: any registered reward as an HTTP service (FastAPI + uvicorn).

    python -m g2rpo.rewards.serve --reward hps --options '{"checkpoint": "/ckpt/HPS_v2.1_compressed.pt"}' \\
        --reward pickscore --host 127.0.0.1 --port 8001 --device cuda --max-batch 64

Endpoints:

* ``GET /health`` -> ``{"status": "ok", "rewards": [...], "judges": [...]}``;
* ``POST /score`` ``{"reward": NAME, "prompts": [...], "images": PAYLOAD}`` -> ``{"scores": [...]}``, with images as
  :mod:`g2rpo.rewards.wire` encodes them (float32/uint8 arrays or PNG). Concurrent requests for one reward are
  batched together up to ``--max-batch`` images (waiting at most ``--batch-wait-ms`` for company);
* ``POST /v1/chat/completions``: the OpenAI chat API for the VLM judges served with ``--judge`` (a transformers
  Qwen2.5-VL folder, as ``unified_reward`` loads it): greedy, one conversation per request, images as
  ``image_url`` data URLs. vLLM and SGLang serve the same API for production judges.

Malformed requests get a 4xx naming the problem; a reward that fails on a request gets that request a 500 with
its error; the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request  # the serve extra: pip install g2rpo[serve]
from fastapi.responses import JSONResponse

from .remote import TOKEN_ENV
from .wire import Limits

__all__ = ["LOOPBACK", "TOKEN_ENV", "build_app", "main"]

#: Hosts that serve this machine only (no token needed).
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Batcher:
    """Requests for one reward, batched: a worker takes the first waiting request, gathers others with the same
    image size until ``max_batch`` images or ``wait_s``, scores them in one call, answers each its share."""

    def __init__(self, model, max_batch: int, wait_s: float, executor: ThreadPoolExecutor) -> None:
        self.model, self.max_batch, self.wait_s, self.executor = model, max_batch, wait_s, executor
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: list = []
        self.batches = 0  # scoring calls made (for the tests and the health endpoint)

    async def submit(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, prompts, future))
        return await future

    async def _next(self, timeout: float | None):
        if self.pending:
            return self.pending.pop(0)
        if timeout is None:
            return await self.queue.get()
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            group, n = [first], first[0].shape[0]
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                try:
                    item = await self._next(max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if item[0].shape[1:] != first[0].shape[1:] or n + item[0].shape[0] > self.max_batch:
                    self.pending.append(item)  # another size, or too many: the next batch
                    break
                group.append(item)
                n += item[0].shape[0]
            images = torch.cat([g[0] for g in group])
            prompts = [p for g in group for p in g[1]]
            try:
                scores = await loop.run_in_executor(self.executor, self._score, images, prompts)
            except Exception as err:  # noqa: BLE001
                if len(group) == 1:
                    if not group[0][2].done():
                        group[0][2].set_exception(err)
                    continue
                # one request can fail a batch (an unknown prompt, an odd image): each alone, so that only the
                # bad ones fail and the other clients get their scores
                for imgs, prm, fut in group:
                    try:
                        alone = await loop.run_in_executor(self.executor, self._score, imgs, prm)
                    except Exception as one:  # noqa: BLE001
                        if not fut.done():
                            fut.set_exception(one)
                    else:
                        self.batches += 1
                        if not fut.done():
                            fut.set_result(alone)
                continue
            self.batches += 1
            lo = 0
            for imgs, _, fut in group:
                if not fut.done():
                    fut.set_result(scores[lo:lo + imgs.shape[0]])
                lo += imgs.shape[0]

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        out = [self.model.score(images[lo:lo + self.max_batch], prompts[lo:lo + self.max_batch]).float().cpu()
               for lo in range(0, images.shape[0], self.max_batch)]
        return torch.cat(out).tolist()


def build_app(rewards: dict[str, Any], judges: dict[str, Any] | None = None, max_batch: int = 64,
              batch_wait_ms: float = 5.0, limits: Limits | None = None, token: str | None = None):
    """The FastAPI app serving ``rewards`` (name -> reward model) and ``judges`` (name -> UnifiedReward-like judge
    with ``model``, ``processor``). Every request is held to ``limits`` before anything is decoded; with
    ``token``, every request must carry ``Authorization: Bearer <token>`` (401 otherwise)."""
    import hmac

    from .wire import WireError, decode_images

    limits = limits or Limits()

    judges = judges or {}
    executor = ThreadPoolExecutor(max_workers=max(1, len(rewards) + len(judges)))
    batchers = {name: Batcher(model, max_batch, batch_wait_ms / 1000.0, executor) for name, model in rewards.items()}
    judge_lock = asyncio.Lock()
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        workers = [asyncio.create_task(b.run()) for b in batchers.values()]
        yield
        for w in workers:
            w.cancel()

    app = FastAPI(title="g2rpo reward server", lifespan=lifespan)

    @app.middleware("http")
    async def _authorise(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "a bearer token is required (Authorization: Bearer <token>; the "
                                               "clients send their token option or G2RPO_REWARD_TOKEN)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    async def _json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise HTTPException(413, f"the body is {int(declared)} bytes, over the server's limit of "
                                     f"{limits.max_body_bytes} (--max-body-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():  # a body without a length is read only up to the limit
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise HTTPException(413, f"the body is over the server's limit of {limits.max_body_bytes} bytes "
                                         "(--max-body-mb)")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPException(400, f"the body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "rewards": sorted(rewards), "judges": sorted(judges),
                "batches": {n: b.batches for n, b in batchers.items()}}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "g2rpo"} for n in sorted(judges)]}

    @app.post("/score")
    async def score(request: Request) -> dict:
        body = await _json(request)
        name = body.get("reward")
        if name not in batchers:
            raise HTTPException(404, f"reward {name!r} is not served here; served: {sorted(batchers)}")
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise HTTPException(422, "prompts must be a list of strings")
        try:
            limits.check_count(len(prompts), "prompts", "prompts")  # one image per prompt
            images = decode_images(body.get("images"), limits)
        except WireError as err:
            raise HTTPException(422, str(err)) from None
        if images.shape[0] != len(prompts):
            raise HTTPException(422, f"{images.shape[0]} images but {len(prompts)} prompts")
        try:
            scores = await batchers[name].submit(images, prompts)
        except Exception as err:  # noqa: BLE001  (the reward failed on this input: say so, keep serving)
            raise HTTPException(500, f"reward {name!r} failed: {type(err).__name__}: {err}") from None
        return {"scores": scores}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await _json(request)
        name = body.get("model")
        if name not in judges:
            raise HTTPException(404, f"model {name!r} is not served here; judges: {sorted(judges)}")
        max_tokens = body.get("max_tokens", 256)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise HTTPException(422, f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if max_tokens > limits.max_tokens:
            raise HTTPException(422, f"max_tokens {max_tokens} is over the server's limit of {limits.max_tokens} "
                                     "(--max-tokens)")
        try:
            messages, images = _chat_inputs(body.get("messages"), limits)
        except (ValueError, WireError) as err:
            raise HTTPException(422, str(err)) from None
        judge = judges[name]
        async with judge_lock:  # one conversation at a time on the judge
            try:
                text = await asyncio.get_running_loop().run_in_executor(
                    executor, _generate, judge, messages, images, max_tokens)
            except Exception as err:  # noqa: BLE001
                raise HTTPException(500, f"judge {name!r} failed: {type(err).__name__}: {err}") from None
        return JSONResponse({"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                             "model": name, "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": text}}]})

    return app


def _chat_inputs(messages: Any, limits: Limits) -> tuple[list[dict], list]:
    """OpenAI chat messages -> the processor's messages (images as placeholders, in order) and the PIL images
    (each image's size read from its header and held to ``limits`` before it is decoded)."""
    from .wire import decode_png

    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] must be an object with a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
                    raise ValueError(f"messages[{i}].content[{j}]: image_url must be a base64 data URL")
                images.append(decode_png(url.split(";base64,", 1)[1], limits,
                                         f"messages[{i}].content[{j}]").convert("RGB"))
                limits.check_count(len(images), "messages")
                parts.append({"type": "image"})
            else:
                raise ValueError(f"messages[{i}].content[{j}] must be a text or image_url part")
        out.append({"role": m["role"], "content": parts})
    return out, images


@torch.no_grad()
def _generate(judge, messages: list[dict], images: list, max_tokens: int) -> str:
    """Greedy generation, as :meth:`g2rpo.rewards.unified_reward.UnifiedReward.judge` generates."""
    proc = judge.processor
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=images or None, padding=True, return_tensors="pt").to(judge.device)
    out = judge.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2rpo.rewards.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", action="append", default=[], help="a reward to serve (repeat for several)")
    p.add_argument("--options", action="append", default=[],
                   help="JSON options of the --reward before it (a name, module:callable or entry point)")
    p.add_argument("--judge", action="append", default=[], metavar="NAME=MODEL_DIR",
                   help="a Qwen2.5-VL judge folder served through /v1/chat/completions under NAME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    d = Limits()
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body size limit")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="pixels per image (read from its header)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="a judge's longest answer")
    p.add_argument("--token", default=None, help=f"require Authorization: Bearer TOKEN on every request (default: "
                                                 f"${TOKEN_ENV}, if set)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host other than loopback without a token (anyone who reaches the port can use it)")
    args = p.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in LOOPBACK and token is None and not args.insecure:
        p.error(f"--host {args.host} serves beyond this machine: give --token (or set {TOKEN_ENV}) so that only "
                "your clients score, or say --insecure")
    if min(args.max_body_mb, args.max_images, args.max_pixels, args.max_tokens) <= 0:
        p.error("--max-body-mb, --max-images, --max-pixels and --max-tokens must be > 0")
    limits = Limits(int(args.max_body_mb * 2**20), args.max_images, args.max_pixels, args.max_tokens)
    if not args.reward and not args.judge:
        p.error("give at least one --reward or --judge")
    if len(args.options) > len(args.reward):
        p.error("each --options follows the --reward it belongs to")
    if args.max_batch < 1:
        p.error("--max-batch must be >= 1")
    import uvicorn

    from ..hub import reward_options
    import inspect

    from .registry import make_reward, resolve_reward

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards, judges = {}, {}
    try:
        for i, name in enumerate(args.reward):
            opts = json.loads(args.options[i]) if i < len(args.options) else {}
            if not isinstance(opts, dict):
                raise ValueError(f"--options for {name!r} must be a JSON object")
            opts = reward_options(name, opts, f"--reward {name}")
            try:  # the built-in rewards take the device they run on
                if "device" in inspect.signature(resolve_reward(name)).parameters:
                    opts.setdefault("device", device)
            except (TypeError, ValueError):
                pass
            rewards[name] = make_reward(name, **opts)
        for spec in args.judge:
            name, _, folder = spec.partition("=")
            if not name or not folder:
                raise ValueError(f"--judge must be NAME=MODEL_DIR, got {spec!r}")
            judges[name] = make_reward("unified_reward", model_dir=folder, device=device, batch_size=1)
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as err:
        print(f"serve: {err}", file=sys.stderr)
        return 2
    app = build_app(rewards, judges, args.max_batch, args.batch_wait_ms, limits, token)
    print(f"serving rewards {sorted(rewards)} and judges {sorted(judges)} on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
