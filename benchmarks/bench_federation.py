"""Federation figures: bytes on the wire, and round wall time for N clients.

    python benchmarks/bench_federation.py --clients 2 4 8 --steps 20
    python benchmarks/bench_federation.py --sizes-only

Bytes: what a client uploads (its package as an ArrayRecord + manifest) and what the
server sends back (the fused model's compact form), measured on the tiny model and
computed for SD 1.5's shapes (rank 4; the modules are built on the meta device, so no
weights are allocated). Round time: a real ``mos-server`` with N ``mos-client --superlink``
processes on loopback (deployment), and ``mos-simulate`` with N virtual clients
(simulation), all on this machine, tiny model, ``--steps`` ED-LoRA steps per client, no
fidelity report.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mos.common.base import build_tiny
from mos.common.fused import FusedModel
from mos.common.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, target_layer_names
from mos.common.processes import Managed, flower_env, free_port
from mos.common.wire import fused_to_records, package_to_records
from mos.server.fusion import FusionEngine
from mos.toyworld.demo import DEMO_CONCEPTS, write_demo_photos

BIN = Path(sys.executable).parent


def lora_shapes(text_encoder, unet, rank: int) -> list[tuple[int, int]]:
    shapes = []
    for model, targets in ((text_encoder, TEXT_ENCODER_TARGETS), (unet, UNET_TARGETS)):
        for name in target_layer_names(model, targets):
            lin = model.get_submodule(name)
            shapes += [(rank, lin.in_features), (lin.out_features, rank)]
    return shapes


def wire_bytes(shapes, layers: int, dim: int, n: int, bytes_per: int = 4) -> dict:
    """Package: LoRA (rank r) + 2 x L x dim embeddings. Fused: rank n*r + n embeddings."""
    lora = sum(math.prod(s) for s in shapes)
    emb = 2 * layers * dim
    return {
        "package_bytes": (lora + emb) * bytes_per,
        "fused_bytes": (n * lora + n * emb) * bytes_per,  # rank adds up: n*r
    }


def sizes(ns: list[int]) -> dict:
    tiny = build_tiny()
    from bench_fusion import random_packages

    pkg = random_packages(tiny, 1, rank=4)[0]
    arrays, manifest = package_to_records(pkg)
    measured = sum(len(a.data) for a in arrays.values()) + len(json.dumps(dict(manifest)))
    out: dict = {"tiny": {"package_bytes_measured": measured}}
    shapes = lora_shapes(tiny.text_encoder, tiny.unet, 4)
    layers, dim = tiny.num_cross_attention_layers, tiny.text_dim
    out["tiny"]["by_n"] = {n: wire_bytes(shapes, layers, dim, n) for n in ns}
    for n in ns:  # and the fused model as it really travels
        engine = FusionEngine(build_tiny(), random_packages(build_tiny(), n, rank=4))
        result = engine.weight_fusion()
        fused = FusedModel.from_packages(
            result.strategy, result.factors, list(engine.packages.values())
        )
        f_arrays, meta = fused_to_records(fused, 1)
        out["tiny"]["by_n"][n]["fused_bytes_measured"] = sum(
            len(a.data) for a in f_arrays.values()
        ) + len(json.dumps(dict(meta)))

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
            )
        )
    sd_shapes = lora_shapes(te, unet, 4)
    sd_layers = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    out["sd15"] = {
        "lora_layers": len(sd_shapes) // 2,
        "cross_attention_layers": sd_layers,
        "fp32": {n: wire_bytes(sd_shapes, sd_layers, 768, n, 4) for n in ns},
        "fp16": {n: wire_bytes(sd_shapes, sd_layers, 768, n, 2) for n in ns},
    }
    return out


def client_folders(root: Path, n: int, photos: int) -> list[tuple[Path, str, str]]:
    out = []
    for i in range(n):
        _, class_word, draw = DEMO_CONCEPTS[i % len(DEMO_CONCEPTS)]
        name = f"c{i}"
        folder = root / name
        write_demo_photos(folder, count=photos, seed=i, size=32, draw=draw)
        (folder / ".mos-client.json").write_text(json.dumps({"class_word": class_word}))
        out.append((folder, name, class_word))
    return out


def deployment(n: int, steps: int, tmp: Path) -> dict:
    folders = client_folders(tmp / "photos", n, 3)
    port = free_port()
    env = flower_env()
    start = time.perf_counter()
    server = Managed(
        [str(BIN / "mos-server"), "--min-clients", str(n), "--steps", str(steps),
         "--state-dir", str(tmp / "state"), "--port", str(port), "--no-report", "--hub-port", "0",
         "--fusion-mode", "independent",
         "--device", "cpu"],
        env, tmp / "server.log",
    )  # fmt: skip
    clients = []
    # N clients share this machine's cores: one thread each (as ray gives each virtual
    # client), or PyTorch's thread pools oversubscribe the cores many times over
    client_env = {**env, "OMP_NUM_THREADS": "1"}
    try:
        server.wait_for_port("127.0.0.1", port)
        for folder, name, class_word in folders:
            clients.append(Managed(
                [str(BIN / "mos-client"), "--data", str(folder), "--concept", name,
                 "--class-word", class_word, "--superlink", f"127.0.0.1:{port}", "--insecure",
                 "--model-dir", str(tmp / "clients" / name)],
                client_env, tmp / f"{name}.log",
            ))  # fmt: skip
        while server.alive():
            time.sleep(0.2)
        wall = time.perf_counter() - start
    finally:
        for c in clients:
            c.stop()
        server.stop()
    result = json.loads((tmp / "state/result.json").read_text())
    assert len(result["concepts"]) == n, result
    return {"wall_s": wall, "serverapp_s": result["seconds"]}


def simulation(n: int, steps: int, tmp: Path) -> dict:
    client_folders(tmp / "photos", n, 3)
    start = time.perf_counter()
    subprocess.run(
        [str(BIN / "mos-simulate"), "--clients", str(n), "--data-root", str(tmp / "photos"),
         "--out", str(tmp / "sim"), "--steps", str(steps), "--no-report", "--device", "cpu",
         "--fusion-mode", "independent"],
        env=flower_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - start
    result = json.loads((tmp / "sim/server/result.json").read_text())
    assert len(result["concepts"]) == n, result
    return {"wall_s": wall, "serverapp_s": result["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sizes-only", action="store_true")
    p.add_argument("--engines", nargs="+", default=["deployment", "simulation"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/federation_cpu.json"))
    args = p.parse_args()
    report: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "sizes": sizes(args.clients),
    }
    if not args.sizes_only:
        report["rounds"] = {}
        for engine in args.engines:
            for n in args.clients:
                with tempfile.TemporaryDirectory() as tmp:
                    run = deployment if engine == "deployment" else simulation
                    res = run(n, args.steps, Path(tmp))
                report["rounds"][f"{engine}/{n}"] = res
                print(f"{engine:10s} N={n}: {res['wall_s']:.1f} s wall, "
                      f"{res['serverapp_s']:.1f} s in the ServerApp", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["sizes"], indent=2))


if __name__ == "__main__":
    main()
