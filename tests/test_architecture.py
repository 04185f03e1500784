"""The house: the import graph of g2rpo/ has no loops, no module imports one that stands above it on the
data path, and each model family's name is spelled in at most two files (its registry row, its adapter)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "g2rpo"

#: Floors, bottom to top: a module may import its own floor and those below. ``__main__`` modules are
#: entry points, above everything. Modules not listed fail the test (every new module takes a floor).
FLOORS = [
    ("foundation", ["g2rpo.yaml_numbers", "g2rpo.hub", "g2rpo.distributed", "g2rpo.schedule", "g2rpo.models.registry",
                    "g2rpo.config", "g2rpo.safeload"]),
    ("math", ["g2rpo.sde", "g2rpo.ops*", "g2rpo.loss", "g2rpo.advantage"]),
    ("rollout", ["g2rpo.rollout*"]),
    ("models, rewards, prompts", ["g2rpo.models*", "g2rpo.rewards*", "g2rpo.prompts", "g2rpo.compat*",
                                  "g2rpo.testing*"]),
    ("worlds", ["g2rpo.lab*"]),
    ("configuration and the drop-in API", ["g2rpo.checkpoint", "g2rpo.pipelines"]),
    ("trainer", ["g2rpo.train*"]),
    ("tools above the trainer", ["g2rpo.eval", "g2rpo.export", "g2rpo.experiments*", "g2rpo"]),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.with_suffix("").relative_to(ROOT).parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every g2rpo module each module imports, at module level or inside functions."""
    edges = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    found.add(t)
        # `from . import x` in a package resolves to its own submodules only; drop the package itself
        edges[name] = {t for t in found if not (name.startswith(t + ".") and t != "g2rpo") or t == name}
    return edges


def _floor(name: str) -> int:
    if name.endswith("__main__"):
        return len(FLOORS)
    best = None
    for i, (_, patterns) in enumerate(FLOORS):
        for p in patterns:
            if name == p:  # a module named exactly takes that floor over any pattern (models.registry)
                return i
            if p.endswith("*") and (name == p[:-1] or name.startswith(p[:-1] + ".")):
                best = i
    assert best is not None, f"{name} has no floor in tests/test_architecture.py: give it one"
    return best


def test_the_import_graph_has_no_loops():
    edges = _imports(_modules())
    index, low, stack, on, loops, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert loops == [], f"import loops: {loops}"


def test_no_module_imports_one_above_it():
    edges = _imports(_modules())
    climbs = [f"{a} ({FLOORS[_floor(a)][0] if _floor(a) < len(FLOORS) else 'entry point'}) imports {b} "
              f"({FLOORS[_floor(b)][0]})" for a, bs in sorted(edges.items()) for b in sorted(bs)
              if b != "g2rpo" and _floor(b) > _floor(a)]
    assert climbs == [], "\n".join(climbs)


def test_each_family_name_is_spelled_in_at_most_two_places():
    """A family's name is spelled (as a string) only in its registry row and in its own code: the adapter's
    module (the lab world's package for the lab)."""
    from g2rpo.models.registry import FAMILIES

    for name, fam in FAMILIES.items():
        own = fam.adapter.split(":")[0]
        own = own.rsplit(".", 1)[0] if own.startswith("g2rpo.lab.") else own
        pattern = re.compile(rf"""["']{name}["']""")
        files = sorted(str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if pattern.search(p.read_text()))
        elsewhere = [f for f in files if f != "g2rpo/models/registry.py"
                     and not f.removesuffix(".py").replace("/", ".").startswith(own)]
        assert "g2rpo/models/registry.py" in files and elsewhere == [], (name, elsewhere)


def test_the_checkout_root_holds_no_package_but_g2rpo():
    """Python run from the checkout's root (``python -m pytest``) imports a root folder before any installed
    package: a root ``kernels/`` shadowed Hugging Face's ``kernels`` (which transformers imports), so diffusers
    failed to import."""
    from importlib.metadata import packages_distributions

    installed = packages_distributions()
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "g2rpo"]
    assert "kernels" not in packages
    clashes = {p: installed[p] for p in packages if p in installed and installed[p] != ["g2rpo"]}
    assert not clashes, f"root folders shadow installed packages: {clashes}"


def test_every_package_is_installed():
    """pyproject lists packages by hand: a new subpackage missing there works in an editable install and is absent
    from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert found - listed == set(), sorted(found - listed)


def test_strategy_specific_branches_live_in_the_strategies():
    """Code outside the strategies asks the Strategy interface (sde_steps, candidate_sde_steps,
    continuation_granularities, with_granularities) instead of testing which strategy it holds."""
    pattern = re.compile(r"isinstance\([^)]*(G2RPOStrategy|TrajectoryStrategy)\)|getattr\([^)]*[\"']granularities[\"']"
                         r"|hasattr\([^)]*[\"']sde_steps[\"']")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in PKG.rglob("*.py") if p.name != "strategies.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == [], found


def test_importing_the_config_loads_no_strategy_trainer_model_or_reward():
    """The config is at the bottom: importing it (in a fresh interpreter) loads nothing from ``rollout`` or
    ``train``, no model adapter or reward implementation (the registries of names are fine), and no diffusers,
    transformers or open_clip."""
    import subprocess
    import sys

    code = ("import sys, g2rpo.config; print(' '.join(m for m in sys.modules if m.startswith(('g2rpo', 'diffusers',"
            " 'transformers', 'open_clip'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.split())
    assert "g2rpo.config" in loaded
    above = sorted(m for m in loaded if m.startswith(("g2rpo.rollout", "g2rpo.train", "g2rpo.rewards", "g2rpo.lab",
                                                      "g2rpo.experiments", "diffusers", "transformers", "open_clip"))
                   or m.startswith("g2rpo.models.") and m != "g2rpo.models.registry")
    assert above == [], above


def test_each_family_option_is_named_only_in_its_registry_row_and_adapters():
    """A family option (``model.num_frames``, ...) is spelled only in the registry (its FamilyOption row) and in
    the adapters of the families that take it; the config, eval, logs and the drop-in API loop over the rows.
    The first_frame reward has an option of its own named num_frames (the frames it compares)."""
    from g2rpo.models.registry import FAMILIES, all_family_options

    for name in all_family_options():
        adapters = {"g2rpo/" + f.adapter.split(":")[0].removeprefix("g2rpo.").replace(".", "/") + ".py"
                    for f in FAMILIES.values() if name in f.option_names}
        allowed = {"g2rpo/models/registry.py", *adapters} | ({"g2rpo/rewards/first_frame.py"}
                                                              if name == "num_frames" else set())
        pattern = re.compile(rf"\b{name}\b")
        files = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if pattern.search(p.read_text())}
        assert files - allowed == set(), (name, sorted(files - allowed))


def test_the_training_loop_stays_thin():
    """``train/loop.py`` reads as one iteration's data path (issue 30: about 300 lines or fewer): set-up, the run
    directory, resume, reward scoring, granularity control and signals live in their own modules."""
    lines = (PKG / "train" / "loop.py").read_text().splitlines()
    assert len(lines) <= 300, f"train/loop.py has {len(lines)} lines; move a job it does into its own module"
