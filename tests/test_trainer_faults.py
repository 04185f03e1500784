"""Misuse and faults (issue 13): nothing lost, clear errors before any model loads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import g2rpo.train.setup as setup_mod
from g2rpo.config import ConfigError, load_config
from g2rpo.train.checks import check_config
from g2rpo.train import Trainer, TrainingError, main

from test_train import ROOT, _flat, _metrics, run, tiny

QUIET = lambda *a, **k: None  # noqa: E731


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the error under test must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(setup_mod, "load_configured_policy", boom)


# 1 ---------------------------------------------------------------------------------------------
def test_output_dir_is_locked_while_a_run_holds_it(lab_world, tmp_path):
    cfg = load_config(None, tiny(lab_world, tmp_path, iterations=1))
    first = Trainer(cfg, log=QUIET)
    with pytest.raises(ConfigError, match=r"in use by another run \(pid \d+"):
        Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=1, seed=2)), log=QUIET)
    assert str(os.getpid()) in (tmp_path / ".lock").read_text()
    first.run()  # releases the lock when its writes are done
    again = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=2, resume=True)), log=QUIET)
    assert again.start_iteration == 1
    again.close()
    assert [m["iteration"] for m in _metrics(tmp_path)] == [1]


# 2 ---------------------------------------------------------------------------------------------
def test_non_finite_weights_stop_the_run_and_are_never_checkpointed(lab_world, tmp_path):
    trainer = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=2)), log=QUIET)
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(TrainingError, match=r"iteration 1: non-finite parameters after the optimizer step .*prompts \["):
        trainer.run()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="optim.lr must be finite"):
        load_config(None, {"optim": {"lr": float("inf")}})


def test_nan_velocity_in_the_rollout_names_iteration_and_prompts(lab_world, tmp_path):
    trainer = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=2)), log=QUIET)
    velocity = trainer.policy.velocity
    real = velocity.forward
    velocity.forward = lambda x, s, c: real(x, s, c) * float("nan")
    with pytest.raises(TrainingError, match=r"iteration 1: rollout failed: model returned non-finite velocity.*prompts \["):
        trainer.run()


# 3 ---------------------------------------------------------------------------------------------
def test_resume_applies_allowed_changes_and_refuses_others_before_models_load(lab_world, tmp_path, monkeypatch):
    run(tiny(lab_world, tmp_path, iterations=2))
    trainer, hist = run(tiny(lab_world, tmp_path, iterations=3, resume=True, **{"optim.lr": 0.05}))
    assert trainer.start_iteration == 2 and hist[0]["iteration"] == 3
    assert hist[0]["lr"] == pytest.approx(0.05)
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 0.05
    assert ("optim.lr", 1e-3, 0.05) in trainer.changes

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(setup_mod, "load_configured_policy", boom)
    with pytest.raises(ConfigError) as err:
        Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=4, resume=True, seed=7,
                                       **{"lora.enabled": True, "sampler.group_size": 4})), log=QUIET)
    for key in ("seed", "lora.enabled", "sampler.group_size"):
        assert f"\n  {key}:" in str(err.value)


# 4 ---------------------------------------------------------------------------------------------
def test_evaluation_after_resume_compares_with_the_base_model(lab_world, tmp_path, capsys):
    args = _flat(tiny(lab_world, tmp_path, iterations=2, **{"optim.lr": 3e-3}))
    assert main(args) == 0
    first = json.loads((tmp_path / "lab_eval.json").read_text())
    assert main(_flat(tiny(lab_world, tmp_path, iterations=3, **{"optim.lr": 3e-3})) + ["--resume"]) == 0
    second = json.loads((tmp_path / "lab_eval.json").read_text())
    assert second["base"] == pytest.approx(first["base"], rel=1e-6)
    assert second["base"]["digit_alignment"] != pytest.approx(first["trained"]["digit_alignment"], rel=1e-6)
    # a finished run says so
    assert main(_flat(tiny(lab_world, tmp_path, iterations=3, **{"optim.lr": 3e-3})) + ["--resume"]) == 0
    assert "run complete" in capsys.readouterr().out


# 5 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate_distcp", "missing_metadata", "corrupt_trainer_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(lab_world, tmp_path, damage):
    run(tiny(lab_world, tmp_path, iterations=3))
    last = tmp_path / "checkpoints" / "iter_000003"
    if damage == "truncate_distcp":
        f = next(last.glob("*.distcp"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif damage == "missing_metadata":
        (last / ".metadata").unlink()
    else:
        (last / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="iter_000003"):
        trainer, hist = run(tiny(lab_world, tmp_path, iterations=4, resume=True))
    assert trainer.start_iteration == 2 and [m["iteration"] for m in hist] == [3, 4]
    assert [m["iteration"] for m in _metrics(tmp_path)] == [1, 2, 3, 4]


# 6 ---------------------------------------------------------------------------------------------
def test_a_cut_short_metrics_line_does_not_break_resume(lab_world, tmp_path):
    run(tiny(lab_world, tmp_path, iterations=2))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 3, "reward/digit_al')
    with pytest.warns(UserWarning, match="not valid JSON"):
        run(tiny(lab_world, tmp_path, iterations=3, resume=True))
    assert [m["iteration"] for m in _metrics(tmp_path)] == [1, 2, 3]


# 7 ---------------------------------------------------------------------------------------------
def test_bad_inputs_are_found_before_any_model_loads(lab_world, tmp_path, no_model_load):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n   \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cases = [({"output_dir": str(a_file)}, "is a file"),
             ({"output_dir": str(a_file / "sub")}, "not writable"),
             ({"output_dir": "/proc/g2rpo_cannot_be_here"}, "not writable"),
             ({"data": {"prompts": str(blank)}}, "holds no prompts"),
             ({"data": {"prompts": str(tmp_path / "empty.txt")}}, "not found"),
             ({"data": {"prompts": str(latin)}}, "not UTF-8")]
    (tmp_path / "empty.txt").write_text("")
    cases[4] = ({"data": {"prompts": str(tmp_path / "empty.txt")}}, "holds no prompts")
    for extra, msg in cases:
        o = tiny(lab_world, tmp_path / "out")
        for k, v in extra.items():
            o[k] = {**o.get(k, {}), **v} if isinstance(v, dict) else v
        with pytest.raises(ConfigError, match=msg):
            Trainer(load_config(None, o), log=QUIET)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        load_config(None, {"seed": -3})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sampler:\n  group_size: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad_yaml}: YAML syntax error") as err:
        load_config(bad_yaml)
    assert "<unicode string>" not in str(err.value)


# 8 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, msg", [
    ({"sampler": {"granularities": [1, 50]}}, "must be < sampler.num_steps"),
    ({"sampler": {"num_steps": 1, "sde_indices": [0], "granularities": [1, 2]}}, "sampler.granularities"),
    ({"sampler": {"num_steps": 4, "sde_indices": [2], "granularities": [1, 2]}}, "same ODE continuation"),
    ({"sampler": {"eta": 1e6}}, "eta=1e\\+06 is too large"),
    ({"loss": {"clip_range": float("inf")}}, "clip_range must be finite"),
])
def test_nonsense_settings_are_refused(override, msg):
    with pytest.raises(ConfigError, match=msg):
        check_config(load_config(None, override))


# 9 ---------------------------------------------------------------------------------------------
def _wait(pred, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.5)
    return False


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_workers_exit_when_the_launcher_dies(lab_world, tmp_path):
    import psutil

    args = _flat(tiny(lab_world, tmp_path, iterations=10_000, checkpoint_every=0))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "g2rpo.train", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.jsonl").read_text(), 120)
        workers = [c.pid for c in psutil.Process(launcher.pid).children(recursive=True)]
        assert len(workers) >= 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        assert _wait(lambda: not any(_alive(p) for p in workers), 30), "orphaned workers kept running"
    finally:
        for c in psutil.Process().children(recursive=True):
            c.kill()


@pytest.mark.slow
def test_a_hung_rank_stops_the_run_after_the_timeout(lab_world, tmp_path):
    """A rank stopped mid-run (SIGSTOP): the healthy rank gives up after dist_timeout_s and exits with an error,
    after which torchrun ends the job (it then waits its own 30 s grace before killing the stopped rank: torchrun's
    behaviour, not g2rpo's, so this test ends once the healthy rank is out)."""
    import psutil

    args = _flat(tiny(lab_world, tmp_path, iterations=10_000, checkpoint_every=0, dist_timeout_s=5))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "g2rpo.train", *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.jsonl").read_text(), 120)
        workers = sorted(psutil.Process(launcher.pid).children(recursive=True), key=lambda p: p.pid)
        healthy, hung = workers[-2], workers[-1]
        hung.send_signal(signal.SIGSTOP)
        t0 = time.time()
        healthy.wait(timeout=100)
        assert time.time() - t0 < 60  # the 5 s timeout, not an endless wait
        for proc in (hung, launcher):  # the stopped rank holds the stderr pipe open
            proc.kill()
        err = launcher.communicate(timeout=60)[1]
        assert "training stopped: rank 0: a collective across the 2 ranks got no answer within dist_timeout_s=5 s" \
            in err and "Traceback" not in err.split("training stopped")[0].split("[rank0]")[-1], err[-3000:]
    finally:
        for c in psutil.Process().children(recursive=True):
            c.kill()


# 10 --------------------------------------------------------------------------------------------
def test_prompt_embeddings_do_not_depend_on_the_batch(lab_world):
    from g2rpo.lab import load_lab_policy

    together = load_lab_policy(lab_world).encode_prompts(["a handwritten digit one", "the digit seven", "a 3"])
    alone = load_lab_policy(lab_world).encode_prompts(["the digit seven"])
    for k in alone:
        assert torch.equal(together[k][1], alone[k][0])


# 11 / 12 -----------------------------------------------------------------------------------------
def test_cli_friction(lab_world, tmp_path, capsys):
    from g2rpo.config import parse_overrides
    from g2rpo.lab.__main__ import main as lab_main

    run(tiny(lab_world, tmp_path / "run", iterations=1))
    out = tmp_path / "missing" / "deeper" / "grid.png"
    lab_main(["grid", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])  # a run dir: its final/
    assert out.is_file()
    with pytest.raises(SystemExit, match="not a lab model"):
        lab_main(["grid", "--checkpoint", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit) as moved:  # the removed alias names where the comparison went
        lab_main(["compare", "--budget", "10"])
    assert moved.value.code == 2 and "python -m g2rpo.experiments compare" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--sampler.group_size needs a value"):
        parse_overrides(["--sampler.group_size", "--optim.lr", "1e-4"])
    assert main(["--print-config", "sampler.group_size=5"]) == 0
    printed = capsys.readouterr().out
    assert "group_size: 5" in printed and "update_schedule: per_iteration" in printed
    from g2rpo.eval import main as eval_main

    assert eval_main(["--model", str(lab_world), "--prompts", "builtin:lab_test", "--rewards", "hps",
                      "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err  # no checkpoint given: the usual repository, not in the (empty) cache
    assert "--rewards hps.options.checkpoint: 'xswu/HPSv2/HPS_v2.1_compressed.pt'" in err and "cache" in err


def test_outputs_are_honest_and_grids_readable(lab_world, tmp_path, monkeypatch):
    import g2rpo.train.logs as logs

    seen = []
    real = logs.save_prompt_grid
    monkeypatch.setattr(logs, "save_prompt_grid", lambda path, images, prompts, per: (seen.append(list(prompts)),
                                                                                      real(path, images, prompts, per)))
    run(tiny(lab_world, tmp_path, iterations=2, image_every=1))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "height" not in cfg["model"] and "guidance_scale" not in cfg["model"]
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) >= 4  # fixed prompts
    from PIL import Image

    w, h = Image.open(tmp_path / "images" / "iter_000002.png").size
    assert h >= len(seen[0]) * 96 and w >= 4 * 96


# issue 22 ------------------------------------------------------------------------------------------
def test_a_failed_final_export_leaves_nothing_half_written_and_resume_exports_again(lab_world, tmp_path, monkeypatch):
    import g2rpo.lab.generator as generator

    args = _flat(tiny(lab_world, tmp_path, iterations=2, checkpoint_every=0))
    real = generator.LabPolicy.save_pretrained

    def full_disk(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "partial").write_text("x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generator.LabPolicy, "save_pretrained", full_disk)
    assert main(args) == 3
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.tmp").exists()
    assert (tmp_path / "checkpoints" / "iter_000002" / "COMPLETE").is_file()
    monkeypatch.setattr(generator.LabPolicy, "save_pretrained", real)
    assert main(args + ["--resume"]) == 0  # complete, but final/ is missing: exported again
    assert json.loads((tmp_path / "final" / "g2rpo_export.json").read_text())["iteration"] == 2


def test_export_any_checkpoint_and_eval_a_checkpoint(lab_world, tmp_path):
    from g2rpo.eval import main as eval_main
    from g2rpo.export import main as export_main

    run(tiny(lab_world, tmp_path / "run", iterations=2, export_final=False))
    assert export_main([str(tmp_path / "run"), "--iteration", "1"]) == 0
    exported = tmp_path / "run" / "exports" / "iter_000001"
    assert json.loads((exported / "g2rpo_export.json").read_text())["iteration"] == 1
    from g2rpo.lab import load_lab_policy

    load_lab_policy(exported)
    assert export_main([str(tmp_path / "run"), "--iteration", "7"]) == 2
    ev = ["--model", str(lab_world), "--prompts", "builtin:lab_test", "--max-prompts", "2", "--samples", "2",
          "--rewards", "digit_alignment", "--no-base"]
    assert eval_main(ev + ["--checkpoint", str(tmp_path / "run" / "checkpoints" / "iter_000002"),
                           "--out", str(tmp_path / "ev")]) == 0
    assert eval_main(ev + ["--checkpoint", str(tmp_path / "run"), "--iteration", "1", "--out", str(tmp_path / "e1")]) == 0


def test_a_deleted_output_dir_stops_the_run(lab_world, tmp_path):
    import shutil

    trainer = Trainer(load_config(None, tiny(lab_world, tmp_path / "out", iterations=3)), log=QUIET)

    def delete(tr, m):
        if m["iteration"] == 1:
            shutil.rmtree(tmp_path / "out")

    with pytest.raises(TrainingError, match="was deleted or replaced"):
        trainer.run(callback=delete)


def test_a_full_disk_while_checkpointing_is_named_and_leaves_no_tmp(lab_world, tmp_path, monkeypatch):
    import shutil

    import g2rpo.checkpoint as checkpoint

    trainer = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=2)), log=QUIET)
    real = checkpoint.dcp.save
    calls = []

    def flaky(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            raise RuntimeError("unexpected pos 704 vs 598")
        return real(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(checkpoint.dcp, "save", flaky)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1024))
    with pytest.raises(TrainingError, match=r"iteration 2: writing checkpoint iter_000002 failed .*no space left"):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001"]


@pytest.mark.parametrize("override, msg", [
    ({"optim": {"lr": 1e38}}, "optim.lr must be <= 1"),
    ({"sampler": {"shift": 10.0, "eta": 1.25, "num_steps": 8, "sde_indices": list(range(8)), "granularities": [1]}},
     "sampler.eta=1.25 is too large"),
])
def test_more_nonsense_is_refused(override, msg):
    with pytest.raises(ConfigError, match=msg):
        check_config(load_config(None, override))


def test_g2rpo_keys_are_not_checked_for_trajectory_strategies():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config([root / "configs" / "lab.yaml", root / "configs" / "methods" / "dance_grpo-official.yaml"],
                      {"sampler": {"num_steps": 3}})
    assert cfg.sampler.num_steps == 3


def test_unusable_files_found_before_any_model_loads(lab_world, tmp_path, no_model_load):
    (tmp_path / "p.txt").write_text("a digit one\na picture of a cat\n")
    with pytest.raises(ConfigError, match="cannot tell which digit the prompt 'a picture of a cat'"):
        Trainer(load_config(None, tiny(lab_world, tmp_path / "a", **{"data.prompts": str(tmp_path / "p.txt")})),
                log=QUIET)
    (tmp_path / "b" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(ConfigError, match="metrics.jsonl is not writable"):
        Trainer(load_config(None, tiny(lab_world, tmp_path / "b")), log=QUIET)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "final").write_text("a file")
    with pytest.raises(ConfigError, match="final is a file"):
        Trainer(load_config(None, tiny(lab_world, tmp_path / "c")), log=QUIET)


def test_group_size_two_warns(lab_world, tmp_path):
    with pytest.warns(UserWarning, match="sign-only"):
        Trainer(load_config(None, tiny(lab_world, tmp_path, **{"sampler.group_size": 2})), log=QUIET).close()
