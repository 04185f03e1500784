"""The drop-in path (issue 14): pipeline-level rollouts, training units, the examples and every
Python block of the README, run as written on tiny pipelines built here."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from g2rpo.testing.tiny import tiny_flux_pipeline, tiny_sd3_pipeline
from g2rpo.pipelines import policy_for, rollout, unit_log_probs

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["g2rpo", "g2rpo_no_mgai", "dance_grpo", "flow_grpo", "mix_grpo"]
SMALL = dict(num_steps=6, group_size=3, sde_indices=[0, 2], height=32, width=32, max_sequence_length=16)


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_units_cover_every_transition_once_and_are_on_policy(strategy):
    pipe = tiny_flux_pipeline()
    out = rollout(pipe, ["a cat", "a dog"], strategy=strategy, **SMALL)
    ro = out.rollout
    P, K, G = ro.log_probs.shape
    seen = torch.zeros(P, K, G, dtype=torch.int64)
    calls = {"rows": 0}
    real = out.policy.forward

    def counting(x, sigma, cond):
        calls["rows"] += x.shape[0]
        return real(x, sigma, cond)

    out.policy.forward = counting
    for unit in ro.training_units():
        seen[unit.prompt, unit.slot, unit.branches] += 1
        before = calls["rows"]
        logp = unit_log_probs(out.policy, ro, unit, out.cond)
        assert calls["rows"] - before == 1  # ONE forward at the unit's source state
        assert torch.allclose(logp, unit.old_log_probs, atol=1e-5)
        assert torch.equal(unit.x, ro.x_k[unit.prompt, unit.source])
    assert (seen == 1).all()
    assert out.images.shape[0] == len(out.prompts_per_image) == P * ro.finals.shape[1] * ro.finals.shape[2] * G


def test_sd3_and_qwen_image_pipeline_rollouts_and_unsupported_pipelines():
    out = rollout(tiny_sd3_pipeline(), ["a cat"], strategy="g2rpo", guidance_scale=1.0, **SMALL)
    assert out.images.shape[1:] == (3, 32, 32) and out.rollout.forward_rows > 0
    from g2rpo.testing.tiny import tiny_qwen_image_pipeline

    out = rollout(tiny_qwen_image_pipeline(), ["a cat", "a dog on a sled"], strategy="dance_grpo",
                  guidance_scale=1.0, **dict(SMALL, max_sequence_length=256))
    assert out.images.shape == (2 * 3, 3, 32, 32)
    for unit in list(out.rollout.training_units())[:3]:
        assert torch.allclose(unit_log_probs(out.policy, out.rollout, unit, out.cond), unit.old_log_probs, atol=1e-5)
    with pytest.raises(TypeError, match="not supported"):
        policy_for(object())
    with pytest.raises(ValueError, match="non-empty list"):
        rollout(tiny_flux_pipeline(), [], **SMALL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropin_example_runs_every_strategy(flux_dir, strategy, capsys):
    ex = _example("dropin_flux_grpo")
    assert ex.main(["--pipeline", str(flux_dir), "--strategy", strategy, "--iterations", "2", "--height", "32",
                    "--width", "32", "--group-size", "3", "--steps", "6", "--lr", "1e-3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iteration")]
    assert len(lines) == 2 and "reward" in lines[0]
    forwards = int(re.search(r"(\d+) training forwards", lines[0]).group(1))
    # 2 prompts, 6 steps, G=3: G2RPO one unit per (prompt, SDE step 0 or 2: after 1 and 3, two of Lambda {1,2,3}
    # share a continuation at T = 6), w/o MGAI per (prompt, step 0..4); DanceGRPO the shared first state then one per branch and step; Flow-GRPO
    # (independent noise) one per branch and step; MixGRPO its window
    expected = {"g2rpo": 4, "g2rpo_no_mgai": 10, "dance_grpo": 2 * (1 + 3 * 5), "flow_grpo": 2 * 3 * 6,
                "mix_grpo": 2 * (1 + 3 * 3)}
    assert forwards == expected[strategy]


def test_flow_grpo_swap_example(flux_dir, capsys):
    assert _example("flow_grpo_swap").main(["--pipeline", str(flux_dir), "--height", "32", "--width", "32",
                                            "--steps", "6", "--group-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "Flow-GRPO loop with g2rpo's step" in out and "G2RPO rollout" in out


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("i", range(len(_readme_blocks())))
def test_readme_python_block_runs_as_written(i):
    block = _readme_blocks()[i]
    reason = re.search(r"#\s*requires:\s*(.+)", block)
    if reason:
        pytest.skip(f"README block {i} needs {reason.group(1).strip()}")
    exec(compile(block, f"README.md block {i}", "exec"), {"__name__": "__readme__"})


def test_the_readme_shows_the_one_import_swap():
    text = (ROOT / "README.md").read_text()
    assert "from g2rpo.compat.flow_grpo import sde_step_with_logprob" in text
    assert len(_readme_blocks()) >= 3


@pytest.mark.slow
def test_tiny_pipeline_command_saves_a_loadable_pipeline(tmp_path, capsys):
    """`python -m g2rpo.testing tiny-pipeline flux DIR` (the README's way to try the examples offline)."""
    from diffusers import FluxPipeline

    from g2rpo.testing.__main__ import main

    assert main(["tiny-pipeline", "flux", str(tmp_path / "f")]) == 0
    assert "saved a tiny FluxPipeline" in capsys.readouterr().out
    pipe = FluxPipeline.from_pretrained(tmp_path / "f")
    assert pipe.transformer.config.num_layers == 1
    with pytest.raises(SystemExit) as exit_:
        main(["tiny-pipeline", "sdxl", str(tmp_path / "g")])
    assert exit_.value.code == 2 and "invalid choice: 'sdxl'" in capsys.readouterr().err


def test_library_inputs_get_clear_errors():
    from g2rpo import G2RPOSampler
    from g2rpo.testing import GaussianWorld
    from g2rpo.testing.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    for kwargs, msg in (({"prompts": "cat"}, "got one string 'cat'"), ({"prompts": []}, "non-empty list"),
                        ({"height": 0}, "height must be an int >= 1"), ({"seed": 2**64}, "seed must be an int")):
        args = {"prompts": ["a cat"], "num_steps": 4, "group_size": 2, "sde_indices": [0], "height": 32, "width": 32}
        args.update(kwargs)
        with pytest.raises(ValueError, match=msg):
            rollout(pipe, args.pop("prompts"), **args)
    with pytest.raises(ValueError, match="same ODE continuation"):
        G2RPOSampler(GaussianWorld(), num_steps=6, sde_indices=[3], granularities=[4, 5])
    with pytest.raises(ValueError, match="group_size 1000000"):
        G2RPOSampler(GaussianWorld(), num_steps=16, group_size=1_000_000)
    with pytest.raises(ValueError, match="no prompt"):
        G2RPOSampler(GaussianWorld(), num_steps=4, sde_indices=[0], group_size=2).rollout(torch.zeros(0, 4))


@pytest.mark.slow
def test_the_readmes_tiny_flux_training_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's first run on a tiny Flux: each command of the bash block, its arguments as written (shlex, as
    bash splits them), given to its module's main() in this process (output under a temporary folder)."""
    import importlib
    import shlex

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "tiny-pipeline flux /tmp/tiny-flux" in b)
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert [c[:3] for c in commands] == [["python", "-m", "g2rpo.testing"], ["python", "-m", "g2rpo.train"]]
    for cmd in commands:
        module = importlib.import_module(cmd[2] + ".__main__" if cmd[2] == "g2rpo.testing" else cmd[2])
        assert module.main(cmd[3:]) == 0, capsys.readouterr().err[-2000:]
    assert "wall clock:" in capsys.readouterr().out
    lines = (tmp_path / "runs" / "tiny-flux" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "reward/g2rpo.testing:brightness" in lines[-1]
