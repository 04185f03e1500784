"""Metrics that stay true and served replies that fail by name (issue 31 parts 3 and 5)."""

import http.server
import json
import threading

import pytest
import torch

from g2rpo.config import ConfigError, load_config
from g2rpo.rewards.remote import RemoteReward, RemoteRewardError, VLMJudge, check_health, check_template
from g2rpo.train import Trainer, TrainingError
from g2rpo.train.metrics import reduce_ops

from test_train import tiny

QUIET = dict(log=lambda *a, **k: None)


class CountingReward:
    """Brightness, counting one "fallback" per image scored below 0.5 (as a judge counts unparseable answers)."""

    def __init__(self):
        self.fallbacks = 0

    def score(self, images, prompts):
        s = images.flatten(1).mean(1)
        self.fallbacks += int((s < 0.5).sum())
        return s


class HugeReward:
    """Finite float32 scores whose group statistics overflow."""

    def score(self, images, prompts):
        return torch.tensor([3e38 if i % 2 else -3e38 for i in range(images.shape[0])], dtype=torch.float32)


def test_two_rewards_with_one_name_are_refused_and_labels_keep_them_apart(lab_world, tmp_path):
    with pytest.raises(ConfigError, match=r"two of them would share reward/digit_alignment .*give each a label"):
        load_config(None, tiny(lab_world, tmp_path, rewards=[{"name": "digit_alignment"},
                                                             {"name": "digit_alignment", "weight": 2.0}]))
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, rewards=[
        {"name": "digit_alignment", "label": "align"}, {"name": "digit_alignment", "label": "again", "weight": 2.0}]))
    (m,) = Trainer(cfg, **QUIET).run()
    assert m["reward/align"] == m["reward/again"] and "reward/digit_alignment" not in m


def test_fallback_counts_go_on_across_resume_and_are_summed_over_ranks(lab_world, tmp_path):
    rewards = [{"name": "digit_alignment"}, {"name": "test_metrics_truth:CountingReward", "label": "judge",
                                               "weight": 0.0}]
    straight = Trainer(load_config(None, tiny(lab_world, tmp_path / "a", iterations=4, rewards=rewards)), **QUIET).run()
    counts = [m["reward_fallbacks/judge"] for m in straight]
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0  # cumulative
    Trainer(load_config(None, tiny(lab_world, tmp_path / "b", iterations=2, rewards=rewards)), **QUIET).run()
    resumed = Trainer(load_config(None, tiny(lab_world, tmp_path / "b", iterations=4, rewards=rewards, resume=True)),
                      **QUIET).run()
    assert [m["reward_fallbacks/judge"] for m in resumed] == counts[2:]  # it restarted at zero before
    ops = reduce_ops({"reward_fallbacks/judge": 3.0, "loss": 0.1})
    assert ops["reward_fallbacks/judge"] == "sum" and ops.get("loss", "mean") == "mean"  # counts add up over ranks


def test_scores_whose_statistics_overflow_stop_the_run(lab_world, tmp_path):
    huge = [{"name": "test_metrics_truth:HugeReward"}]
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=2, rewards=huge))
    with pytest.raises(TrainingError, match=r"iteration 1: reward 0 \(test_metrics_truth:HugeReward\): scores up to "
                                            r"3e\+38 overflow"):
        Trainer(cfg, **QUIET).run()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the body registered for its path."""

    replies: dict = {}

    def _reply(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        body, kind = self.replies[self.path]
        self.send_response(200)
        self.send_header("content-type", kind)
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _reply

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Canned.replies
    server.shutdown()


@pytest.mark.parametrize("body, kind, message", [
    ("<html>bad gateway</html>", "text/html", "with a body that is not JSON"),
    ('{"scores": "0.5"}', "application/json", "holds no list of scores"),
    ('{"scores": null}', "application/json", "holds no list of scores"),
    ('{}', "application/json", "holds no list of scores"),
    ("0.5", "application/json", "holds no list of scores"),
    ('{"scores": [true, false]}', "application/json", "every score must be a number, got True"),
    ('{"scores": [[0.5], [0.5]]}', "application/json", r"every score must be a number, got \[0.5\]"),
    ('{"scores": [0.5]}', "application/json", "1 scores for 2 images"),
])
def test_every_malformed_reward_reply_is_a_named_remote_error(canned, body, kind, message):
    url, replies = canned
    replies["/score"] = (body, kind)
    with pytest.raises(RemoteRewardError, match=rf"{url}/score.*{message}"):
        RemoteReward(url, "r", retries=0).score(torch.rand(2, 3, 4, 4), ["a", "b"])


def test_malformed_judge_and_health_replies_are_named(canned):
    url, replies = canned
    judge = VLMJudge(url, "m", retries=0, parse_retries=0)
    replies["/chat/completions"] = ('{"choices": []}', "application/json")
    with pytest.raises(RemoteRewardError, match="not a chat completion"):
        judge.score(torch.rand(1, 3, 4, 4), ["a"])
    replies["/chat/completions"] = (json.dumps({"choices": [{"message": {"content": 5}}]}), "application/json")
    with pytest.raises(RemoteRewardError, match="the answer's content is int, not text"):
        judge.score(torch.rand(1, 3, 4, 4), ["a"])
    replies["/health"] = ("<html>ok</html>", "text/html")
    with pytest.raises(RemoteRewardError, match="not JSON"):
        check_health(f"{url}/health")
    replies["/models"] = ("[1, 2]", "application/json")
    with pytest.raises(RemoteRewardError, match="answered list JSON, not an object"):
        check_health(f"{url}/models")


def test_a_judge_template_is_checked_when_the_reward_is_built():
    assert check_template('Rate {prompt}: reply {{"score": n}}') == 'Rate {prompt}: reply {{"score": n}}'
    for template, message in (('Reply as JSON {"score": n} for {prompt}', r'\{"score": n\} is not a field'),
                              ("{prompt.upper}", r"\{prompt.upper\} is not a field"),
                              ("no field at all", "contain {prompt}"), ("a { brace {prompt}", "doubled")):
        with pytest.raises(ValueError, match=message):
            VLMJudge("http://127.0.0.1:9", "m", template=template)


def test_unwritable_and_absurd_settings_get_one_line(lab_world, tmp_path, monkeypatch, capsys):
    """A folder name over 255 bytes and a value nested 2000 deep are config errors (exit 2; they were an OSError
    and a RecursionError traceback); a full disk while the final export's safetensors are written (SafetensorError
    is not an OSError) stops with exit 3 and says that --resume recovers."""
    from safetensors import SafetensorError

    from g2rpo.train.cli import main
    from g2rpo.train.loop import Trainer as LoopTrainer

    assert main([f"output_dir={tmp_path / ('x' * 300)}"]) == 2
    assert "folder name over 255 bytes" in capsys.readouterr().err
    assert main(["sampler.sde_indices=" + "[" * 2000 + "]" * 2000]) == 2
    assert "nested too deeply" in capsys.readouterr().err

    def full_disk(self, folder, iteration=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(LoopTrainer, "export", full_disk)
    args = [f"{k}={v}" for k, v in {"model.path": lab_world, "output_dir": tmp_path / "run", "iterations": 1,
                                   "progress": "false", "tensorboard": "false", "image_every": 0,
                                   "sampler.num_steps": 8, "sampler.sde_indices": "[0, 2]",
                                   "sampler.granularities": "[1, 2]", "sampler.group_size": 3,
                                   "data.prompts_per_iteration": 4}.items()]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "training stopped: SafetensorError" in err and "--resume continues (and exports again)" in err
    assert "Traceback" not in err
