import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mos.client.data import load_photo_folder
from mos.client.trainer import train_concept
from mos.common.base import build_tiny
from mos.common.config import TrainConfig
from mos.common.package import FORMAT_VERSION, ConceptPackage, PackageError
from mos.common.pipeline import MixOfShowPipeline


@pytest.fixture
def trained(photo_dir, tmp_path):
    base = build_tiny()
    result = train_concept(
        base,
        load_photo_folder(photo_dir),
        "dog1",
        "dog",
        TrainConfig(steps=8, lr_unet=1e-2, lr_text=1e-2),
        progress=False,
    )
    path = result.package.save(tmp_path / "dog1.safetensors")
    return base, result, path


def _sample(pipe, **kw):
    return pipe(
        "a photo of a <dog1> on the beach",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        **kw,
    )


def test_save_load_onto_fresh_base_gives_identical_outputs(trained):
    base, result, path = trained
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format_version"] == str(FORMAT_VERSION) and meta["concept"] == "<dog1>"
    assert json.loads(meta["words"]) == ["<dog1_1>", "<dog1_2>"]
    assert meta["class_word"] == "dog" and meta["method"] == "edlora" and meta["rank"] == "4"
    assert meta["num_layers"] == "7" and meta["base_fingerprint"] == base.fingerprint
    assert json.loads(meta["training"])["steps"] == 8
    assert "embeddings" in keys
    assert any(
        k.startswith("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A")
        for k in keys
    )

    original = _sample(MixOfShowPipeline.from_base(base, result.concepts))
    fresh = MixOfShowPipeline.from_packages(build_tiny(), [ConceptPackage.load(path)])
    assert torch.equal(_sample(fresh), original)
    # the LoRA is really there: scale 0 (embeddings only) differs
    assert not torch.equal(_sample(fresh, lora_scale=0.0), original)


def test_package_from_another_base_is_refused(trained):
    _, _, path = trained
    with pytest.raises(PackageError, match="another base model"):
        MixOfShowPipeline.from_packages(build_tiny(seed=1), [ConceptPackage.load(path)])


def _rewrite(path, out, *, meta=None, tensors=None, drop=()):
    with safe_open(str(path), "pt") as f:
        m = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys() if k not in drop}  # noqa: SIM118
    m.update(meta or {})
    t.update(tensors or {})
    save_file(t, str(out), metadata=m)
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"meta": {"format_version": "99"}}, "version '99' is not supported"),
        ({"meta": {"format": "something"}}, "not a Mix-of-Show concept package"),
        ({"meta": {"rank": "8"}}, "metadata says rank 8"),
        ({"meta": {"num_layers": "16"}}, "expected \\[2 words, 16 layers"),
        ({"meta": {"words": '["<a_1>", "<a_2>"]'}}, "do not match concept"),
        ({"meta": {"concept": "<../../etc>"}}, "bad metadata"),
        ({"meta": {"method": "dreambooth"}}, "bad metadata"),
        ({"drop": ("embeddings",)}, "'embeddings' is missing"),
        ({"tensors": {"embeddings": torch.full((2, 7, 32), float("nan"))}}, "NaN"),
        ({"tensors": {"embeddings": torch.zeros(2, 7, 32, dtype=torch.int32)}}, "dtype"),
        ({"tensors": {"unet.evil.weight": torch.zeros(2, 2)}}, "unexpected tensor"),
    ],
)
def test_lying_or_broken_packages_are_refused(trained, tmp_path, change, message):
    _, _, path = trained
    bad = _rewrite(path, tmp_path / "bad.safetensors", **change)
    with pytest.raises(PackageError, match=message):
        ConceptPackage.load(bad)


def test_shape_mismatch_against_the_base_is_refused(trained, tmp_path):
    _, _, path = trained
    with safe_open(str(path), "pt") as f:
        key = next(k for k in f.keys() if k.startswith("unet.") and k.endswith("lora_A.weight"))  # noqa: SIM118
        a = f.get_tensor(key)
    bad = _rewrite(
        path, tmp_path / "bad.safetensors", tensors={key: torch.zeros(a.shape[0], a.shape[1] + 1)}
    )
    pkg = ConceptPackage.load(bad)
    with pytest.raises(PackageError, match="shape"):
        pkg.check_against(build_tiny())
    missing = _rewrite(
        path, tmp_path / "missing.safetensors", drop=(key, key.replace("lora_A", "lora_B"))
    )
    with pytest.raises(PackageError, match="missing"):
        ConceptPackage.load(missing).check_against(build_tiny())


def test_not_a_package_and_size_cap(tmp_path, trained):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(PackageError, match="not a readable safetensors"):
        ConceptPackage.load(junk)
    with pytest.raises(PackageError, match="limit"):
        ConceptPackage.load(trained[2], max_bytes=1000)
    with pytest.raises(PackageError, match="no such"):
        ConceptPackage.load(tmp_path / "nope.safetensors")


def test_write_is_atomic(trained, tmp_path, monkeypatch):
    _, result, path = trained
    import mos.common.package as package_mod

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(package_mod, "save_file", exploding_save)
    target = tmp_path / "out" / "dog1.safetensors"
    with pytest.raises(KeyboardInterrupt):
        result.package.save(target)
    assert list((tmp_path / "out").iterdir()) == []  # no package, no temp file
    # an existing good package is not damaged by a failed overwrite
    good = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        result.package.save(path)
    assert path.read_bytes() == good
