"""Rewards computed elsewhere: ``remote`` (a ``g2rpo.rewards.serve`` server) and ``vlm_judge`` (any server of the
OpenAI chat API: vLLM, SGLang, or ``g2rpo.rewards.serve --judge``). Both behave as in-process rewards:
``score(images, prompts) -> [N]``.

    rewards: [{name: remote, options: {url: http://host:8001, reward: hps, timeout_s: 60, retries: 3}}]
    rewards: [{name: vlm_judge, options: {base_url: http://host:8000/v1, model: UnifiedReward-qwen-7b}}]

Requests go in chunks (``chunk_size`` images), several in flight at once (``max_in_flight``), each with a timeout,
retried with exponential backoff on connection errors, timeouts and 5xx answers; a 4xx is not retried (the
request is wrong). When the retries are spent, :class:`RemoteRewardError` names the url and the last error (the
trainer then stops, naming the iteration; the last checkpoint is intact). The judge's answer is parsed as
in-process UnifiedReward parses it (the same template, the same ``Final Score:`` parser); an answer without a
score is asked again (``parse_retries`` times), then scored ``fallback_score`` (NaN by default: the trainer stops
on it) and counted in ``fallbacks``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .unified_reward import DEFAULT_TEMPLATE, parse_final_score
from .wire import encode_images, png_data_url

__all__ = ["RemoteReward", "RemoteRewardError", "VLMJudge", "check_health", "remote_reward", "vlm_judge"]

TEMPLATES = {"unified_reward": DEFAULT_TEMPLATE}


#: The environment variable holding a reward server's token (``serve --token``), sent as a bearer header by
#: the ``remote`` and ``vlm_judge`` clients when their own ``token`` / ``api_key`` option is not given.
TOKEN_ENV = "G2RPO_REWARD_TOKEN"


def auth_headers(token: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` for ``token``, else for $G2RPO_REWARD_TOKEN, else none."""
    token = token or os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


class RemoteRewardError(RuntimeError):
    """A served reward could not be reached or answered with an error, after the retries."""


def _request(method: str, url: str, timeout_s: float, retries: int, backoff_s: float, client=None, **kw):
    """One HTTP request with retries on connection errors, timeouts and 5xx; the response's JSON. ``client``: an
    ``httpx.Client`` whose connections are kept alive between requests."""
    import httpx

    last = None
    for attempt in range(retries + 1):
        try:
            r = (client or httpx).request(method, url, timeout=timeout_s, **kw)
            if r.status_code < 400:
                try:
                    return r.json()
                except ValueError:  # a proxy's HTML page, a truncated body
                    raise RemoteRewardError(f"{url} answered {r.status_code} with a body that is not JSON: "
                                            f"{r.text[:200]!r}") from None
            detail = r.text[:500]
            if r.status_code < 500:  # the request itself is wrong: retrying cannot help
                raise RemoteRewardError(f"{url} answered {r.status_code}: {detail}")
            last = f"{r.status_code}: {detail}"
        except httpx.HTTPError as err:  # connection refused, reset, timeout
            last = f"{type(err).__name__}: {err}"
        if attempt < retries:
            time.sleep(backoff_s * 2 ** attempt)
    raise RemoteRewardError(f"{url} failed after {retries + 1} attempts: {last}")


def check_health(url: str, timeout_s: float = 10.0, token: str | None = None) -> dict:
    """``GET url/health`` (a g2rpo reward server) or ``GET base_url/models`` (an OpenAI-compatible server): a JSON
    object, else RemoteRewardError. ``token``: as the clients send it (:func:`auth_headers`)."""
    reply = _request("GET", url, timeout_s, 0, 0.0, headers=auth_headers(token))
    if not isinstance(reply, dict):
        raise RemoteRewardError(f"{url} answered {type(reply).__name__} JSON, not an object: is it a g2rpo reward "
                                "server (/health) or an OpenAI-compatible server (/models)?")
    return reply


def check_template(template: str) -> str:
    """A judge template (``str.format`` text): ``{prompt}`` and nothing else in braces, checked when the reward is
    built (a literal brace is written doubled: ``{{"score": n}}``). ValueError naming the problem."""
    import string

    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"vlm_judge: template: {err} (write a literal brace doubled: {{{{ and }}}})") from None
    wrong = [name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") for name, spec, conv in fields
             if name != "prompt" or spec or conv]
    if wrong:
        raise ValueError(f"vlm_judge: template: {{{wrong[0]}}} is not a field; the only one is {{prompt}} (write a "
                         "literal brace doubled: {{\"score\": n}} for {\"score\": n})")
    if not fields:
        raise ValueError(f"vlm_judge: template must be one of {sorted(TEMPLATES)} or contain {{prompt}}")
    return template


def _scores_of(reply, url: str, n: int) -> list[float]:
    """The ``scores`` of a reward server's reply: a list of ``n`` numbers (not booleans, not nested), else
    RemoteRewardError saying what came instead."""
    scores = reply.get("scores") if isinstance(reply, dict) else None
    if not isinstance(scores, list):
        raise RemoteRewardError(f"{url}: the reply holds no list of scores (got {str(reply)[:200]!r})")
    bad = [s for s in scores if isinstance(s, bool) or not isinstance(s, (int, float))]
    if bad:
        raise RemoteRewardError(f"{url}: every score must be a number, got {bad[0]!r}")
    if len(scores) != n:
        raise RemoteRewardError(f"{url}: {len(scores)} scores for {n} images")
    return [float(s) for s in scores]


class RemoteReward:
    """A reward served by ``python -m g2rpo.rewards.serve``."""

    def __init__(self, url: str, reward: str, timeout_s: float = 60.0, retries: int = 3, chunk_size: int = 32,
                 max_in_flight: int = 4, image_format: str = "raw", backoff_s: float = 0.5,
                 token: str | None = None) -> None:
        if chunk_size < 1 or max_in_flight < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("remote: chunk_size and max_in_flight must be >= 1, retries >= 0, timeout_s > 0")
        self.url, self.reward, self.name = url.rstrip("/"), reward, f"remote:{reward}"
        self.timeout_s, self.retries, self.chunk, self.backoff_s = timeout_s, retries, chunk_size, backoff_s
        self.format, self.headers = image_format, auth_headers(token)
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight)
        import httpx

        self.client = httpx.Client(limits=httpx.Limits(max_connections=max_in_flight))  # kept-alive connections

    def _chunk(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        body = {"reward": self.reward, "prompts": prompts, "images": encode_images(images, self.format)}
        reply = _request("POST", f"{self.url}/score", self.timeout_s, self.retries, self.backoff_s, self.client,
                         json=body, headers=self.headers)
        return _scores_of(reply, f"{self.url}/score", len(prompts))

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        jobs = [self.pool.submit(self._chunk, images[lo:lo + self.chunk], prompts[lo:lo + self.chunk])
                for lo in range(0, images.shape[0], self.chunk)]
        return torch.tensor([s for j in jobs for s in j.result()], dtype=torch.float32)


class VLMJudge:
    """A VLM judge behind the OpenAI chat API, asked as in-process UnifiedReward asks (the same template and
    parser): one conversation per image (an image part, then the template's text), temperature 0."""

    def __init__(self, base_url: str, model: str, template: str = "unified_reward", max_tokens: int = 256,
                 timeout_s: float = 120.0, retries: int = 3, max_in_flight: int = 8, parse_retries: int = 1,
                 fallback_score: float = float("nan"), backoff_s: float = 0.5, api_key: str | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model, self.name = base_url.rstrip("/"), model, f"vlm_judge:{model}"
        self.template = check_template(TEMPLATES.get(template, template))
        self.max_tokens, self.timeout_s, self.retries, self.backoff_s = max_tokens, timeout_s, retries, backoff_s
        self.parse_retries, self.fallback_score = parse_retries, float(fallback_score)
        self.headers = auth_headers(api_key)
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight)
        import httpx

        self.client = httpx.Client(limits=httpx.Limits(max_connections=max_in_flight))
        self.fallbacks = 0  # answers without a score, scored fallback_score (the trainer logs it)

    def _answer(self, image: torch.Tensor, prompt: str) -> str:
        """The judge's answer for one image (the template's text after the image, temperature 0)."""
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    {"type": "text", "text": self.template.format(prompt=prompt)}]}]}
        reply = _request("POST", self.url, self.timeout_s, self.retries, self.backoff_s, self.client, json=body,
                         headers=self.headers)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RemoteRewardError(f"{self.url}: not a chat completion (no choices[0].message.content): "
                                    f"{str(reply)[:200]!r}") from None
        if content is not None and not isinstance(content, str):
            raise RemoteRewardError(f"{self.url}: the answer's content is {type(content).__name__}, not text")
        return content or ""

    def _ask(self, image: torch.Tensor, prompt: str) -> float:
        for _ in range(self.parse_retries + 1):
            score = parse_final_score(self._answer(image, prompt))
            if score == score:  # not NaN
                return score
        self.fallbacks += 1
        return self.fallback_score

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        jobs = [self.pool.submit(self._ask, images[i], p) for i, p in enumerate(prompts)]
        return torch.tensor([j.result() for j in jobs], dtype=torch.float32)


def remote_reward(url: str, reward: str, **options) -> RemoteReward:
    """The ``remote`` reward (registered built-in)."""
    return RemoteReward(url, reward, **options)


def vlm_judge(base_url: str, model: str, **options) -> VLMJudge:
    """The ``vlm_judge`` reward (registered built-in)."""
    return VLMJudge(base_url, model, **options)
