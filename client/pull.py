"""``mos-client pull``: fetch a fused model from the server's model hub, verified.

    mos-client pull --hub server.example:9093 --root-certificates ca.pem --model-dir ./models
    mos-client pull --hub 127.0.0.1:9093 --insecure --list

Files are downloaded into ``<model-dir>/fused/.v<N>.partial/`` in chunks; an interrupted
download resumes where it stopped (the next run, or up to ``--retries`` times within one
run). Each file's SHA-256 is checked, and the compact model is loaded and its base
fingerprint compared, before the folder becomes ``fused/v<N>/`` (one rename) and
``latest.json`` is rewritten (atomically). Until then the previous version stays in place
and in use.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import grpc
from tqdm import tqdm

from ..common.cli import UsageError, run_command
from ..common.files import file_sha256
from ..common.fused import COMPACT_FILE, FusedModel
from ..common.hubauth import HubAuthError, load_private_key, sign_request
from ..common.package import PackageError
from ..proto import hub_pb2, hub_pb2_grpc
from .layout import FUSED_DIR, write_latest

log = logging.getLogger("mos.pull")
SERVICE = "/mos.hub.v1.ModelHub/"


class HubError(RuntimeError):
    """The hub refused, could not be reached, or sent something that does not verify."""


class HubClient:
    """Thin client over the stub: TLS or not, every call signed when a key is given."""

    def __init__(
        self,
        address: str,
        *,
        root_certificates: Path | None = None,
        insecure: bool = False,
        private_key: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        if insecure == (root_certificates is not None):
            raise UsageError("give --root-certificates CA.pem (TLS hub) or --insecure, not both")
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(root_certificates).read_bytes()
            )
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = hub_pb2_grpc.ModelHubStub(self.channel)
        self.key = load_private_key(private_key) if private_key else None
        self.address = address
        self.timeout = timeout

    def _meta(self, method: str):
        return sign_request(self.key, SERVICE + method) if self.key else None

    def call(self, method: str, request):
        try:
            return getattr(self.stub, method)(
                request, timeout=self.timeout, metadata=self._meta(method)
            )
        except grpc.RpcError as err:
            raise HubError(_explain(self.address, err)) from err

    def stream(self, request: hub_pb2.DownloadRequest):
        return self.stub.Download(request, timeout=None, metadata=self._meta("Download"))

    def close(self) -> None:
        self.channel.close()


def _explain(address: str, err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the model hub at {address} ({details}); is the server running, and "
            "does TLS match (--root-certificates for a TLS hub, --insecure for a plain one)?"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the hub at {address} refused this client: {details} (--auth-private-key)"
    return f"the hub at {address} answered {code.name if code else 'an error'}: {details}"


def download_file(
    client: HubClient,
    version: int,
    info: hub_pb2.FileInfo,
    part: Path,
    retries: int = 3,
    bar: tqdm | None = None,
) -> None:
    """Download one file into ``part``, resuming from its current size; verify its SHA-256."""
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > info.size:
            part.unlink()
            have = 0
        try:
            if have < info.size or info.size == 0:
                with open(part, "ab") as f:
                    request = hub_pb2.DownloadRequest(version=version, file=info.name, offset=have)
                    for chunk in client.stream(request):
                        if chunk.offset != have or chunk.sha256 != info.sha256:
                            raise HubError(
                                f"{info.name}: the hub's file changed during the download"
                            )
                        f.write(chunk.data)
                        have += len(chunk.data)
                        if bar is not None:
                            bar.update(len(chunk.data))
                        if have >= chunk.total_size:
                            break
            if file_sha256(part) != info.sha256:
                part.unlink()
                raise HubError(
                    f"{info.name}: SHA-256 does not match; the partial file was discarded"
                )
            return
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if (
                code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                or attempt >= retries
            ):
                raise HubError(_explain(client.address, err)) from err
            attempt += 1
            wait = min(8.0, 2.0 ** (attempt - 1))
            log.warning(
                "%s: interrupted at %d bytes (%s); resuming in %.0f s",
                info.name,
                have,
                code.name,
                wait,
            )
            time.sleep(wait)


def pull(
    client: HubClient,
    model_dir: Path,
    version: int = 0,
    *,
    base_fingerprint: str | None = None,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download ``version`` (0: the latest) into ``model_dir/fused/v<N>/``; returns that folder."""
    versions = client.call("ListVersions", hub_pb2.ListVersionsRequest()).versions
    if not versions:
        raise HubError(f"the hub at {client.address} has no fused model yet")
    chosen = (
        versions[-1] if version == 0 else next((v for v in versions if v.version == version), None)
    )
    if chosen is None:
        raise HubError(
            f"no version {version} on the hub; it has {', '.join(str(v.version) for v in versions)}"
        )
    names = [f.name for f in chosen.files]
    if COMPACT_FILE not in names:
        raise HubError(f"version {chosen.version} has no {COMPACT_FILE}")
    for name in names:  # the hub lists plain names; anything else is refused here too
        if Path(name).name != name or name.startswith(".") or "\x00" in name:
            raise HubError(f"the hub listed an unsafe file name {name!r}")
    fused_dir = model_dir / FUSED_DIR
    final = fused_dir / f"v{chosen.version}"
    if final.is_dir() and all(
        (final / f.name).is_file() and file_sha256(final / f.name) == f.sha256 for f in chosen.files
    ):
        log.info("v%d is already here and verified: %s", chosen.version, final)
        _point_latest(model_dir, chosen, final, FusedModel.load_compact(final / COMPACT_FILE))
        return final
    partial = fused_dir / f".v{chosen.version}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    total = sum(f.size for f in chosen.files)
    done = sum(
        min((partial / f"{f.name}.part").stat().st_size, f.size)
        if (partial / f"{f.name}.part").exists()
        else 0
        for f in chosen.files
    )
    if done:
        log.info("resuming v%d: %d of %d bytes already here", chosen.version, done, total)
    with tqdm(
        total=total,
        initial=done,
        unit="B",
        unit_scale=True,
        desc=f"v{chosen.version}",
        disable=not progress,
    ) as bar:
        for info in chosen.files:
            part = partial / f"{info.name}.part"
            download_file(client, chosen.version, info, part, retries, bar)
    # all verified: check the model itself before it replaces anything
    for info in chosen.files:
        (partial / f"{info.name}.part").replace(partial / info.name)
    try:
        fused = FusedModel.load_compact(partial / COMPACT_FILE)
    except (PackageError, OSError, ValueError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise HubError(f"v{chosen.version}: the downloaded model does not load ({err})") from err
    expected = base_fingerprint or chosen.base_fingerprint
    if expected and fused.base_fingerprint != expected:
        shutil.rmtree(partial, ignore_errors=True)
        raise HubError(
            f"v{chosen.version} is for base {fused.base_fingerprint[:12]}, expected {expected[:12]}"
        )
    if final.exists():
        shutil.rmtree(final)
    partial.replace(final)
    _point_latest(model_dir, chosen, final, fused)
    log.info(
        "v%d (%d concepts) verified and stored in %s", chosen.version, len(chosen.concepts), final
    )
    return final


def _point_latest(model_dir: Path, v: hub_pb2.VersionInfo, folder: Path, fused: FusedModel) -> None:
    sha = next(f.sha256 for f in v.files if f.name == COMPACT_FILE)
    write_latest(model_dir, v.version, folder / COMPACT_FILE, sha, fused)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mos-client pull", description=__doc__.splitlines()[0])
    p.add_argument("--hub", required=True, help="HOST:PORT of the server's model hub")
    p.add_argument("--model-dir", type=Path, default=Path("mos-models"), help="where models go")
    p.add_argument("--version", type=int, default=0, help="a version number (default: the latest)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate of a TLS hub")
    p.add_argument("--insecure", action="store_true", help="the hub has no TLS")
    p.add_argument("--auth-private-key", type=Path, help="this client's SuperNode private key")
    p.add_argument(
        "--list", action="store_true", help="list versions and concepts, download nothing"
    )
    p.add_argument("--report", action="store_true", help="print the version's fusion report")
    p.add_argument("--retries", type=int, default=3, help="resume attempts after a cut connection")
    return p


def run(args: argparse.Namespace) -> Path | None:
    for name in ("root_certificates", "auth_private_key"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise UsageError(f"--{name.replace('_', '-')} {path}: no such file")
    client = HubClient(
        args.hub,
        root_certificates=args.root_certificates,
        insecure=args.insecure,
        private_key=args.auth_private_key,
    )
    try:
        if args.list:
            for v in client.call("ListVersions", hub_pb2.ListVersionsRequest()).versions:
                size = sum(f.size for f in v.files)
                print(
                    f"v{v.version}  {v.strategy}  {size / 1e6:.2f} MB  {', '.join(f'<{c}>' for c in v.concepts)}"
                )
            reply = client.call("ListConcepts", hub_pb2.ListConceptsRequest(version=args.version))
            for c in reply.concepts:
                print(
                    f"  {c.token} ({c.class_word}, {c.method}) from {c.origin or '?'}, round {c.round}"
                )
            return None
        if args.report:
            print(client.call("GetReport", hub_pb2.GetReportRequest(version=args.version)).markdown)
            return None
        folder = pull(
            client, args.model_dir.expanduser().resolve(), args.version, retries=args.retries
        )
        print(folder)
        return folder
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    return run_command(
        "mos-client pull",
        build_parser(),
        run,
        (HubError, HubAuthError),
        argv,
        interrupted="interrupted; the partial download resumes on the next run",
    )


if __name__ == "__main__":
    sys.exit(main())
