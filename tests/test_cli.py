import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mos.client.cli import main
from mos.common.package import ConceptPackage
from tests.conftest import make_photos


def test_local_mode_writes_package_grid_and_loss_curve(photo_dir, tmp_path, capsys):
    out = tmp_path / "pkgs" / "dog1.safetensors"
    code = main(
        [
            "--data",
            str(photo_dir),
            "--concept",
            "<dog1>",
            "--steps",
            "4",
            "--sample-steps",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    pkg = ConceptPackage.load(out)
    assert pkg.concept.token == "<dog1>" and pkg.concept.class_word == "dog"  # guessed from dog1
    assert pkg.training["steps"] == 4 and pkg.training["num_photos"] == 3
    grid = Image.open(tmp_path / "pkgs" / "dog1.samples.png")
    # 3 prompts x 3 LoRA scales of 32 px images enlarged to 128 px cells, plus labels
    assert grid.width > 3 * 128 and grid.height > 3 * 128
    assert Image.open(tmp_path / "pkgs" / "dog1.loss.png").size == (480, 240)
    # running again does not silently overwrite
    code = main(["--data", str(photo_dir), "--concept", "dog1", "--steps", "1", "--out", str(out)])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_every_training_option_reaches_the_package(photo_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    opts = [
        "--lr-embedding",
        "0.002",
        "--lr-text",
        "3e-5",
        "--lr-unet",
        "5e-4",
        "--rank",
        "2",
        "--conv-rank",
        "3",
        "--batch-size",
        "3",
        "--lora-dropout",
        "0.1",
        "--kv-dropout",
        "0.2",
        "--seed",
        "7",
        "--resolution",
        "48",
        "--steps",
        "2",
        "--flip-p",
        "0",
    ]
    assert (
        main(
            [
                "--data",
                str(photo_dir),
                "--concept",
                "dog1",
                *opts,
                "--no-samples",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    t = ConceptPackage.load(out).training
    assert (t["lr_embedding"], t["lr_text"], t["lr_unet"]) == (0.002, 3e-5, 5e-4)
    assert (t["rank"], t["batch_size"], t["lora_dropout"], t["kv_dropout"]) == (2, 3, 0.1, 0.2)
    assert (t["seed"], t["resolution"], t["steps"], t["flip_p"]) == (7, 48, 2, 0.0)
    assert t["conv_rank"] == 3 and ConceptPackage.load(out).conv_rank == 3


def test_vanilla_lora_method(photo_dir, tmp_path):
    out = tmp_path / "cat2.safetensors"
    assert (
        main(
            [
                "--data",
                str(photo_dir),
                "--concept",
                "cat2",
                "--method",
                "lora",
                "--steps",
                "2",
                "--no-samples",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    pkg = ConceptPackage.load(out)
    assert pkg.concept.method == "lora" and pkg.embeddings.shape[:2] == (1, 1)
    assert not (tmp_path / "cat2.samples.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concept", "../evil"], "is not allowed"),
        (["--concept", "<a b>"], "is not allowed"),
        (["--concept", "x" * 80], "is not allowed"),
        (["--concept", "zebra1"], "not a single token"),
        (["--concept", "1234"], "cannot guess a class word"),
        (["--concept", "dog1", "--class-word", "two words"], "not a single token"),
        (["--concept", "dog1", "--steps", "0"], "--steps"),
        (["--concept", "dog1", "--resolution", "30"], "multiple of 8"),
        (["--concept", "dog1", "--kv-dropout", "1.5"], "--kv-dropout"),
        (["--concept", "dog1", "--conv-rank", "-1"], "--conv-rank"),
        (["--concept", "dog1", "--conv-rank", "200"], "--conv-rank 200 is too large"),
        (["--concept", "dog1", "--out", "x.bin"], ".safetensors"),
        (["--concept", "dog1", "--base-model", "nowhere/at-all-missing-dir/x"], "not found"),
    ],
)
def test_bad_arguments_fail_early_and_write_nothing(
    photo_dir, tmp_path, capsys, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    code = main(
        ["--data", str(photo_dir), *args, "--steps" if "--steps" not in args else "--seed", "1"]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("mos-client: error:")
    assert set(tmp_path.rglob("*")) == before


def test_bad_photos_fail_with_every_file_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_photos(tmp_path / "p", count=2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    (folder / "readme.md").write_text("hello")
    code = main(["--data", str(folder), "--concept", "dog1", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "broken.jpg" in err and "readme.md" in err
    assert not (tmp_path / "dog1.safetensors").exists()
    code = main(
        [
            "--data",
            str(folder),
            "--concept",
            "dog1",
            "--steps",
            "1",
            "--skip-bad",
            "--no-samples",
            "--quiet",
        ]
    )
    assert code == 0 and (tmp_path / "dog1.safetensors").exists()
    code = main(["--data", str(tmp_path / "empty"), "--concept", "dog2"])
    assert code == 2 and "not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs_from_an_unactivated_venv(photo_dir, tmp_path):
    exe = Path(sys.executable).with_name("mos-client")
    if not exe.exists():
        pytest.skip("mos-client is not installed beside this interpreter")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    proc = subprocess.run(
        [
            str(exe),
            "--data",
            str(photo_dir),
            "--concept",
            "<dog1>",
            "--steps",
            "2",
            "--no-samples",
            "--out",
            str(tmp_path / "d.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and ConceptPackage.load(tmp_path / "d.safetensors")


def test_real_loading_paths_from_the_command_line(tiny, photo_dir, tmp_path, capsys, monkeypatch):
    """A diffusers folder and a single-file checkpoint (with its config) as --base-model."""
    from mos.common.single_file import save_single_file

    tiny.save_pretrained(tmp_path / "sd")
    ckpt = save_single_file(tiny, tmp_path / "sd.safetensors")
    common = [
        "--data",
        str(photo_dir),
        "--concept",
        "dog1",
        "--steps",
        "1",
        "--no-samples",
        "--quiet",
    ]
    out1, out2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main([*common, "--base-model", str(tmp_path / "sd"), "--out", str(out1)]) == 0
    assert (
        main(
            [
                *common,
                "--base-model",
                str(ckpt),
                "--base-config",
                str(tmp_path / "sd"),
                "--resolution",
                "48",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    a, b = ConceptPackage.load(out1), ConceptPackage.load(out2)
    assert a.base_fingerprint == b.base_fingerprint == tiny.fingerprint
    assert b.training["resolution"] == 48
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main([*common, "--base-model", str(ckpt), "--out", str(tmp_path / "c.safetensors")])
    assert code == 2 and "--base-config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "pass --root-certificates CA.pem"),
        (["--insecure", "--trusted-entities", "missing.yaml"], "missing.yaml: no such file"),
        (["--root-certificates", "nope.pem"], "nope.pem: no such file"),
        (["--insecure", "--auth-private-key", "nokey"], "nokey: no such file"),
    ],
)
def test_joining_checks_tls_and_trust_files_before_starting_anything(
    photo_dir, tmp_path, capsys, extra, message
):
    code = main(["--data", str(photo_dir), "--concept", "<dog1>", "--superlink", "127.0.0.1:1",
                 "--model-dir", str(tmp_path / "m"), *extra])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err


def test_mos_demo_refuses_zero_fusion_steps_before_writing_anything(tmp_path, capsys):
    from mos.toyworld.demo import main as demo_main

    with pytest.raises(SystemExit) as exc:
        demo_main(["--out", str(tmp_path / "demo"), "--fusion-steps", "0"])
    assert exc.value.code == 2
    assert "--fusion-steps must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
