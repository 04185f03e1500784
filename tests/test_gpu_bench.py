"""bench/gpu: the one-command GPU acceptance run, exercised on tiny models on CPU so it cannot rot."""

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "gpu" / "run.sh"
STAGES = ["ops", "rollout", "ratio", "train_step", "memory", "graphs"]  # in order of value
@pytest.mark.slow
def test_run_sh_tiny_on_cpu_writes_every_stage(tmp_path, lab_world):
    """Every stage's verdict from its numbers: a budget no loaded machine exhausts (each stage's share is minutes
    where it needs seconds), so a busy machine cannot turn a stage into "out of time" (the 480 s default once did,
    for the ratio stage, beside three other jobs)."""
    out, cache = tmp_path / "acc", tmp_path / "cache"
    (cache / "lab").mkdir(parents=True)
    (cache / "lab" / "base").symlink_to(lab_world)  # the ratio stage reads the lab world from $G2RPO_CACHE
    r = subprocess.run(["bash", str(RUN), "--device", "cpu", "--tiny", "--budget-s", "3000", "--out", str(out)],
                       capture_output=True, text=True, timeout=3600, env=dict(os.environ, G2RPO_CACHE=str(cache)))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == STAGES
    assert all(s["status"] == "ok" for s in report["stages"].values()), report["stages"]
    graphs, ratio = report["stages"]["graphs"], report["stages"]["ratio"]
    assert 1 <= graphs["compiled_graphs"] <= 4 and graphs["graph_breaks"] == 0
    assert graphs["padded_rows"] > 0 and graphs["max_abs_diff_vs_eager"] < 1e-4
    assert ratio["ratio_first_max_dev"] <= 1e-6 and ratio["recompute_forward_rows"] > 0
    rollout = report["stages"]["rollout"]
    assert rollout["engine"]["forward_rows"] == 1708 and rollout["public_loop"]["forward_rows"] == 2188
    assert rollout["engine"]["tflops"] > 0 and rollout["speedup_vs_public_loop"] > 1
    # GPU-only items are reported as skipped, with the reason
    assert "needs a GPU" in report["stages"]["train_step"]["peak_memory_GiB"]["skipped"]
    assert "needs a GPU" in report["stages"]["ops"]["triton"]["skipped"]
    assert "needs a GPU" in report["stages"]["memory"]["max_batch_64"]["peak_GiB"]["skipped"]
    md = (out / "report.md").read_text()
    assert all(f"## {s}: ok" in md for s in STAGES)
    started = [line.split("stage ")[1].split()[0] for line in r.stdout.splitlines() if "] stage " in line]
    assert started == STAGES  # in order of value: the fused ops first


@pytest.mark.slow
def test_run_sh_fits_its_budget_and_sends_back_at_most_4_files(tmp_path):
    """A lent GPU is held 15 minutes (its start included), one command runs at most 10, at most 8 files come back:
    --budget-s bounds the whole run, each stage runs under its share of what is left and is stopped there, and
    what did not fit is reported as not run or out of time. The smallest budget (20 s) leaves no stage its
    time; the stages' order of value is the full run's (test_run_sh_tiny_on_cpu_writes_every_stage). Checked on
    the run's own report of the time it used and the stages it stopped or skipped, not on this test's clock (a
    loaded machine slows the interpreter's start, not the run's arithmetic)."""
    import re
    import tarfile

    out, work = tmp_path / "acc", tmp_path / "work"
    r = subprocess.run(["bash", str(RUN), "--device", "cpu", "--tiny", "--budget-s", "20", "--out", str(out),
                        "--work", str(work)], capture_output=True, text=True, timeout=300)
    used, budget = map(int, re.search(r"\(exit \d+; (\d+)s of (\d+)s\)", r.stdout).groups())
    assert budget == 20 and used <= budget + 5, (used, (r.stdout + r.stderr)[-3000:])  # stops itself; 5 s to report
    assert r.returncode == 1  # not every stage ran: the report says so
    assert sorted(p.name for p in out.iterdir()) == ["details.tar.gz", "gpu_tests.log", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == STAGES
    statuses = [s["status"] for s in report["stages"].values()]
    assert set(statuses) <= {"ok", "not run", "out of time"} and "out of time" in statuses, statuses
    assert statuses.count("ok") < len(STAGES)
    with tarfile.open(out / "details.tar.gz") as tar:
        assert "./setup.json" in tar.getnames()


def test_run_sh_rejects_bad_arguments(tmp_path):
    for args, msg in ((["--device", "cpu"], "--out DIR is required"),
                      (["--out", str(tmp_path), "--stage", "nope"], "unknown stage nope"),
                      (["--out", str(tmp_path), "--device", "tpu"], "--device must be cuda or cpu"),
                      (["--out", str(tmp_path), "--budget-s", "ten"], "--budget-s must be a whole number")):
        r = subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def _wheelhouse():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "bench" / "gpu" / "wheelhouse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wheelhouse_closes_over_the_gpu_image_whatever_is_installed_here(monkeypatch):
    """The check reads wheels.json and the GPU image's list, never this environment: with every installed
    version made to differ from its pin it still passes, and it fails on a real gap."""
    wh = _wheelhouse()
    wheels = wh.load()
    monkeypatch.setattr(metadata, "version", lambda name: "999.0")  # a resolver picked other versions today
    monkeypatch.setattr(metadata, "requires", lambda name: ["not-in-the-image"])
    assert wh.closure_problems(wheels) == []
    text = (ROOT / "bench" / "gpu" / "wheels.sh").read_text()
    assert "wheelhouse.py\" pins" in text and "wheelhouse.py\" verify" in text  # one list of pins
    gap = {**wheels, "ftfy": {**wheels["ftfy"], "requires": ["wcwidth>=9"]}}
    assert wh.closure_problems(gap) == ["ftfy needs wcwidth>=9, the wheelhouse pins wcwidth==0.7.0"]
    gap = {n: w for n, w in wheels.items() if n != "lazy-importer"}
    assert wh.closure_problems(gap) == ["importlib_metadata needs lazy-importer: add it to wheels.json"]
    assert wh.closure_problems(gap, python="3.15") == []  # the marker is evaluated for the image's Python


def test_wheelhouse_verify_reads_the_downloaded_wheels(tmp_path):
    """``wheelhouse.py verify`` compares the wheels' own METADATA with wheels.json (wheels built here)."""
    import zipfile

    wh = _wheelhouse()
    wheels = {"demo-pkg": {"version": "1.0", "requires": ["numpy", 'zipp>=3; python_version < "3.15"']}}
    meta = ("Metadata-Version: 2.1\nName: demo-pkg\nVersion: {v}\nRequires-Dist: numpy\n"
            'Requires-Dist: zipp>=3; python_version < "3.15"\nRequires-Dist: pytest; extra == "test"\n')
    with zipfile.ZipFile(tmp_path / "demo_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("demo_pkg-1.0.dist-info/METADATA", meta.format(v="1.0"))
    assert wh.verify(tmp_path, wheels) == []
    wheels["demo-pkg"]["requires"] = ["numpy"]
    assert "the wheel requires" in wh.verify(tmp_path, wheels)[0]
    assert wh.verify(tmp_path, {"other": {"version": "2", "requires": []}}) == [f"other==2: no wheel in {tmp_path}"]
