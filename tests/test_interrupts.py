"""Ctrl-C and SIGTERM keep work: a checkpoint at the next safe point, a one-line message, a conventional
exit code, and ``--resume`` (with only the output_dir named: the stored config is the base) continues
exactly as if nothing had happened."""

import json

import pytest

from test_train import ROOT, _cli, _flat, _metrics, _run_main, tiny

PRESETS = ["--config", str(ROOT / "configs" / "lab.yaml"), "--config", str(ROOT / "configs" / "methods" /
                                                                            "g2rpo-official.yaml")]


def _same(ma, mb):
    assert [m["iteration"] for m in ma] == [m["iteration"] for m in mb]
    for x, y in zip(ma, mb):
        for k in x:
            if not k.startswith("time_"):
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), k


def _short_and_clean(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert message in stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) <= 6, stderr


@pytest.mark.slow
def test_sigint_mid_update_finishes_the_iteration_and_sigterm_mid_rollout_abandons_it(lab_world, tmp_path,
                                                                                     monkeypatch):
    """In this process (the signal handlers are the trainer's while it runs; the CLI's exit status and stderr are
    main()'s): a subprocess would only add its interpreter's start."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    opts = dict(iterations=4, checkpoint_every=0, tensorboard=True)
    ref = _run_main(PRESETS + _flat(tiny(lab_world, a, **opts)))
    assert ref.returncode == 0, ref.stderr[-2000:]

    # SIGINT during the second iteration's update: that iteration finishes and is checkpointed
    monkeypatch.setenv("G2RPO_FAULT", "int@1:train")
    r = _run_main(PRESETS + _flat(tiny(lab_world, b, **opts)))
    assert r.returncode == 130, r.stderr[-3000:]
    _short_and_clean(r.stderr, "interrupted at iteration 2; continue with --resume")
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["iter_000002"]
    # SIGTERM (a scheduler's preemption) before the second iteration's rollout: it is abandoned
    monkeypatch.setenv("G2RPO_FAULT", "term@1:rollout")
    r = _run_main(PRESETS + _flat(tiny(lab_world, c, **opts)))
    assert r.returncode == 143, r.stderr[-3000:]
    _short_and_clean(r.stderr, "interrupted at iteration 1; continue with --resume")
    assert [m["iteration"] for m in _metrics(c)] == [1]

    monkeypatch.delenv("G2RPO_FAULT")
    for out in (b, c):  # the README's resume command: the stored config (presets included) is the base
        r = _run_main([f"output_dir={out}", "--resume"])
        assert r.returncode == 0, r.stderr[-3000:]
        _same(_metrics(a), _metrics(out))
    events = EventAccumulator(str(b / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/digit_alignment")] == [1, 2, 3, 4]  # no duplicate steps


@pytest.mark.slow
def test_resume_refuses_changes_and_nothing_to_resume(lab_world, tmp_path):
    r = _run_main([f"output_dir={tmp_path / 'typo'}", "--resume"])
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.jsonl").write_text('{"iteration": 1}\n')
    r = _run_main([f"output_dir={tmp_path / 'x'}", "--resume"])
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr, r.stderr
    assert (tmp_path / "x" / "metrics.jsonl").read_text() == '{"iteration": 1}\n'  # never truncated


@pytest.mark.slow
def test_an_interrupt_on_one_rank_stops_both_together(lab_world, tmp_path):
    out = tmp_path / "two"
    r = _cli(_flat(tiny(lab_world, out, iterations=4, checkpoint_every=0)), {"G2RPO_FAULT": "int@1:score:0"},
             torchrun=2)
    assert r.returncode != 0
    assert r.stderr.count("interrupted at iteration 1; continue with --resume") == 1, r.stderr[-3000:]
    # no rank prints a traceback of ours (torchrun's launcher prints its own ChildFailedError report)
    assert f'File "{ROOT / "g2rpo"}' not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_000001"]
    r = _cli([f"output_dir={out}", "--resume"], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["iteration"] for m in _metrics(out)] == [1, 2, 3, 4]


def test_a_signal_during_the_final_export_finishes_it_and_stops_with_its_status(lab_world, tmp_path):
    """SIGTERM while the final export is written: the export completes, the held-out evaluation is skipped and the
    exit status is 143 (it printed "stopping", then evaluated and exited 0)."""
    import signal as sig

    from g2rpo.config import load_config
    from g2rpo.train import Trainer
    from g2rpo.train.interrupts import Interrupted

    trainer = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=1, export_final=True)),
                      log=lambda *a, **k: None)
    real = trainer.export

    def export_with_a_signal(folder, iteration=None):
        trainer.stop._handle(sig.SIGTERM, None)  # what the signal handler runs
        return real(folder, iteration)

    trainer.export = export_with_a_signal
    with pytest.raises(Interrupted) as err:
        trainer.run()
    trainer.close()
    assert err.value.exit_code == 143 and "export written" in str(err.value)
    assert (tmp_path / "final" / "transformer" / "config.json").is_file()


def test_a_second_signal_exits_with_its_own_status_and_says_what_was_lost(lab_world, tmp_path, monkeypatch, capsys):
    import signal as sig

    import g2rpo.train.cli as cli
    from g2rpo.train.interrupts import StopNow, StopRequest

    stop = StopRequest.__new__(StopRequest)
    stop.signum, stop._first, stop.log = None, 0.0, lambda *a: None
    stop._handle(sig.SIGTERM, None)
    stop._first -= 10  # the second signal comes later than REPEAT_S
    with pytest.raises(StopNow) as err:
        stop._handle(sig.SIGTERM, None)
    assert err.value.signum == sig.SIGTERM
    monkeypatch.setattr(cli, "_train", lambda cfg: (_ for _ in ()).throw(StopNow(sig.SIGTERM)))
    assert cli.main([f"output_dir={tmp_path}"]) == 143  # two SIGTERMs exited 130
    assert "no checkpoint was written: every iteration of this run is lost" in capsys.readouterr().err


def test_a_half_written_checkpoint_of_a_dead_run_is_removed_naming_it(lab_world, tmp_path):
    from g2rpo.config import load_config
    from g2rpo.train import Trainer

    Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=1)), log=lambda *a, **k: None).run()
    stale = tmp_path / "checkpoints" / "iter_000002.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"x" * 1000)  # a node died while saving iteration 2
    logged = []
    trainer = Trainer(load_config(None, tiny(lab_world, tmp_path, iterations=2, resume=True)), log=logged.append)
    assert not stale.exists() and any(f"removed {stale}" in line for line in logged)
    trainer.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]


SLOW_REWARD = '''
import os, signal, time

calls = [0]

def slow(images, prompts):
    """Brightness; on its call number $G2RPO_TEST_SIGNAL_AT: SIGTERM, 2.5 s of scoring, SIGTERM again."""
    calls[0] += 1
    if str(calls[0]) == os.environ.get("G2RPO_TEST_SIGNAL_AT"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2.5)  # a slow reward: the first signal's safe point is not reached
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
    return images.flatten(1).mean(1)
'''


@pytest.mark.slow
def test_a_second_signal_before_the_update_still_writes_the_completed_iterations(lab_world, tmp_path,
                                                                                 monkeypatch):
    """SIGTERM during iteration 3's (slow) scoring, a second one 2.5 s later before its safe point: with no
    checkpoint yet (checkpoint_every 16), the state after iteration 2 is written (nothing had changed it), the
    message says so, and --resume finishes exactly as an uninterrupted run."""
    (tmp_path / "slow_reward_mod.py").write_text(SLOW_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    opts = dict(iterations=4, checkpoint_every=16, reward_batch=100000, export_final=False,
                rewards=[{"name": "slow_reward_mod:slow"}])
    ref = _run_main(_flat(tiny(lab_world, tmp_path / "ref", **opts)))
    assert ref.returncode == 0, ref.stderr
    monkeypatch.setenv("G2RPO_TEST_SIGNAL_AT", "3")  # the reward's calls continue from the reference run's 4
    import slow_reward_mod

    slow_reward_mod.calls[0] = 0
    r = _run_main(_flat(tiny(lab_world, tmp_path / "run", **opts)))
    assert r.returncode == 143
    assert "the state after iteration 2, the last completed, was written to" in r.stderr
    assert "the iteration in progress is lost; continue with --resume" in r.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["iter_000002"]
    monkeypatch.delenv("G2RPO_TEST_SIGNAL_AT")
    assert _run_main(["--resume", f"output_dir={tmp_path / 'run'}"]).returncode == 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time")}  # noqa: E731
    assert [strip(m) for m in metrics] == [strip(m) for m in expected]
