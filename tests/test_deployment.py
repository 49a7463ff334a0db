"""End to end with real processes on loopback: ``mos-server`` (a real ``flower-superlink``)
and ``mos-client --superlink`` (real ``flower-supernode``s), and the simulation demo.

The commands are called by absolute path with a ``PATH`` that lacks the venv, as from a
venv that is not activated. Every process is ended by PID (and process group) in teardown;
ports are chosen free.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from mos.common.fused import FusedModel
from mos.common.processes import Managed, free_port
from mos.toyworld.demo import DEMO_CONCEPTS, TOY_DEMO_CONCEPTS, write_demo_photos

BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BIN / "flower-superlink").exists(), reason="Flower's commands are not installed"
    ),
]


def bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env["PATH"] = "/usr/bin:/bin"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # five processes share two cores in CI
    return env


@pytest.fixture
def procs():
    started: list[Managed] = []

    def start(cmd: list[str], log: Path) -> Managed:
        p = Managed([str(BIN / cmd[0]), *cmd[1:]], bare_env(), log)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop(timeout=5)


def wait(proc: Managed, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.alive():
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.cmd[0]} still running after {timeout} s:{proc._tail()}")
        time.sleep(0.3)
    return proc.proc.returncode


def photo_folders(root: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for i, name in enumerate(("smiley1", "ring2", "star3", "face4", "ring5")):
        _, class_word, draw = DEMO_CONCEPTS[i % len(DEMO_CONCEPTS)]  # face4: a face, ring5: a ring
        folder = root / name
        write_demo_photos(folder, count=2, seed=i, size=32, draw=draw)
        out[name] = (folder, class_word)
    return out


def client_cmd(name, folders, port, tmp: Path, *extra) -> list[str]:
    folder, class_word = folders[name]
    return [
        "mos-client",
        "--data", str(folder),
        "--concept", f"<{name}>",
        "--class-word", class_word,
        "--superlink", f"127.0.0.1:{port}",
        "--insecure",
        "--model-dir", str(tmp / "clients" / name),
        "--max-wait", "60",
        *extra,
    ]  # fmt: skip


def latest(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "clients" / name / "latest.json").read_text())


def test_deployment_with_faults_then_a_restart_that_fuses_without_retraining(tmp_path, procs):
    folders = photo_folders(tmp_path / "photos")
    state = tmp_path / "server"
    logs = tmp_path / "logs"
    logs.mkdir()

    def server(min_clients: int, port: int, tag: str, *extra: str) -> Managed:
        return procs(
            [
                "mos-server",
                "--min-clients", str(min_clients),
                "--steps", "4",
                "--fusion-steps", "3",
                "--state-dir", str(state),
                "--port", str(port),
                "--round-timeout", "40",
                "--wait-clients", "120",
                "--device", "cpu",
                "--hub-port", "0",
                *extra,
            ],
            logs / f"server-{tag}.log",
        )  # fmt: skip

    # --- round 1: two good clients, one sending a corrupt package, one killed in training
    port = free_port()
    srv = server(4, port, "1")
    srv.wait_for_port("127.0.0.1", port, timeout=60)
    good = {
        n: procs(client_cmd(n, folders, port, tmp_path), logs / f"{n}.log")
        for n in ("smiley1", "ring2")
    }
    bad = procs(
        client_cmd("star3", folders, port, tmp_path, "--test-fault", "corrupt-package"),
        logs / "star3.log",
    )
    doomed = procs(client_cmd("face4", folders, port, tmp_path), logs / "face4.log")
    deadline = time.monotonic() + 120
    while "Receiving: train message" not in (logs / "face4.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, "face4 never got its training message"
        time.sleep(0.1)
    doomed.stop(timeout=1)  # killed while training: the round goes on without it

    assert wait(srv, 240) == 0, srv._tail()
    result = json.loads((state / "result.json").read_text())
    rnd = result["rounds"][0]
    assert sorted(rnd["accepted"]) == ["ring2", "smiley1"]
    reasons = " ".join(r["reason"] for r in rnd["rejected"])
    assert "sha256" in reasons  # star3's corrupt package, named in the log too
    assert "sha256" in (logs / "server-1.log").read_text()
    assert len(rnd["missing"]) + len(rnd["rejected"]) == 2  # star3 rejected, face4 gone
    assert result["version"] == 1 and sorted(result["concepts"]) == ["ring2", "smiley1"]
    for name, proc in good.items():
        assert wait(proc, 60) == 0, proc._tail()
        info = latest(tmp_path, name)
        assert info["version"] == 1 and sorted(info["concepts"]) == ["<ring2>", "<smiley1>"]
        fused = FusedModel.load_compact(info["file"])
        assert sorted(c.name for c in fused.concepts) == ["ring2", "smiley1"]
    assert wait(bad, 60) == 0  # it is still a member: it got the model, without its concept
    assert (state / "models/v1/fusion_report.md").is_file()

    # --- round 2: the server restarts on its state folder; smiley1 comes back (its
    # package is registered: not retrained, not resent), ring5 is new, ring2 stays away
    port = free_port()
    srv = server(2, port, "2", "--no-report")
    srv.wait_for_port("127.0.0.1", port, timeout=60)
    again = procs(client_cmd("smiley1", folders, port, tmp_path), logs / "smiley1-2.log")
    new = procs(client_cmd("ring5", folders, port, tmp_path), logs / "ring5.log")
    assert wait(srv, 240) == 0, srv._tail()
    result = json.loads((state / "result.json").read_text())
    rnd = result["rounds"][0]
    assert rnd["known"] == ["smiley1"] and rnd["accepted"] == ["ring5"]
    assert result["version"] == 2
    assert sorted(result["concepts"]) == ["ring2", "ring5", "smiley1"]  # ring2 from disk
    for name, proc in (("smiley1", again), ("ring5", new)):
        assert wait(proc, 60) == 0, proc._tail()
        assert latest(tmp_path, name)["version"] == 2
    assert "tuning <smiley1>" not in (logs / "smiley1-2.log").read_text()


def test_tls_and_supernode_auth_admit_only_registered_clients_end_to_end(tmp_path, procs):
    """The deploy/ recipe on loopback: certificates from deploy/make_certs.py, a TLS
    SuperLink that knows alice's and bob's keys; mallory's SuperNode is refused; the two
    registered ones complete a round; then the model hub serves alice and refuses mallory."""
    import subprocess

    certs = tmp_path / "certs"
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "deploy" / "make_certs.py"), "--out", str(certs),
         "--client", "alice", "--client", "bob", "--client", "mallory"],
        check=True, capture_output=True,
    )  # fmt: skip
    folders = photo_folders(tmp_path / "photos")
    logs = tmp_path / "logs"
    logs.mkdir()
    port, hub_port = free_port(), free_port()
    srv = procs(
        [
            "mos-server", "--min-clients", "2", "--steps", "3", "--fusion-steps", "2",
            "--no-report", "--state-dir", str(tmp_path / "server"), "--port", str(port),
            "--hub-port", str(hub_port), "--stay", "--device", "cpu", "--wait-clients", "120",
            "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
            "--ssl-ca-certfile", str(certs / "ca.pem"), "--enable-supernode-auth",
            "--supernode-public-key", str(certs / "clients" / "alice.pub"),
            "--supernode-public-key", str(certs / "clients" / "bob.pub"),
        ],
        logs / "server.log",
    )  # fmt: skip
    srv.wait_for_port("127.0.0.1", port, timeout=60)

    def client(name: str, concept: str, max_wait: str = "60") -> Managed:
        cmd = client_cmd(concept, folders, port, tmp_path, "--max-wait", max_wait)
        cmd.remove("--insecure")
        cmd += ["--root-certificates", str(certs / "ca.pem"),
                "--auth-private-key", str(certs / "clients" / name)]  # fmt: skip
        return procs(cmd, logs / f"{name}.log")

    mallory = client("mallory", "star3", max_wait="15")
    alice, bob = client("alice", "smiley1"), client("bob", "ring2")
    assert wait(mallory, 120) != 0, "an unregistered SuperNode was let in"
    for proc in (alice, bob):
        assert wait(proc, 240) == 0, proc._tail()
    info = latest(tmp_path, "smiley1")
    assert info["version"] == 1 and sorted(info["concepts"]) == ["<ring2>", "<smiley1>"]
    assert not (tmp_path / "clients" / "star3" / "latest.json").exists()

    # the hub, still serving (--stay): same TLS, same keys
    def pull(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "mos-client"), "pull", "--hub", f"127.0.0.1:{hub_port}",
             "--root-certificates", str(certs / "ca.pem"),
             "--auth-private-key", str(certs / "clients" / name),
             "--model-dir", str(tmp_path / "pulled" / name)],
            env=bare_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    got = pull("alice")
    assert got.returncode == 0, got.stderr
    assert json.loads((tmp_path / "pulled/alice/latest.json").read_text())["version"] == 1
    refused = pull("mallory")
    assert refused.returncode == 2 and "not signed by a registered SuperNode key" in refused.stderr
    os.kill(srv.pid, signal.SIGTERM)
    assert wait(srv, 30) == 130


def test_the_readme_demo_runs_the_simulation_end_to_end(demo_run):
    out = demo_run.out
    result = json.loads((out / "server/result.json").read_text())
    names = sorted(TOY_DEMO_CONCEPTS)  # the default base is the toy world's
    assert sorted(result["concepts"]) == names
    status = json.loads((out / "server/status.json").read_text())
    assert status["stage"] == "done" and status["version"] == 1
    report = (out / "server/models/v1/fusion_report.md").read_text()
    assert all(f"<{n}>" in report for n in names)
    for name in names:
        info = json.loads((out / "clients" / name / "latest.json").read_text())
        assert sorted(info["concepts"]) == [f"<{n}>" for n in names]
    log = demo_run.log
    assert "SuperLink" in log
    # it ends with the concepts composed side by side and the detector's verdict
    with Image.open(out / "composed.png") as composed:
        assert composed.width > composed.height
    assert all(f"<{n}> found in its own box" in log for n in names)


def test_the_app_bundle_carries_no_weights_images_or_code(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from mos.common.federation import write_app_dir

    app = write_app_dir(tmp_path / "app")
    (app / "weights.safetensors").write_bytes(b"x" * 100)
    (app / "photo.png").write_bytes(b"x" * 100)
    for folder, want in (
        (app, {"pyproject.toml", "README.md"}),
        (Path(__file__).resolve().parents[1], {"pyproject.toml", "README.md", "LICENSE"}),
    ):
        fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder)))
        assert set(fab.namelist()) - {".info/CONTENT"} == want


def cmdlines_with(text: str) -> list[str]:
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            out.append(cmd)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_server_and_its_superlink(tmp_path, procs, sig):
    port = free_port()
    state = tmp_path / "state"
    # started as from a script's background job: SIGINT inherited as ignored
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        srv = procs(
            [
                "mos-server",
                "--min-clients",
                "3",
                "--state-dir",
                str(state),
                "--port",
                str(port),
                "--hub-port",
                str(free_port()),
            ],  # fmt: skip
            tmp_path / "server.log",
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 90
    while "waiting for clients" not in (tmp_path / "server.log").read_text(errors="replace"):
        assert srv.alive() and time.monotonic() < deadline, srv._tail()
        time.sleep(0.2)
    assert cmdlines_with(f"--port {port}")  # the SuperLink is up
    os.kill(srv.pid, sig)
    assert wait(srv, 30) == 130
    assert "interrupted" in (tmp_path / "server.log").read_text()
    time.sleep(1)
    assert cmdlines_with(f"--port {port}") == []
    assert cmdlines_with(str(state)) == []  # no flwr run, ServerApp or SuperExec left
