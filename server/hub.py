"""The model hub: a gRPC service (``proto/hub.proto``) over the server's registry.

A client that was offline during a round gets the latest fused model here (``mos-client
pull``). The hub reads the state folder only: ``registry.json`` for the versions and who
sent each concept, ``models/v<N>/`` for the files, ``fusion_report.json`` for fidelity. It
never needs the base model. A download names a version and one of that version's listed
files (nothing else can be asked for: no paths), starts at an offset (resume), and every
chunk carries the file's SHA-256.

Security: TLS with the SuperLink's certificate and key; with SuperNode authentication,
every call must be signed by a registered SuperNode key (``mos.common.hubauth``), checked
by an interceptor before any handler runs.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc

from ..common.files import file_sha256
from ..common.hubauth import HubAuthError, KeyRing
from ..proto import hub_pb2, hub_pb2_grpc
from .registry import INDEX

log = logging.getLogger(__name__)
CHUNK = 256 * 1024
REPORT_JSON = "fusion_report.json"
REPORT_MD = "fusion_report.md"


class _Index:
    """A read-only view of the registry index, re-read when it changes on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stamp: tuple[float, int] | None = None
        self._data: dict = {}
        self._sha: dict[tuple[str, float, int], str] = {}
        self._lock = threading.Lock()

    def data(self) -> dict:
        path = self.root / INDEX
        with self._lock:
            try:
                st = path.stat()
                stamp = (st.st_mtime, st.st_size)
                if stamp != self._stamp:
                    self._data = json.loads(path.read_text())
                    self._stamp = stamp
            except (OSError, ValueError):
                self._data, self._stamp = {}, None
            return self._data

    def versions(self) -> list[dict]:
        return [m for m in self.data().get("models", []) if (self.root / m["path"]).is_dir()]

    def version(self, number: int) -> dict:
        versions = self.versions()
        if not versions:
            raise LookupError("no fused model has been published yet")
        if number == 0:
            return versions[-1]
        for m in versions:
            if int(m["version"]) == number:
                return m
        have = ", ".join(str(m["version"]) for m in versions)
        raise LookupError(f"no version {number}; the hub has {have}")

    def files(self, m: dict) -> list[hub_pb2.FileInfo]:
        folder = self.root / m["path"]
        out = []
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith(".") and not p.is_symlink():
                out.append(hub_pb2.FileInfo(name=p.name, size=p.stat().st_size, sha256=self.sha(p)))
        return out

    def sha(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_mtime, st.st_size)
        if key not in self._sha:
            self._sha[key] = file_sha256(path)
        return self._sha[key]


class ModelHub(hub_pb2_grpc.ModelHubServicer):
    """The service; ``state_dir`` is the server's ``--state-dir``."""

    def __init__(self, state_dir: Path, chunk_size: int = CHUNK) -> None:
        self.index = _Index(Path(state_dir))
        self.chunk_size = chunk_size

    def _version(self, number: int, context) -> dict:
        try:
            return self.index.version(number)
        except LookupError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            raise  # abort raises; this line is never reached

    def ListVersions(self, request, context):  # noqa: N802 - gRPC names
        data = self.index.data()
        return hub_pb2.ListVersionsReply(
            versions=[
                hub_pb2.VersionInfo(
                    version=int(m["version"]),
                    strategy=m.get("strategy", ""),
                    concepts=m.get("concepts", []),
                    created_at=float(m.get("created_at", 0.0)),
                    files=self.index.files(m),
                    base_fingerprint=data.get("base_fingerprint", ""),
                    base_source=data.get("base_source", ""),
                )
                for m in self.index.versions()
            ]
        )

    def ListConcepts(self, request, context):  # noqa: N802
        m = self._version(request.version, context)
        folder = self.index.root / m["path"]
        entries = {e["name"]: e for e in self.index.data().get("concepts", [])}
        table = _read_json(folder / "concepts.json").get("concepts", [])
        report = {r.get("concept"): r for r in _read_json(folder / REPORT_JSON).get("concepts", [])}
        out = []
        for c in table:
            e = entries.get(c["name"], {})
            token = f"<{c['name']}>"
            out.append(
                hub_pb2.ConceptInfo(
                    name=c["name"],
                    token=token,
                    class_word=c.get("class_word", ""),
                    method=c.get("method", ""),
                    origin=str(e.get("origin", "")),
                    accepted_at=float(e.get("accepted_at", 0.0)),
                    round=int(e.get("round", 0)),
                    fidelity_json=json.dumps(report[token]) if token in report else "",
                )
            )
        return hub_pb2.ListConceptsReply(version=int(m["version"]), concepts=out)

    def GetReport(self, request, context):  # noqa: N802
        m = self._version(request.version, context)
        folder = self.index.root / m["path"]
        if not (folder / REPORT_JSON).is_file():
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {m['version']} has no fusion report")
        md = folder / REPORT_MD
        return hub_pb2.GetReportReply(
            version=int(m["version"]),
            json=(folder / REPORT_JSON).read_text(),
            markdown=md.read_text() if md.is_file() else "",
        )

    def Download(self, request, context):  # noqa: N802
        m = self._version(request.version, context)
        files = {f.name: f for f in self.index.files(m)}
        info = files.get(request.file)
        if info is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"version {m['version']} has no file {request.file!r}; it has {', '.join(files)}",
            )
        if request.offset > info.size:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {request.offset} is past the end ({info.size})",
            )
        path = self.index.root / m["path"] / info.name
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while True:
                block = f.read(self.chunk_size)
                if not block and offset < info.size:
                    context.abort(grpc.StatusCode.DATA_LOSS, f"{info.name} shrank while being sent")
                yield hub_pb2.Chunk(
                    offset=offset, data=block, total_size=info.size, sha256=info.sha256
                )
                offset += len(block)
                if offset >= info.size:
                    return


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class _AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        method = handler_call_details.method
        try:
            who = self.keys.check(metadata, method)
        except HubAuthError as err:
            reason = str(err)
            log.warning("hub: refused %s: %s", method, reason)

            def deny(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

            handler = continuation(handler_call_details)
            if handler is not None and handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(deny)
            return grpc.unary_unary_rpc_method_handler(deny)
        log.debug("hub: %s by %s", method, who[:40])
        return continuation(handler_call_details)


def serve_hub(
    state_dir: Path,
    address: str,
    *,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    keys: KeyRing | None = None,
    chunk_size: int = CHUNK,
    max_workers: int = 8,
) -> grpc.Server:
    """Start the hub on ``address`` (``host:port``); returns the started server (``.stop()``)."""
    interceptors = [_AuthInterceptor(keys)] if keys is not None else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors
    )
    hub_pb2_grpc.add_ModelHubServicer_to_server(ModelHub(state_dir, chunk_size), server)
    if certfile is not None and keyfile is not None:
        creds = grpc.ssl_server_credentials(
            [(Path(keyfile).read_bytes(), Path(certfile).read_bytes())]
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"the model hub cannot listen on {address}")
    server.start()
    log.info(
        "model hub on %s (%s%s)",
        address,
        "TLS" if certfile else "no TLS",
        ", SuperNode keys" if keys else "",
    )
    return server


def main(argv: list[str] | None = None) -> int:
    """``mos-hub``: serve a state folder's fused models without running a federation."""
    import argparse
    import time

    from ..common.cli import UsageError, run_command

    p = argparse.ArgumentParser(
        prog="mos-hub",
        description="Serve the fused models of a mos-server --state-dir to mos-client pull.",
    )
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--ssl-certfile", type=Path, help="server certificate (PEM)")
    p.add_argument("--ssl-keyfile", type=Path, help="server private key (PEM)")
    p.add_argument(
        "--supernode-public-key",
        type=Path,
        action="append",
        default=[],
        help="accept only calls signed by these SuperNode keys (repeat per client)",
    )

    def run(args: argparse.Namespace) -> None:
        if not (args.state_dir / INDEX).is_file():
            raise UsageError(f"--state-dir {args.state_dir}: no {INDEX} (not a mos-server state)")
        if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
            raise UsageError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for path in [args.ssl_certfile, args.ssl_keyfile, *args.supernode_public_key]:
            if path is not None and not path.is_file():
                raise UsageError(f"{path}: no such file")
        if not args.ssl_certfile:
            log.warning("no TLS certificate given: the hub runs without TLS")
        keys = KeyRing.from_files(args.supernode_public_key) if args.supernode_public_key else None
        server = serve_hub(
            args.state_dir.resolve(),
            f"{args.host}:{args.port}",
            certfile=args.ssl_certfile,
            keyfile=args.ssl_keyfile,
            keys=keys,
        )
        print(f"model hub on {args.host}:{args.port}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            server.stop(grace=1.0).wait()

    return run_command("mos-hub", p, run, (HubAuthError, OSError), argv, interrupted="stopped")
