import pytest
import torch

from mos.client.data import load_photo_folder
from mos.client.trainer import attention_regularisation, denoising_loss, masked_mse, train_concept
from mos.common.base import build_tiny
from mos.common.config import TrainConfig
from mos.common.lora import LoRALinear


def test_only_new_embedding_rows_change(tiny, photo_dir):
    before = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    n_before = before.shape[0]
    result = train_concept(
        tiny,
        load_photo_folder(photo_dir),
        "dog1",
        "dog",
        TrainConfig(steps=5, embedding_norm_threshold=0),
        progress=False,
    )
    after = tiny.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[:n_before], before)  # old rows bit-identical
    new = after[n_before:]
    assert new.shape[0] == 2 * tiny.num_cross_attention_layers
    pkg_emb = result.package.embeddings.reshape(new.shape)
    assert torch.equal(new, pkg_emb)
    # word 2 started at the class word; training moved it
    dog = before[tiny.tokenizer.convert_tokens_to_ids("dog</w>")]
    word2 = new[tiny.num_cross_attention_layers :]
    assert not torch.allclose(word2, dog.expand_as(word2))
    assert torch.allclose(word2, dog.expand_as(word2), atol=0.05)  # 5 steps at lr 1e-3


def test_initialisation_follows_the_method(tiny, photo_dir):
    result = train_concept(
        tiny,
        load_photo_folder(photo_dir),
        "dog1",
        "dog",
        TrainConfig(steps=1, lr_embedding=0.0),
        progress=False,
    )
    emb = result.package.embeddings
    dog = tiny.text_encoder.get_input_embeddings().weight[
        tiny.tokenizer.convert_tokens_to_ids("dog</w>")
    ]
    assert emb.shape == (2, tiny.num_cross_attention_layers, tiny.text_dim)
    assert torch.allclose(emb[1], dog.expand_as(emb[1]), atol=1e-7)
    assert 0.007 < float(emb[0].std()) < 0.02  # N(0, 0.013^2)
    assert not torch.equal(emb[0, 0], emb[0, 1])  # each layer its own draw


@pytest.mark.slow
def test_norm_threshold_freezes_embeddings(photo_dir):
    photos = load_photo_folder(photo_dir)

    def run(steps):
        config = TrainConfig(
            steps=steps, lr_embedding=0.05, embedding_norm_threshold=0.2, lr_schedule="constant"
        )
        return train_concept(build_tiny(), photos, "dog1", "dog", config, progress=False)

    # the tiny model's starting mean norm is ~0.1: at a large embedding lr it crosses 0.2 fast
    full = run(30)
    frozen = full.embeddings_frozen_at
    assert frozen is not None and frozen < 30
    assert float(full.package.embeddings.norm(dim=-1).mean()) >= 0.2
    # the same seed stopped right at the freeze gives the same embeddings: nothing moved after
    short = run(frozen)
    assert short.embeddings_frozen_at == frozen
    assert torch.equal(full.package.embeddings, short.package.embeddings)
    # and without a threshold they keep moving
    free = train_concept(
        build_tiny(),
        photos,
        "dog1",
        "dog",
        TrainConfig(
            steps=30, lr_embedding=0.05, embedding_norm_threshold=0, lr_schedule="constant"
        ),
        progress=False,
    )
    assert free.embeddings_frozen_at is None
    assert not torch.equal(free.package.embeddings, full.package.embeddings)


@pytest.mark.slow
def test_short_tuning_lowers_the_loss_on_a_fixed_batch(photo_dir):
    photos = load_photo_folder(photo_dir)
    caption = "a photo of a <dog1>"
    untrained = train_concept(
        build_tiny(),
        photos,
        "dog1",
        "dog",
        TrainConfig(steps=1, lr_embedding=0, lr_text=0, lr_unet=0),
        progress=False,
    )
    base0 = untrained.package  # a no-op step: the starting point
    tiny0 = build_tiny()
    from mos.common.concepts import ConceptTable
    from mos.common.package import attach_package

    table0 = ConceptTable()
    attach_package(tiny0, base0, table0)
    before = denoising_loss(tiny0, table0, photos, caption)

    tiny1 = build_tiny()
    trained = train_concept(
        tiny1,
        photos,
        "dog1",
        "dog",
        TrainConfig(steps=60, batch_size=4, lr_unet=3e-3, lr_text=1e-3),
        progress=False,
    )
    after = denoising_loss(tiny1, trained.concepts, photos, caption)
    assert after < before
    assert any(
        torch.count_nonzero(m.lora_B.weight)
        for m in tiny1.unet.modules()
        if isinstance(m, LoRALinear)
    )


def test_vanilla_lora_has_one_token_and_no_layerwise_embeddings(tiny, photo_dir):
    result = train_concept(
        tiny,
        load_photo_folder(photo_dir),
        "cat2",
        "cat",
        TrainConfig(steps=3, method="lora"),
        progress=False,
    )
    pkg = result.package
    assert pkg.concept.words == ["<cat2>"] and pkg.embeddings.shape == (1, 1, tiny.text_dim)
    assert "<cat2>" in tiny.tokenizer.get_vocab()
    assert not any(t.startswith("<cat2_") for t in tiny.tokenizer.get_vocab())


def test_masked_mse_against_brute_force():
    g = torch.Generator().manual_seed(0)
    err = torch.rand(2, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4, :4] = 1  # top-left latent quarter of sample 0
    mask[1] = 1
    inside = torch.cat([err[0, :, :2, :2].flatten(), err[1].flatten()])
    assert torch.allclose(masked_mse(err, mask), inside.mean())
    assert torch.allclose(masked_mse(err, torch.ones(2, 1, 8, 8)), err.mean())


def test_attention_regularisation_against_brute_force():
    # 1 sample, 4x4 pixels, 5 tokens; word 1 at token 1, word 2 at token 2
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 16, 5, generator=g).softmax(-1)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    pos1 = torch.tensor([[False, True, False, False, False]])
    pos2 = torch.tensor([[False, False, True, False, False]])
    got = attention_regularisation({0: probs}, mask, pos1, pos2)
    a1 = probs[0, :, 1] / probs[0, :, 1].max()
    a2 = probs[0, :, 2] / probs[0, :, 2].max()
    m = mask.flatten()
    want = ((a2 - m) ** 2).mean() + ((a1 * (1 - m)) ** 2).mean()
    assert torch.allclose(got, want)
    perfect = torch.zeros(1, 16, 5)
    perfect[0, :, 2] = m  # word 2 exactly on the subject, word 1 nowhere
    perfect[0, :, 0] = 1 - m
    assert float(attention_regularisation({0: perfect}, mask, pos1, pos2)) == pytest.approx(0.0)


def test_masks_switch_on_mask_loss_and_attention_reg(tmp_path):
    from PIL import Image

    from tests.conftest import make_photos

    folder = make_photos(tmp_path / "p", count=2)
    m = Image.new("L", (48, 48), 0)
    m.paste(255, (8, 8, 40, 40))
    m.save(folder / "00.mask.png")
    m.save(folder / "01.mask.png")
    photos = load_photo_folder(folder)
    assert photos[0].mask is not None and photos[1].mask is not None

    def first_loss(**kw):
        config = TrainConfig(steps=1, **kw)
        return train_concept(build_tiny(), photos, "dog1", "dog", config, progress=False).losses[0]

    plain = first_loss(mask_loss=False, attention_reg_weight=0.0)
    masked = first_loss(mask_loss=True, attention_reg_weight=0.0)
    regularised = first_loss(mask_loss=True, attention_reg_weight=1.0)
    assert masked != plain  # only the pixels inside the mask count
    assert regularised > masked  # the same step plus a positive attention penalty
    # without masks neither switch changes anything
    no_masks = load_photo_folder(make_photos(tmp_path / "q", count=2))
    a = train_concept(build_tiny(), no_masks, "dog1", "dog", TrainConfig(steps=1), progress=False)
    b = train_concept(
        build_tiny(),
        no_masks,
        "dog1",
        "dog",
        TrainConfig(steps=1, mask_loss=False, attention_reg_weight=0.0),
        progress=False,
    )
    assert a.losses == b.losses


def test_same_seed_same_package_and_checkpointing_changes_nothing(photo_dir):
    photos = load_photo_folder(photo_dir)

    def run(**kw):
        config = TrainConfig(steps=4, lora_dropout=0.1, kv_dropout=0.2, **kw)
        return train_concept(build_tiny(), photos, "dog1", "dog", config, progress=False).package

    torch.manual_seed(123)
    a = run()
    state = torch.random.get_rng_state()
    b = run(gradient_checkpointing="on")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert a.lora.keys() == b.lora.keys()
    assert all(torch.allclose(a.lora[k], b.lora[k], atol=1e-6) for k in a.lora)
    c = run(seed=1)
    assert not torch.equal(a.embeddings, c.embeddings)


def test_authors_attention_regularisation_against_brute_force():
    """Per resolution the layers' maps are averaged, each word's map divided by its maximum
    over the batch; linear: both words' mean off the mask; full identity: the second
    word's squared error to the mask; summed over resolutions."""
    from mos.client.trainer import attention_regularisation_authors

    g = torch.Generator().manual_seed(1)
    maps = {i: torch.rand(2, n, 5, generator=g).softmax(-1) for i, n in enumerate((16, 16, 4))}
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    pos1 = torch.zeros(2, 5, dtype=torch.bool)
    pos2 = torch.zeros(2, 5, dtype=torch.bool)
    pos1[:, 1], pos2[:, 2] = True, True
    for full in (False, True):
        want = 0.0
        for group, size in (([0, 1], 4), ([2], 2)):
            probs = torch.stack([maps[i] for i in group]).mean(0)
            a1, a2 = probs[..., 1], probs[..., 2]
            a1, a2 = a1 / a1.max(), a2 / a2.max()
            m = torch.nn.functional.interpolate(mask, size=(size, size)).flatten(1)
            bg = m == 0
            subject = ((a2 - m) ** 2).mean() if full else a2[bg].mean()
            want += float(subject + a1[bg].mean())
        got = attention_regularisation_authors(maps, mask, pos1, pos2, full_identity=full)
        assert float(got) == pytest.approx(want, rel=1e-5)
    # no background at a resolution: it adds nothing (the authors skip a NaN)
    full_mask = torch.ones(2, 1, 4, 4)
    assert float(attention_regularisation_authors(maps, full_mask, pos1, pos2)) == 0.0


def test_kv_drop_on_the_lora_branch_switches_attn2_kv_adapters_off_per_step(photo_dir):
    """``kv_dropout_mode lora`` (the authors'): with p = 1 the attn2 to_k/to_v LoRA branches
    never run, so their up factors stay at their zero start while every other adapter
    trains; with p = 0 they train too. After training every branch is on again."""
    photos = load_photo_folder(photo_dir)

    def run(p: float):
        base = build_tiny()
        config = TrainConfig(steps=3, kv_dropout=p, kv_dropout_mode="lora")
        package = train_concept(base, photos, "dog1", "dog", config, progress=False).package
        layers = [m for m in base.unet.modules() if isinstance(m, LoRALinear)]
        assert layers and all(m.scale == 1.0 for m in layers)
        return package.lora

    def kv(key: str) -> bool:
        return ".attn2." in key and (".to_k." in key or ".to_v." in key)

    dropped, kept = run(1.0), run(0.0)
    ups = [k for k in dropped if k.startswith("unet") and k.endswith("lora_B.weight")]
    assert any(kv(k) for k in ups) and any(not kv(k) for k in ups)
    for k in ups:
        assert bool(dropped[k].abs().sum() == 0) == kv(k)
        assert float(kept[k].abs().sum()) > 0


def test_augmented_recipe_is_deterministic_and_differs_from_the_fixed_crop(tmp_path):
    from tests.conftest import make_photos

    photos = load_photo_folder(make_photos(tmp_path / "p", count=3, size=40))

    def run(**kw):
        config = TrainConfig(steps=3, **kw)
        return train_concept(build_tiny(), photos, "dog1", "dog", config, progress=False)

    paper = dict(augment="canvas", canvas_scale=0.5, caption_templates="human", flip_p=0.0)
    a, b, plain = run(**paper), run(**paper), run(flip_p=0.0)
    assert a.losses == b.losses
    assert all(torch.equal(a.package.lora[k], b.package.lora[k]) for k in a.package.lora)
    assert a.losses != plain.losses
    assert run(augment="crop", caption_templates="object").losses != plain.losses
