import pytest
import torch
from diffusers import StableDiffusionPipeline

from mos.common.attention import cross_attention_layers, layerwise_cross_attention
from mos.common.concepts import (
    Concept,
    ConceptError,
    ConceptTable,
    encode_prompts,
    parse_concept_name,
)
from mos.common.edlora import add_concept_tokens, initial_embeddings, write_embeddings
from mos.common.pipeline import MixOfShowPipeline


def test_layer_order_is_down_mid_up(tiny):
    names = [n for n, _ in cross_attention_layers(tiny.unet)]
    kinds = [n.split(".")[0] for n in names]
    assert kinds == sorted(kinds, key=["down_blocks", "mid_block", "up_blocks"].index)
    # unet.attn_processors lists up blocks before the mid block: we must not follow it
    proc_order = [k.rsplit(".processor", 1)[0] for k in tiny.unet.attn_processors if "attn2" in k]
    assert sorted(proc_order) == sorted(names) and proc_order != names


def _attach(tiny, name="dog1"):
    concept = Concept(name, "dog", "edlora", tiny.num_cross_attention_layers)
    emb = initial_embeddings(tiny, concept, torch.Generator().manual_seed(0))
    add_concept_tokens(tiny, concept)
    write_embeddings(tiny, concept, emb)
    return concept, emb


def _kv_inputs(tiny, context):
    """Run the UNet once; return what each cross-attention layer's to_k saw, in layer order."""
    seen = {}
    handles = [
        attn.to_k.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
        for i, (_, attn) in enumerate(cross_attention_layers(tiny.unet))
    ]
    try:
        with layerwise_cross_attention(tiny.unet):
            tiny.unet(
                torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                torch.tensor([100]),
                encoder_hidden_states=context,
            )
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(seen))]


def test_changing_layer_l_embedding_changes_only_layer_l_input(tiny):
    concept, emb = _attach(tiny)
    table = ConceptTable([concept])
    L = tiny.num_cross_attention_layers

    def encode():
        return encode_prompts(tiny.text, ["a photo of a <dog1>"], table, L)

    before = _kv_inputs(tiny, encode())
    changed = emb.clone()
    changed[0, 3] += 0.5  # word 1, layer 3 only
    write_embeddings(tiny, concept, changed)
    after = _kv_inputs(tiny, encode())
    differs = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert differs == [i == 3 for i in range(L)]


def test_prompt_expansion_and_names():
    c = Concept("dog1", "dog", "edlora", 3)
    table = ConceptTable([c])
    assert table.expand("a <dog1> on grass", 3) == [
        "a <dog1_1_l0> <dog1_2_l0> on grass",
        "a <dog1_1_l1> <dog1_2_l1> on grass",
        "a <dog1_1_l2> <dog1_2_l2> on grass",
    ]
    assert table.expand("a <dog1_1> <dog1_2>", 1) == ["a <dog1_1_l0> <dog1_2_l0>"]
    with pytest.raises(ConceptError, match="known: <dog1>"):
        table.expand("a <cat2>", 3)
    lora = Concept("cat2", "cat", "lora", 1)
    assert (
        lora.all_tokens() == ["<cat2>"]
        and ConceptTable([lora]).expand("a <cat2>", 4) == ["a <cat2>"] * 4
    )
    assert parse_concept_name("<dog1>") == parse_concept_name("dog1") == "dog1"
    with pytest.raises(ConceptError, match="already"):
        table.add(Concept("dog1", "cat", "lora", 1))
    with pytest.raises(ConceptError, match="clashes with <dog1>"):
        table.add(Concept("dog1_1", "dog", "lora", 1))  # its token is <dog1>'s first word
    for bad in ("../x", "/etc/passwd", "a b", "dog\x00", "x" * 65, "", "<>", "dög"):
        with pytest.raises(ConceptError):
            parse_concept_name(bad)


def test_pipeline_without_concepts_matches_diffusers(tiny):
    ours = MixOfShowPipeline.from_base(tiny)(
        "a photo of a dog",
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    )
    ref = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=tiny.unet,
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    theirs = ref(
        "a photo of a dog",
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_pipeline_checks_its_inputs(tiny):
    pipe = MixOfShowPipeline.from_base(tiny)
    with pytest.raises(ValueError, match="empty"):
        pipe("  ")
    with pytest.raises(ValueError, match="multiples"):
        pipe("a dog", height=31)
    with pytest.raises(ConceptError, match="unknown concept"):
        pipe("a <dog9>")


def test_concept_names_are_case_insensitive(tiny):
    name = parse_concept_name("<Dog1>")
    assert name == "dog1"
    with pytest.raises(ConceptError, match="lower case"):
        Concept("Dog1", "dog", "edlora", 2)
    concept, emb = _attach(tiny, name)
    ids = tiny.tokenizer.convert_tokens_to_ids(concept.all_tokens())
    weight = tiny.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ids], emb.reshape(len(ids), -1))
    table = ConceptTable([concept])
    L = tiny.num_cross_attention_layers
    upper = encode_prompts(tiny.text, ["a photo of a <DOG1>"], table, L)
    lower = encode_prompts(tiny.text, ["a photo of a <dog1>"], table, L)
    assert torch.equal(upper, lower)
    # each layer's copy holds that layer's tokens, not the unknown-token id
    ids_l3 = tiny.tokenizer(table.expand("a <dog1>", L)[3]).input_ids
    assert concept.all_tokens()[3] in tiny.tokenizer.convert_ids_to_tokens(ids_l3)
