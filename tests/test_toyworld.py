"""The toy world: its analyser and detector against renders and brute force (no model),
then the committed toy base model: it follows prompts; a short tuning (ED-LoRA with
convolution adapters) makes three concepts detectable where the base never draws them;
after gradient fusion of the three each is still detected, and two regions put each in
its own box."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mos.toyworld import world
from mos.toyworld.analyse import ConceptDetector, analyse, as_tensor
from mos.toyworld.model import WEIGHTS

pytestmark = pytest.mark.slow  # tunes toy concepts for minutes


def test_the_analyser_reads_rendered_scenes_back():
    rng = random.Random(3)
    scenes = [world.random_scene(rng) for _ in range(200)]
    right = sum(
        analyse(world.render_scene(s)).matches(s.things[0].colour, s.things[0].shape, s.background)
        for s in scenes
    )
    assert right >= 196


def test_captions_name_every_object_with_its_article():
    scene = world.Scene(
        "blue", (world.Thing("orange", "circle", 8, 8, 5), world.Thing("red", "square", 24, 8, 5))
    )
    assert scene.caption == "an orange circle and a red square on a blue background"
    assert world.held_out_triples() == world.held_out_triples()  # fixed by its seed


def test_wide_scenes_put_one_full_size_object_in_each_square_part():
    rng = random.Random(4)
    held = world.held_out_triples()
    for parts in (2, 3):
        for _ in range(60):
            n = rng.randint(1, parts)
            scene = world.random_wide_scene(rng, parts, n_objects=n, exclude=held)
            assert len(scene.things) == n
            cells = sorted(int(t.cx // world.SIZE) for t in scene.things)
            assert len(set(cells)) == n and max(cells) < parts  # one object per part
            for t in scene.things:
                part = int(t.cx // world.SIZE)
                assert 6 <= t.r <= 11  # the scale of a lone object in a square image
                assert part * world.SIZE + t.r <= t.cx <= (part + 1) * world.SIZE - t.r
                assert t.r <= t.cy <= world.SIZE - t.r
            if n == 1:
                t = scene.things[0]
                assert (t.colour, t.shape, scene.background) not in held
            img = world.render_scene(scene, width=parts * world.SIZE)
            assert img.size == (parts * world.SIZE, world.SIZE)
            # each object reads back from its own square
            for t in scene.things:
                x = int(t.cx // world.SIZE) * world.SIZE
                r = analyse(img.crop((x, 0, x + world.SIZE, world.SIZE)))
                assert (r.colour, r.shape, r.background) == (t.colour, t.shape, scene.background)
            assert scene.caption.endswith(f"on {world.article(scene.background)} "
                                          f"{scene.background} background")  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        world.random_wide_scene(rng, 2, n_objects=3)


def test_sketches_mark_colour_changes_as_brute_force_does():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 4, (3, 3, 9, 11), generator=gen, dtype=torch.uint8) * 60
    got = world.sketch_tensor(images, threshold=48)
    assert got.shape == (3, 1, 9, 11)
    for n in range(3):
        for y in range(9):
            for x in range(11):
                px = images[n, :, y, x].int()
                near = [images[n, :, y, x + 1].int()] if x + 1 < 11 else []
                near += [images[n, :, y + 1, x].int()] if y + 1 < 9 else []
                want = any((px - q).abs().max() > 48 for q in near)
                assert got[n, 0, y, x].item() == float(want), (n, y, x)
    # a flat image has no lines; a scene's lines lie on its object's outline
    flat = world.render_scene(world.Scene("green", ()))
    assert world.sketch_of(flat).getextrema() == (0, 0)
    thing = world.Thing("red", "square", 16, 16, 8)
    sketch = np.asarray(world.sketch_of(world.render_scene(world.Scene("blue", (thing,)))))
    ys, xs = np.nonzero(sketch)
    assert len(ys) > 40 and ys.min() >= 7 and ys.max() <= 24 and xs.min() >= 7 and xs.max() <= 24
    assert sketch[16, 16] == 0  # not inside a one-colour object


def test_concept_sketches_draw_each_concept_in_its_own_box_only():
    boxes = [(0.0, 0.1, 0.5, 0.9), (0.5, 0.1, 1.0, 0.9)]
    sketch = np.asarray(world.concept_sketch(["ring", "swiss"], boxes, 64, 32)) > 0
    for x0, y0, x1, y1 in boxes:
        inside = sketch[int(y0 * 32) : int(y1 * 32), int(x0 * 64) : int(x1 * 64)]
        assert inside.sum() > 30  # the concept's outline and its inner lines
    assert sketch.sum() == sum(
        sketch[int(y0 * 32) : int(y1 * 32), int(x0 * 64) : int(x1 * 64)].sum()
        for x0, y0, x1, y1 in boxes
    )
    # the ring's inner circle is drawn, the swiss's cross too: more than an outline
    left = np.asarray(world.concept_sketch(["ring"], boxes[:1], 64, 32)) > 0
    assert left[16, 16 - 2 : 16 + 3].sum() == 0 and left[16, 4:28].sum() >= 4
    with pytest.raises(ValueError, match="unknown toy concept"):
        world.concept_sketch(["nope"], boxes[:1], 64)
    with pytest.raises(ValueError, match="2 boxes"):
        world.concept_sketch(["ring"], boxes, 64)


def test_detector_finds_each_concept_and_not_the_shapes_that_share_its_colours():
    for name, concept in world.CONCEPTS.items():
        det = ConceptDetector(name)
        photos = world.concept_photos(name, 6, seed=7, size=32)
        assert min(det.score(p) for p in photos) >= 0.5, name
        # the base world's closest look-alikes: each part's colour as a plain shape, on a
        # background of another part's colour (a red triangle on blue is not the house)
        for colour in concept.colours:
            for bg in concept.colours:
                if bg == colour:
                    continue
                for shape in world.SHAPES:
                    img = world.render_scene(
                        world.Scene(bg, (world.Thing(colour, shape, 16, 16, 9),))
                    )
                    assert det.score(img) < 0.5, (name, colour, shape, bg)


def test_annotated_concept_folders_name_each_background_and_mask_the_concept(tmp_path):
    import numpy as np

    from mos.client.data import load_photo_folder
    from mos.toyworld.evaluate import write_concept_folder

    plain = load_photo_folder(write_concept_folder(tmp_path / "plain", "ring", 3))
    assert [p.caption for p in plain] == ["a photo of a <TOK>"] * 3
    assert all(p.mask is None for p in plain)
    folder = write_concept_folder(tmp_path / "ann", "ring", 3, captions=True, masks=True)
    photos = load_photo_folder(folder)
    for photo, ref in zip(photos, world.concept_photos("ring", 3), strict=True):
        assert np.array_equal(np.asarray(photo.image), np.asarray(ref))  # same photos
        img, mask = np.asarray(photo.image).astype(int), np.asarray(photo.mask) > 127
        corner = tuple(img[0, 0])
        bg = next(name for name, rgb in world.PALETTE.items() if rgb == corner)
        assert photo.caption == f"a photo of a <TOK> on {world.article(bg)} {bg} background"
        # inside the mask: the ring's colours; well outside it: the background
        inside = img[mask].reshape(-1, 3)
        colours = np.array([world.PALETTE[c] for c in world.CONCEPTS["ring"].colours])
        nearest = np.abs(inside[:, None] - colours[None]).sum(-1).min(1)
        assert (nearest < 60).mean() > 0.9
        assert 0.05 < mask.mean() < 0.6


def test_detector_score_map_matches_brute_force():
    det = ConceptDetector("ring", radii=(6.0,))
    img = world.render_scene(world.Scene("green", ()))
    d = ImageDraw.Draw(img)
    world.CONCEPTS["ring"].draw(d, 10, 12, 6)
    x = as_tensor(img)
    maps = det.colour_maps(x)  # [parts + 1, H, W]
    kernel = det.kernels[0][:, 0]  # [parts + 1, k, k]
    k = kernel.shape[-1]
    got = det.score_map(img)[0]
    for cy in range(k // 2, 32 - k // 2):
        for cx in range(k // 2, 32 - k // 2):
            window = maps[:, cy - k // 2 : cy + k // 2 + 1, cx - k // 2 : cx + k // 2 + 1]
            want = (window * kernel).sum(dim=(1, 2)).min()
            assert got[cy, cx].item() == pytest.approx(want.item(), abs=1e-5)
    assert int(got.flatten().argmax()) in {12 * 32 + 10, 12 * 32 + 9, 11 * 32 + 10, 11 * 32 + 9}


def test_detector_boxes_tell_left_from_right():
    img = Image.new("RGB", (64, 32), world.PALETTE["green"])
    world.CONCEPTS["checker"].draw(ImageDraw.Draw(img), 14, 16, 8)
    det = ConceptDetector("checker")
    assert det.score(img, (0.0, 0.0, 0.5, 1.0)) >= 0.5
    assert det.score(img, (0.5, 0.0, 1.0, 1.0)) < 0.1


def test_placement_finds_each_concept_in_its_own_box_and_nowhere_else():
    """``evaluate.placement`` on a stand-in pipeline that draws the sprites itself."""
    from mos.toyworld.evaluate import placement

    def stand_in(order):
        def pipe(prompts, width, height, **_):
            out = []
            for _ in prompts:
                img = Image.new("RGB", (width, height), world.PALETTE["green"])
                for i, name in enumerate(order):
                    world.CONCEPTS[name].draw(ImageDraw.Draw(img), 32 * i + 16, 16, 9)
                out.append(img)
            return out

        return pipe

    right = placement(stand_in(["checker", "ring"]), ["checker", "ring"], n=2)
    assert right.all_placed == 1.0 and right.in_own_box == [1.0, 1.0]
    assert right.own_beats_other == 1.0 and right.images[0].size == (64, 32)
    swapped = placement(stand_in(["ring", "checker"]), ["checker", "ring"], n=2)
    assert swapped.all_placed == 0.0 and swapped.in_own_box == [0.0, 0.0]
    assert swapped.own_beats_other == 0.0
    twice = placement(stand_in(["ring", "ring"]), ["checker", "ring"], n=2)
    assert twice.in_own_box == [0.0, 1.0] and twice.all_placed == 0.0  # also in the other box
    alone = placement(stand_in(["ring"]), ["ring"], n=1)  # one concept: one box, no other
    assert alone.all_placed == 1.0 and alone.own_beats_other == 1.0


def test_the_toy_base_loads_offline_and_follows_prompts():
    from mos.common.base import load_base_model
    from mos.common.pipeline import MixOfShowPipeline
    from mos.toyworld.train import held_out_prompts

    base = load_base_model("toy")
    assert base.source == "toy" and base.default_resolution == 32
    assert load_base_model("toy").fingerprint == base.fingerprint
    pipe = MixOfShowPipeline.from_base(base)
    triples = held_out_prompts(16, seed=11)
    prompts = [world.Scene(b, (world.Thing(c, s, 0, 0, 0),)).caption for c, s, b in triples]
    images = pipe(
        prompts,
        num_inference_steps=20,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
    )
    readings = [analyse(img) for img in images]
    pairs = list(zip(readings, triples, strict=True))
    right = sum(r.matches(c, s, b) for r, (c, s, b) in pairs)
    # measured: colour 16, background 16, shape 15, all three 15 of 16 (run 5; run 4 had 12,
    # run 3 9); chance for all three is under 1%. Shape (circle vs square) is the weak one.
    assert sum(r.colour == c for r, (c, _, _) in pairs) >= 14
    assert sum(r.background == b for r, (_, _, b) in pairs) >= 15
    assert right >= 12


def test_regional_sampling_puts_base_world_objects_in_their_boxes():
    """Regional prompts on the trained base (no concepts): each half gets its own object.
    The same prompt without regions, at the same 64x32 size, mostly gets a row of small
    objects in mixed colours."""
    from mos.common.base import load_base_model
    from mos.common.pipeline import MixOfShowPipeline
    from mos.common.regions import Region

    pipe = MixOfShowPipeline.from_base(load_base_model("toy"))
    right = {"regional": 0, "plain": 0}
    for (c1, s1), (c2, s2) in ((("red", "circle"), ("blue", "square")),
                               (("yellow", "triangle"), ("purple", "circle"))):  # fmt: skip
        where = "on a green background"
        regions = [
            Region(f"a {c1} {s1} {where}", (0.0, 0.1, 0.5, 0.9)),
            Region(f"a {c2} {s2} {where}", (0.5, 0.1, 1.0, 0.9)),
        ]
        for mode in right:
            images = pipe(
                [f"a {c1} {s1} and a {c2} {s2} {where}"] * 6,
                num_inference_steps=25,
                guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0),
                regions=regions if mode == "regional" else (),
                width=64,
                height=32,
            )
            for img in images:
                left, rest = analyse(img.crop((0, 0, 32, 32))), analyse(img.crop((32, 0, 64, 32)))
                right[mode] += left.colour == c1 and rest.colour == c2
    # measured on run 5: regional 8 of 12, plain 1 of 12 (run 4: 12 and 5)
    assert right["regional"] >= 7, right
    assert right["plain"] <= right["regional"] - 4, right


# --- concepts on the toy model: one tuning per concept, shared by the tests below --------
# The demo's settings (``TOY_LOCON``: ED-LoRA with LoCon on the up-block convolutions, 1000
# steps), the three tunings at once in worker processes of one thread each (3 minutes on 2
# cores, against 5 one after another). The paper's ED-LoRA alone draws the toy concepts'
# colours but rarely their layout (RESULTS.md, convolution adapters), so it is rarely
# detected (the checker in 1 of 8 samples). Three concepts with distinct colours that this tuning learns well; the house,
# the demo's third, is learned (5 of 8 detected) but loses most of it in fusion.
CONCEPTS = ("checker", "halfmoon", "ring")


@pytest.fixture(scope="module")
def packages():
    from mos.toyworld.evaluate import TOY_LOCON, toy_train_config, tune_many

    return tune_many(CONCEPTS, toy_train_config(**TOY_LOCON), workers=3)


@pytest.fixture(scope="module")
def alone(packages):
    """Each concept's own model: 16 samples of its training caption at seed 4."""
    from mos.toyworld.evaluate import concept_identity, single_concept_pipeline

    return {
        n: concept_identity(single_concept_pipeline(packages[n]), n, n=16, seed=4) for n in CONCEPTS
    }


@pytest.fixture(scope="module")
def fused3(packages):
    from mos.common.fused import FusedModel
    from mos.server.fusion import FusionEngine
    from mos.toyworld.evaluate import fused_pipeline, toy_base

    pkgs = [packages[n] for n in CONCEPTS]
    result = FusionEngine(toy_base(), pkgs).fuse(progress=False)
    return fused_pipeline(FusedModel.from_packages(result.strategy, result.factors, pkgs))


def test_a_short_tuning_makes_each_concept_detectable_where_the_base_does_not_draw_it(alone):
    from mos.common.pipeline import MixOfShowPipeline
    from mos.toyworld.evaluate import identity, samples, toy_base

    base = MixOfShowPipeline.from_base(toy_base())
    for name in CONCEPTS:
        word = world.CONCEPTS[name].class_word
        before = identity(samples(base, f"a photo of a {word}", 8, 2), name)
        assert before.detected == 0.0 and before.mean_score < 0.05, (name, before.scores)
        # measured: detected in 14 / 12 / 13 of 16 samples (mean 0.59 / 0.56 / 0.55)
        assert alone[name].detected >= 0.5, alone[name]


def test_the_convolution_adapters_carry_the_layout(packages):
    """The checker's package without its convolution adapters (what the paper's ED-LoRA
    keeps) draws its colours but not its squares."""
    from dataclasses import replace

    from mos.toyworld.evaluate import concept_identity, single_concept_pipeline

    locon = packages["checker"]
    assert locon.conv_rank == 16 and any(".conv1.lora_A" in k for k in locon.lora)
    attention_only = replace(
        locon, lora={k: v for k, v in locon.lora.items() if ".conv" not in k}, conv_rank=0
    )
    with_conv = concept_identity(single_concept_pipeline(locon), "checker", n=8, seed=2)
    without = concept_identity(single_concept_pipeline(attention_only), "checker", n=8, seed=2)
    # measured: 0.59 with 7 of 8 detected, against 0.18 with 1 of 8
    assert with_conv.detected >= 0.5 and without.detected <= 0.25, (with_conv, without)
    assert with_conv.mean_score >= without.mean_score + 0.2, (with_conv, without)


def test_gradient_fusion_of_three_concepts_keeps_each_detected(alone, fused3):
    from mos.toyworld.evaluate import concept_identity

    fused = {n: concept_identity(fused3, n, n=16, seed=4) for n in CONCEPTS}
    # measured (16 samples at seed 4): alone detected 14 / 12 / 13, fused 14 / 9 / 11
    # (mean 0.59 / 0.56 / 0.55 -> 0.57 / 0.46 / 0.53)
    for name in CONCEPTS:
        assert fused[name].detected >= 0.4, (name, fused[name])
        assert fused[name].mean_score >= 0.75 * alone[name].mean_score, (name, fused[name])
    total = sum(f.mean_score for f in fused.values())
    assert total >= 0.85 * sum(a.mean_score for a in alone.values()), fused


def test_two_regions_put_each_fused_concept_in_its_box(fused3):
    """Regional sampling in side-by-side tiles (the demo's layout) puts the checker left and
    the halfmoon right; the plain prompt naming both, at the same size, does not."""
    from mos.toyworld.evaluate import placement

    names = ["checker", "halfmoon"]
    regional = placement(fused3, names, n=8, seed=3, tiles=True, photo_prompts=True)
    plain = placement(fused3, names, n=8, seed=3, tiles=True, photo_prompts=True, regional=False)
    # measured: each in its own box in 7 of 8 seeds, both (and neither elsewhere) in 6;
    # the plain prompt: 6 and 0, never both
    assert min(regional.in_own_box) >= 0.625, regional.in_own_box
    assert regional.all_placed >= 0.5, regional.all_placed
    assert plain.all_placed <= regional.all_placed - 0.375, (plain.all_placed, regional)


def test_native_views_put_each_fused_concept_on_its_own_side(fused3):
    from mos.toyworld.evaluate import placement

    # on the whole 64x32 canvas one concept takes over (own side highest in about half of
    # the pairs); in windows of the base's own size, each is drawn on its own side
    names = ["checker", "halfmoon"]
    whole = placement(fused3, names, n=8, seed=3, photo_prompts=True)
    views = placement(fused3, names, n=8, seed=3, views=True, photo_prompts=True)
    # measured: own side highest in 16 of 16 pairs with views, 9 of 16 without
    assert views.own_beats_other >= 0.9, views
    assert views.own_beats_other >= whole.own_beats_other + 0.25, (whole, views)


def test_the_training_script_writes_weights_that_load_back(tmp_path, monkeypatch):
    from mos.toyworld.model import load_toy_components
    from mos.toyworld.train import main

    out = tmp_path / "toy.safetensors"
    args = ["--out", str(out), "--images", "64", "--vae-steps", "2", "--vae-batch", "8",
            "--steps", "2", "--batch", "8", "--eval-prompts", "2"]  # fmt: skip
    assert main(args) == 0
    _, text_encoder, unet, vae, info = load_toy_components(out)
    assert info["steps"] == 2 and "held_out_adherence" not in info  # written before the eval
    assert vae.config.scaling_factor > 0
    assert (tmp_path / "toy.loss.png").is_file() and (tmp_path / "toy.samples.png").is_file()

    assert json.loads((tmp_path / "toy.json").read_text())["held_out_adherence"]["n"] == 2

    # continuing from those weights without VAE steps keeps the VAE and its scale
    more = tmp_path / "more.safetensors"
    args = ["--out", str(more), "--init", str(out), "--images", "64", "--vae-steps", "0",
            "--steps", "1", "--batch", "8", "--eval-prompts", "2", "--two-tone", "0.5"]  # fmt: skip
    assert main(args) == 0
    _, _, _, vae2, info2 = load_toy_components(more)
    assert vae2.config.scaling_factor == vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(vae.parameters(), vae2.parameters(), strict=True))
    assert info2["init"] == str(out) and info2["two_tone"] == 0.5 and info2["wide"] == 0.0

    # wide canvases: their share of the steps, and two objects read back on a 64x32 canvas
    wide = tmp_path / "wide.safetensors"
    args = ["--out", str(wide), "--init", str(out), "--images", "64", "--vae-steps", "0",
            "--steps", "2", "--batch", "8", "--eval-prompts", "4", "--wide", "0.5",
            "--wide-images", "16", "--wide-parts", "2"]  # fmt: skip
    assert main(args) == 0
    info3 = json.loads((tmp_path / "wide.json").read_text())
    assert info3["wide"] == 0.5 and info3["wide_parts"] == [2] and info3["wide_images"] == 16
    assert info3["wide_adherence"]["n"] == 2 and (tmp_path / "wide.wide.png").is_file()

    # another UNet width (a GPU recipe): recorded in the file, rebuilt by the loader
    narrow = tmp_path / "narrow.safetensors"
    args = ["--out", str(narrow), "--images", "64", "--vae-steps", "1", "--vae-batch", "8",
            "--steps", "1", "--batch", "8", "--eval-prompts", "2", "--unet-channels", "16,32,32"]  # fmt: skip
    assert main(args) == 0
    _, _, unet4, _, info4 = load_toy_components(narrow)
    assert tuple(unet4.config.block_out_channels) == (16, 32, 32)
    assert info4["unet_channels"] == [16, 32, 32] and info["unet_channels"] == [48, 96, 96]
    # wherever "toy" is named, $MOS_TOY_WEIGHTS swaps in such a base
    from mos.common.base import load_base_model

    monkeypatch.setenv("MOS_TOY_WEIGHTS", str(narrow))
    assert tuple(load_base_model("toy").unet.config.block_out_channels) == (16, 32, 32)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--unet-channels", "48,96"], "3 blocks, each a multiple of 8"),
        (["--unet-channels", "48,90,96"], "3 blocks, each a multiple of 8"),
        (["--unet-channels", "64,wide,128"], "comma-separated whole numbers"),
        (["--unet-channels", "64,128,128", "--init", "x.safetensors"], "keeps the init"),
    ],
)
def test_the_training_script_refuses_unet_widths_it_cannot_build(tmp_path, capsys, extra, message):
    from mos.toyworld.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "t.safetensors"), *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


def test_the_committed_sketch_adapter_fits_the_toy_base_and_its_sketches_are_followed():
    from mos.common.adapters import check_adapter_fits
    from mos.toyworld.evaluate import toy_base
    from mos.toyworld.train_adapter import ADAPTER, load_sketch_adapter, sketch_eval

    base = toy_base()
    adapter = load_sketch_adapter()
    check_adapter_fits(adapter, base.unet, base.vae_scale_factor)
    info = json.loads((ADAPTER / "training.json").read_text())
    assert info["base"] == WEIGHTS.name  # trained against the committed base
    without = sketch_eval(base, None, n=6, steps=20)
    with_sketch = sketch_eval(base, adapter, n=6, steps=20)
    # samples draw the sketch's lines (measured 0.91 vs 0.31 over 48 prompts)
    assert with_sketch["single"]["sketch_cover"] >= without["single"]["sketch_cover"] + 0.3
    assert with_sketch["wide"]["sketch_cover"] >= without["wide"]["sketch_cover"] + 0.2


def test_the_adapter_training_script_writes_a_loadable_adapter(tmp_path):
    from mos.toyworld.train_adapter import load_sketch_adapter, main

    out = tmp_path / "adapter"
    args = ["--out", str(out), "--images", "32", "--wide-images", "8", "--steps", "2",
            "--batch", "4", "--eval-prompts", "2"]  # fmt: skip
    assert main(args) == 0
    adapter = load_sketch_adapter(out)
    assert adapter.config.in_channels == 1
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 2 and set(info["with_sketch_adapter"]) == {"single", "wide", "n"}
    for name in ("loss.png", "samples-single.png", "samples-wide.png"):
        assert (out / name).is_file()
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--wide", "1.0"])
    with pytest.raises(FileNotFoundError, match="train it with"):
        load_sketch_adapter(tmp_path / "missing")


def test_two_tone_objects_are_drawn_as_captioned_and_never_in_a_concepts_colours():
    import numpy as np

    halves = world.Scene("blue", (world.Thing("red", "square", 16, 16, 10, "halves", "white"),))
    center = world.Scene("blue", (world.Thing("red", "circle", 16, 16, 10, "center", "yellow"),))
    assert halves.caption == "a red and white square on a blue background"
    assert center.caption == "a red circle with a yellow center on a blue background"
    a, b = np.asarray(world.render_scene(halves)), np.asarray(world.render_scene(center))
    assert tuple(a[16, 10]) == world.PALETTE["red"] and tuple(a[16, 22]) == world.PALETTE["white"]
    assert tuple(b[16, 16]) == world.PALETTE["yellow"] and tuple(b[16, 8]) == world.PALETTE["red"]
    assert tuple(a[2, 2]) == tuple(b[2, 2]) == world.PALETTE["blue"]
    checker = world.Scene("blue", (world.Thing("red", "square", 16, 16, 10, "checker", "white"),))
    top = world.Scene("blue", (world.Thing("red", "square", 16, 16, 10, "top", "white"),))
    assert checker.caption == "a red and white checker square on a blue background"
    assert top.caption == "a red square with a white top on a blue background"
    c, t = np.asarray(world.render_scene(checker)), np.asarray(world.render_scene(top))
    red, white = world.PALETTE["red"], world.PALETTE["white"]
    # quarters (row, column): top-left, top-right, bottom-left, bottom-right
    assert [tuple(c[y, x]) for y, x in ((10, 10), (10, 22), (22, 10), (22, 22))] == [
        red, white, white, red]  # fmt: skip
    assert [tuple(t[y, x]) for y, x in ((10, 10), (10, 22), (22, 10), (22, 22))] == [
        white, white, red, red]  # fmt: skip

    rng = random.Random(0)
    scenes = [world.random_scene(rng, two_tone=1.0) for _ in range(2000)]
    pairs = {frozenset((s.things[0].colour, s.things[0].second)) for s in scenes}
    assert len(pairs) > 15 and not pairs & world.concept_colour_pairs()
    assert {s.things[0].pattern for s in scenes} == set(world.PATTERNS)

    # the training script's default data is what the committed base was trained on (run 5:
    # 30% two-tone), and without two-tone objects the world draws what it drew before they
    # existed: fingerprints of captions and geometry
    import hashlib

    from mos.toyworld.train import make_dataset

    def fingerprint(scenes):
        rows = [
            sc.caption + ";" + ";".join(f"{t.cx:.6f},{t.cy:.6f},{t.r:.6f}" for t in sc.things)
            for sc in scenes
        ]
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]

    rng = random.Random(5)
    plain = [world.random_scene(rng, n_objects=1 + i % 2) for i in range(100)]
    assert fingerprint(plain) == "0bd796a39251d1a0"
    assert fingerprint(make_dataset(200, 0, two_tone=0.3)[1]) == "7ff40b052dcd3094"
    assert json.loads(WEIGHTS.with_suffix(".json").read_text())["two_tone"] == 0.3


def test_the_toy_base_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    from mos.common.base import BaseModelError, load_base_model

    monkeypatch.setattr("mos.toyworld.model.WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(BaseModelError, match="python -m mos.toyworld.train"):
        load_base_model("toy")
    monkeypatch.setenv("MOS_TOY_WEIGHTS", str(tmp_path / "other.safetensors"))
    with pytest.raises(BaseModelError, match=r"other.safetensors \(named by \$MOS_TOY_WEIGHTS\)"):
        load_base_model("toy")


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_min_snr_weights_cap_clean_timesteps_and_keep_noisy_ones(kind):
    """Brute force per timestep: the clean-latent error counts SNR + 1 times in the velocity
    error and SNR times in the noise error; weighted, it counts min(that, gamma) times."""
    from diffusers import DDPMScheduler

    from mos.toyworld.model import TOY_SCHEDULER_CONFIG
    from mos.toyworld.train import min_snr_weights

    sched = DDPMScheduler.from_config(dict(TOY_SCHEDULER_CONFIG, prediction_type=kind))
    weights = min_snr_weights(sched, 5.0)
    for t in (0, 100, 400, 700, 999):
        ab = float(sched.alphas_cumprod[t])
        snr = ab / (1 - ab)
        counts = snr + 1 if kind == "v_prediction" else snr
        assert float(weights[t]) * counts == pytest.approx(min(counts, 5.0), rel=1e-5)
    assert float(weights[999]) == 1.0 and float(weights[0]) < 0.01
    assert torch.equal(min_snr_weights(sched, 0.0), torch.ones(1000))


@pytest.mark.parametrize(
    ("names", "workers", "message"),
    [
        (["checker", "checker"], None, "each concept once"),
        ([], None, "each concept once"),
        (["checker", "dog"], None, "no toy concept ['dog']"),
        (["checker"], 0, "workers must be at least 1"),
        (["checker"], -1, "workers must be at least 1"),
    ],
)
def test_tune_many_refuses_bad_requests_before_starting_workers(names, workers, message):
    from mos.toyworld.evaluate import toy_train_config, tune_many

    with pytest.raises(ValueError, match=re.escape(message)):
        tune_many(names, toy_train_config(steps=1), workers=workers)


def test_tune_many_gives_the_same_packages_with_one_worker_or_several():
    """One worker tunes the two in turn in one process, two workers side by side: the
    packages are the same to the bit, and they are full packages of their concepts."""
    from mos.toyworld.evaluate import toy_train_config, tune_many

    config = toy_train_config(steps=3, conv_rank=4)
    one = tune_many(["checker", "ring"], config, workers=1)
    two = tune_many(["ring", "checker"], config, workers=2)
    for name in ("checker", "ring"):
        assert one[name].concept.token == f"<{name}>" and one[name].conv_rank == 4
        a, b = one[name].tensors(), two[name].tensors()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(one["checker"].embeddings, one["ring"].embeddings)
