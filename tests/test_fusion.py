import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mos.client.data import load_photo_folder
from mos.client.trainer import train_concept
from mos.common.base import build_tiny
from mos.common.config import TrainConfig
from mos.common.fused import FusedModel, load_fused_folder
from mos.common.package import ConceptPackage, PackageError
from mos.server.cli import main as fuse_main
from mos.server.fusion import FusionConfig, FusionEngine
from mos.server.recorder import GramRecorder
from mos.server.report import fidelity, noise_predictions, trajectory
from mos.server.solve import (
    cross_term,
    fused_factors,
    gram,
    lbfgs_reference,
    objective,
    solve_downs,
    symmetric,
    weight_fusion_factors,
)
from tests.conftest import sample_tensor, shape_photos

# --- pure math ---------------------------------------------------------------------------


def objective_dense(
    delta: torch.Tensor,
    grams: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
) -> float:
    """Brute force: the objective of a dense update ``delta`` ``[out, in]``."""
    total = 0.0
    for g, b, a in zip(grams, ups, downs, strict=True):
        m = delta.to(g.dtype) - b.to(g.dtype) @ a.to(g.dtype)
        total += float(torch.trace(m @ g @ m.T))
    return total


def _problem(seed=0, n=3, d_in=10, d_out=7, r=2, rows=40):
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(d_out, r, generator=g) for _ in range(n)]
    downs = [torch.randn(r, d_in, generator=g) for _ in range(n)]
    xs = [torch.randn(rows, d_in, generator=g) for _ in range(n)]
    return ups, downs, xs


def test_exact_solve_equals_brute_force_least_squares():
    ups, downs, xs = _problem()
    up, down = fused_factors([gram(x) for x in xs], ups, downs, ridge=0.0)
    assert up.shape[1] == down.shape[0] == sum(a.shape[0] for a in downs)  # rank <= sum r
    stacked = torch.cat(xs).double()
    targets = torch.cat(
        [x.double() @ (b @ a).double().T for x, b, a in zip(xs, ups, downs, strict=True)]
    )
    brute = torch.linalg.lstsq(stacked, targets).solution.T
    assert torch.allclose(up @ down, brute, atol=1e-9)


def test_ridge_keeps_unvisited_directions_at_the_base():
    ups, downs, xs = _problem(d_in=10, rows=40)
    xs = [
        torch.cat([x[:, :6], torch.zeros(x.shape[0], 4)], dim=1) for x in xs
    ]  # last 4 dims never seen
    up, down = fused_factors([gram(x) for x in xs], ups, downs)
    delta = up @ down
    assert delta[:, 6:].abs().max() < 1e-12
    assert delta[:, :6].abs().max() > 0.1


def test_ridge_toward_the_average_fills_unvisited_directions_with_it():
    ups, downs, xs = _problem(d_in=10, rows=40)
    xs = [torch.cat([x[:, :6], torch.zeros(x.shape[0], 4)], dim=1) for x in xs]
    grams = [gram(x) for x in xs]
    total = torch.stack(grams).sum(0)
    crosses = [cross_term(a, g) for a, g in zip(downs, grams, strict=True)]
    new = solve_downs(total, crosses, ridge=1e-3, toward_average=downs)
    delta = torch.cat([b.double() for b in ups], 1) @ torch.cat(new)
    average = sum((b @ a).double() for b, a in zip(ups, downs, strict=True)) / 3
    assert torch.allclose(delta[:, 6:], average[:, 6:], atol=1e-9)
    # a huge ridge is weight fusion; no ridge is the plain least-squares solution
    huge = solve_downs(total, crosses, ridge=1e9, toward_average=downs)
    assert torch.allclose(
        torch.cat([b.double() for b in ups], 1) @ torch.cat(huge), average, atol=1e-6
    )


def _one_ulp_off(g: torch.Tensor) -> torch.Tensor:
    """``g`` with entry (0, 1) moved by one ulp: what a GEMM kernel that sums ``(0, 1)`` and
    ``(1, 0)`` in different orders (MKL on AVX-512) hands back for a symmetric product."""
    g = g.clone()
    g[0, 1] = torch.nextafter(g[0, 1], g[0, 1] + 1)
    return g


def test_symmetric_is_bitwise_symmetric_and_the_solve_reads_both_triangles_alike():
    ups, downs, xs = _problem()
    grams = [gram(x) for x in xs]
    for g in grams:  # by construction: G_ij + G_ji and G_ji + G_ij are the same number
        assert torch.equal(g, g.T)
    skewed = _one_ulp_off(torch.stack(grams).sum(0))
    assert not torch.equal(skewed, skewed.T)
    assert torch.equal(symmetric(skewed), symmetric(skewed).T)
    assert torch.equal(symmetric(skewed), symmetric(skewed.T))
    batched = torch.stack([skewed, skewed.T])
    assert torch.equal(symmetric(batched), symmetric(batched).mT)
    crosses = [cross_term(a, g) for a, g in zip(downs, grams, strict=True)]
    # the same system whichever triangle held the kernel's rounding: bitwise the same
    # answer, since the solve sees identical inputs (same kernels, same order)
    for a, b in zip(
        solve_downs(skewed, crosses, ridge=1e-3),
        solve_downs(skewed.T, crosses, ridge=1e-3),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_every_recorded_gram_is_bitwise_symmetric():
    """Rows, per-model and reduced recording: each addend is ``symmetric``'s, and sums of
    bitwise-symmetric matrices stay so (elementwise addition of equal operands)."""
    lin = torch.nn.Linear(9, 3)
    downs = torch.randn(2, 4, 9, dtype=torch.float64)
    xs = [torch.randn(6, 11, 9) for _ in range(3)]
    for kwargs in ({}, {"groups": 2}, {"reduce": {"lin": downs}}):
        with GramRecorder({"lin": lin}, **kwargs) as rec:
            for x in xs:
                lin(x)
        g = rec.grams["lin"]
        assert torch.equal(g, g.mT), kwargs


def test_streaming_gram_equals_batch_and_hooks_are_removed():
    lin = torch.nn.Linear(5, 3)
    xs = [torch.randn(4, 7, 5) for _ in range(6)]
    with GramRecorder({"lin": lin}) as rec:
        for x in xs:
            lin(x)
    assert not lin._forward_pre_hooks
    assert rec.rows["lin"] == 6 * 4 * 7
    assert torch.allclose(rec.grams["lin"], gram(torch.cat(xs)), atol=1e-10)
    assert rec.grams["lin"].shape == (5, 5)  # memory: d^2, whatever the number of rows
    with pytest.raises(RuntimeError), GramRecorder({"lin": lin}):
        raise RuntimeError("boom")
    assert not lin._forward_pre_hooks


def test_reducing_recorder_keeps_only_the_total_and_the_cross_terms():
    lin = torch.nn.Linear(5, 3)
    downs = torch.randn(2, 4, 5, dtype=torch.float64)  # 2 models, R = 4
    xs = [torch.randn(6, 3, 5) for _ in range(3)]  # rows 0-2: model 0, rows 3-5: model 1
    with GramRecorder({"lin": lin}, reduce={"lin": downs}) as rec:
        for x in xs:
            lin(x)
    per_model = [gram(torch.cat([x[3 * k : 3 * k + 3] for x in xs])) for k in range(2)]
    assert torch.allclose(rec.grams["lin"], per_model[0] + per_model[1], atol=1e-10)
    for k in range(2):
        assert torch.allclose(rec.crosses["lin"][k], downs[k] @ per_model[k], atol=1e-9)


def test_lbfgs_reference_is_within_one_percent_of_the_exact_objective():
    ups, downs, xs = _problem(seed=1, d_in=8, rows=200)
    grams = [gram(x) for x in xs]
    exact = objective(*fused_factors(grams, ups, downs, ridge=0.0), grams, ups, downs)
    run = lbfgs_reference(xs, ups, downs, iterations=500)
    ref = objective_dense(run.delta.double(), grams, ups, downs)
    assert exact <= ref <= exact * 1.01


def test_lbfgs_reference_runs_every_iteration_and_keeps_the_best_iterate():
    """On an ill-conditioned problem (known optimum: the normal equations) the authors'
    settings (tolerances 1e-16) run all 500 iterations and end within 1% of the optimum."""
    g = torch.Generator().manual_seed(0)
    ups = [torch.randn(24, 4, generator=g) for _ in range(3)]
    downs = [torch.randn(4, 32, generator=g) for _ in range(3)]
    scale = torch.diag(torch.logspace(0, -3, 32))
    xs = [torch.randn(300, 32, generator=g) @ scale for _ in range(3)]
    grams = [gram(x) for x in xs]
    optimum = objective(*fused_factors(grams, ups, downs, ridge=0.0), grams, ups, downs)
    run = lbfgs_reference(xs, ups, downs, iterations=500)
    assert run.iterations == 500 and run.evaluations >= 500
    assert optimum <= objective_dense(run.delta.double(), grams, ups, downs) <= optimum * 1.01
    assert run.loss <= run.first_loss
    # the best iterate, not the last: its loss is the smallest the closure saw
    x, t = torch.cat(xs), torch.cat([x @ (b @ a).T for x, b, a in zip(xs, ups, downs, strict=True)])
    mse = float(((x @ run.delta.T - t) ** 2).mean())
    assert mse == pytest.approx(run.loss, rel=1e-4)


def test_weight_fusion_formula():
    ups, downs, _ = _problem()
    up, down = weight_fusion_factors(ups, downs)
    assert torch.allclose(
        up @ down, sum((b @ a).double() for b, a in zip(ups, downs, strict=True)) / 3
    )
    up, down = weight_fusion_factors(ups, downs, [1.0, 0.0, 0.5])
    want = (ups[0] @ downs[0] + 0.5 * ups[2] @ downs[2]).double()
    assert torch.allclose(up @ down, want)


# --- on tiny concept models ------------------------------------------------------------


def _concept_photos(kind: int, folder: Path) -> Path:
    """Three visibly different 'concepts': yellow discs, framed blue squares, red stripes."""
    return shape_photos(folder, ("disc", "framed", "stripes")[kind], seed=kind)


@pytest.fixture(scope="module")
def concept_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("concepts")
    files = []
    config = TrainConfig(steps=60, batch_size=4, lr_unet=3e-3, lr_text=1e-3)
    for kind, (name, cls) in enumerate([("dog1", "dog"), ("cat2", "cat"), ("toy3", "toy")]):
        photos = load_photo_folder(_concept_photos(kind, root / name))
        result = train_concept(build_tiny(), photos, name, cls, config, progress=False)
        files.append(result.package.save(root / f"{name}.safetensors"))
    return files


def _packages(files):
    return [ConceptPackage.load(f) for f in files]


@pytest.mark.slow
def test_fusing_one_concept_reproduces_its_model(concept_files):
    engine = FusionEngine(build_tiny(), _packages(concept_files[:1]))
    result = engine.fuse(progress=False)
    report = fidelity(engine, [result])
    assert report["concepts"][0]["gradient-fusion"]["unet_drift"] < 1e-4  # ridge only
    assert report["concepts"][0]["gradient-fusion"]["text_drift"] < 1e-4


@pytest.mark.slow
def test_gradient_fusion_keeps_concepts_better_than_weight_fusion(concept_files):
    engine = FusionEngine(build_tiny(), _packages(concept_files))
    gradient, weight = engine.fuse(progress=False), engine.weight_fusion()
    report = fidelity(engine, [gradient, weight])
    gf, wf = report["mean"]["gradient-fusion"], report["mean"]["weight-fusion"]
    assert gf["unet_drift"] < 0.7 * wf["unet_drift"]
    for stage in ("text", "kv", "spatial"):  # least squares: never worse on its own features
        assert gradient.objective[stage] <= gradient.objective[f"{stage} (weight fusion)"]
    # and it disturbs plain prompts no more than averaging does
    assert report["prior_drift"]["gradient-fusion"] <= 1.05 * report["prior_drift"]["weight-fusion"]


def _close(a, b):
    return a.keys() == b.keys() and all(
        torch.allclose(a[k][0] @ a[k][1], b[k][0] @ b[k][1], atol=1e-6)
        for k in a  # fp32 batching
    )


@pytest.mark.slow
def test_incremental_add_and_remove_equal_fusing_from_scratch(concept_files):
    config = FusionConfig(mode="independent")
    p = _packages(concept_files)
    scratch3 = FusionEngine(build_tiny(), p, config).fuse(progress=False).factors
    scratch2 = FusionEngine(build_tiny(), p[:2], config).fuse(progress=False).factors

    engine = FusionEngine(build_tiny(), p[:2], config)
    assert _close(engine.fuse(progress=False).factors, scratch2)
    recorded = []
    spatial = engine.stages[-1]
    original = spatial.record
    spatial.record = lambda eng, ns, *a: recorded.extend(ns) or original(eng, ns, *a)
    engine.add(p[2])
    assert _close(engine.fuse(progress=False).factors, scratch3)
    assert recorded == ["toy3"]  # only the new concept was sampled
    engine.remove("toy3")
    assert _close(engine.fuse(progress=False).factors, scratch2)
    assert recorded == ["toy3"]


@pytest.mark.slow
def test_sampling_concepts_in_one_batch_gives_the_same_fusion(concept_files):
    p = _packages(concept_files)
    one = FusionEngine(build_tiny(), p, FusionConfig(concept_batch=1, samples=2)).fuse(
        progress=False
    )
    many = FusionEngine(build_tiny(), p, FusionConfig(concept_batch=3, samples=2)).fuse(
        progress=False
    )
    assert all(
        torch.allclose(
            one.factors[k][0] @ one.factors[k][1],
            many.factors[k][0] @ many.factors[k][1],
            atol=1e-6,
        )
        for k in one.factors
    )
    assert many.objective["spatial"] == pytest.approx(one.objective["spatial"], rel=1e-6)


@pytest.mark.slow
def test_compact_form_on_the_base_equals_the_fused_folder(concept_files, tmp_path):
    out = tmp_path / "fused"
    assert fuse_main(["--concepts", *map(str, concept_files), "--out", str(out), "--no-grid"]) == 0
    for name in (
        "concepts.json",
        "fused.safetensors",
        "fusion_report.json",
        "fusion_report.md",
        "model_index.json",
    ):
        assert (out / name).is_file()
    folder_base, table = load_fused_folder(out)
    assert [c.token for c in table] == ["<dog1>", "<cat2>", "<toy3>"]
    compact = FusedModel.load_compact(out / "fused.safetensors")
    ranks = {down.shape[0] for _, down in compact.factors.values()}
    assert ranks == {12}  # exactly 3 x rank 4, no truncation
    fresh = build_tiny()
    compact_table = compact.attach(fresh)

    prompt = "a photo of a <dog1> and a <toy3>"
    want = sample_tensor(folder_base, table, prompt)
    assert torch.allclose(want, sample_tensor(fresh, compact_table, prompt), atol=1e-4)
    with pytest.raises(Exception, match="made for base"):
        FusedModel.load_compact(out / "fused.safetensors").attach(build_tiny(seed=1))


@pytest.mark.slow
def test_mos_fuse_refuses_bad_packages_before_work(concept_files, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a package")
    out = tmp_path / "out"
    code = fuse_main(
        ["--concepts", str(concept_files[0]), str(junk), str(concept_files[0]), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "junk.safetensors" in err and "the same package as" in err
    assert not out.exists()
    code = fuse_main(
        ["--concepts", str(concept_files[0]), "--base-model", "tiny:1", "--out", str(out)]
    )
    assert code == 2 and "another base model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_noise_predictions_depend_on_the_adapters(concept_files):
    engine = FusionEngine(build_tiny(), _packages(concept_files[:1]))
    prompts = ["photo of a <dog1>", "<dog1>"]
    engine.apply(None)
    inputs = trajectory(engine, prompts, seeds=2, steps=3)
    assert inputs[0].shape[0] == 3 * 2 * 2 and inputs[2].tolist()[:4] == [0, 0, 1, 1]
    base = noise_predictions(engine, prompts, inputs)
    engine.apply(engine.concept_factors("dog1"))
    assert not torch.allclose(base, noise_predictions(engine, prompts, inputs))


@pytest.mark.slow
def test_mos_fuse_with_the_reference_solver_and_weights(concept_files, tmp_path):
    out = tmp_path / "ref"
    args = ["--concepts", *map(str, concept_files[:2]), "--out", str(out), "--no-grid"]
    assert (
        fuse_main(
            [
                *args,
                "--solver",
                "lbfgs",
                "--mode",
                "independent",
                "--gram-dtype",
                "float32",
                "--compare",
            ]
        )  # fmt: skip
        == 0
    )
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["config"]["solver"] == "lbfgs" and report["config"]["gram_dtype"] == "float32"
    assert set(report["mean"]) == {"gradient-fusion", "weight-fusion"}  # --compare: both
    out2 = tmp_path / "wf"
    assert (
        fuse_main(
            [
                "--concepts",
                *map(str, concept_files[:2]),
                "--out",
                str(out2),
                "--no-grid",
                "--strategy",
                "weight-fusion",
                "--weights",
                "1",
                "0",
            ]
        )
        == 0
    )
    compact = FusedModel.load_compact(out2 / "fused.safetensors")
    assert compact.strategy == "weight-fusion"
    # without --compare the report holds the chosen strategy alone (no gradient fusion ran)
    assert set(json.loads((out2 / "fusion_report.json").read_text())["mean"]) == {"weight-fusion"}
    dog = ConceptPackage.load(concept_files[0])
    key = next(iter(compact.factors))
    up, down = compact.factors[key]
    want = dog.lora[f"{key}.lora_B.weight"] @ dog.lora[f"{key}.lora_A.weight"]
    assert torch.allclose(up @ down, want, atol=1e-6)  # weights 1, 0: exactly the first concept


def test_per_concept_alphas_scale_that_concepts_update_before_fusion():
    """The authors' ``unet_alpha`` / ``text_encoder_alpha``: one concept fused alone gives
    its own update; with alphas, that update scaled per part, the other concept untouched."""
    from tests.conftest import random_package

    base = build_tiny()
    packages = [random_package(base, "dog1", seed=1), random_package(base, "cat2", seed=2)]
    engine = FusionEngine(base, packages, FusionConfig(steps=2, resolution=16))
    plain = engine.concept_factors("dog1")
    engine.set_alpha("dog1", text=0.25, unet=0.5)
    scaled, other = engine.concept_factors("dog1"), engine.concept_factors("cat2")
    assert {engine.part_of[k] for k in plain} == {"text", "kv", "spatial"}
    for key, (up, down) in plain.items():
        alpha = 0.25 if engine.part_of[key] == "text" else 0.5
        torch.testing.assert_close(scaled[key][0] @ scaled[key][1], alpha * (up @ down))
    cat = FusionEngine(build_tiny(), [packages[1]], FusionConfig()).concept_factors("cat2")
    assert all(torch.equal(other[k][0], cat[k][0]) for k in cat)
    with pytest.raises(PackageError, match="unknown concept"):
        engine.set_alpha("cow3", 1.0, 1.0)


def test_mos_fuse_alpha_options_name_what_is_wrong():
    from mos.common.cli import UsageError
    from mos.server.cli import parse_alphas

    class Engine:
        names = ["dog1"]
        packages = {"dog1": type("P", (), {"concept": type("C", (), {"token": "<dog1>"})})}

    assert parse_alphas(["<dog1>=0.7"], ["<dog1>=0.8"], Engine()) == {"dog1": (0.7, 0.8)}
    assert parse_alphas([], ["<dog1>=0.8"], Engine()) == {"dog1": (1.0, 0.8)}
    for bad, why in (("<cat2>=1", "no concept <cat2>"), ("0.5", "TOKEN=ALPHA"),
                     ("<dog1>=x", "not a number"), ("<dog1>=-1", "between 0 and 10")):  # fmt: skip
        with pytest.raises(UsageError, match=why):
            parse_alphas([], [bad], Engine())


def test_a_name_given_twice_is_renamed_by_the_collision_rule():
    from mos.common.package import free_name
    from tests.conftest import random_package

    assert free_name("dog1", []) == "dog1"
    assert free_name("dog1", ["dog1"]) == "dog1-2"
    assert free_name("dog1", {"dog1", "dog1-2", "dog1-4"}) == "dog1-3"
    base = build_tiny()
    first, second = random_package(base, "dog1", seed=1), random_package(base, "dog1", seed=2)
    engine = FusionEngine(base, [first], FusionConfig(steps=2, resolution=16))
    with pytest.raises(PackageError, match="already taken"):
        engine.add(second, "b.safetensors")
    assert engine.add(second, "b.safetensors", rename=True) == "dog1-2"
    renamed = engine.packages["dog1-2"]
    assert renamed.concept.token == "<dog1-2>" and renamed.sha256 == second.sha256
    assert torch.equal(renamed.embeddings, second.embeddings)
    # both concepts are in the tokenizer, each with its own embeddings
    emb = base.text_encoder.get_input_embeddings().weight
    for pkg in (first, renamed):
        ids = base.tokenizer.convert_tokens_to_ids(pkg.concept.all_tokens())
        assert torch.equal(emb[ids].detach(), pkg.embeddings.reshape(len(ids), -1))
