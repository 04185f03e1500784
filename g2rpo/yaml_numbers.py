"""YAML with YAML 1.2 / JSON numbers and booleans: ``1e-5``, ``1E-5``, ``.5``, ``1.0e+3`` and JSON's ``1e-08`` are
floats; only ``true`` / ``false`` are booleans (``off``, ``yes``, ``no``, ``on`` stay text).

PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent, so ``1e-5`` (what
users write, and what ``json.dumps`` writes into a run's ``config.json``) would load as a string.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["NumberLoader", "load_yaml"]

_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class NumberLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose float resolver is YAML 1.2's (JSON numbers included)."""


NumberLoader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
NumberLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
# YAML 1.2's core schema: only true / false are booleans (YAML 1.1 also read yes, no, on, off: output_dir=off was
# False, "expected a string")
NumberLoader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"]
                                        for k, v in NumberLoader.yaml_implicit_resolvers.items()}
NumberLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats."""
    return yaml.load(text, Loader=NumberLoader)  # noqa: S506  (a SafeLoader subclass)
