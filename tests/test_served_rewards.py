"""Served rewards (issue 23): real server processes on 127.0.0.1 (free ports, bounded waits, always stopped)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from g2rpo.config import load_config
from g2rpo.rewards import make_reward
from g2rpo.train import Trainer, TrainingError

from test_train import _metrics, tiny

ROOT = Path(__file__).resolve().parents[1]
QUIET = lambda *a, **k: None  # noqa: E731

BRIGHTNESS = textwrap.dedent('''
    import open_clip

    def brightness(images, prompts):
        return images.flatten(1).mean(1)

    def tiny_hps(checkpoint, config_dir, device=None):
        from g2rpo.rewards.clip_models import load_hps
        open_clip.add_model_config(config_dir)
        return load_hps(checkpoint, model_name="tiny-vit", device=device)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(args: list[str], pythonpath: Path | None = None, port: int | None = None, wait_s: float = 120):
    port = port or _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.Popen([sys.executable, "-m", "g2rpo.rewards.serve", *args, "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not come up")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def user_module(tmp_path, monkeypatch, tiny_open_clip):
    from conftest import TINY_CLIP_CFG

    (tmp_path / "served_rewards_mod.py").write_text(BRIGHTNESS)
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "tiny-vit.json").write_text(json.dumps(TINY_CLIP_CFG))
    _, state = tiny_open_clip
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_remote_scores_equal_in_process_scores(user_module, lab_world):
    hps_opts = {"checkpoint": str(user_module / "hps.pt"), "config_dir": str(user_module / "oc")}
    args = ["--reward", "served_rewards_mod:tiny_hps", "--options", json.dumps(hps_opts),
            "--reward", "digit_alignment", "--options", json.dumps({"world": str(lab_world)})]
    with serving(args, user_module) as (url, _):
        rgb = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        prompts = ["a red cube", "a cat", "a dog", "a sled", "a tree"]
        local = make_reward("served_rewards_mod:tiny_hps", **hps_opts).score(rgb, prompts)
        for fmt in ("raw", "png"):  # PNG rounds to uint8 exactly as the reward's own PIL conversion does
            remote = make_reward("remote", url=url, reward="served_rewards_mod:tiny_hps", chunk_size=2,
                                 image_format=fmt).score(rgb, prompts)
            assert torch.allclose(remote, local, atol=1e-6), fmt
        digits = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(1))
        lab_prompts = ["a digit one", "the digit seven", "a 3", "a digit two", "a 9", "the digit zero"]
        local = make_reward("digit_alignment", world=str(lab_world)).score(digits, lab_prompts)
        remote = make_reward("remote", url=url, reward="digit_alignment", chunk_size=4).score(digits, lab_prompts)
        assert torch.equal(remote, local)


@pytest.mark.slow
def test_training_with_a_remote_reward_equals_in_process_and_survives_the_server(lab_world, tmp_path):
    args = ["--reward", "digit_alignment", "--options", json.dumps({"world": str(lab_world)})]
    port = _free_port()
    local = Trainer(load_config(None, tiny(lab_world, tmp_path / "local", iterations=2, rewards=[
        {"name": "digit_alignment"}])), log=QUIET).run()
    with serving(args, port=port) as (url, proc):
        remote_reward = [{"name": "remote", "options": {"url": url, "reward": "digit_alignment", "retries": 1,
                                                        "backoff_s": 0.05, "timeout_s": 20}}]
        cfg = load_config(None, tiny(lab_world, tmp_path / "remote", iterations=3, rewards=remote_reward))
        trainer = Trainer(cfg, log=QUIET)

        def kill_after_two(tr, m):
            if m["iteration"] == 2:
                proc.kill()
                proc.wait(timeout=30)

        with pytest.raises(TrainingError, match=r"iteration 3: reward remote: .* failed after 2 attempts"):
            trainer.run(callback=kill_after_two)
    got = _metrics(tmp_path / "remote")
    assert [m["iteration"] for m in got] == [1, 2]
    for a, b in zip(local, got):
        assert a["reward/digit_alignment"] == pytest.approx(b["reward/remote"], abs=1e-7)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    assert (tmp_path / "remote" / "checkpoints" / "iter_000002" / "COMPLETE").is_file()
    with pytest.raises(Exception, match="does not answer"):  # checked before any model loads
        Trainer(load_config(None, tiny(lab_world, tmp_path / "remote", iterations=3, resume=True,
                                       rewards=remote_reward)), log=QUIET)
    with serving(args, port=port):  # back: --resume continues
        trainer = Trainer(load_config(None, tiny(lab_world, tmp_path / "remote", iterations=3, resume=True,
                                                 rewards=remote_reward)), log=QUIET)
        trainer.run()
    assert [m["iteration"] for m in _metrics(tmp_path / "remote")] == [1, 2, 3]


@pytest.mark.slow
def test_malformed_requests_get_4xx_the_server_stays_up_and_many_clients_lose_nothing(user_module):
    """One server (a start-up costs seconds): malformed requests first, then the load of many clients."""
    with serving(["--reward", "served_rewards_mod:brightness", "--max-batch", "16", "--batch-wait-ms", "10"],
                 user_module) as (url, proc):
        name = "served_rewards_mod:brightness"
        good = {"format": "raw", "dtype": "float32", "shape": [1, 2, 2], "data": "AAAAAAAAAAAAAAAAAAAAAA=="}
        cases = [(b"{not json", 400), (json.dumps([1, 2]).encode(), 400),
                 (json.dumps({"reward": "nope", "prompts": ["a"], "images": good}).encode(), 404),
                 (json.dumps({"reward": name, "prompts": "a", "images": good}).encode(), 422),
                 (json.dumps({"reward": name, "prompts": ["a", "b"], "images": good}).encode(), 422),
                 (json.dumps({"reward": name, "prompts": ["a"], "images": {**good, "data": "%%%"}}).encode(), 422),
                 (json.dumps({"reward": name, "prompts": ["a"], "images": {**good, "shape": [1, 3, 3]}}).encode(), 422),
                 (json.dumps({"reward": name, "prompts": ["a"], "images": {"format": "png", "data": ["AAAA"]}}).encode(),
                  422)]
        for body, code in cases:
            r = httpx.post(f"{url}/score", content=body, timeout=10)
            assert r.status_code == code, (body[:60], r.status_code, r.text)
            assert r.json()["detail"]
        r = httpx.post(f"{url}/score", json={"reward": name, "prompts": ["a"], "images": good}, timeout=10)
        assert r.status_code == 200 and r.json()["scores"] == [0.0] and proc.poll() is None
        _many_clients_lose_nothing_and_get_their_own_answers(url)


def _many_clients_lose_nothing_and_get_their_own_answers(url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from g2rpo.rewards.wire import encode_images

    clients, seconds = 8, 4.0
    batches_before = httpx.get(f"{url}/health", timeout=10).json()["batches"].get("served_rewards_mod:brightness", 0)

    def client(c: int) -> tuple[int, int]:
        sent = wrong = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            value = (c * 1000 + sent) / 1e5  # an answer that says whose request it was
            images = torch.full((2, 1, 4, 4), value)
            r = httpx.post(f"{url}/score", json={"reward": "served_rewards_mod:brightness", "prompts": ["x", "y"],
                                                 "images": encode_images(images)}, timeout=30)
            wrong += int(r.status_code != 200 or r.json()["scores"] != pytest.approx([value, value], abs=1e-7))
            sent += 1
        return sent, wrong

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert sum(w for _, w in results) == 0 and all(s > 0 for s, _ in results)
    batches = health["batches"]["served_rewards_mod:brightness"] - batches_before
    assert batches < sum(s for s, _ in results)  # requests were batched


@pytest.mark.slow
def test_chat_api_judge_equals_in_process_unified_reward(tmp_path):
    from g2rpo.testing.tiny import tiny_qwen_vl_judge

    tiny_qwen_vl_judge(tmp_path / "judge")
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cube", "a blue sphere"]
    local = make_reward("unified_reward", model_dir=str(tmp_path / "judge"), max_new_tokens=6, batch_size=1)
    answers = local.judge(images, prompts)
    with serving(["--judge", f"tiny-judge={tmp_path / 'judge'}"]) as (url, _):
        judge = make_reward("vlm_judge", base_url=f"{url}/v1", model="tiny-judge", max_tokens=6, parse_retries=1,
                            fallback_score=-1.0)
        got = [judge._answer(images[i], p) for i, p in enumerate(prompts)]
        assert got == answers  # the same prompt, image and greedy decoding
        scores = judge.score(images, prompts)  # a random judge never writes "Final Score:": the fallback, counted
        assert scores.tolist() == [-1.0, -1.0] and judge.fallbacks == 2
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-judge", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, timeout=10)
        assert r.status_code == 422 and "data URL" in r.json()["detail"]
