"""``mos-server`` and ``mos-simulate``: start a SuperLink, submit the Flower app, stream
progress, and end every process they started (also on Ctrl-C).

    mos-server --strategy gradient-fusion --min-clients 2 --state-dir ./server-state
    mos-simulate --clients 3 --data-root ./photos --out ./sim

``mos-server`` runs the deployment engine: SuperNodes join with ``mos-client --superlink``.
``mos-simulate`` runs the simulation engine (one virtual client per sub-folder of
``--data-root``; needs the ``[sim]`` extra, i.e. ray). Both write a private Flower home
(connection config, app bundle) into their state folder; nothing goes to ``~/.flwr``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from pydantic import BaseModel as PydanticModel

from ..common.cli import UsageError, run_command
from ..common.config import FusionConfig, TrainConfig
from ..common.federation import (
    FUSION_PREFIX,
    RunSettings,
    ServerSettings,
    toml_value,
    write_app_dir,
)
from ..common.presets import load_preset
from ..common.processes import LaunchError, Managed, executable, flower_env, free_port
from ..common.settings import SettingsError, add_options, build, given, key, option, scalar_fields

log = logging.getLogger("mos.launch")
CONNECTION = "mos"
# run-config settings that mos-simulate fills in itself (no options)
NOT_OPTIONS = ("data_root", "client_root")


def _settings_args(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Options that become run-config values: one per field of the three settings models."""
    add_options(p, ServerSettings, exclude=(*NOT_OPTIONS, *exclude))
    p.add_argument(
        "--preset",
        help="a named set of tuning and fusion settings beneath the options given; resolved "
        "here into run-config values",
    )
    train = p.add_argument_group("tuning on the clients")
    add_options(train, TrainConfig)
    fusion = p.add_argument_group("fusion on the server")
    add_options(fusion, FusionConfig, prefix=FUSION_PREFIX, exclude=_non_scalar(FusionConfig))


def _non_scalar(model: type[PydanticModel]) -> tuple[str, ...]:
    return tuple(set(model.model_fields) - set(scalar_fields(model)))


def _overrides(args: argparse.Namespace, **fixed: str | int | float | bool) -> dict:
    """The run-config values given on the command line (plus ``fixed``), validated; an error
    names the option."""
    try:
        preset = load_preset(args.preset)
    except SettingsError as err:
        raise UsageError(str(err)) from err
    values: dict[str, str | int | float | bool] = {}
    sections: tuple[tuple[type[PydanticModel], str, tuple[str, ...], dict], ...] = (
        (ServerSettings, "", NOT_OPTIONS, {}),
        (TrainConfig, "", (), preset.train),
        (FusionConfig, FUSION_PREFIX, (), preset.fusion),
    )
    for model, prefix, exclude, beneath in sections:
        chosen = {**beneath, **given(args, model, prefix, exclude)}
        try:
            build(model, chosen, partial(option, prefix=prefix))
        except SettingsError as err:
            raise UsageError(str(err)) from err
        values.update({key(name, prefix): value for name, value in chosen.items()})
    values.update(fixed)
    try:  # the fixed values too
        RunSettings.from_run_config(values)
    except SettingsError as err:
        raise UsageError(str(err)) from err
    return values


def _write_flower_home(home: Path, address: str, root_cert: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {toml_value(address)}")
    if root_cert:
        lines.append(f"root-certificates = {toml_value(str(root_cert))}")
    else:
        lines.append("insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _write_run_config(path: Path, values: dict) -> Path:
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def _stream(proc: Managed, prefix: str = "") -> int:
    """Copy a child's output to ours line by line until it ends; returns its status."""
    assert proc.proc.stdout is not None
    for raw in proc.proc.stdout:
        sys.stdout.write(prefix + raw.decode(errors="replace"))
        sys.stdout.flush()
    return proc.proc.wait()


def submit(app_dir: Path, home: Path, run_config: Path, extra: list[str] | None = None) -> Managed:
    cmd = [executable("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(run_config)]
    return Managed([*cmd, *(extra or []), "--stream"], flower_env(home))


def _prepare(state: Path, home: Path, address: str, root_cert: Path | None, values: dict):
    """The state folder's logs, the private Flower home, the app bundle and run config."""
    (state / "logs").mkdir(parents=True, exist_ok=True)
    _write_flower_home(home, address, root_cert)
    return write_app_dir(state / "app"), _write_run_config(state / "run-config.toml", values)


def _run_app(
    app_dir: Path, home: Path, run_config: Path, state: Path, since: float, extra=None
) -> dict:
    """Submit the app, stream its log until it ends, and read its result."""
    runner = submit(app_dir, home, run_config, extra)
    try:
        rc = _stream(runner)
    finally:
        runner.stop()
    if rc:
        raise LaunchError(f"flwr run failed (status {rc}); see the messages above")
    return _result(state, since)


def _result(state: Path, since: float) -> dict:
    path = state / "result.json"
    if not path.is_file() or path.stat().st_mtime < since:
        raise LaunchError(f"the run ended without a result; see the log above and {state / 'logs'}")
    return json.loads(path.read_text())


def _summary(result: dict) -> None:
    print(
        f"\nfused model v{result['version']} with {len(result['concepts'])} concepts "
        f"({', '.join(result['concepts'])}): {result['model']}"
    )
    for r in result["rounds"]:
        print(
            f"  round {r['round']}: accepted {r['accepted'] or '-'}, known {r['known'] or '-'}, "
            f"rejected {len(r['rejected'])}, missing {len(r['missing'])}"
        )
        for rej in r["rejected"]:
            print(f"    rejected: {rej['reason']}")


# --- mos-server -------------------------------------------------------------------------
def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mos-server",
        description="Run the Mix-of-Show federation: a Flower SuperLink plus the fusion "
        "ServerApp. Clients join with mos-client --superlink HOST:PORT.",
    )
    _settings_args(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument(
        "--hub-port",
        type=int,
        default=9093,
        help="the model hub's port (mos-client pull; same TLS and keys); 0: no hub",
    )
    p.add_argument(
        "--stay",
        action="store_true",
        help="after the run, keep serving the model hub until Ctrl-C",
    )
    tls = p.add_argument_group("TLS and SuperNode authentication")
    tls.add_argument("--ssl-certfile", type=Path, help="server certificate (PEM)")
    tls.add_argument("--ssl-keyfile", type=Path, help="server private key (PEM)")
    tls.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (PEM)")
    tls.add_argument(
        "--enable-supernode-auth",
        action="store_true",
        help="accept only SuperNodes whose public key is registered",
    )
    tls.add_argument(
        "--supernode-public-key",
        type=Path,
        action="append",
        default=[],
        help="register this SuperNode public key (repeat per client)",
    )
    return p


def run_server(args: argparse.Namespace) -> dict:
    state_dir = args.state_dir or ServerSettings.model_fields["state_dir"].default
    state = Path(state_dir).expanduser().resolve()
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certfile"):  # Flower wants absolute
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).expanduser().resolve())
    args.supernode_public_key = [k.expanduser().resolve() for k in args.supernode_public_key]
    certs = [args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile]
    if any(certs) and not all(certs):
        raise UsageError("TLS needs all of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile")
    for path in [*(c for c in certs if c), *args.supernode_public_key]:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    if args.supernode_public_key and not args.enable_supernode_auth:
        raise UsageError("--supernode-public-key needs --enable-supernode-auth")
    values = _overrides(args, **{"state-dir": str(state)})
    home = state / "flwr-home"
    connect = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    app_dir, run_config = _prepare(
        state, home, f"{connect}:{args.port}", args.ssl_ca_certfile, values
    )

    cmd = [
        executable("flower-superlink"),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--disable-runtime-dependency-installation",
    ]
    if all(certs):
        cmd += ["--ssl-certfile", str(args.ssl_certfile), "--ssl-keyfile", str(args.ssl_keyfile)]
        cmd += ["--ssl-ca-certfile", str(args.ssl_ca_certfile)]
    else:
        log.warning("no TLS certificates given: the SuperLink runs without TLS (--insecure)")
        cmd.append("--insecure")
    if args.enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    started = time.time()
    hub = None
    superlink = Managed(cmd, flower_env(home), state / "logs" / "superlink.log")
    try:
        if args.hub_port:
            hub = start_hub(state, args)
        superlink.wait_for_port(connect, args.port)
        print(
            f"SuperLink on {args.host}:{args.port} (pid {superlink.pid}); clients join with:\n"
            f"  mos-client --data DIR --concept '<name>' --superlink {connect}:{args.port}"
            + ("" if all(certs) else " --insecure"),
            flush=True,
        )
        for key in args.supernode_public_key:
            reg = subprocess.run(
                [executable("flwr"), "supernode", "register", str(key), CONNECTION],
                env=flower_env(home),
                capture_output=True,
                text=True,
            )
            if reg.returncode:
                raise LaunchError(f"registering {key} failed: {reg.stdout}{reg.stderr}")
            log.info("registered SuperNode key %s", key)
        result = _run_app(app_dir, home, run_config, state, started)
        superlink.stop()  # now: clients leave once the SuperLink closes (--stay or not)
        _summary(result)
        if hub is not None and args.stay:
            print(
                f"model hub still serving on {args.host}:{args.hub_port}; Ctrl-C to stop",
                flush=True,
            )
            while True:
                time.sleep(3600)
    finally:
        superlink.stop()
        if hub is not None:
            hub.stop(grace=1.0).wait()
    return result


def start_hub(state: Path, args: argparse.Namespace):
    """The model hub beside the SuperLink: same TLS certificate, same SuperNode keys."""
    from ..common.hubauth import KeyRing
    from .hub import serve_hub

    keys = KeyRing.from_files(args.supernode_public_key) if args.enable_supernode_auth else None
    try:
        hub = serve_hub(
            state,
            f"{args.host}:{args.hub_port}",
            certfile=args.ssl_certfile,
            keyfile=args.ssl_keyfile,
            keys=keys,
        )
    except (OSError, RuntimeError) as err:
        raise LaunchError(f"the model hub cannot start on port {args.hub_port}: {err}") from err
    print(
        f"model hub on {args.host}:{args.hub_port}; anyone registered fetches the latest model "
        f"with: mos-client pull --hub HOST:{args.hub_port}",
        flush=True,
    )
    return hub


def server_main(argv: list[str] | None = None) -> int:
    return run_command(
        "mos-server",
        server_parser(),
        run_server,
        (LaunchError,),
        argv,
        interrupted="interrupted; the SuperLink was stopped (the state folder stays usable)",
    )


# --- mos-simulate -----------------------------------------------------------------------
def simulate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mos-simulate",
        description="Run the federation on one machine with Flower's simulation engine: one "
        "virtual client per sub-folder of --data-root (the folder name is the concept name).",
    )
    p.add_argument("--clients", type=int, required=True, help="number of virtual clients")
    p.add_argument("--data-root", type=Path, required=True, help="one photo folder per client")
    p.add_argument("--out", type=Path, default=Path("mos-sim"), help="server state and clients")
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    _settings_args(p, exclude=("state_dir", "min_clients", "wait_clients"))
    return p


def run_simulation(args: argparse.Namespace) -> dict:
    root = args.data_root.expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"--data-root {root}: not a folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if args.clients < 1:
        raise UsageError("--clients must be at least 1")
    if len(folders) < args.clients:
        raise UsageError(
            f"--clients {args.clients}: {root} has only {len(folders)} client folders "
            f"({', '.join(folders) or 'none'})"
        )
    if len(folders) > args.clients:
        log.warning(
            "using the first %d of %d folders: %s",
            args.clients,
            len(folders),
            ", ".join(folders[: args.clients]),
        )
    try:
        import ray  # noqa: F401
    except ImportError as err:
        raise UsageError(
            "the simulation engine needs ray: pip install 'mix-of-show-flower[sim]'"
        ) from err
    out = args.out.expanduser().resolve()
    state = out / "server"
    values = _overrides(
        args,
        **{
            "state-dir": str(state),
            "min-clients": args.clients,
            "wait-clients": 120.0,
            "data-root": str(root),
            "client-root": str(out / "clients"),
        },
    )
    home = out / "flwr-home"
    port = free_port()
    app_dir, run_config = _prepare(state, home, f"127.0.0.1:{port}", None, values)
    cmd = [
        executable("flower-superlink"),
        "--insecure",
        "--simulation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    started = time.time()
    superlink = Managed(cmd, flower_env(home), state / "logs" / "superlink.log")
    federation = [
        f"num-supernodes={args.clients}",
        f"client-resources-num-cpus={args.cpus_per_client}",
        f"client-resources-num-gpus={args.gpus_per_client}",
    ]
    try:
        superlink.wait_for_port("127.0.0.1", port)
        log.info("simulation SuperLink on 127.0.0.1:%d (pid %d)", port, superlink.pid)
        extra = [x for f in federation for x in ("--federation-config", f)]
        result = _run_app(app_dir, home, run_config, state, started, extra)
    finally:
        superlink.stop()
    _summary(result)
    print(f"client model folders: {out / 'clients'}")
    return result


def simulate_main(argv: list[str] | None = None) -> int:
    return run_command(
        "mos-simulate",
        simulate_parser(),
        run_simulation,
        (LaunchError,),
        argv,
        interrupted="interrupted; the simulation SuperLink was stopped",
    )
