"""Each fusion stage on its own: what it attaches or records, against brute force."""

from __future__ import annotations

import torch

from mos.common.attention import cross_attention_layers
from mos.common.base import build_tiny
from mos.common.concepts import encode_prompts
from mos.common.config import FusionConfig
from mos.server.fusion import FusionEngine
from mos.server.stages import (
    KeyValueStage,
    SpatialStage,
    TextEncoderStage,
    TokenStage,
    default_stages,
)
from tests.conftest import random_package


def _engine(*names: str, **config) -> FusionEngine:
    base = build_tiny()
    packages = [random_package(base, n, seed=i + 1) for i, n in enumerate(names)]
    return FusionEngine(base, packages, FusionConfig(steps=2, resolution=16, **config))


def test_the_stages_run_in_the_papers_order():
    assert [s.part for s in default_stages()] == ["text", "kv", "spatial"]
    assert SpatialStage().batch(FusionConfig(concept_batch=5)) == 5
    assert SpatialStage().batch(FusionConfig(concept_batch=5, solver="lbfgs")) == 1
    assert TextEncoderStage().batch(FusionConfig(concept_batch=5)) == 1


def test_token_stage_appends_every_concepts_embeddings_unaveraged_and_is_idempotent():
    engine = _engine("dog1", "cat2")
    tok, emb = engine.base.tokenizer, engine.base.text_encoder.get_input_embeddings().weight
    size = len(tok)
    TokenStage().run(engine, engine.names)
    assert len(tok) == size  # already attached by add(): nothing added twice
    for name in engine.names:
        package = engine.packages[name]
        concept = package.concept
        for w in range(len(concept.words)):
            ids = tok.convert_tokens_to_ids(
                [concept.layer_token(w, i) for i in range(concept.num_layers)]
            )
            assert torch.equal(emb[ids].detach(), package.embeddings[w].to(emb.dtype))


def _inputs_of(module: torch.nn.Module, run) -> torch.Tensor:
    """Every input row ``module`` saw while ``run()`` ran (a forward hook, removed after)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()


def test_text_encoder_stage_records_the_concept_models_layer_inputs():
    engine = _engine("dog1")
    rec = TextEncoderStage().record(engine, ["dog1"], None)
    group = next(g for g in engine.groups.values() if g.part == "text")
    engine.apply(engine.concept_factors("dog1"), ("text",))
    x = _inputs_of(
        group.hook,
        lambda: encode_prompts(
            engine.base.text,
            engine.prompts_of("dog1"),
            engine.table,
            engine.num_layers,
        ),
    )
    torch.testing.assert_close(rec.grams[group.key], x.T @ x)


def test_text_encoder_stage_on_prompt_positions_drops_the_padding_only():
    """``text_positions prompt``: the rows up to each prompt's end token, nothing after; the
    causal text encoder gives them the values an unpadded prompt gets."""
    engine = _engine("dog1", text_positions="prompt")
    rec = TextEncoderStage().record(engine, ["dog1"], None)
    group = next(g for g in engine.groups.values() if g.part == "text")
    engine.apply(engine.concept_factors("dog1"), ("text",))
    tok = engine.base.tokenizer
    seen: list[torch.Tensor] = []
    handle = group.hook.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        rows = []
        for prompt in engine.prompts_of("dog1"):
            for copy in engine.table.expand(prompt, engine.num_layers):
                ids = tok(copy, return_tensors="pt").input_ids  # unpadded: BOS .. EOS
                assert int(ids[0, -1]) == tok.eos_token_id
                engine.base.text_encoder(ids)
                rows.append(seen.pop().reshape(-1, group.hook.in_features))
    finally:
        handle.remove()
    x = torch.cat(rows).double()
    assert rec.rows[group.key] == x.shape[0] < 2 * engine.num_layers * tok.model_max_length
    torch.testing.assert_close(rec.grams[group.key], x.T @ x)


def test_key_value_stage_records_text_features_at_the_chosen_positions_per_layer():
    engine = _engine("dog1", kv_positions="concept")
    rec = KeyValueStage().record(engine, ["dog1"], None)
    engine.apply(engine.concept_factors("dog1"), ("text",))
    hidden, positions = engine.concept_prompt_features("dog1", "concept")
    assert 0 < int(positions.sum()) < positions.numel()  # some positions, not all
    for layer, (name, _) in enumerate(cross_attention_layers(engine.base.unet)):
        x = hidden[:, layer][positions].double()
        torch.testing.assert_close(rec.grams[f"unet.{name}.kv"], x.T @ x)


def test_key_value_stage_reads_the_fused_text_encoder_in_sequential_mode():
    engine = _engine("dog1", "cat2")
    own = KeyValueStage().record(engine, ["dog1"], None)
    other = engine.concept_factors("cat2")  # a different text encoder upstream
    fused = KeyValueStage().record(engine, ["dog1"], other)
    key = next(iter(own.grams))
    assert not torch.allclose(own.grams[key], fused.grams[key])


def test_spatial_stage_records_several_concepts_in_one_batch_as_each_alone():
    engine = _engine("dog1", "cat2")
    both = SpatialStage().record(engine, ["dog1", "cat2"], None)
    for k, name in enumerate(["dog1", "cat2"]):
        alone = SpatialStage().record(engine, [name], None)
        for key, g in alone.grams.items():
            # the same up to fp32 summation order in the batched adapters
            assert float((both.grams[key][k] - g).norm() / g.norm()) < 1e-5
