"""Triton kernels of g2rpo, installed as ``g2rpo.kernels`` (never as a top-level
``kernels`` package, which would shadow Hugging Face's ``kernels`` that diffusers probes)."""
