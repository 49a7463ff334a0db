"""LoRA on the UNet's up-block ResNet convolutions (LoCon): the layer, packages, fusion, fused forms."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mos.client.data import load_photo_folder
from mos.client.trainer import train_concept
from mos.common.base import build_tiny
from mos.common.config import TrainConfig
from mos.common.fused import FusedModel, load_fused_folder
from mos.common.lora import UNET_CONV_TARGETS, LoRAConv2d, inject_lora, target_layer_names
from mos.common.package import ConceptPackage, PackageError
from mos.common.pipeline import MixOfShowPipeline
from mos.server.cli import main as fuse_main
from mos.server.fusion import CONV_SAMPLES, FusionConfig, FusionEngine
from mos.server.recorder import GramRecorder
from mos.server.report import fidelity
from mos.server.solve import cross_term, solve_downs
from tests.conftest import sample_tensor, shape_photos

pytestmark = pytest.mark.slow  # tunes and fuses convolution concepts

# --- the layer -----------------------------------------------------------------------------


def _conv(seed=0, cin=5, cout=6, k=3, stride=1, padding=1):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride=stride, padding=padding)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_adapter_equals_the_convolution_with_the_merged_weight(stride, padding):
    conv = _conv(stride=stride, padding=padding)
    layer = LoRAConv2d(conv, rank=3)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 9, 7)
    merged = conv.weight + layer.delta_weight()
    want = nn.functional.conv2d(x, merged, conv.bias, stride=stride, padding=padding)
    assert torch.allclose(layer(x), want, atol=1e-5)
    # im2col: the convolution is a linear map on the patches
    rows = layer.patches(x) @ merged.reshape(6, -1).T + conv.bias
    assert torch.allclose(rows, want.flatten(2).transpose(1, 2), atol=1e-5)
    plain = LoRAConv2d(_conv(stride=stride, padding=padding), rank=3)
    plain.load_state_dict(layer.state_dict())
    assert torch.allclose(plain.to_conv(merge=True)(x), want, atol=1e-5)
    assert not isinstance(plain.to_conv(), LoRAConv2d)


def test_conv_adapter_factors_and_batched_chunks():
    conv = _conv()
    layer = LoRAConv2d(conv, rank=2)
    x = torch.randn(4, 5, 6, 6)
    ups = [torch.randn(6, 2), torch.randn(6, 5)]
    downs = [torch.randn(2, 45), torch.randn(5, 45)]

    def brute(xs, up, down):
        w = conv.weight + (up @ down).reshape(conv.weight.shape)
        return nn.functional.conv2d(xs, w, conv.bias, padding=1)

    layer.set_batched(ups, downs)
    out = layer(x)
    for k in range(2):
        assert torch.allclose(out[2 * k : 2 * k + 2], brute(x[2 * k : 2 * k + 2], *[ups[k], downs[k]][:2]), atol=1e-4)  # fmt: skip
    layer.set_factors(ups[1], downs[1])
    assert layer.rank == 5 and torch.allclose(layer(x), brute(x, ups[1], downs[1]), atol=1e-4)
    layer.set_factors(None, None)
    assert torch.allclose(layer(x), conv(x))
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_factors(torch.randn(6, 2), torch.randn(2, 44))
    with pytest.raises(ValueError, match="out of range"):
        LoRAConv2d(conv, rank=7)


def test_conv_targets_are_the_up_blocks_resnet_convolutions():
    unet = build_tiny().unet
    names = target_layer_names(unet, UNET_CONV_TARGETS)
    assert names and all(".resnets." in n and n.endswith((".conv1", ".conv2")) for n in names)
    resnets = [n for n, _ in unet.named_modules() if n.split(".")[-2:-1] == ["resnets"]]
    up = [n for n in resnets if n.startswith("up_blocks.")]
    assert up and len(up) < len(resnets)  # the down and middle blocks have ResNets too
    assert sorted(names) == sorted(f"{n}.{c}" for n in up for c in ("conv1", "conv2"))
    layers = inject_lora(unet, UNET_CONV_TARGETS, rank=2)
    assert all(isinstance(x, LoRAConv2d) for x in layers.values())


def test_exact_solve_on_patches_equals_brute_force_least_squares():
    """Gradient fusion of a convolution: Gram matrices of the hooked im2col patches, the
    exact solve, and the fused convolution equal least squares over all concepts' outputs."""
    conv = _conv(cin=3, cout=4)
    layer = LoRAConv2d(conv, rank=2)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(4, 2, generator=g) for _ in range(3)]
    downs = [torch.randn(2, 27, generator=g) for _ in range(3)]
    xs = [torch.randn(2, 3, 6, 6, generator=g) for _ in range(3)]
    grams = []
    for x in xs:
        with GramRecorder({"c": layer}) as rec:
            layer(x)
        grams.append(rec.grams["c"])
    new = solve_downs(
        sum(grams), [cross_term(a, gi) for a, gi in zip(downs, grams, strict=True)], ridge=0
    )
    fused = conv.weight.double() + (torch.cat(ups, 1).double() @ torch.cat(new)).reshape(
        conv.weight.shape
    )
    # brute force: stack every concept's patches and the outputs its own model gives them
    feats, targets = [], []
    for x, b, a in zip(xs, ups, downs, strict=True):
        p = layer.patches(x).reshape(-1, 27).double()
        feats.append(p)
        targets.append(p @ (conv.weight.reshape(4, -1).double() + b.double() @ a.double()).T)
    brute = torch.linalg.lstsq(torch.cat(feats), torch.cat(targets)).solution.T
    assert torch.allclose(fused.reshape(4, -1), brute, atol=1e-8)


# --- packages, fusion and fused forms on tiny concept models ------------------------------


@pytest.fixture(scope="module")
def locon_files(tmp_path_factory) -> list[Path]:
    """``chk1`` with convolution adapters (rank 2), ``sun2`` without."""
    root = tmp_path_factory.mktemp("locon")
    files = []
    for kind, (name, cls, conv_rank) in enumerate([("chk1", "toy", 2), ("sun2", "cat", 0)]):
        config = TrainConfig(
            steps=40, batch_size=4, lr_unet=3e-3, lr_text=1e-3, conv_rank=conv_rank
        )
        kind_name = ("checker", "disc")[kind]
        photos = load_photo_folder(shape_photos(root / name, kind_name, seed=kind))
        result = train_concept(build_tiny(), photos, name, cls, config, progress=False)
        files.append(result.package.save(root / f"{name}.safetensors"))
    return files


def test_a_package_with_convolution_adapters(locon_files):
    pkg = ConceptPackage.load(locon_files[0])
    with safe_open(str(locon_files[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "2" and meta["conv_rank"] == "2"
    conv_keys = [k for k, t in pkg.lora.items() if t.ndim == 4]
    base = build_tiny()
    n_convs = len(target_layer_names(base.unet, UNET_CONV_TARGETS))
    assert len(conv_keys) == 2 * n_convs
    assert any(float(pkg.lora[k].abs().max()) > 0 for k in conv_keys if ".lora_B." in k)
    plain = ConceptPackage.load(locon_files[1])
    assert plain.conv_rank == 0 and all(t.ndim == 2 for t in plain.lora.values())
    # the convolution adapters are part of the concept's model
    pipe = MixOfShowPipeline.from_packages(base, [pkg])
    convs = [m for m in base.unet.modules() if isinstance(m, LoRAConv2d)]
    assert len(convs) == n_convs

    def sample():
        return pipe("photo of a <chk1>", num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0))  # fmt: skip

    full = sample()
    for m in convs:
        m.scale = 0.0
    assert not torch.allclose(full, sample(), atol=1e-4)


def test_convolution_adapters_in_a_package_are_validated(locon_files):
    pkg = ConceptPackage.load(locon_files[0])
    tensors, meta = pkg.tensors(), pkg.metadata()
    with pytest.raises(PackageError, match="needs format version 2"):
        ConceptPackage.from_parts(tensors, {**meta, "format_version": "1"})
    with pytest.raises(PackageError, match="must be 2-D"):
        ConceptPackage.from_parts(tensors, {**meta, "conv_rank": "0", "format_version": "1"})
    with pytest.raises(PackageError, match="conv_rank 3"):
        ConceptPackage.from_parts(tensors, {**meta, "conv_rank": "3"})
    key = next(k for k, t in tensors.items() if t.ndim == 4 and ".lora_A." in k)
    bad = {**tensors, key: tensors[key][:, :1].contiguous()}
    with pytest.raises(PackageError, match="this base needs"):
        ConceptPackage.from_parts(bad, meta).check_against(build_tiny())
    # a package of the earlier layout (down-block convolutions too) is named as such
    down = "unet.down_blocks.0.resnets.0.conv1"
    earlier = {**tensors, f"{down}.lora_A.weight": torch.zeros(2, 32, 3, 3),
               f"{down}.lora_B.weight": torch.zeros(32, 2, 1, 1)}  # fmt: skip
    with pytest.raises(PackageError, match="earlier version.*tune it again"):
        ConceptPackage.from_parts(earlier, meta).check_against(build_tiny())


def test_fusing_one_convolution_concept_reproduces_its_model(locon_files):
    engine = FusionEngine(build_tiny(), [ConceptPackage.load(locon_files[0])])
    assert engine.conv and any(isinstance(x, LoRAConv2d) for x in engine.layers.values())
    result = engine.fuse(progress=False)
    report = fidelity(engine, [result])
    assert report["concepts"][0]["gradient-fusion"]["unet_drift"] < 1e-4


def test_mixed_packages_fuse_and_load_as_compact_and_folder(locon_files, tmp_path):
    out = tmp_path / "fused"
    assert fuse_main(["--concepts", *map(str, locon_files), "--out", str(out), "--no-grid"]) == 0
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["objective"]["spatial"] <= report["objective"]["spatial (weight fusion)"]
    compact = FusedModel.load_compact(out / "fused.safetensors")
    assert compact.has_conv() and compact.version() == 2
    conv_keys = [k for k in compact.factors if k.endswith((".conv1", ".conv2"))]
    # exact rank: chk1's 2 plus sun2's zero rank-1 update
    assert conv_keys and {compact.factors[k][1].shape[0] for k in conv_keys} == {3}
    folder_base, table = load_fused_folder(out)
    down = conv_keys[0].replace("up_blocks.", "down_blocks.")
    earlier = dataclasses.replace(
        compact, factors={**compact.factors, down: compact.factors[conv_keys[0]]}
    )
    with pytest.raises(PackageError, match="earlier version.*fuse its concepts again"):
        earlier.attach(build_tiny())
    fresh = build_tiny()
    compact_table = compact.attach(fresh)
    assert any(isinstance(m, LoRAConv2d) for m in fresh.unet.modules())

    prompt = "a photo of a <chk1> and a <sun2>"
    want = sample_tensor(folder_base, table, prompt)
    assert torch.allclose(want, sample_tensor(fresh, compact_table, prompt), atol=1e-4)
    # a base without the convolution layers' factors is refused, as are unknown layers
    partial = FusedModel(compact.strategy, dict(compact.factors), compact.concepts,
                         compact.embeddings, compact.base_fingerprint)  # fmt: skip
    partial.factors.pop(conv_keys[0])
    with pytest.raises(PackageError, match="lacks 1 layers"):
        partial.attach(build_tiny())
    partial.factors[conv_keys[0]] = partial.factors[conv_keys[0] + "x"] = compact.factors[
        conv_keys[0]
    ]
    with pytest.raises(PackageError, match="the base lacks"):
        partial.attach(build_tiny())


def test_adding_a_convolution_concept_later_equals_fusing_from_scratch(locon_files):
    config = FusionConfig(mode="independent")
    chk, sun = (ConceptPackage.load(f) for f in locon_files)
    scratch = FusionEngine(build_tiny(), [sun, chk], config).fuse(progress=False).factors
    engine = FusionEngine(build_tiny(), [sun], config)
    engine.fuse(progress=False)
    assert not engine.conv and engine.stage4_samples == 1
    engine.add(chk)
    # convolutions see wide im2col inputs: stage 4 samples more images unless told otherwise
    assert engine.conv and engine.stage4_samples == CONV_SAMPLES > 1
    assert FusionEngine(build_tiny(), [chk], FusionConfig(samples=2)).stage4_samples == 2
    later = engine.fuse(progress=False).factors
    assert later.keys() == scratch.keys()
    for k in scratch:
        a, b = later[k][0] @ later[k][1], scratch[k][0] @ scratch[k][1]
        assert torch.allclose(a, b, atol=1e-6), k
