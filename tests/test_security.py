"""Nothing g2rpo loads runs code (issue 31): crafted reward checkpoints, trainer states and RNG files are refused
with an error naming the file, and their payload never runs; checkpoints written before the change still resume."""

import os
import random

import numpy as np
import pytest
import torch

from g2rpo.config import load_config
from g2rpo.safeload import UnsafeFileError, load_torch_file
from g2rpo.train import Trainer
from g2rpo.train.cli import main as train_main

from test_train import tiny


class _Payload:
    """Unpickled with weights_only=False, this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _overrides(d, prefix=""):
    out = []
    for k, v in d.items():
        out += _overrides(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"]
    return out


def test_a_crafted_file_is_refused_naming_it_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, evil)
    with pytest.raises(UnsafeFileError, match=rf"HPS checkpoint {evil}: refused: .*\(posix.system\)"):
        load_torch_file(evil, "HPS checkpoint")
    assert not marker.exists()
    garbage = tmp_path / "cut.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch file") as err:  # damaged, not crafted
        load_torch_file(garbage, "x")
    assert not isinstance(err.value, UnsafeFileError)
    fine = tmp_path / "fine.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "names": ("a", None)}, fine)
    assert load_torch_file(fine, "x")["names"] == ("a", None)


def test_a_crafted_hps_checkpoint_runs_nothing(tmp_path, tiny_open_clip):
    """HPS files come from the Hub by default; a crafted one ran its payload inside make_reward("hps", ...).
    (ImageReward's: tests/test_rewards.py, beside its official layout.)"""
    from g2rpo.rewards import make_reward

    marker = tmp_path / "ran"
    evil = tmp_path / "hps.pt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(UnsafeFileError, match=rf"HPS checkpoint {evil}: refused"):
        make_reward("hps", checkpoint=str(evil), model_name=tiny_open_clip[0])
    assert not marker.exists()


def test_a_crafted_trainer_state_stops_export_and_resume_before_anything_runs(lab_world, tmp_path, capsys):
    from g2rpo.export import main as export_main

    out = tmp_path / "run"
    cfg = tiny(lab_world, out, iterations=1)
    Trainer(load_config(None, cfg), log=lambda *a, **k: None).run()
    marker = tmp_path / "ran"
    state = out / "checkpoints" / "iter_000001" / "trainer_state.pt"
    real = torch.load(state, weights_only=True)
    torch.save({**real, "payload": _Payload(marker)}, state)
    assert export_main([str(out)]) == 2
    assert "checkpoint trainer state" in capsys.readouterr().err and not marker.exists()
    assert train_main(_overrides(cfg) + ["resume=true", "iterations=2"]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()
    torch.save(real, state)  # the RNG file is read as strictly
    rng = out / "checkpoints" / "iter_000001" / "rng_rank0.pt"
    torch.save({**torch.load(rng, weights_only=True), "payload": _Payload(marker)}, rng)
    assert train_main(_overrides(cfg) + ["resume=true", "iterations=2"]) == 2
    assert "checkpoint RNG state" in capsys.readouterr().err and not marker.exists()


def test_a_checkpoint_written_before_the_components_kept_their_state_resumes_exactly(lab_world, tmp_path):
    """A trainer state with the old top-level keys (scheduler, optimizer_steps_done, cost_totals) and an RNG file
    holding numpy's state tuple resume to the same run as the new format."""
    def metrics(out, **extra):
        trainer = Trainer(load_config(None, tiny(lab_world, out, **{"iterations": 3, **extra})), log=lambda *a, **k: None)
        return trainer.run()

    straight = metrics(tmp_path / "straight")
    metrics(tmp_path / "old", **{"iterations": 2})
    ckpt = tmp_path / "old" / "checkpoints" / "iter_000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    comp = state.pop("components")
    state.update(scheduler=comp["update"]["scheduler"], optimizer_steps_done=comp["update"]["optimizer_steps_done"],
                 cost_totals=comp["cost"]["totals"], auto_granularities=comp["granularity"])
    torch.save(state, ckpt / "trainer_state.pt")
    rng = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    n = rng["numpy"]
    rng["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    torch.save(rng, ckpt / "rng_rank0.pt")
    random.seed(0)  # the restored states, not these, must drive the rest of the run
    resumed = metrics(tmp_path / "old", resume=True)
    assert [m["iteration"] for m in resumed] == [3]
    for key in ("reward/digit_alignment", "loss", "cost", "lr"):
        assert resumed[0][key] == straight[2][key], key
