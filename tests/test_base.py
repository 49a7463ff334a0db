import os

import pytest
import torch

from mos.common.attention import cross_attention_layers
from mos.common.base import BaseModelError, build_tiny, load_base_model
from mos.common.single_file import save_single_file


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_is_sd1_shaped_and_deterministic(tiny):
    layers = cross_attention_layers(tiny.unet)
    assert len(layers) == tiny.num_cross_attention_layers == 7
    # cross-attention at two or more resolutions: down blocks 0 and 1 both carry it
    assert {n.split(".")[1] for n, _ in layers if n.startswith("down_blocks")} == {"0", "1"}
    assert tiny.unet.config.cross_attention_dim == tiny.text_dim
    assert tiny.noise_scheduler.config.clip_sample is False
    again = build_tiny()
    assert _states_equal(tiny.unet, again.unet) and _states_equal(tiny.vae, again.vae)
    assert tiny.fingerprint == again.fingerprint
    assert build_tiny(1).fingerprint != tiny.fingerprint
    assert load_base_model("tiny:1").fingerprint == build_tiny(1).fingerprint


def test_fingerprint_ignores_fp16_storage_but_sees_weight_changes(tiny):
    half = build_tiny()
    half.unet.half()
    half.text_encoder.half()
    from mos.common.base import base_fingerprint

    assert base_fingerprint(half) == tiny.fingerprint
    with torch.no_grad():
        tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight[0, 0] += 1
    assert base_fingerprint(tiny) != tiny.fingerprint


def test_diffusers_folder_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    loaded = load_base_model(tmp_path / "m")
    assert loaded.fingerprint == tiny.fingerprint
    assert _states_equal(loaded.unet, tiny.unet) and _states_equal(
        loaded.text_encoder, tiny.text_encoder
    )


def test_single_file_checkpoint_loads_with_local_config(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "config")
    ckpt = save_single_file(tiny, tmp_path / "model.safetensors")
    keys = set(__import__("safetensors").safe_open(str(ckpt), "pt").keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    loaded = load_base_model(ckpt, config=tmp_path / "config")
    for a, b in (
        (loaded.unet, tiny.unet),
        (loaded.vae, tiny.vae),
        (loaded.text_encoder, tiny.text_encoder),
    ):
        assert _states_equal(a, b)
    assert loaded.fingerprint == tiny.fingerprint


def test_single_file_without_config_offline_says_what_to_do(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = save_single_file(tiny, tmp_path / "model.safetensors")
    with pytest.raises(BaseModelError, match="--base-config"):
        load_base_model(ckpt)
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_base_model(ckpt, config=tmp_path)


def test_bad_specs_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="hub"):
        load_base_model("someone/no-such-model")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(BaseModelError, match="pickle"):
        load_base_model(tmp_path / "x.ckpt")
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_base_model(tmp_path)
    with pytest.raises(BaseModelError, match="not found"):
        load_base_model(str(tmp_path / "missing"))
    with pytest.raises(BaseModelError, match="no such checkpoint"):
        load_base_model(tmp_path / "missing.safetensors")
    with pytest.raises(BaseModelError, match="integer seed"):
        load_base_model("tiny:abc")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow
def test_fingerprint_is_the_same_in_every_process():
    """The tiny model and its tokenizer must not depend on hash order (PYTHONHASHSEED)."""
    import subprocess
    import sys

    code = "from mos.common.base import build_tiny; print(build_tiny().fingerprint)"
    prints = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(prints) == 1 and build_tiny().fingerprint in prints


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_is_what_the_scheduler_steps_with(kind):
    """A UNet that predicted the target exactly would let the sampler recover the clean
    latents: the scheduler's own x0 formula for each prediction type gives them back."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from mos.common.base import SD_SCHEDULER_CONFIG, denoising_target

    config = dict(SD_SCHEDULER_CONFIG, prediction_type=kind)
    train, sample = DDPMScheduler.from_config(config), DDIMScheduler.from_config(config)
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500, 990])
    noisy = train.add_noise(latents, noise, t)
    target = denoising_target(train, latents, noise, t)
    sample.set_timesteps(1000)
    for i in range(3):
        step = sample.step(target[i : i + 1], int(t[i]), noisy[i : i + 1], eta=0.0)
        torch.testing.assert_close(step.pred_original_sample, latents[i : i + 1], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        denoising_target(
            DDPMScheduler.from_config(dict(config, prediction_type="x")), latents, noise, t
        )
