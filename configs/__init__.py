"""Training configs (YAML), shipped as ``g2rpo.configs``; ``lab.yaml`` is the embedded default."""
