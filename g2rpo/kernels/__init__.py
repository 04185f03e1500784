"""Triton kernels of g2rpo (``g2rpo.kernels``). They live inside the package: a top-level ``kernels/`` folder in
the checkout would shadow Hugging Face's ``kernels`` package (which transformers imports) whenever Python runs
from the checkout's root, as ``python -m pytest`` does, and diffusers would then fail to import."""
