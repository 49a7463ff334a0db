"""LoRAs and checkpoints of other tools: import (kohya, diffusers), export (diffusers,
kohya, single file), checked against stock diffusers on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mos.client.importer import import_lora, read_embedding
from mos.client.importer import main as import_main
from mos.common.base import build_tiny, load_base_model, sd_pipeline_class
from mos.common.concepts import Concept
from mos.common.export import collapsed_embedding, export_lora
from mos.common.export import main as export_main
from mos.common.fused import FusedModel, load_fused_folder
from mos.common.lora_formats import (
    LoraFormatError,
    base_layers,
    kohya_name,
    package_factors,
    to_kohya,
)
from mos.common.package import ConceptPackage, expected_lora_shapes
from mos.common.pipeline import MixOfShowPipeline
from mos.server.cli import main as fuse_main
from mos.server.fusion import FusionEngine

from .conftest import random_package

STEPS = 3


def _image(pipe, prompt: str) -> torch.Tensor:
    """One seed-0 sample at 64 px; the same call for our pipeline and stock diffusers'."""
    out = pipe(
        prompt,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        height=64,
        width=64,
    )
    return out.images if hasattr(out, "images") else out


def _stock(folder: Path):
    return sd_pipeline_class().from_pretrained(str(folder), safety_checker=None)


def _vanilla_package(base, name: str, seed: int, rank: int = 2) -> ConceptPackage:
    """A vanilla-LoRA package (one token, one embedding) with random factors."""
    g = torch.Generator().manual_seed(seed)
    lora = {
        k: torch.randn(*s, generator=g) * (0.05 if ".lora_B." in k else 0.3)
        for k, s in expected_lora_shapes(base, rank).items()
    }
    emb = torch.randn(1, 1, base.text_dim, generator=g) * 0.02
    return ConceptPackage(Concept(name, "dog", "lora", 1), rank, emb, lora, base.fingerprint)


def _peft_lora_file(folder: Path, out: Path, rank: int = 2, alpha: int = 4):
    """A LoRA made by stock diffusers + PEFT on the tiny model (random, non-zero factors),
    saved with ``save_lora_weights``; returns the pipeline carrying it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = _stock(folder)
    torch.manual_seed(0)
    ucfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    tcfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        init_lora_weights=False,
    )
    pipe.unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    type(pipe).save_lora_weights(
        str(out),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder)
        ),
        unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict(),
    )
    return pipe


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    build_tiny().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _kohya_file(base, path: Path, ranks=(1, 3), alpha: float = 2.0, extra=None, conv: bool = False):
    """A kohya-named LoRA written by hand: ranks alternate between layers, every layer has
    ``alpha``; returns the brute-force update of every layer."""
    g = torch.Generator().manual_seed(7)
    tensors, updates = {}, {}
    for i, (key, layer) in enumerate(base_layers(base, conv=conv).items()):
        if layer.conv and ".resnets.0.conv1" not in key:
            continue
        r = 2 if layer.conv else ranks[i % len(ranks)]
        down = torch.randn(r, *layer.down_shape, generator=g) * 0.3
        up_shape = (layer.out_features, r, 1, 1) if layer.conv else (layer.out_features, r)
        up = torch.randn(*up_shape, generator=g) * 0.05
        name = kohya_name(key)
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
        u, d = up.half().float().reshape(up.shape[0], -1), down.half().float().reshape(r, -1)
        updates[key] = alpha / r * u @ d
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return updates


def test_kohya_lora_imports_exactly_with_alpha_and_mixed_ranks(tmp_path):
    base = build_tiny()
    updates = _kohya_file(base, tmp_path / "k.safetensors", conv=True)
    pkg, report = import_lora(base, tmp_path / "k.safetensors", "rex", trigger="sks  dog")
    assert report.format == "kohya" and report.rank == 3 and report.conv_rank == 2
    assert report.padded > 0 and set(report.alpha_scales) == {2.0, 1.0, 2.0 / 3}
    assert pkg.concept.method == "trigger" and pkg.concept.trigger == "sks dog"
    got = package_factors(pkg.lora)
    for key, layer in base_layers(base, conv=True).items():
        up, down = got[key]
        want = updates.get(key, torch.zeros(layer.out_features, layer.in_flat))
        torch.testing.assert_close(up @ down, want, atol=1e-6, rtol=1e-5)
    # the package is an ordinary one: saved, loaded, attached, sampled with the trigger words
    pkg.save(tmp_path / "rex.safetensors")
    again = ConceptPackage.load(tmp_path / "rex.safetensors")
    assert again.concept == pkg.concept and again.embeddings.shape == (0, 1, base.text_dim)
    pipe = MixOfShowPipeline.from_packages(base, [again])
    assert pipe.concepts.expand("a photo of <rex>", 2) == ["a photo of sks dog"] * 2


def test_import_refuses_what_it_cannot_hold_naming_the_key(tmp_path):
    base = build_tiny()
    ff = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    extra = {
        f"{ff}.lora_down.weight": torch.randn(2, 128),
        f"{ff}.lora_up.weight": torch.randn(32, 2),
    }
    _kohya_file(base, tmp_path / "k.safetensors", extra=extra)
    with pytest.raises(LoraFormatError, match=f"{ff}.*--skip-unmapped"):
        import_lora(base, tmp_path / "k.safetensors", "rex", trigger="sks dog")
    pkg, report = import_lora(
        base, tmp_path / "k.safetensors", "rex", trigger="sks dog", skip_unmapped=True
    )
    assert report.skipped == [ff] and 0 < report.skipped_share < 1
    assert pkg.training["skipped_layers"] == [ff]

    # a LoRA for another base: the shape that does not fit is named
    key = next(iter(base_layers(base)))
    save_file(
        {
            f"{kohya_name(key)}.lora_down.weight": torch.randn(2, 1024),
            f"{kohya_name(key)}.lora_up.weight": torch.randn(32, 2),
        },
        str(tmp_path / "other.safetensors"),
    )
    with pytest.raises(LoraFormatError, match=f"{kohya_name(key)}.*another base"):
        import_lora(base, tmp_path / "other.safetensors", "rex", trigger="sks dog")

    # other adapter kinds, pickles, files that are no LoRA
    name = kohya_name(key)
    save_file({f"{name}.hada_w1_a": torch.randn(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoraFormatError, match="hada_w1_a.*LoHa"):
        import_lora(base, tmp_path / "loha.safetensors", "rex", trigger="sks dog")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(LoraFormatError, match="never unpickles"):
        import_lora(base, tmp_path / "x.ckpt", "rex", trigger="sks dog")
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(LoraFormatError, match="not a LoRA"):
        import_lora(base, tmp_path / "m.safetensors", "rex", trigger="sks dog")


def test_mos_import_command_writes_a_package_and_explains_bad_input(tmp_path, capsys):
    base = build_tiny()
    _kohya_file(base, tmp_path / "k.safetensors")
    out = tmp_path / "rex.safetensors"
    argv = [str(tmp_path / "k.safetensors"), "--concept", "<rex>", "--out", str(out)]
    assert import_main(argv) == 2
    assert "--trigger" in capsys.readouterr().err and not out.exists()
    assert import_main([*argv, "--trigger", "sks dog"]) == 0
    assert ConceptPackage.load(out).concept.trigger == "sks dog"
    assert import_main([*argv, "--trigger", "sks dog"]) == 2
    assert "--force" in capsys.readouterr().err

    # a textual-inversion embedding instead of trigger words: a vanilla-LoRA concept
    vec = torch.randn(1, base.text_dim)
    save_file({"emb_params": vec}, str(tmp_path / "ti.safetensors"))
    ti_out = tmp_path / "ti-pkg.safetensors"
    assert (
        import_main(
            [*argv[:3], "--out", str(ti_out), "--embedding", str(tmp_path / "ti.safetensors")]
        )
        == 0
    )
    pkg = ConceptPackage.load(ti_out)
    assert pkg.concept.method == "lora"
    torch.testing.assert_close(pkg.embeddings.reshape(-1), vec.reshape(-1))
    save_file({"emb_params": torch.randn(3, base.text_dim)}, str(tmp_path / "ti3.safetensors"))
    with pytest.raises(Exception, match="3 vectors"):
        read_embedding(tmp_path / "ti3.safetensors", base.text_dim)


def test_stock_diffusers_lora_imports_and_samples_exactly_as_diffusers(tmp_path, tiny_folder):
    stock = _peft_lora_file(tiny_folder, tmp_path / "dl", rank=2, alpha=4)
    want = _image(stock, "a photo of sks dog")
    base = build_tiny()
    pkg, report = import_lora(
        base, tmp_path / "dl" / "pytorch_lora_weights.safetensors", "rex", trigger="sks dog"
    )
    assert report.format == "diffusers" and set(report.alpha_scales) == {2.0}
    got = _image(MixOfShowPipeline.from_packages(base, [pkg]), "a photo of <rex>")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # without the alpha the images differ: the test sees the scale
    plain = _image(
        MixOfShowPipeline.from_packages(build_tiny(), [_halved(pkg)]), "a photo of <rex>"
    )
    assert (plain - want).abs().max() > 1e-3


def _halved(pkg: ConceptPackage) -> ConceptPackage:
    lora = {k: v / 2 if ".lora_B." in k else v for k, v in pkg.lora.items()}
    return ConceptPackage(pkg.concept, pkg.rank, pkg.embeddings, lora, pkg.base_fingerprint)


def _fused(packages: list[ConceptPackage]):
    engine = FusionEngine(build_tiny(), packages)
    result = engine.fuse(progress=False)
    return engine, result


def test_imported_and_edlora_packages_fuse_by_gradient_fusion(tmp_path, tiny_folder):
    base = build_tiny()
    _kohya_file(base, tmp_path / "k.safetensors")
    _peft_lora_file(tiny_folder, tmp_path / "dl")
    kohya, _ = import_lora(base, tmp_path / "k.safetensors", "rex", trigger="sks dog")
    peft, _ = import_lora(
        base, tmp_path / "dl" / "pytorch_lora_weights.safetensors", "tom", trigger="a tabby cat"
    )
    ed = [random_package(base, "dog1", seed=1), random_package(base, "dog2", seed=2)]
    engine, result = _fused([kohya, peft, *ed])
    for part in ("text", "kv", "spatial"):
        assert result.objective[part] <= result.objective[f"{part} (weight fusion)"] * (1 + 1e-6)
    fused = FusedModel.from_packages(result.strategy, result.factors, [kohya, peft, *ed])
    fused.save_compact(tmp_path / "fused.safetensors")
    again = FusedModel.load_compact(tmp_path / "fused.safetensors")
    ours = build_tiny()
    table = again.attach(ours)
    assert table.expand("<rex> and <tom>", 1) == ["sks dog and a tabby cat"]
    assert [c.method for c in again.concepts] == ["trigger", "trigger", "edlora", "edlora"]
    want = _image(MixOfShowPipeline.from_base(ours, table), "a photo of <rex>")
    # the fused model's LoRA export, in stock diffusers, draws the imported concept the same
    export_lora(
        base,
        again.factors,
        again.concepts,
        again.embeddings,
        tmp_path / "x",
        "diffusers",
        torch.float32,
    )
    stock = _stock(tiny_folder)
    stock.load_lora_weights(str(tmp_path / "x"), weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(_image(stock, "a photo of sks dog"), want, atol=1e-4, rtol=0)


def test_exported_lora_of_a_fused_model_reproduces_it_in_stock_diffusers(tmp_path, tiny_folder):
    base = build_tiny()
    packages = [_vanilla_package(base, "cat2", seed=3), random_package(base, "dog1", seed=1)]
    engine, result = _fused(packages)
    fused = FusedModel.from_packages(result.strategy, result.factors, packages)
    report = export_lora(
        base,
        fused.factors,
        fused.concepts,
        fused.embeddings,
        tmp_path / "x",
        "diffusers",
        torch.float32,
    )
    ours_base = build_tiny()
    table = fused.attach(ours_base)
    want = _image(MixOfShowPipeline.from_base(ours_base, table), "a photo of <cat2>")

    stock = _stock(tiny_folder)
    stock.load_textual_inversion(
        str(tmp_path / "x" / "embeddings" / "cat2.safetensors"), token="<cat2>"
    )
    assert (_image(stock, "a photo of <cat2>") - want).abs().max() > 1e-3  # the LoRA matters
    stock.load_lora_weights(str(tmp_path / "x"), weight_name="pytorch_lora_weights.safetensors")
    got = _image(stock, "a photo of <cat2>")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the ED-LoRA concept's per-layer embeddings are collapsed, and the report says so
    assert any("<dog1>" in line and "collapsed" in line for line in report.lost)
    mean, spread = collapsed_embedding(packages[1].concept, packages[1].embeddings)
    assert mean.shape == (2, base.text_dim) and report.layer_spread["<dog1>"] == spread > 0


def test_kohya_export_imports_back_to_the_same_update(tmp_path):
    base = build_tiny()
    pkg = _vanilla_package(base, "cat2", seed=3)
    layers = base_layers(base)
    save_file(
        to_kohya(package_factors(pkg.lora), layers, torch.float32), str(tmp_path / "k.safetensors")
    )
    back, _ = import_lora(base, tmp_path / "k.safetensors", "cat2x", trigger="cat")
    for key, (up, down) in package_factors(pkg.lora).items():
        u, d = package_factors(back.lora)[key]
        torch.testing.assert_close(u @ d, up @ down, atol=1e-6, rtol=1e-5)


def test_mos_fuse_single_file_reads_back_in_diffusers_with_the_same_weights(tmp_path, tiny_folder):
    base = build_tiny()
    paths = []
    for i, pkg in enumerate([_vanilla_package(base, "cat2", 3), random_package(base, "dog1", 1)]):
        paths.append(tmp_path / f"p{i}.safetensors")
        pkg.save(paths[-1])
    ckpt = tmp_path / "fused.safetensors"
    argv = ["--concepts", *map(str, paths), "--out", str(tmp_path / "f"), "--no-grid"]
    assert fuse_main([*argv, "--single-file", str(ckpt)]) == 0
    merged, table = load_fused_folder(tmp_path / "f")
    # diffusers' own single-file loader, with the configs of the base folder
    loaded = load_base_model(ckpt, config=tiny_folder)
    for ours, theirs in ((merged.unet, loaded.unet), (merged.vae, loaded.vae)):
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    te_ours, te_theirs = merged.text_encoder.state_dict(), loaded.text_encoder.state_dict()
    for k, b in te_theirs.items():
        a = te_ours[k]
        if "token_embedding" in k:  # the concept tokens' rows travel as embedding files
            assert a.shape[0] == b.shape[0] + 1 + 2 * merged.num_cross_attention_layers
            a = a[: b.shape[0]]
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    side = tmp_path / "fused-embeddings" / "embeddings"
    assert sorted(p.name for p in side.iterdir()) == ["cat2.safetensors", "dog1.safetensors"]
    report = json.loads((tmp_path / "fused-export_report.json").read_text())
    assert any("<dog1>" in line for line in report["lost"])
    # and mos-export writes the same checkpoint from the fused folder
    again = tmp_path / "again.safetensors"
    assert export_main([str(tmp_path / "f"), "--format", "single-file", "--out", str(again)]) == 0
    assert again.read_bytes() == ckpt.read_bytes()
    assert table.known_tokens() == ["<cat2>", "<dog1>"]


def test_stock_diffusion_pipeline_loads_a_fused_folder_with_its_concepts(tmp_path):
    from diffusers import DiffusionPipeline

    base = build_tiny()
    packages = [_vanilla_package(base, "cat2", 3), random_package(base, "dog1", 1)]
    for i, pkg in enumerate(packages):
        pkg.save(tmp_path / f"p{i}.safetensors")
    argv = ["--concepts", str(tmp_path / "p0.safetensors"), str(tmp_path / "p1.safetensors")]
    assert fuse_main([*argv, "--out", str(tmp_path / "f"), "--no-grid"]) == 0
    merged, table = load_fused_folder(tmp_path / "f")
    want = _image(MixOfShowPipeline.from_base(merged, table), "<dog1> beside <cat2>")

    pipe = DiffusionPipeline.from_pretrained(
        str(tmp_path / "f"), custom_pipeline="mix_of_show", trust_remote_code=True
    )
    assert isinstance(pipe, MixOfShowPipeline)
    assert pipe.concepts.known_tokens() == ["<cat2>", "<dog1>"]
    torch.testing.assert_close(_image(pipe, "<dog1> beside <cat2>"), want, atol=1e-6, rtol=0)
    # save_pretrained writes what from_pretrained reads, by either door
    pipe.save_pretrained(tmp_path / "again")
    for again in (
        MixOfShowPipeline.from_pretrained(tmp_path / "again"),
        DiffusionPipeline.from_pretrained(
            str(tmp_path / "again"), custom_pipeline="mix_of_show", trust_remote_code=True
        ),
    ):
        assert again.concepts.known_tokens() == ["<cat2>", "<dog1>"]
        torch.testing.assert_close(_image(again, "<dog1> beside <cat2>"), want, atol=1e-6, rtol=0)
    # without custom_pipeline it is an ordinary Stable Diffusion folder
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "f"))).__name__ == (
        "StableDiffusionPipeline"
    )


def _tiny_sd2(folder: Path) -> Path:
    """A tiny SD 2.x-shaped model as a diffusers folder: v-prediction, linear projections
    in the transformer blocks, a wider GELU text encoder (OpenCLIP's activation) and a
    per-block head count."""
    from mos.common.base import SD_SCHEDULER_CONFIG, BaseModel, build_components, tiny_configs
    from mos.common.tokenizer import build_tiny_tokenizer

    configs = tiny_configs()
    configs["unet"].update(
        use_linear_projection=True, cross_attention_dim=48, attention_head_dim=(2, 4, 4)
    )
    configs["text_encoder"].update(hidden_size=48, projection_dim=48, hidden_act="gelu")
    tokenizer = build_tiny_tokenizer()
    te, unet, vae = build_components(configs, tokenizer, seed=5)
    scheduler = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    BaseModel.from_components(tokenizer, te, unet, vae, "sd2", scheduler).save_pretrained(folder)
    return folder


def test_an_sd2_shaped_base_tunes_fuses_and_samples(tmp_path):
    from mos.client.data import load_photo_folder
    from mos.client.trainer import train_concept
    from mos.common.config import TrainConfig

    from .conftest import make_photos

    folder = _tiny_sd2(tmp_path / "sd2")
    base = load_base_model(folder)
    assert base.noise_scheduler.config.prediction_type == "v_prediction" and base.text_dim == 48
    photos = load_photo_folder(make_photos(tmp_path / "photos"))
    config = TrainConfig(steps=4, embedding_norm_threshold=0)
    packages = [
        train_concept(load_base_model(folder), photos, n, "dog", config, progress=False).package
        for n in ("dog1", "dog2")
    ]
    assert all(p.lora for p in packages) and packages[0].embeddings.shape[-1] == 48
    engine = FusionEngine(base, packages)
    result = engine.fuse(progress=False)
    for part in ("text", "kv", "spatial"):
        ours, weight = result.objective[part], result.objective[f"{part} (weight fusion)"]
        assert ours <= weight * (1 + 1e-6) + 1e-9  # (4 steps: the text stage is at the floor)
    engine.apply(result.factors)
    image = _image(MixOfShowPipeline.from_base(base, engine.table), "<dog1> and <dog2>")
    assert image.shape == (1, 3, 64, 64) and bool(torch.isfinite(image).all())
    # an SD 1.x package on it is refused, naming what differs
    with pytest.raises(Exception, match="another base"):
        random_package(build_tiny(), "cat2").check_against(base)
    # the single-file LDM layout written here is SD 1.x's: SD 2.x is refused, not mis-written
    fused = FusedModel.from_packages(result.strategy, result.factors, packages)
    from mos.common.export import export_single_file

    with pytest.raises(Exception, match="SD 2"):
        export_single_file(base, fused.concepts, fused.embeddings, tmp_path / "x.safetensors")


def test_a_package_moves_to_a_sibling_checkpoint_only_when_asked(tmp_path, capsys):
    sibling = build_tiny(seed=3)  # same architecture, other weights
    sibling.save_pretrained(tmp_path / "sibling")
    pkg = random_package(build_tiny(), "dog1")
    pkg.save(tmp_path / "dog1.safetensors")
    argv = [str(tmp_path / "dog1.safetensors"), "--base-model", str(tmp_path / "sibling")]
    assert import_main(argv) == 2
    assert "--allow-other-base" in capsys.readouterr().err
    assert import_main([*argv, "--allow-other-base"]) == 0
    moved = ConceptPackage.load(tmp_path / "dog1-rebased.safetensors")
    moved.check_against(load_base_model(tmp_path / "sibling"))
    assert moved.training["trained_on"] == {"fingerprint": pkg.base_fingerprint, "source": "tiny"}
    assert moved.sha256 == pkg.sha256  # the tensors are untouched
    # another architecture is still refused, naming the shape
    _tiny_sd2(tmp_path / "sd2")
    other = [str(tmp_path / "dog1.safetensors"), "--base-model", str(tmp_path / "sd2")]
    assert (
        import_main([*other, "--allow-other-base", "--out", str(tmp_path / "x.safetensors")]) == 2
    )
    assert "dim" in capsys.readouterr().err
