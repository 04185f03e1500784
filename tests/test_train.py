import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from g2rpo.config import load_config
from g2rpo.train import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]


def tiny(lab_world, out, **extra):
    """A seconds-long training config on the session's lab world."""
    o = {
        "model": {"path": str(lab_world)},
        "sampler": {"num_steps": 8, "sde_indices": [0, 2], "granularities": [1, 2], "group_size": 3,
                    "max_batch": 64},
        "data": {"prompts_per_iteration": 4},
        "optim": {"lr": 1e-3},
        "iterations": 3, "checkpoint_every": 1, "output_dir": str(out), "progress": False,
        "tensorboard": False, "image_every": 0,
    }
    for k, v in extra.items():
        node = o
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return o


def run(overrides):
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    return trainer, trainer.run()


def _cli(args, env_extra=None, torchrun=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
           if torchrun else [sys.executable]) + ["-m", "g2rpo.train"] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _run_main(args):
    """``python -m g2rpo.train ARGS`` in this process, one thread as _cli's subprocess has (a reference run: the
    interpreter's start-up and imports cost seconds per subprocess)."""
    import contextlib
    import io
    import types

    from g2rpo.train import main

    threads, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(list(args))
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def _flat(o, prefix=""):
    out = []
    for k, v in o.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out += _flat(v, key)
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(str(Path(out) / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_first_ratio_of_every_iteration_is_one(lab_world, tmp_path):
    _, hist = run(tiny(lab_world, tmp_path, inner_epochs=3))
    for m in hist:
        assert m["ratio_first_max_dev"] < 1e-6
    # the later epochs move the policy: the ratio is not trivially 1
    assert max(max(m["ratio_max"] - 1, 1 - m["ratio_min"]) for m in hist) > 1e-4
    assert all(m["forward_rows"] > 0 and m["grad_norm"] > 0 for m in hist)


def test_training_changes_weights_checkpoints_and_exports(lab_world, tmp_path):
    trainer, hist = run(tiny(lab_world, tmp_path, tensorboard=True, image_every=2))
    assert [m["iteration"] for m in hist] == [1, 2, 3] == [m["iteration"] for m in _metrics(tmp_path)]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["iter_000001", "iter_000002", "iter_000003"]
    base = load_file(str(lab_world / "transformer" / "diffusion_pytorch_model.safetensors"))
    new = _weights(tmp_path)
    assert base.keys() == new.keys() and any(not torch.equal(base[k], new[k]) for k in base)
    live = trainer.module.state_dict()
    assert all(torch.equal(live[k].cpu(), new[k]) for k in new)
    from g2rpo.lab import load_lab_policy

    load_lab_policy(tmp_path / "final")  # the export loads through the diffusers code path
    from g2rpo.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):  # a fresh run never silently mixes with an old one
        Trainer(load_config(None, tiny(lab_world, tmp_path)), log=lambda *a, **k: None)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = events.Scalars("reward/digit_alignment")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([m["reward/digit_alignment"] for m in hist])
    assert (tmp_path / "images" / "iter_000002.png").is_file()


@pytest.mark.slow
def test_kill_mid_iteration_and_resume_reproduces_metrics(lab_world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args_a = _flat(tiny(lab_world, a, iterations=4))
    args_b = _flat(tiny(lab_world, b, iterations=4))
    r = _run_main(args_a)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = _cli(args_b, {"G2RPO_FAULT": "kill@2:train"})  # dies inside the third iteration
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(_metrics(b)) == 2
    resumed = _run_main(args_b + ["--resume"])  # a new Trainer from the files alone (in this process: no start-up)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ma, mb = _metrics(a), _metrics(b)
    assert [m["iteration"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        for k in x:
            if not k.startswith("time_"):
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), k
    wa, wb = _weights(a), _weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)


@pytest.mark.slow
def test_two_ranks_match_one_rank(lab_world, tmp_path):
    """Also validation during training (eval.every): the held-out prompts split over the ranks, the scores reduced
    (9 prompts: the ranks' shares differ by one, padded), the same numbers as on one rank."""
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = {"iterations": 2, "checkpoint_every": 0, "eval.every": 1, "eval.max_prompts": 9}
    r1 = _run_main(_flat(tiny(lab_world, one, **cfg)))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _cli(_flat(tiny(lab_world, two, **cfg)), torchrun=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = ([m for m in _metrics(d) if "loss" in m] for d in (one, two))
    assert len(m1) == len(m2) == 2
    for x, y in zip(m1, m2):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["reward/digit_alignment"] == pytest.approx(y["reward/digit_alignment"], rel=1e-5)
        assert x["forward_rows"] == y["forward_rows"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["adv_std"] == pytest.approx(y["adv_std"], rel=1e-6)  # over every rank, not a mean of per-rank stds
    e1, e2 = ([m for m in _metrics(d) if "eval/digit_judge" in m] for d in (one, two))
    assert [m["iteration"] for m in e1] == [m["iteration"] for m in e2] == [0, 1, 2]
    for x, y in zip(e1, e2):
        for k in ("eval/digit_judge", "eval/digit_alignment", "eval/digit_alignment_std", "eval/diversity",
                  "eval/cost_rows"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    w1, w2 = _weights(one), _weights(two)
    # Adam steps of lr=1e-3: weights agree far below one step's size
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-4, worst


def test_nan_reward_stops_with_iteration_and_prompt_named(lab_world, tmp_path, monkeypatch):
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=3, reward_batch=1000))  # one score call per iteration
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    name, model, w = trainer.rewards[0]
    real_score = model.score
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        s = real_score(images, prompts)
        if calls["n"] == 3:  # the third iteration's scoring
            s[5] = float("nan")
        return s

    monkeypatch.setattr(model, "score", flaky)
    with pytest.raises(TrainingError, match=r"iteration 3: reward 0 \(digit_alignment\).*prompts \["):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]


def test_lora_ema_kl_and_gradient_checkpointing_options(lab_world, tmp_path):
    base = load_file(str(lab_world / "transformer" / "diffusion_pytorch_model.safetensors"))
    trainer, hist = run(tiny(lab_world, tmp_path / "lora", iterations=2, **{
        "lora.enabled": True, "lora.rank": 4, "lora.alpha": 8.0, "loss.kl_beta": 0.1,
        "model.gradient_checkpointing": True}))
    trained = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    assert trained and all("lora" in n for n in trained)
    assert hist[0]["kl"] < 1e-10 and hist[1]["kl"] > 0  # the policy starts at the reference
    merged = _weights(tmp_path / "lora")
    assert merged.keys() == base.keys()  # LoRA fused into plain diffusers weights
    assert any(not torch.allclose(merged[k], base[k]) for k in base)

    trainer, _ = run(tiny(lab_world, tmp_path / "ema", iterations=2, ema_decay=0.5))
    exported = _weights(tmp_path / "ema")
    live = trainer.module.state_dict()
    for k in exported:
        expected = trainer.ema[k]
        assert torch.allclose(exported[k], expected)
    assert any(not torch.equal(exported[k], live[k]) for k in exported)


def test_gradient_checkpointing_gives_the_same_update(lab_world, tmp_path):
    run(tiny(lab_world, tmp_path / "plain", iterations=1))
    run(tiny(lab_world, tmp_path / "ckpt", iterations=1, **{"model.gradient_checkpointing": True}))
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_prompt_files(tmp_path):
    from g2rpo.prompts import PromptSchedule, load_prompts

    (tmp_path / "p.txt").write_text("a digit one\n\n  a digit two \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a digit one", "a digit two"]
    (tmp_path / "p.jsonl").write_text('{"caption": "x"}\n"y"\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["x", "y"]
    (tmp_path / "p.json").write_text('["u", {"prompt": "v"}]')
    assert load_prompts(str(tmp_path / "p.json")) == ["u", "v"]
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    s = PromptSchedule(["a", "b", "c"], seed=1)
    seen = [s.prompt_at(i) for i in range(6)]
    assert sorted(seen[:3]) == ["a", "b", "c"] and sorted(seen[3:]) == ["a", "b", "c"]
    assert seen == [PromptSchedule(["a", "b", "c"], seed=1).prompt_at(i) for i in range(6)]


def test_attention_backend_option(lab_world, tmp_path):
    from g2rpo.config import ConfigError

    trainer, hist = run(tiny(lab_world, tmp_path / "sdpa", iterations=1, **{"model.attention_backend": "native"}))
    assert hist[0]["ratio_first_max_dev"] < 1e-6
    with pytest.raises(ConfigError, match="model.attention_backend"):
        Trainer(load_config(None, tiny(lab_world, tmp_path / "bad", **{"model.attention_backend": "warp_drive"})),
                log=lambda *a, **k: None)


def test_nan_in_the_training_forward_stops_the_run(lab_world, tmp_path):
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=3))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    velocity = trainer.policy.velocity
    real_forward = velocity.forward
    state = {"iteration": 0}

    def forward(x, sigma, cond):  # NaN only in the second iteration's training forwards
        v = real_forward(x, sigma, cond)
        return v * float("nan") if torch.is_grad_enabled() and state["iteration"] == 1 else v

    velocity.forward = forward
    real_iteration = trainer.iteration

    def iteration(i):
        state["iteration"] = i
        return real_iteration(i)

    trainer.iteration = iteration
    with pytest.raises(TrainingError, match=r"iteration 2: non-finite loss at SDE step \d+ for prompts \["):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001"]


def test_bf16_compute_keeps_fp32_master_weights(lab_world, tmp_path):
    """model.dtype=bfloat16 computes in bf16 (autocast) but trains fp32 masters: a step of
    lr 1e-5 moves weights that a bf16 copy could not represent."""
    trainer, hist = run(tiny(lab_world, tmp_path, iterations=1, **{"model.dtype": "bfloat16", "optim.lr": 1e-5}))
    assert all(p.dtype == torch.float32 for p in trainer.setup.params)
    # the policy was loaded in bf16, so the fp32 masters start from the bf16-rounded weights
    base = {k: v.to(torch.bfloat16).float()
            for k, v in load_file(str(lab_world / "transformer" / "diffusion_pytorch_model.safetensors")).items()}
    live = trainer.module.state_dict()
    moved = [k for k in base if not torch.equal(base[k], live[k].float())]
    assert moved
    k = moved[0]
    step = (live[k].float() - base[k]).abs().max()
    assert 0 < step < 2e-5  # one Adam step of lr 1e-5: far below bf16 spacing near 1 (0.0078)
    assert hist[0]["forward_rows"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in hist[0].values()
                                               if isinstance(v, float))


# ---- precision parity between rollout and training (issue 11) ---------------------------------

def test_bf16_timesteps_reach_the_transformer_identically_in_rollout_and_training(lab_world, tmp_path):
    """The rollout's and the training forwards' transformer inputs (timestep, hidden states) have one
    dtype, and the trained sigma's timestep value is the same bits in both phases."""
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, **{"model.dtype": "bfloat16"}))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    seen = {True: [], False: []}

    def hook(module, args, kwargs):
        seen[module.training].append((kwargs["timestep"].dtype, kwargs["hidden_states"].dtype,
                                      set(kwargs["timestep"].float().tolist())))

    trainer.module.register_forward_pre_hook(hook, with_kwargs=True)
    hist = trainer.run()
    rollout, train = seen[False], seen[True]
    assert rollout and train
    assert {d for d, _, _ in rollout} == {d for d, _, _ in train} == {torch.bfloat16}
    assert {h for _, h, _ in rollout} == {h for _, h, _ in train} == {torch.bfloat16}
    rollout_t = set().union(*(t for _, _, t in rollout))
    assert set().union(*(t for _, _, t in train)) <= rollout_t
    assert hist[0]["ratio_first_max_dev"] <= 1e-6


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_one_process_ratio_is_one(lab_world, tmp_path, recompute):
    _, hist = run(tiny(lab_world, tmp_path, iterations=2, **{"model.dtype": "bfloat16",
                                                             "loss.recompute_old_logprob": recompute}))
    for m in hist:
        assert m["ratio_first_max_dev"] <= 1e-6
        # 4 prompts x 2 SDE steps, one forward per (prompt, shared x_k)
        assert ("recompute_forward_rows" in m) == recompute
        if recompute:
            assert m["recompute_forward_rows"] == 4 * 2


def test_recomputed_old_logprobs_replace_the_rollouts(lab_world, tmp_path):
    """With the rollout's log-probs perturbed (as a batch-dependent kernel would), recompute=false
    shows the deviation in the first ratio and recompute=true removes it."""
    devs = {}
    for recompute in (False, True):
        cfg = load_config(None, tiny(lab_world, tmp_path / str(recompute), iterations=1,
                                     **{"loss.recompute_old_logprob": recompute}))
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        real = trainer.sampler.rollout

        def perturbed(*a, **k):
            ro = real(*a, **k)
            ro.log_probs = ro.log_probs + 0.05
            return ro

        trainer.sampler.rollout = perturbed
        m = trainer.run()[0]
        devs[recompute] = m["ratio_first_max_dev"]
        if recompute:
            assert m["old_logprob_max_dev"] == pytest.approx(0.05, rel=1e-3)
    assert devs[False] > 0.04 and devs[True] <= 1e-6
    assert load_config(None, {"model": {"dtype": "bfloat16"}}).loss.recompute_old_logprob == "auto"
    from g2rpo.config import ConfigError

    with pytest.raises(ConfigError, match="loss.recompute_old_logprob"):
        load_config(None, {"loss": {"recompute_old_logprob": "sometimes"}})


@pytest.mark.slow
def test_two_ranks_bf16_fsdp_ratio_is_one(lab_world, tmp_path):
    """2-rank gloo FSDP2 with a bf16 param dtype, old log-probs NOT recomputed: the rollout's and the
    training forwards see identical inputs, so the first ratio is 1."""
    out = tmp_path / "two"
    r = _cli(_flat(tiny(lab_world, out, iterations=2, checkpoint_every=0,
                        **{"model.dtype": "bfloat16", "loss.recompute_old_logprob": False})), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for m in _metrics(out):
        assert m["ratio_first_max_dev"] <= 1e-6


def test_chunked_scoring_equals_unchunked(lab_world, tmp_path):
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1, reward_batch=1000))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    positions, prompts = trainer.local_prompts(0)
    cond = trainer.policy.encode_prompts(prompts)
    noise, gens = trainer._noise(0, positions)
    ro = trainer.sampler.rollout(noise, cond, generator=gens)
    decoded = []
    real_decode = trainer.policy.decode
    trainer.policy.decode = lambda z: decoded.append(z.shape[0]) or real_decode(z)
    whole = trainer.score_rewards(ro, prompts, 0)
    trainer.cfg.reward_batch = 5
    chunked = trainer.score_rewards(ro, prompts, 0)
    n = ro.flat_finals().shape[0]
    assert decoded[0] == n and max(decoded[1:]) == 5 and sum(decoded[1:]) == n
    assert torch.allclose(whole, chunked, atol=1e-6)
