"""``mos-client --superlink HOST:PORT``: join a federation as a Flower SuperNode.

The photo folder and the concept name are checked here first; then a ``flower-supernode``
starts with them in its node config (the ClientApp in ``client_app.py`` reads them). The
command streams the SuperNode's log and ends by itself once the server's final round has
delivered the fused model and the server has closed (``--stay`` keeps serving later rounds
and runs), or when the SuperLink stays unreachable for ``--max-wait`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from ..common.cli import UsageError
from ..common.concepts import ConceptError, parse_concept_name
from ..common.federation import toml_value
from ..common.package import ConceptPackage
from ..common.processes import Managed, executable, flower_env, free_port, port_open
from .data import load_photo_folder
from .layout import DONE, LATEST

log = logging.getLogger("mos.client")
STAMPED = re.compile(r"^\d\d:\d\d:\d\d ")


def node_config(values: dict[str, str]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML (JSON) strings."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items() if v != "")


def run_supernode(args: argparse.Namespace) -> Path:
    host, _, port = args.superlink.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--superlink {args.superlink!r}: expected HOST:PORT, e.g. 10.0.0.5:9092")
    data = package = None
    if args.package is not None:
        package = args.package.expanduser().resolve()
        ready = ConceptPackage.load(package)  # fail now, not in the middle of a round
        name = ready.concept.name
        if args.concept and parse_concept_name(args.concept) != name:
            raise UsageError(
                f"--concept {args.concept}: the package is {ready.concept.token} (rename it "
                "with mos-import, or leave --concept out)"
            )
        what = f"the package {package.name}"
    else:
        try:
            name = parse_concept_name(args.concept)
        except ConceptError as err:
            raise UsageError(str(err)) from err
        data = args.data.expanduser().resolve()
        photos = load_photo_folder(data)  # fail now, not in the middle of a round
        what = f"{len(photos)} photos"
    model_dir = (args.model_dir or Path(f"{name}-model")).expanduser().resolve()
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / DONE).unlink(missing_ok=True)
    if args.root_certificates is None and not args.insecure:
        raise UsageError(
            "pass --root-certificates CA.pem for a TLS SuperLink, or --insecure for one "
            "without TLS (e.g. mos-server on this machine without certificates)"
        )
    for option in ("root_certificates", "auth_private_key", "trusted_entities"):  # cwd differs
        path = getattr(args, option)
        if path is not None:
            path = path.expanduser().resolve()
            if not path.is_file():
                raise UsageError(f"{path}: no such file")
            setattr(args, option, path)
    config = node_config(
        {
            "data": str(data or ""),
            "package": str(package or ""),
            "concept": name,
            "class-word": args.class_word or "",
            "model-dir": str(model_dir),
            "base-model": args.base_model_for_node or "",
            "base-config": args.base_config or "",
            "device": args.device,
            "test-fault": args.test_fault or "",
        }
    )
    cmd = [
        executable("flower-supernode"),
        "--superlink",
        args.superlink,
        "--node-config",
        config,
        "--port",
        str(args.clientappio_port or free_port()),
        "--max-wait-time",
        str(args.max_wait),
    ]
    if args.root_certificates is not None:
        cmd += ["--root-certificates", str(args.root_certificates)]
    else:
        cmd.append("--insecure")
    if args.auth_private_key is not None:
        cmd += ["--auth-supernode-private-key", str(args.auth_private_key)]
    if args.trusted_entities is not None:  # run only app bundles signed by these keys
        cmd += ["--trusted-entities", str(args.trusted_entities)]
    log.info("joining %s as <%s> with %s; models go to %s", args.superlink, name, what, model_dir)
    # Several SuperNodes (and the server) often share one machine; PyTorch's default of a
    # thread per core each then oversubscribes the cores, which measured up to 60x slower.
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    env = flower_env()
    if "OMP_NUM_THREADS" not in os.environ or args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    done = model_dir / DONE
    rejoins = 0
    while True:
        rc = _run_node(cmd, env, model_dir, done, host, int(port), args.stay)
        if done.exists() or rejoins >= args.rejoin:
            break
        # A SuperLink that restarts forgets its nodes, and Flower's SuperNode then ends
        # (its heartbeat is refused) instead of registering again: we start a new one.
        rejoins += 1
        log.warning(
            "the SuperNode ended (status %s) before the final round; rejoining %s (%d of %d)",
            rc,
            args.superlink,
            rejoins,
            args.rejoin,
        )
        deadline = time.time() + min(args.max_wait, REJOIN_WAIT_S)
        while not port_open(host.strip("[]"), int(port)) and time.time() < deadline:
            time.sleep(1.0)
        if not port_open(host.strip("[]"), int(port)):
            log.warning("the SuperLink did not come back within %.0f s", REJOIN_WAIT_S)
            break
        time.sleep(2.0)
    if (model_dir / DONE).exists():
        latest = json.loads((model_dir / LATEST).read_text())
        print(
            f"fused model v{latest['version']} with {', '.join(latest['concepts'])}: "
            f"{latest['file']}"
        )
        return Path(latest["file"])
    raise UsageError(
        f"the SuperNode ended (status {rc}) before a fused model arrived; is the server "
        f"running at {args.superlink}?"
    )


REJOIN_WAIT_S = 60.0  # how long a rejoin waits for the SuperLink to be back


def _run_node(
    cmd: list[str], env: dict, model_dir: Path, done: Path, host: str, port: int, stay: bool
) -> int | None:
    """Run one SuperNode until it ends, or until the federation is over; its status."""
    node = Managed(cmd, env, cwd=model_dir)
    pump = threading.Thread(target=_pump, args=(node,), daemon=True)
    pump.start()
    try:
        while node.alive():
            if done.exists() and not stay:
                # The ClientApp writes DONE before its reply leaves, and a SuperNode that
                # leaves takes its unread replies with it: stay until the server has
                # ended the federation (its SuperLink closes), or for at most 5 minutes.
                if not port_open(host.strip("[]"), port):
                    break
                if time.time() - done.stat().st_mtime > 300:
                    log.warning("the server is still up 5 minutes after the final round; leaving")
                    break
            time.sleep(0.5)
    finally:
        rc = node.stop()
    return rc


def _pump(node: Managed) -> None:
    assert node.proc.stdout is not None
    for raw in node.proc.stdout:
        line = raw.decode(errors="replace")
        stamp = "" if STAMPED.match(line) else time.strftime("%H:%M:%S ")  # Flower's lack one
        print(stamp + line, end="", flush=True)
