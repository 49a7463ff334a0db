"""The model hub (proto/hub.proto): listing, verified and resumable downloads, TLS and
SuperNode-key authentication, and the generated code being up to date."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from mos.client.pull import HubClient, HubError, pull
from mos.client.pull import main as pull_main
from mos.common.base import build_tiny
from mos.common.fused import COMPACT_FILE, FusedModel
from mos.common.processes import free_port
from mos.proto import hub_pb2
from mos.server.hub import ModelHub, serve_hub
from mos.server.registry import Registry
from tests.conftest import random_fused, random_package

ROOT = Path(__file__).resolve().parents[1]


def publish(state: Path, names: list[str], report: bool = True) -> Registry:
    """A server state folder with one more fused model version of ``names``."""
    base = build_tiny()
    reg = Registry.open(state, base)
    pkgs = [random_package(base, n, seed=i) for i, n in enumerate(names)]
    for p in pkgs:
        reg.accept(p, origin=f"node-{p.concept.name}", node_id=7, round=1)
    fused = random_fused(base, pkgs)
    rep = None
    if report:
        rep = {
            "concepts": [
                {
                    "concept": p.concept.token,
                    "weight-fusion": {"text_drift": 0.0, "unet_drift": 0.1},
                }
                for p in pkgs
            ],
            "prior_drift": {"weight-fusion": 0.01},
            "mean": {"weight-fusion": {"text_drift": 0.0, "unet_drift": 0.1}},
        }
    reg.publish(fused, rep)
    return reg


@pytest.fixture
def state(tmp_path):
    s = tmp_path / "state"
    publish(s, ["dog1", "cat2"])
    return s


@pytest.fixture
def hub(state):
    port = free_port()
    server = serve_hub(state, f"127.0.0.1:{port}", chunk_size=4096)
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


def test_list_versions_concepts_and_report(hub):
    client = HubClient(hub, insecure=True)
    versions = client.call("ListVersions", hub_pb2.ListVersionsRequest()).versions
    assert [v.version for v in versions] == [1]
    assert sorted(versions[0].concepts) == ["cat2", "dog1"]
    assert COMPACT_FILE in {f.name for f in versions[0].files}
    concepts = client.call("ListConcepts", hub_pb2.ListConceptsRequest()).concepts
    by_token = {c.token: c for c in concepts}
    assert set(by_token) == {"<dog1>", "<cat2>"}
    assert by_token["<dog1>"].origin == "node-dog1" and by_token["<dog1>"].round == 1
    assert json.loads(by_token["<dog1>"].fidelity_json)["weight-fusion"]["unet_drift"] == 0.1
    report = client.call("GetReport", hub_pb2.GetReportRequest())
    assert "prior_drift" in report.json
    with pytest.raises(HubError, match="no version 9"):
        client.call("ListConcepts", hub_pb2.ListConceptsRequest(version=9))


def test_pull_verifies_and_stores_the_latest_version(hub, state, tmp_path):
    out = tmp_path / "client"
    folder = pull(HubClient(hub, insecure=True), out, progress=False)
    assert folder == out / "fused" / "v1"
    for f in (state / "models" / "v1").iterdir():
        assert (folder / f.name).read_bytes() == f.read_bytes()
    latest = json.loads((out / "latest.json").read_text())
    assert latest["version"] == 1 and latest["file"] == str(folder / COMPACT_FILE)
    fused = FusedModel.load_compact(latest["file"])
    assert sorted(c.name for c in fused.concepts) == ["cat2", "dog1"]
    assert not list((out / "fused").glob(".*partial*"))


def test_files_outside_a_version_cannot_be_asked_for(hub):
    client = HubClient(hub, insecure=True)
    for name in ("../../registry.json", "/etc/passwd", "registry.json", ""):
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream(hub_pb2.DownloadRequest(version=1, file=name)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


class CuttingHub(ModelHub):
    """Sends ``cut_after`` chunks of the first download, then drops the connection."""

    def __init__(self, *a, cut_after: int = 3, **kw):
        super().__init__(*a, **kw)
        self.cut_after = cut_after
        self.requests: list[tuple[str, int]] = []

    def Download(self, request, context):  # noqa: N802
        self.requests.append((request.file, request.offset))
        for i, chunk in enumerate(super().Download(request, context)):
            if self.cut_after is not None and i == self.cut_after:
                self.cut_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut (test)")
            yield chunk


def _serve(servicer) -> tuple[grpc.Server, str]:
    from concurrent import futures

    from mos.proto import hub_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    hub_pb2_grpc.add_ModelHubServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_cut_download_resumes_from_where_it_stopped(state, tmp_path, monkeypatch):
    monkeypatch.setattr("mos.client.pull.time.sleep", lambda s: None)
    servicer = CuttingHub(state, chunk_size=4096, cut_after=3)
    server, address = _serve(servicer)
    try:
        folder = pull(HubClient(address, insecure=True), tmp_path / "c", progress=False)
    finally:
        server.stop(0).wait()
    compact = [(f, o) for f, o in servicer.requests if f == COMPACT_FILE]
    assert compact == [(COMPACT_FILE, 0), (COMPACT_FILE, 3 * 4096)]  # resumed, not restarted
    want = (state / "models" / "v1" / COMPACT_FILE).read_bytes()
    assert (folder / COMPACT_FILE).read_bytes() == want


def test_a_failed_download_leaves_the_previous_version_in_use(state, tmp_path, monkeypatch):
    out = tmp_path / "c"
    port = free_port()
    server = serve_hub(state, f"127.0.0.1:{port}")
    try:
        pull(HubClient(f"127.0.0.1:{port}", insecure=True), out, progress=False)
        publish(state, ["dog1", "cat2", "owl3"])  # v2 appears on the server ...
        v2 = state / "models" / "v2" / COMPACT_FILE
        # ... and is corrupted after its digest was taken: the client must notice
        client = HubClient(f"127.0.0.1:{port}", insecure=True)
        client.call("ListVersions", hub_pb2.ListVersionsRequest())  # hub caches the digest
        data = bytearray(v2.read_bytes())
        data[len(data) // 2] ^= 0xFF
        import os

        st = v2.stat()
        v2.write_bytes(bytes(data))
        os.utime(v2, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time: stale digest
        with pytest.raises(HubError, match="SHA-256 does not match"):
            pull(client, out, progress=False)
    finally:
        server.stop(0).wait()
    latest = json.loads((out / "latest.json").read_text())
    assert latest["version"] == 1
    assert FusedModel.load_compact(latest["file"]).concepts  # still loads
    assert not (out / "fused" / "v2").exists()


def _certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out", str(out),
         "--client", "alice", "--client", "mallory"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_tls_hub_with_supernode_keys_admits_only_registered_clients(state, tmp_path, capsys):
    from mos.common.hubauth import KeyRing

    certs = _certs(tmp_path)
    keys = KeyRing.from_files([certs / "clients" / "alice.pub"])
    port = free_port()
    server = serve_hub(
        state,
        f"127.0.0.1:{port}",
        certfile=certs / "server.pem",
        keyfile=certs / "server.key",
        keys=keys,
    )
    address = f"127.0.0.1:{port}"
    ca = certs / "ca.pem"
    try:
        out = tmp_path / "alice"
        args = ["--hub", address, "--root-certificates", str(ca), "--model-dir", str(out)]
        assert pull_main([*args, "--auth-private-key", str(certs / "clients" / "alice")]) == 0
        assert json.loads((out / "latest.json").read_text())["version"] == 1
        capsys.readouterr()

        for who, extra in (
            ("mallory", ["--auth-private-key", str(certs / "clients" / "mallory")]),
            ("nobody", []),
        ):
            out = tmp_path / who
            args = ["--hub", address, "--root-certificates", str(ca), "--model-dir", str(out)]
            assert pull_main([*args, *extra]) == 2
            assert "not signed by a registered SuperNode key" in capsys.readouterr().err
            assert not (out / "latest.json").exists()

        # a client that does not trust the server's CA, or speaks plain gRPC, gets nothing
        other = _certs(tmp_path / "other")
        for extra in (["--root-certificates", str(other / "ca.pem")], ["--insecure"]):
            out = tmp_path / "stranger"
            code = pull_main(["--hub", address, "--model-dir", str(out), "--retries", "0",
                              "--auth-private-key", str(certs / "clients" / "alice"), *extra])  # fmt: skip
            assert code == 2
            assert "cannot reach the model hub" in capsys.readouterr().err
            assert not (out / "latest.json").exists()
    finally:
        server.stop(0).wait()


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    import shutil

    work = tmp_path / "repo"
    (work / "proto").mkdir(parents=True)
    shutil.copy(ROOT / "proto" / "hub.proto", work / "proto")
    shutil.copy(ROOT / "proto" / "build.sh", work / "proto")
    subprocess.run(
        ["bash", "proto/build.sh"],
        cwd=work,
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for name in ("hub_pb2.py", "hub_pb2.pyi", "hub_pb2_grpc.py"):
        assert (work / "proto" / name).read_text() == (ROOT / "proto" / name).read_text(), (
            f"proto/{name} is stale: run proto/build.sh"
        )
