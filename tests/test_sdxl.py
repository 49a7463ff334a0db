"""SDXL-architecture bases, on the built-in tiny SDXL-shaped model (CPU): loading, ED-LoRA on
both text encoders, gradient fusion, regional sampling with an SDXL T2I-Adapter, the
architecture check of packages, the command lines and the federation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, T2IAdapter
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from mos.client.cli import main as client_main
from mos.client.data import load_photo_folder
from mos.client.importer import import_lora
from mos.client.sample import main as sample_main
from mos.client.trainer import train_concept
from mos.common.adapters import AdapterCondition, AdapterError, check_adapter_fits
from mos.common.base import BaseModelError, build_tiny, build_tiny_sdxl, load_base_model
from mos.common.concepts import ConceptTable
from mos.common.config import TrainConfig
from mos.common.export import export_lora, export_single_file
from mos.common.fused import FusedModel, merge_into
from mos.common.lora_formats import LoraFormatError, package_factors
from mos.common.package import ConceptPackage, PackageError, attach_package
from mos.common.pipeline import MixOfShowPipeline
from mos.common.regions import Region
from mos.common.single_file import save_single_file
from mos.server.cli import main as fuse_main
from mos.server.fusion import FusionEngine
from mos.server.report import fidelity
from tests.conftest import random_package, shape_photos


@pytest.fixture
def xl():
    return build_tiny_sdxl()


def test_tiny_sdxl_has_sdxl_shape_and_loads_back_from_its_diffusers_folder(xl, tmp_path):
    assert xl.architecture == "sdxl" and build_tiny().architecture == "sd1"
    te1, te2 = xl.text_encoder.config.hidden_size, xl.text_encoder_2.config.hidden_size
    assert te1 != te2 and xl.text_dim == te1 + te2 == xl.unet.config.cross_attention_dim
    # the tokenizers share their vocabulary and differ in padding, as SDXL's
    assert xl.tokenizer.get_vocab() == xl.tokenizer_2.get_vocab()
    assert xl.tokenizer.pad_token_id != xl.tokenizer_2.pad_token_id
    assert xl.num_cross_attention_layers == 11  # several transformer blocks per attention block
    prefixes = [p for p, _, _ in xl.lora_components()]
    assert prefixes[1] == "text_encoder_2" and prefixes[-1] == "unet"
    xl.save_pretrained(tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    back = load_base_model(tmp_path / "xl")
    assert back.architecture == "sdxl" and back.fingerprint == xl.fingerprint
    assert back.tokenizer_2.pad_token_id == xl.tokenizer_2.pad_token_id


def test_sdxl_single_file_and_hub_loading_fail_offline_with_what_to_do(xl, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "sdxl.safetensors"  # the key that tells an SDXL checkpoint apart
    save_file(
        {"conditioner.embedders.1.model.text_projection": torch.zeros(2, 2)},
        str(ckpt),
    )
    with pytest.raises(BaseModelError, match=r"single-file SDXL checkpoint.*--base-config"):
        load_base_model(ckpt)
    build_tiny().save_pretrained(tmp_path / "sd")  # an SD 1.x config folder for it: refused
    with pytest.raises(BaseModelError, match=r"SD 1.x/2.x folder but .* SDXL checkpoint"):
        load_base_model(ckpt, config=tmp_path / "sd")
    with pytest.raises(BaseModelError, match="Hugging Face hub"):
        load_base_model("stabilityai/stable-diffusion-xl-base-1.0")


def _diffusers_xl(base) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=base.unet,
        scheduler=base.scheduler,
    )


@pytest.mark.parametrize(("guidance", "negative"), [(1.0, ""), (5.0, ""), (5.0, "a red cat")])
def test_sampling_without_concepts_is_what_diffusers_sdxl_pipeline_gives(xl, guidance, negative):
    """Penultimate hidden states of both encoders, the pooled embedding, the time ids and
    SDXL's zero guidance for an empty negative prompt, exactly as diffusers."""
    kw = dict(num_inference_steps=3, guidance_scale=guidance, output_type="latent")
    ours = MixOfShowPipeline.from_base(xl)(
        "a photo of a dog", negative, generator=torch.Generator().manual_seed(0), **kw
    )
    theirs = _diffusers_xl(xl)(
        "a photo of a dog",
        negative_prompt=negative or None,
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _latent(pipe, prompt, regions=(), **kw):
    return pipe(
        prompt,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        regions=regions,
        output_type="latent",
        **kw,
    )


def test_one_full_canvas_region_is_the_plain_prompt_and_a_box_changes_its_area(xl):
    table = ConceptTable()
    attach_package(xl, random_package(xl, "dog1", seed=1), table)
    pipe = MixOfShowPipeline.from_base(xl, table)
    prompt = "a photo of a <dog1>"
    plain = _latent(pipe, prompt, negative_prompt="blurry")
    full = _latent(pipe, prompt, [Region(prompt, (0, 0, 1, 1), "blurry")], negative_prompt="blurry")
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)
    boxed = _latent(pipe, prompt, [Region("a red cat", (0.5, 0, 1, 1))])
    diff = (boxed - _latent(pipe, prompt)).abs().mean(dim=(0, 1, 2))  # per latent column
    assert diff[8:].mean() > diff[:8].mean()  # the box is the right half


def _xl_adapter(base, seed: int = 0) -> T2IAdapter:
    channels = [*base.unet.config.block_out_channels, base.unet.config.block_out_channels[-1]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T2IAdapter(
            in_channels=3,
            channels=channels,
            num_res_blocks=1,
            downscale_factor=2 * base.vae_scale_factor,
            adapter_type="full_adapter_xl",
        )


def test_an_sdxl_t2i_adapter_guides_sdxl_sampling_and_is_refused_on_sd1(xl):
    pipe = MixOfShowPipeline.from_base(xl)
    adapter = _xl_adapter(xl)
    for p in adapter.parameters():  # a random adapter's features are tiny: make them count
        p.data.mul_(4)
    pose = Image.new("RGB", (32, 32), "white")
    plain = _latent(pipe, "a photo of a dog")
    guided = _latent(pipe, "a photo of a dog", adapters=[AdapterCondition(adapter, pose)])
    off = _latent(pipe, "a photo of a dog", adapters=[AdapterCondition(adapter, pose, weight=0)])
    assert not torch.allclose(guided, plain, atol=1e-4)
    torch.testing.assert_close(off, plain)  # weight 0: features scaled to nothing
    sd = build_tiny()
    with pytest.raises(AdapterError, match="SDXL T2I-Adapter"):
        check_adapter_fits(adapter, sd.unet, sd.vae_scale_factor)
    sd_adapter = T2IAdapter(channels=[32, 64, 64], num_res_blocks=1, downscale_factor=2)
    with pytest.raises(AdapterError, match="SD 1.x/2.x T2I-Adapter"):
        check_adapter_fits(sd_adapter, xl.unet, xl.vae_scale_factor)


@pytest.fixture(scope="module")
def xl_packages(tmp_path_factory) -> list[ConceptPackage]:
    root = tmp_path_factory.mktemp("xl")
    config = TrainConfig(steps=20, batch_size=2, lr_unet=3e-3, lr_text=1e-3)
    out = []
    for kind, name in (("disc", "dog1"), ("framed", "cat2")):
        photos = load_photo_folder(shape_photos(root / name, kind, seed=0))
        result = train_concept(build_tiny_sdxl(), photos, name, "dog", config, progress=False)
        out.append(ConceptPackage.load(result.package.save(root / f"{name}.safetensors")))
    return out


def test_edlora_on_sdxl_tunes_both_encoders_and_the_package_records_the_architecture(
    xl_packages,
):
    pkg = xl_packages[0]
    assert pkg.architecture == "sdxl"
    xl = build_tiny_sdxl()
    assert pkg.embeddings.shape == (2, xl.num_cross_attention_layers, xl.text_dim)
    prefixes = {k.split(".", 1)[0] for k in pkg.lora}
    assert prefixes == {"text_encoder", "text_encoder_2", "unet"}
    # both encoders' share of the class word's rows moved in training
    d1 = xl.text_encoder.config.hidden_size
    cls_id = xl.tokenizer("dog", add_special_tokens=False).input_ids[0]
    start = [
        xl.text_encoder.get_input_embeddings().weight[cls_id],
        xl.text_encoder_2.get_input_embeddings().weight[cls_id],
    ]
    word2 = pkg.embeddings[1]  # started at the class word in every layer
    assert not torch.allclose(word2[:, :d1], start[0].expand_as(word2[:, :d1]), atol=1e-4)
    assert not torch.allclose(word2[:, d1:], start[1].expand_as(word2[:, d1:]), atol=1e-4)
    # the second encoder's adapters were trained (B starts at zero)
    b2 = [v for k, v in pkg.lora.items() if k.startswith("text_encoder_2") and "lora_B" in k]
    assert b2 and any(float(b.abs().max()) > 0 for b in b2)


def test_a_package_for_one_architecture_is_refused_by_the_other_naming_both(xl_packages):
    with pytest.raises(PackageError, match=r"tuned on an SDXL base .* this base is SD 1.x"):
        xl_packages[0].check_against(build_tiny())
    sd_package = random_package(build_tiny(), "dog1")  # no architecture recorded: told apart
    assert sd_package.architecture == "" and sd_package.tuned_for == "sd"
    with pytest.raises(PackageError, match=r"tuned on an SD 1.x/2.x base .* this base is SDXL"):
        sd_package.check_against(build_tiny_sdxl())


def test_gradient_fusion_on_sdxl_reproduces_one_concept_and_beats_weight_fusion(xl_packages):
    one = FusionEngine(build_tiny_sdxl(), xl_packages[:1])
    assert any(k.startswith("text_encoder_2.") and p == "text" for k, p in one.part_of.items())
    report = fidelity(one, [one.fuse(progress=False)])
    assert report["concepts"][0]["gradient-fusion"]["unet_drift"] < 1e-3  # ridge only
    assert report["concepts"][0]["gradient-fusion"]["text_drift"] < 1e-3
    both = FusionEngine(build_tiny_sdxl(), xl_packages)
    result = both.fuse(progress=False)
    for stage in ("text", "kv", "spatial"):
        assert result.objective[stage] <= result.objective[f"{stage} (weight fusion)"]
        assert result.objective[f"{stage} (weight fusion)"] > 0
    assert any(k.startswith("text_encoder_2.") for k in result.factors)
    # the compact fused model goes onto an SDXL base and samples
    fused = FusedModel.from_packages(result.strategy, result.factors, xl_packages)
    base = build_tiny_sdxl()
    pipe = MixOfShowPipeline.from_base(base, fused.attach(base))
    assert _latent(pipe, "a photo of a <dog1> and a <cat2>").shape == (1, 4, 16, 16)


@pytest.mark.slow
def test_mos_client_fuse_and_sample_run_on_tiny_sdxl(tmp_path, capsys):
    pkgs = []
    for kind, name in (("disc", "dog1"), ("framed", "cat2")):
        photos = shape_photos(tmp_path / kind, kind, seed=0)
        out = tmp_path / f"{name}.safetensors"
        code = client_main(
            ["--data", str(photos), "--concept", f"<{name}>", "--base-model", "tiny-sdxl",
             "--steps", "3", "--sample-steps", "2", "--out", str(out), "--quiet"]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        pkgs.append(str(out))
    folder = tmp_path / "fused"
    code = fuse_main(
        ["--concepts", *pkgs, "--base-model", "tiny-sdxl", "--out", str(folder), "--steps", "2"]
    )
    assert code == 0, capsys.readouterr().err
    # an ordinary diffusers SDXL folder with the concepts merged in
    stock = StableDiffusionXLPipeline.from_pretrained(folder)
    assert "<dog1_1_l0>" in stock.tokenizer.get_vocab()
    assert "<dog1_1_l0>" in stock.tokenizer_2.get_vocab()
    png = tmp_path / "two.png"
    code = sample_main(
        ["--model", str(folder), "--prompt", "a photo of a <dog1> and a <cat2>",
         "--region", "a photo of a <dog1>@0,0,0.5,1", "--region", "a photo of a <cat2>@0.5,0,1,1",
         "--steps", "2", "--out", str(png)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert Image.open(png).size == (32, 32)
    # the SDXL package on the SD 1.x base: refused by name, nothing written
    code = fuse_main(["--concepts", pkgs[0], "--base-model", "tiny", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "SDXL" in err and "SD 1.x" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_simulation_runs_the_federation_on_tiny_sdxl(tmp_path):
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1")
    demo = Path(sys.executable).parent / "mos-demo"
    out = tmp_path / "demo"
    cmd = [str(demo), "--out", str(out), "--base-model", "tiny-sdxl", "--clients", "2",
           "--steps", "3", "--fusion-steps", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fused = FusedModel.load_compact(out / "server" / "models" / "v1" / "fused.safetensors")
    assert sorted(c.name for c in fused.concepts) == ["ring2", "smiley1"]
    assert any(k.startswith("text_encoder_2.") for k in fused.factors)
    for client in ("ring2", "smiley1"):
        package = ConceptPackage.load(out / "clients" / client / "package.safetensors")
        assert package.architecture == "sdxl"
        assert (out / "clients" / client / "latest.json").is_file()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_loras_leave_and_come_back_in_kohya_and_diffusers_layouts(xl_packages, tmp_path, fmt):
    pkg = xl_packages[0]
    base = build_tiny_sdxl()
    factors = package_factors(pkg.lora)
    report = export_lora(
        base, factors, [pkg.concept], {pkg.concept.name: pkg.embeddings}, tmp_path, fmt,
        torch.float32,
    )  # fmt: skip
    lora_file = Path(report.files[0])
    with safe_open(str(lora_file), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    if fmt == "kohya":  # SDXL's names for the two text encoders
        assert {k.split("_", 2)[1] for k in keys} == {"te1", "te2", "unet"}
    else:
        assert any(k.startswith("text_encoder_2.") for k in keys)
    with safe_open(str(tmp_path / "embeddings" / "dog1.safetensors"), framework="pt") as f:
        d1 = base.text_encoder.config.hidden_size
        assert f.get_tensor("clip_l").shape == (2, d1)
        assert f.get_tensor("clip_g").shape == (2, base.text_dim - d1)
    back, _ = import_lora(base, lora_file, "back", trigger="a dog")
    assert back.architecture == "sdxl"
    again = package_factors(back.lora)
    assert again.keys() == factors.keys()
    for key, (up, down) in factors.items():
        torch.testing.assert_close(again[key][0] @ again[key][1], up @ down, rtol=1e-5, atol=1e-6)
    if fmt == "kohya":
        with pytest.raises(LoraFormatError, match="SDXL LoRA"):
            import_lora(build_tiny(), lora_file, "back", trigger="a dog")


def test_sdxl_single_file_round_trips_and_a_fused_model_exports_to_one(xl_packages, tmp_path):
    base = build_tiny_sdxl()
    base.save_pretrained(tmp_path / "config")
    save_single_file(base, tmp_path / "xl.safetensors")
    with safe_open(str(tmp_path / "xl.safetensors"), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert any(k.startswith("model.diffusion_model.label_emb.") for k in keys)  # pooled + time
    back = load_base_model(tmp_path / "xl.safetensors", config=tmp_path / "config")
    assert back.architecture == "sdxl" and back.fingerprint == base.fingerprint
    for ours, theirs in ((base.unet, back.unet), (base.text_encoder_2, back.text_encoder_2)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a fused model leaves as one checkpoint; its concept rows go to clip_l / clip_g files
    result = FusionEngine(build_tiny_sdxl(), xl_packages).fuse(progress=False)
    fused = FusedModel.from_packages(result.strategy, result.factors, xl_packages)
    merged = build_tiny_sdxl()
    table = fused.attach(merged)
    merge_into(merged)
    report = export_single_file(merged, list(table), fused.embeddings, tmp_path / "f.safetensors")
    assert str(tmp_path / "f.safetensors") in report.files
    loaded = load_base_model(tmp_path / "f.safetensors", config=tmp_path / "config")
    a, b = merged.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    side = tmp_path / "f-embeddings" / "embeddings" / "dog1.safetensors"
    with safe_open(str(side), framework="pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"}  # noqa: SIM118
