"""What a run leaves for use elsewhere: the fused export and, with LoRA, the adapter in diffusers' format."""

import json

import torch
from safetensors.torch import load_file


def test_lora_adapter_loads_with_load_lora_weights_and_equals_the_fused_export(tmp_path, tiny_open_clip):
    from diffusers import FluxPipeline

    from g2rpo.testing.tiny import tiny_flux_pipeline
    from g2rpo.train import main as train_main

    base = tmp_path / "flux"
    tiny_flux_pipeline(seed=0).save_pretrained(base)
    name, state = tiny_open_clip
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\n")
    out = tmp_path / "run"
    assert train_main(["model.kind=flux", f"model.path={base}", "model.dtype=float32", "model.height=32",
                       "model.width=32", "model.max_sequence_length=16",
                       f"rewards=[{{name: hps, options: {{checkpoint: {tmp_path / 'hps.pt'}, model_name: {name}}}}}]",
                       f"data.prompts={tmp_path / 'p.txt'}", "data.prompts_per_iteration=2", "sampler.num_steps=4",
                       "sampler.sde_indices=[0]", "sampler.granularities=[1]", "sampler.group_size=2", "iterations=1",
                       "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "optim.lr=0.05", "progress=false",
                       "tensorboard=false", f"output_dir={out}"]) == 0
    assert json.loads((out / "final" / "g2rpo_export.json").read_text()) == {"iteration": 1, "ema": False,
                                                                               "lora_fused": True}
    assert (out / "final_lora" / "pytorch_lora_weights.safetensors").is_file()
    fused = load_file(str(out / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    pipe = FluxPipeline.from_pretrained(base)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(out / "final_lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    assert after.keys() == fused.keys()
    assert any(not torch.equal(before[k], fused[k]) for k in fused)  # training moved the weights
    for k in fused:  # rank 4, alpha 8: the adapter's scale (2) travels in its metadata
        assert torch.allclose(after[k], fused[k], atol=1e-5), k
