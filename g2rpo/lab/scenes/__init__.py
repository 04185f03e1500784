"""The scenes lab world: coloured compositional scenes (GenEval's six categories) rendered procedurally, a tiny
Flux transformer pretrained on them over an object-slot latent (``latent.py``), learned in-domain rewards
(``scene_clip``, ``scene_preference``) and out-of-domain judges (``scene_exact``: rules; ``scene_detector``: a
learned detector and the rules)."""
