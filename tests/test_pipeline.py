"""MixOfShowPipeline is a diffusers DiffusionPipeline: .to(), save_pretrained and
from_pretrained (with the concept table) come from diffusers and keep the samples."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from mos.common.base import build_tiny
from mos.common.concepts import ConceptError, ConceptTable
from mos.common.fused import merge_into
from mos.common.package import attach_package
from mos.common.pipeline import CONCEPTS_FILE, MixOfShowPipeline
from tests.conftest import random_package


def _sample(pipe: MixOfShowPipeline) -> torch.Tensor:
    """One image from fixed fp32 starting noise (the same whatever the pipeline's dtype)."""
    latent = pipe.default_resolution // pipe.vae_scale_factor
    noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    return pipe("a photo of a <dog1>", num_inference_steps=3, latents=noise, output_type="pt")


@pytest.fixture
def merged_pipe() -> MixOfShowPipeline:
    base = build_tiny()
    table = ConceptTable()
    attach_package(base, random_package(base, "dog1", seed=1), table)
    pipe = MixOfShowPipeline.from_base(base, table)
    merge_into(base)  # the adapters folded into the weights, as in a fused model
    return pipe


def test_save_pretrained_and_from_pretrained_keep_the_concepts_and_the_samples(
    merged_pipe, tmp_path
):
    before = _sample(merged_pipe)
    merged_pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "MixOfShowPipeline"
    assert {"vae", "text_encoder", "tokenizer", "unet", "scheduler"} <= set(index)
    back = MixOfShowPipeline.from_pretrained(tmp_path / "pipe")
    assert [c.token for c in back.concepts] == ["<dog1>"]
    torch.testing.assert_close(_sample(back), before, rtol=0, atol=1e-5)
    assert isinstance(back, DiffusionPipeline)
    sd = {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    assert set(back.components) == sd | {"tokenizer_2", "text_encoder_2"}
    assert back.components["text_encoder_2"] is None  # SDXL's, optional


def test_a_concept_table_naming_tokens_the_tokenizer_lacks_is_refused(merged_pipe, tmp_path):
    merged_pipe.save_pretrained(tmp_path / "pipe")
    table = json.loads((tmp_path / "pipe" / CONCEPTS_FILE).read_text())
    table["concepts"][0]["name"] = "cat2"
    (tmp_path / "pipe" / CONCEPTS_FILE).write_text(json.dumps(table))
    with pytest.raises(ConceptError, match="lacks concept tokens"):
        MixOfShowPipeline.from_pretrained(tmp_path / "pipe")


def test_unmerged_adapters_are_not_saved_as_a_diffusers_folder(tmp_path):
    base = build_tiny()
    pipe = MixOfShowPipeline.from_packages(base, [random_package(base, "dog1", seed=1)])
    with pytest.raises(ValueError, match="LoRA adapters"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "model_index.json").exists()


def test_to_moves_every_component_and_sampling_follows(merged_pipe):
    before = _sample(merged_pipe)
    merged_pipe.to(torch.float64)
    assert merged_pipe.unet.dtype == merged_pipe.text_encoder.dtype == torch.float64
    assert merged_pipe.vae.dtype == torch.float64
    torch.testing.assert_close(_sample(merged_pipe).float(), before, rtol=0, atol=1e-4)
