"""Load and faults on loopback (issue 7): many clients at once, a SuperLink restart under
connected SuperNodes, and a model-hub download cut halfway. Bounded loops, tiny model.

    python benchmarks/bench_faults.py                 # ~5 min on 2 cores
    python benchmarks/bench_faults.py --only hub

- ``load``: ``mos-simulate`` with 16 virtual clients (2 tuning steps each) against one
  SuperLink: how many clients were held, and packages lost (accepted - fused; must be 0).
- ``restart``: ``mos-server`` waiting for 3 clients with 2 connected; the server (and its
  SuperLink) is stopped with SIGTERM and started again on the same port and state folder;
  do the SuperNodes reconnect within their bounded ``--max-wait``, and does the run finish?
- ``hub``: a 6 MB fused model served in 64 KiB chunks; the connection is cut after half
  the chunks; ``mos-client pull`` resumes: bytes sent twice (must be 0) and the SHA-256.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mos.common.processes import Managed, flower_env, free_port
from mos.toyworld.demo import DEMO_CONCEPTS, write_demo_photos

BIN = Path(sys.executable).parent


def folders(root: Path, n: int) -> list[tuple[Path, str, str]]:
    out = []
    for i in range(n):
        _, class_word, draw = DEMO_CONCEPTS[i % len(DEMO_CONCEPTS)]
        folder = root / f"c{i}"
        write_demo_photos(folder, count=2, seed=i, size=32, draw=draw)
        (folder / ".mos-client.json").write_text(json.dumps({"class_word": class_word}))
        out.append((folder, f"c{i}", class_word))
    return out


def load(tmp: Path, n: int = 16) -> dict:
    import subprocess

    folders(tmp / "photos", n)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "mos-simulate"), "--clients", str(n), "--data-root", str(tmp / "photos"),
         "--out", str(tmp / "sim"), "--steps", "2", "--fusion-steps", "2", "--no-report",
         "--device", "cpu", "--round-timeout", "900"],
        env=flower_env(), capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    wall = time.perf_counter() - start
    result = (
        json.loads((tmp / "sim/server/result.json").read_text()) if proc.returncode == 0 else {}
    )
    rnd = (result.get("rounds") or [{}])[0]
    accepted = len(rnd.get("accepted", []))
    fused = len(result.get("concepts", []))
    return {
        "clients": n,
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "accepted": accepted,
        "fused": fused,
        "rejected": len(rnd.get("rejected", [])),
        "missing": len(rnd.get("missing", [])),
        "packages_lost": accepted - fused,
        "clients_with_model": sum(
            (tmp / "sim/clients" / f"c{i}" / "latest.json").is_file() for i in range(n)
        ),
    }


def restart(tmp: Path) -> dict:
    env = flower_env()
    client_env = {**env, "OMP_NUM_THREADS": "1"}
    port = free_port()
    state = tmp / "state"
    fs = folders(tmp / "photos", 3)

    def server(tag: str) -> Managed:
        return Managed(
            [str(BIN / "mos-server"), "--min-clients", "3", "--steps", "2", "--fusion-steps", "2",
             "--state-dir", str(state), "--port", str(port), "--hub-port", "0", "--no-report",
             "--device", "cpu", "--wait-clients", "180"],
            env, tmp / f"server-{tag}.log",
        )  # fmt: skip

    def client(i: int) -> Managed:
        folder, name, cw = fs[i]
        return Managed(
            [str(BIN / "mos-client"), "--data", str(folder), "--concept", name, "--class-word", cw,
             "--superlink", f"127.0.0.1:{port}", "--insecure", "--max-wait", "90",
             "--model-dir", str(tmp / "clients" / name)],
            client_env, tmp / f"{name}.log",
        )  # fmt: skip

    srv = server("1")
    clients = []
    out: dict = {}
    try:
        srv.wait_for_port("127.0.0.1", port, timeout=90)
        clients = [client(0), client(1)]
        deadline = time.monotonic() + 120
        while "waiting for clients" not in (tmp / "server-1.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("the server never started waiting")
            time.sleep(0.5)
        time.sleep(15)  # the two SuperNodes are registered and polling
        t_cut = time.perf_counter()
        out["server_rc_on_sigterm"] = srv.stop(timeout=20)
        time.sleep(3)
        srv = server("2")
        srv.wait_for_port("127.0.0.1", port, timeout=90)
        clients.append(client(2))
        deadline = time.monotonic() + 400
        while srv.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        out["finished"] = not srv.alive()
        out["seconds_after_restart"] = round(time.perf_counter() - t_cut, 1)
        result_file = state / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        out["concepts"] = sorted(result.get("concepts", []))
        for c in clients:
            deadline = time.monotonic() + 60
            while c.alive() and time.monotonic() < deadline:
                time.sleep(0.5)
        out["clients_rc"] = [c.proc.returncode for c in clients]
        out["clients_with_model"] = sum(
            (tmp / "clients" / f"c{i}" / "latest.json").is_file() for i in range(3)
        )
    finally:
        for c in clients:
            c.stop(timeout=5)
        srv.stop(timeout=5)
    return out


def hub(tmp: Path) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mos.client.pull import HubClient, pull
    from mos.common.base import build_tiny
    from mos.common.fused import COMPACT_FILE
    from mos.server.registry import Registry
    from tests.conftest import random_fused, random_package
    from tests.test_hub import CuttingHub, _serve

    base = build_tiny()
    pkgs = [random_package(base, f"c{i}", seed=i, rank=16) for i in range(24)]
    reg = Registry.open(tmp / "state", base)
    reg.publish(random_fused(base, pkgs))
    size = (tmp / "state/models/v1" / COMPACT_FILE).stat().st_size
    chunk = 64 * 1024
    cut = max(1, size // chunk // 2)
    servicer = CuttingHub(tmp / "state", chunk_size=chunk, cut_after=cut)
    server, address = _serve(servicer)
    try:
        start = time.perf_counter()
        folder = pull(HubClient(address, insecure=True), tmp / "client", progress=False)
        wall = time.perf_counter() - start
    finally:
        server.stop(0).wait()
    offsets = [o for f, o in servicer.requests if f == COMPACT_FILE]
    del torch
    return {
        "file_bytes": size,
        "requests": offsets,
        "cut_after_bytes": cut * chunk,
        "bytes_sent_twice": cut * chunk - offsets[1] if len(offsets) > 1 else None,
        "verified": (folder / COMPACT_FILE).read_bytes()
        == (tmp / "state/models/v1" / COMPACT_FILE).read_bytes(),
        "wall_s": round(wall, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only", nargs="+", choices=("load", "restart", "hub"), default=["load", "restart", "hub"]
    )
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/faults_cpu.json"))
    args = p.parse_args()
    report = {}
    for name in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            report[name] = (
                load(t, args.clients)
                if name == "load"
                else restart(t)
                if name == "restart"
                else hub(t)
            )
        print(name, json.dumps(report[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.write_text(json.dumps({**previous, **report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
