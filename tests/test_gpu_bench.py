"""bench/gpu: the one-command GPU acceptance run, exercised on tiny models on CPU so it cannot rot."""

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "gpu" / "run.sh"
STAGES = ["rollout", "graphs", "ops", "train_step", "ratio", "memory"]
# Python packages of the GPU image (the device tool's KINDS.md, read 2026-11-17) that our wheels may need
GPU_IMAGE = {"torch", "torchvision", "triton", "transformers", "peft", "huggingface-hub", "safetensors", "regex",
             "requests", "filelock", "numpy", "pillow", "tqdm", "timm", "zipp", "pyyaml", "httpx"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_run_sh_tiny_on_cpu_writes_every_stage(tmp_path):
    out = tmp_path / "acc"
    r = subprocess.run(["bash", str(RUN), "--device", "cpu", "--tiny", "--out", str(out)], capture_output=True,
                       text=True, timeout=1200)
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


def test_run_sh_rejects_bad_arguments(tmp_path):
    for args, msg in ((["--device", "cpu"], "--out DIR is required"),
                      (["--out", str(tmp_path), "--stage", "nope"], "unknown stage nope"),
                      (["--out", str(tmp_path), "--device", "tpu"], "--device must be cuda or cpu")):
        r = subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_wheelhouse_pins_the_tested_versions_and_closes_the_dependencies():
    """wheels.sh pins the versions installed here (the ones the suite passes with), and every
    dependency of a wheel is either in the GPU image or in the wheelhouse itself."""
    text = (ROOT / "bench" / "gpu" / "wheels.sh").read_text()
    pins = dict(p.split("==") for p in re.search(r"WHEELS=\(([^)]*)\)", text).group(1).split())
    for name, version in pins.items():
        assert metadata.version(name) == version, name
    have = GPU_IMAGE | {_norm(n) for n in pins}
    for name in pins:
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue
            assert _norm(req.name) in have, f"{name} needs {req.name}: add it to wheels.sh"
