"""The Flower ClientApp (``[tool.flwr.app.components] clientapp``).

``train`` message: tune ED-LoRA on this client's photos with the server's training config
and reply with the concept package (arrays + manifest) and metrics. Photos, captions and
latents never leave the machine. A package already tuned with the same photos, base and
config is reused; one the server has already registered is not sent again.

``evaluate`` message (redistribution): verify the fused model (digest, base fingerprint),
store it atomically in the client's model folder, and measure privately how well it keeps
this client's concept: the denoising loss on the client's own photos, fused model vs the
client's own concept model (same noise, same timesteps). Only that number goes back.

Where the settings come from:
- deployment (``mos-client --superlink``): the SuperNode's ``node_config`` (``data``,
  ``concept``, ``model-dir``, optional ``class-word``, ``base-model``, ``base-config``,
  ``device``);
- simulation: ``partition-id`` picks the ``partition-id``-th sub-folder (sorted) of the
  run config's ``data-root``; the folder name is the concept name (an optional
  ``.mos-client.json`` in it may set ``concept`` and ``class_word``); models go to
  ``client-root/<name>`` (default ``<data-root>/../clients``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..common import federation as fed
from ..common.base import BaseModel, BaseModelError, load_base_model
from ..common.cli import UsageError, default_class_word, resolve_device, setup_logging
from ..common.concepts import ConceptError, ConceptTable, parse_concept_name
from ..common.config import TrainConfig
from ..common.files import atomic_write
from ..common.package import ConceptPackage, PackageError, attach_package
from ..common.pipeline import MixOfShowPipeline
from ..common.wire import fused_from_records, package_to_records
from .data import PhotoFolderError, load_photo_folder
from .layout import CLIENT_FILE, DONE, FUSED_DIR, PACKAGE_FILE, PACKAGE_INFO, write_latest
from .trainer import denoising_loss, train_concept

log = logging.getLogger("mos.client")

app = ClientApp()


class ClientSetupError(ValueError):
    """This client cannot take part (bad node config, photos, base); the message says why."""


@dataclass
class ClientSettings:
    """``data``: the photos to tune on; or ``package``: a ready concept package (an imported
    LoRA, or one tuned before) that is sent as it is, with no photos on this node."""

    data: Path | None
    concept: str
    class_word: str
    model_dir: Path
    base_model: str | None = None
    base_config: str | None = None
    device: str = "auto"
    fault: str = ""  # fault injection for the federation tests: "corrupt-package"
    package: Path | None = None

    @classmethod
    def from_context(cls, context: Context) -> ClientSettings:
        node, run = dict(context.node_config), dict(context.run_config)
        try:
            if "partition-id" in node and "data" not in node:
                return cls._simulated(int(node["partition-id"]), run)
            missing = [k for k in ("concept",) if not str(node.get(k, ""))]
            if not str(node.get("data", "")) and not str(node.get("package", "")):
                missing.insert(0, "data")
            if missing:
                raise ClientSetupError(
                    f"node config lacks {', '.join(missing)} (start the SuperNode with "
                    "mos-client --data DIR --concept NAME --superlink HOST:PORT)"
                )
            name = parse_concept_name(str(node["concept"]))
            given = str(node.get("data") or node.get("package"))
            source = Path(given).expanduser().resolve()
            data = source if node.get("data") else None
            package = None if data else source
            model_dir = Path(str(node.get("model-dir") or source.parent / f"{name}-model"))
            return cls(
                package=package,
                data=data,
                concept=name,
                class_word=str(node.get("class-word") or default_class_word(name)),
                model_dir=model_dir.expanduser().resolve(),
                base_model=str(node.get("base-model") or "") or None,
                base_config=str(node.get("base-config") or "") or None,
                device=str(node.get("device") or "auto"),
                fault=str(node.get("test-fault") or ""),
            )
        except ConceptError as err:
            raise ClientSetupError(str(err)) from err

    @classmethod
    def _simulated(cls, partition: int, run: dict) -> ClientSettings:
        root = str(run.get("data-root", ""))
        if not root:
            raise ClientSetupError(
                "simulation needs the run config data-root (one folder per client)"
            )
        root_path = Path(root).expanduser().resolve()
        if not root_path.is_dir():
            raise ClientSetupError(f"data-root {root_path} is not a folder")
        folders = sorted(
            p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if partition >= len(folders):
            raise ClientSetupError(
                f"virtual client {partition} has no folder: data-root {root_path} has "
                f"{len(folders)} sub-folders; run with at most that many clients"
            )
        folder = folders[partition]
        extra = {}
        if (folder / CLIENT_FILE).is_file():
            try:
                extra = json.loads((folder / CLIENT_FILE).read_text())
            except ValueError as err:
                raise ClientSetupError(f"{folder / CLIENT_FILE}: not JSON ({err})") from err
        name = parse_concept_name(str(extra.get("concept", folder.name)))
        client_root = str(run.get("client-root", "")) or str(root_path.parent / "clients")
        return cls(
            data=folder,
            concept=name,
            class_word=str(extra.get("class_word") or default_class_word(name)),
            model_dir=Path(client_root).expanduser().resolve() / name,
            device="cpu" if str(run.get("device", "auto")) == "cpu" else "auto",
        )


def _photo_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _reply(msg: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=msg)


def _refuse(msg: Message, reason: str) -> Message:
    log.error("refusing: %s", reason)
    return _reply(msg, **{fed.REFUSAL: ConfigRecord({"reason": reason})})


def _load_base(settings: ClientSettings, server_spec: str) -> BaseModel:
    spec = settings.base_model or server_spec
    base = load_base_model(spec, config=settings.base_config)
    return base.to(resolve_device(settings.device))


def _refusing(handler: Callable[[Message, ClientSettings], Message]):
    """Run a handler; a problem this client can name becomes a refusal the server logs."""

    def run(msg: Message, context: Context) -> Message:
        setup_logging()
        try:
            return handler(msg, ClientSettings.from_context(context))
        except (
            ClientSetupError,
            PhotoFolderError,
            BaseModelError,
            PackageError,
            UsageError,
        ) as err:
            return _refuse(msg, str(err))

    return run


def handle_train(msg: Message, settings: ClientSettings) -> Message:
    cfg = msg.content.config_records[fed.TRAIN_CONFIG]
    config = TrainConfig.model_validate_json(str(cfg["train-config"]))
    if settings.package is not None:
        return _send_ready_package(msg, settings, cfg)
    assert settings.data is not None
    photos = load_photo_folder(settings.data)
    base = _load_base(settings, str(cfg.get("base-source", "tiny")))
    want = str(cfg["base-fingerprint"])
    if base.fingerprint != want:
        raise ClientSetupError(
            f"base model mismatch: the server fuses on {cfg.get('base-source')} "
            f"({want[:12]}), this client has {base.source} ({base.fingerprint[:12]}); "
            "start mos-client with the server's --base-model"
        )
    key = hashlib.sha256(
        json.dumps(
            [
                config.model_dump(),
                base.fingerprint,
                _photo_digest(settings.data),
                settings.concept,
                settings.class_word,
            ]
        ).encode()
    ).hexdigest()
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    package, seconds, cached = _cached(settings.model_dir, key), 0.0, True
    if package is None:
        cached = False
        log.info("tuning <%s> on %d photos (%d steps)", settings.concept, len(photos), config.steps)
        start = time.perf_counter()
        result = train_concept(
            base, photos, settings.concept, settings.class_word, config, progress=False
        )
        seconds = time.perf_counter() - start
        package = result.package
        package.save(settings.model_dir / PACKAGE_FILE)
        info = json.dumps({"key": key, "sha256": package.sha256})
        atomic_write(settings.model_dir / PACKAGE_INFO, lambda tmp: Path(tmp).write_text(info))
    else:
        log.info("reusing the package tuned before for <%s>", settings.concept)
    metrics = MetricRecord(
        {
            "steps": config.steps,
            "final_loss": float(package.metrics.get("final_loss", 0.0)),
            "seconds": seconds,
            "cached": int(cached),
            "photos": len(photos),
        }
    )
    registered = json.loads(str(cfg.get("registered", "{}")))
    if registered.get(settings.concept) == package.sha256:
        manifest = ConfigRecord({"status": "registered", "concept": package.concept.token})
        return _reply(msg, **{fed.MANIFEST: manifest, fed.METRICS: metrics})
    arrays, manifest = package_to_records(package)
    if settings.fault == "corrupt-package":  # what a broken or hostile client would send
        key = next(iter(arrays))
        arrays[key] = Array(np.full(arrays[key].shape, np.nan, dtype=arrays[key].dtype))
    return _reply(msg, **{fed.PACKAGE: arrays, fed.MANIFEST: manifest, fed.METRICS: metrics})


def _send_ready_package(msg: Message, settings: ClientSettings, cfg: ConfigRecord) -> Message:
    """The node's ready package, sent as it is (no tuning, no photos)."""
    assert settings.package is not None
    try:
        package = ConceptPackage.load(settings.package)
    except PackageError as err:
        raise ClientSetupError(str(err)) from err
    want = str(cfg["base-fingerprint"])
    if package.base_fingerprint != want:
        raise ClientSetupError(
            f"base model mismatch: the server fuses on {cfg.get('base-source')} "
            f"({want[:12]}), the package {settings.package.name} is for "
            f"{package.base_source or package.base_fingerprint[:12]}; import it for the "
            "server's base (mos-import ... --base-model SERVER_BASE [--allow-other-base])"
        )
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricRecord(
        {"steps": 0, "final_loss": 0.0, "seconds": 0.0, "cached": 1, "photos": 0}
    )
    registered = json.loads(str(cfg.get("registered", "{}")))
    if registered.get(package.concept.name) == package.sha256:
        manifest = ConfigRecord({"status": "registered", "concept": package.concept.token})
        return _reply(msg, **{fed.MANIFEST: manifest, fed.METRICS: metrics})
    arrays, manifest = package_to_records(package)
    return _reply(msg, **{fed.PACKAGE: arrays, fed.MANIFEST: manifest, fed.METRICS: metrics})


def _cached(model_dir: Path, key: str) -> ConceptPackage | None:
    try:
        info = json.loads((model_dir / PACKAGE_INFO).read_text())
        if info.get("key") != key:
            return None
        return ConceptPackage.load(model_dir / PACKAGE_FILE)
    except (OSError, ValueError, PackageError):
        return None


def handle_evaluate(msg: Message, settings: ClientSettings) -> Message:
    content = msg.content
    meta = content.config_records[fed.FUSED_META]
    fused, version = fused_from_records(content.array_records[fed.FUSED], meta)
    base = _load_base(settings, fused.base_source or "tiny")
    if base.fingerprint != fused.base_fingerprint:
        raise ClientSetupError(
            f"the fused model is for base {fused.base_fingerprint[:12]}; this client has "
            f"{base.source} ({base.fingerprint[:12]})"
        )
    table = fused.attach(base)  # also checks that every layer is there
    folder = settings.model_dir / FUSED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = fused.save_compact(folder / f"v{version}.safetensors")
    write_latest(settings.model_dir, version, path, str(meta["sha256"]), fused)
    log.info("stored fused model v%d (%d concepts) in %s", version, len(fused.concepts), path)
    metrics: dict[str, float] = {"version": version, "concepts": len(fused.concepts)}
    own = _cached_package(settings.model_dir)
    if own is not None and own.concept.name in table and settings.data is not None:
        photos = load_photo_folder(settings.data)
        caption = f"a photo of a {own.concept.token}"
        fused_loss = denoising_loss(base, table, photos, caption)
        own_base = _load_base(settings, fused.base_source or "tiny")
        own_table = ConceptTable()
        attach_package(own_base, own, own_table)
        own_loss = denoising_loss(own_base, own_table, photos, caption)
        # the base itself: the fused model with its adapters off, on the class-word prompt
        # (no concept token), so no third copy of the base is loaded
        with MixOfShowPipeline.from_base(base, table).lora_scale(0.0):
            plain = f"a photo of a {own.concept.class_word}"
            base_loss = denoising_loss(base, table, photos, plain)
        gain = base_loss - own_loss
        metrics.update(
            fused_loss=fused_loss,
            own_loss=own_loss,
            base_loss=base_loss,
            loss_ratio=fused_loss / max(own_loss, 1e-12),
            # share of the tuning's improvement over the base that the fused model keeps
            gain_kept=(base_loss - fused_loss) / gain if abs(gain) > 1e-12 else 1.0,
        )
        log.info(
            "own photos: denoising loss fused %.5f, own model %.5f, base %.5f (gain kept %.2f)",
            fused_loss,
            own_loss,
            base_loss,
            metrics["gain_kept"],
        )
    final = int(meta.get("final-round", 0) or 0)
    if final and int(meta.get("round", 0)) >= final:
        done = json.dumps({"version": version, "file": str(path)})
        atomic_write(settings.model_dir / DONE, lambda tmp: Path(tmp).write_text(done))
    return _reply(msg, **{fed.METRICS: MetricRecord(metrics)})


def _cached_package(model_dir: Path) -> ConceptPackage | None:
    try:
        return ConceptPackage.load(model_dir / PACKAGE_FILE)
    except PackageError:
        return None


app.train()(_refusing(handle_train))
app.evaluate()(_refusing(handle_evaluate))
