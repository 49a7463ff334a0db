"""What leaving the project costs: layer-wise embeddings collapsed for other tools, on the
trained toy model.

    python benchmarks/bench_export.py                                 # 3 toy concepts, ~6 min
    python benchmarks/bench_export.py --packages benchmarks/results/paper-locon

Other tools (diffusers' ``load_textual_inversion``, A1111, ComfyUI) have one embedding per
token for every layer; ``mos-export`` writes each ED-LoRA word's mean over the
cross-attention layers. For each concept (tuned with ``--preset toy``, or read from
``--packages`` as ``toy-<name>.safetensors``) this measures the identity (detector score and
detection rate of "a photo of a <TOK>") of its own model with the layer-wise embeddings and
with the collapsed ones, same LoRA, same seeds; and with the LoRA rounded to fp16 (the
export's default dtype). The LoRA itself travels exactly (tests/test_interop.py checks
stock diffusers against this pipeline).

Writes ``--out``/export.json and export.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

from mos.common.export import collapsed_embedding
from mos.common.package import ConceptPackage
from mos.common.presets import load_preset
from mos.toyworld.evaluate import concept_identity, single_concept_pipeline, tune

log = logging.getLogger("bench_export")


def collapsed(package: ConceptPackage) -> ConceptPackage:
    """The package with every layer's embedding set to the word's mean over the layers."""
    mean, _ = collapsed_embedding(package.concept, package.embeddings)
    emb = mean[:, None].expand_as(package.embeddings).clone()
    return replace(package, embeddings=emb)


def fp16(package: ConceptPackage) -> ConceptPackage:
    return replace(package, lora={k: v.half().float() for k, v in package.lora.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", nargs="+", default=["checker", "halfmoon", "house"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--packages", type=Path, help="folder with toy-<name>.safetensors to reuse")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for name in args.concepts:
        cached = (args.packages or args.out) / f"toy-{name}.safetensors"
        if cached.exists():
            package = ConceptPackage.load(cached)
        else:
            package = tune(name, load_preset("toy").train_config())
            package.save(args.out / f"toy-{name}.safetensors")
        _, spread = collapsed_embedding(package.concept, package.embeddings)
        row: dict = {"layer_spread": spread}
        for label, variant in (
            ("layer-wise", package),
            ("collapsed", collapsed(package)),
            ("collapsed, fp16 LoRA", fp16(collapsed(package))),
        ):
            ident = concept_identity(single_concept_pipeline(variant), name, args.samples)
            row[label] = {"score": ident.mean_score, "detected": ident.detected}
            log.info(
                "%s %s: score %.3f, detected %.0f%%",
                name,
                label,
                ident.mean_score,
                100 * ident.detected,
            )
        rows[name] = row
    (args.out / "export.json").write_text(
        json.dumps({"samples": args.samples, "concepts": rows}, indent=2)
    )
    labels = ("layer-wise", "collapsed", "collapsed, fp16 LoRA")
    lines = [
        f"Identity of each concept's own model ({args.samples} samples, score / detected).",
        "",
        "| concept | layers' spread | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for name, row in rows.items():
        cells = [f"{row[x]['score']:.3f} / {100 * row[x]['detected']:.0f}%" for x in labels]
        lines.append(f"| {name} | {row['layer_spread']:.3f} | " + " | ".join(cells) + " |")
    mean = [
        f"{statistics.mean(r[x]['score'] for r in rows.values()):.3f} / "
        f"{100 * statistics.mean(r[x]['detected'] for r in rows.values()):.0f}%"
        for x in labels
    ]
    spread = statistics.mean(r["layer_spread"] for r in rows.values())
    lines.append(f"| **mean** | {spread:.3f} | " + " | ".join(mean) + " |")
    (args.out / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
