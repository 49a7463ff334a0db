"""The server's registry on disk: accepted concept packages, their fusion statistics, and the
versioned fused models. A restarted server reads it and fuses without asking anyone to retrain.

    <state-dir>/
      registry.json              # the index (written atomically, always loadable)
      packages/<name>.safetensors
      stats/<name>.safetensors   # per-concept Gram matrices (independent fusion mode)
      models/v<N>/fused.safetensors, concepts.json, fusion_report.{json,md,png}
      rounds.jsonl               # one line per round: who sent what, what was rejected
      status.json                # what the server is doing now: stage, round, connected nodes

Every file is written whole (temporary file + rename) before the index names it, so a crash
at any point leaves an index whose every entry is usable.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..common.base import BaseModel
from ..common.files import atomic_write
from ..common.fused import COMPACT_FILE, CONCEPTS_FILE, FusedModel
from ..common.package import ConceptPackage, PackageError

log = logging.getLogger(__name__)

INDEX = "registry.json"
FORMAT = "mix-of-show/registry"


class RegistryError(ValueError):
    """The state folder cannot be used (another base, unreadable index)."""


@dataclass
class Entry:
    name: str
    token: str
    sha256: str
    origin: str = ""
    node_id: int = 0
    round: int = 0
    accepted_at: float = 0.0
    metrics: dict = field(default_factory=dict)


@dataclass
class ModelVersion:
    version: int
    strategy: str
    concepts: list[str]
    created_at: float
    path: str


class Registry:
    """See the module docstring. ``Registry.open(state_dir, base)`` creates or loads it."""

    def __init__(self, root: Path, base_fingerprint: str, base_source: str) -> None:
        self.root = root
        self.base_fingerprint = base_fingerprint
        self.base_source = base_source
        self.entries: dict[str, Entry] = {}
        self.models: list[ModelVersion] = []
        self._packages: dict[str, ConceptPackage] = {}

    # --- persistence ---------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, base: BaseModel) -> Registry:
        root = Path(root).expanduser().resolve()
        for sub in ("packages", "stats", "models"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        reg = cls(root, base.fingerprint, base.source)
        index = root / INDEX
        if not index.exists():
            reg._write()
            return reg
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError) as err:
            raise RegistryError(f"{index}: unreadable registry ({err})") from err
        if data.get("format") != FORMAT:
            raise RegistryError(f"{index}: not a Mix-of-Show registry")
        if data["base_fingerprint"] != base.fingerprint:
            raise RegistryError(
                f"{root} holds concepts for base {data['base_fingerprint'][:12]} "
                f"({data.get('base_source', '?')}); this server runs base "
                f"{base.fingerprint[:12]} ({base.source}): the base changed (e.g. a newer "
                "toy model). Use another --state-dir (mos-simulate, mos-demo: another --out), "
                "or remove that folder to start over."
            )
        for d in data.get("concepts", []):
            entry = Entry(**d)
            if not reg.package_path(entry.name).is_file():
                log.warning("registry: package of %s is missing; dropped", entry.token)
                continue
            reg.entries[entry.name] = entry
        for d in data.get("models", []):
            mv = ModelVersion(**d)
            if (root / mv.path / COMPACT_FILE).is_file():
                reg.models.append(mv)
            else:
                log.warning("registry: fused model v%d is missing; dropped", mv.version)
        return reg

    def _write(self) -> None:
        data = {
            "format": FORMAT,
            "base_fingerprint": self.base_fingerprint,
            "base_source": self.base_source,
            "concepts": [asdict(e) for e in self.entries.values()],
            "models": [asdict(m) for m in self.models],
        }
        text = json.dumps(data, indent=2)
        atomic_write(self.root / INDEX, lambda tmp: Path(tmp).write_text(text))

    def package_path(self, name: str) -> Path:
        return self.root / "packages" / f"{name}.safetensors"

    def stats_path(self, name: str) -> Path:
        return self.root / "stats" / f"{name}.safetensors"

    # --- concepts ------------------------------------------------------------------
    def check(self, package: ConceptPackage, origin: str) -> str:
        """``"new"`` or ``"known"`` (the same package again); a clash raises ``PackageError``."""
        name = package.concept.name
        if name not in self.entries:
            return "new"
        entry = self.entries[name]
        if entry.sha256 == package.sha256:
            return "known"
        raise PackageError(
            f"{origin}: concept {package.concept.token} is already registered from "
            f"{entry.origin or 'another client'} with different weights; choose another name"
        )

    def accept(
        self, package: ConceptPackage, origin: str, node_id: int = 0, round: int = 0
    ) -> Entry:
        """Store a validated package (file first, then the index); it stays in memory, so
        fusing it reads nothing back."""
        name = package.concept.name
        package.save(self.package_path(name))
        self._packages[name] = package
        entry = Entry(
            name=name,
            token=package.concept.token,
            sha256=package.sha256,
            origin=origin,
            node_id=node_id,
            round=round,
            accepted_at=time.time(),
            metrics=dict(package.metrics),
        )
        self.entries[name] = entry
        self._write()
        return entry

    def package(self, name: str) -> ConceptPackage:
        """An accepted package: the one in memory, or (after a restart) read and validated."""
        if name not in self._packages:
            self._packages[name] = ConceptPackage.load(self.package_path(name))
        return self._packages[name]

    def registered(self) -> dict[str, str]:
        """``{concept name: sha256}`` of every accepted package."""
        return {n: e.sha256 for n, e in self.entries.items()}

    def save_stats(self, name: str, stats: dict[str, torch.Tensor]) -> None:
        if stats:
            tensors = {k: v.detach().cpu().contiguous() for k, v in stats.items()}
            atomic_write(self.stats_path(name), lambda tmp: save_file(tensors, tmp))

    def load_stats(self, name: str) -> dict[str, torch.Tensor]:
        path = self.stats_path(name)
        if not path.is_file():
            return {}
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            log.warning(
                "registry: statistics of %s unreadable (%s); they will be recorded", name, err
            )
            return {}

    # --- fused models --------------------------------------------------------------
    def latest(self) -> ModelVersion | None:
        return self.models[-1] if self.models else None

    def pending(self) -> list[str]:
        """Accepted concepts that the latest fused model does not hold yet."""
        latest = self.latest()
        have = set(latest.concepts) if latest else set()
        return [n for n in self.entries if n not in have]

    def publish(self, fused: FusedModel, report: dict | None = None, grid=None) -> ModelVersion:
        """Write ``models/v<N>/`` whole, then add it to the index."""
        version = (self.models[-1].version + 1) if self.models else 1
        rel = f"models/v{version}"
        folder = self.root / rel
        folder.mkdir(parents=True, exist_ok=True)
        fused.save_compact(folder / COMPACT_FILE)
        table = json.dumps({**fused.table_json(), "version": version}, indent=2)
        atomic_write(folder / CONCEPTS_FILE, lambda tmp: Path(tmp).write_text(table))
        if report is not None:
            from .report import write_report

            write_report(report, folder, grid)
        mv = ModelVersion(
            version=version,
            strategy=fused.strategy,
            concepts=[c.name for c in fused.concepts],
            created_at=time.time(),
            path=rel,
        )
        self.models.append(mv)
        self._write()
        return mv

    def load_model(self, mv: ModelVersion) -> FusedModel:
        return FusedModel.load_compact(self.root / mv.path / COMPACT_FILE)

    def write_status(self, stage: str, **fields: object) -> None:
        """``status.json``: the server's stage now (waiting, training, fusing, evaluating,
        done, stopped), for the federation view; written whole each time."""
        text = json.dumps({"stage": stage, "time": time.time(), **fields}, default=str)
        atomic_write(self.root / "status.json", lambda tmp: Path(tmp).write_text(text))

    def log_round(self, record: dict) -> None:
        with open(self.root / "rounds.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
