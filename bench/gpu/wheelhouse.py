"""The GPU wheelhouse as data (``wheels.json``): pins, each wheel's own dependencies, and the checks.

The checks read only ``wheels.json`` and the GPU image's package list below, never the versions
installed in this environment (a resolver may pick others on the day):

    python bench/gpu/wheelhouse.py pins          # name==version, one per line (wheels.sh downloads these)
    python bench/gpu/wheelhouse.py verify DIR    # the downloaded wheels are the pinned ones, with the
                                                 # dependencies wheels.json records
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
#: Python packages of the GPU image (the device tool's KINDS.md, read 2026-11-17) that our wheels may need.
GPU_IMAGE = frozenset({"torch", "torchvision", "triton", "transformers", "peft", "huggingface-hub", "safetensors",
                       "regex", "requests", "filelock", "numpy", "pillow", "tqdm", "timm", "zipp", "pyyaml", "httpx"})
#: The GPU image's Python.
GPU_PYTHON = "3.12"


def norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def load(path: Path = HERE / "wheels.json") -> dict[str, dict]:
    """``{name: {"version": ..., "requires": [...]}}``."""
    return json.loads(Path(path).read_text())["wheels"]


def closure_problems(wheels: dict[str, dict], image: frozenset[str] = GPU_IMAGE,
                     python: str = GPU_PYTHON) -> list[str]:
    """Every runtime dependency of a pinned wheel (markers evaluated for the GPU image's Python) must be in
    the image or pinned itself, at a version the requirement admits when pinned."""
    have = {norm(n): w["version"] for n, w in wheels.items()}
    problems = []
    for name, w in wheels.items():
        for spec in w["requires"]:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": python}):
                continue
            dep = norm(req.name)
            if dep in have:
                if req.specifier and not req.specifier.contains(have[dep], prereleases=True):
                    problems.append(f"{name} needs {spec}, the wheelhouse pins {req.name}=={have[dep]}")
            elif dep not in image:
                problems.append(f"{name} needs {req.name}: add it to wheels.json")
    return problems


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, runtime Requires-Dist without extras) read from a .whl file."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    reqs = [r for r in msg.get_all("Requires-Dist") or [] if "extra ==" not in r.replace("extra==", "extra ==")]
    return msg["Name"], msg["Version"], reqs


def verify(folder: Path, wheels: dict[str, dict]) -> list[str]:
    """Problems with the downloaded wheels in ``folder`` against the pins and recorded dependencies."""
    found = {norm(n): (v, r) for n, v, r in (wheel_metadata(p) for p in sorted(Path(folder).glob("*.whl")))}
    problems = []
    for name, w in wheels.items():
        got = found.get(norm(name))
        if got is None:
            problems.append(f"{name}=={w['version']}: no wheel in {folder}")
            continue
        if got[0] != w["version"]:
            problems.append(f"{name}: wheel {got[0]}, pinned {w['version']}")
        if sorted(map(str, map(Requirement, got[1]))) != sorted(map(str, map(Requirement, w["requires"]))):
            problems.append(f"{name}: the wheel requires {got[1]}, wheels.json records {w['requires']}")
    return problems


def main(argv: list[str]) -> int:
    wheels = load()
    if argv[:1] == ["pins"]:
        print("\n".join(f"{n}=={w['version']}" for n, w in wheels.items()))
        return 0
    if argv[:1] == ["verify"] and len(argv) == 2:
        problems = verify(Path(argv[1]), wheels) + closure_problems(wheels)
        for p in problems:
            print(f"wheelhouse: {p}", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
