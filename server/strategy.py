"""The Flower strategies: ``gradient-fusion`` and ``weight-fusion``.

One round of ``Strategy.start`` (Flower's own loop) is, for us:

1. ``configure_train``: wait for ``min_clients`` SuperNodes, send each the training config,
   the base fingerprint and the concepts already registered (a client whose package is
   registered does not retrain);
2. ``aggregate_train``: validate every reply (size limit, dtypes, digest, fingerprint,
   shapes, finite values, name clashes); a bad reply is rejected with a logged reason and
   the round goes on with the others. Accepted packages go to the registry on disk, then
   everything registered is fused (incrementally: only new concepts are sampled in the
   independent mode) and published as the next version;
3. ``configure_evaluate``: send the fused model (compact form + digest) to every node;
4. ``aggregate_evaluate``: collect each client's private fidelity number.

Stock ``FedAvg`` cannot do this: it averages arrays with the same keys, while every concept
package is different. The two strategies differ only in how they fuse.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..common import federation as fed
from ..common.base import BaseModel
from ..common.config import FusionConfig, TrainConfig
from ..common.fused import FusedModel
from ..common.package import ConceptPackage, PackageError, free_name
from ..common.wire import fused_to_records, package_from_records
from .fusion import FusionEngine, FusionResult
from .registry import Registry

log = logging.getLogger("mos.server")


class NotEnoughClients(RuntimeError):
    """Fewer SuperNodes than ``min_clients`` connected in time."""


class ConceptFusionStrategy(Strategy):
    """Collect concept packages, fuse them into one model, send it back (module docstring)."""

    name: ClassVar[str] = ""

    def __init__(
        self,
        base: BaseModel,
        registry: Registry,
        train_config: TrainConfig,
        fusion_config: FusionConfig,
        *,
        min_clients: int = 2,
        wait_clients_s: float = 300.0,
        max_package_bytes: int = 64 << 20,
        report: bool = True,
        compare: bool = False,
        poll_s: float = 1.0,
    ) -> None:
        self.base = base
        self.registry = registry
        self.renamed: list[dict] = []  # the current round's renamings (_unclash)
        self.train_config = train_config
        self.fusion_config = fusion_config
        self.min_clients = min_clients
        self.wait_clients_s = wait_clients_s
        self.max_package_bytes = max_package_bytes
        self.report = report
        self.compare = compare
        self.poll_s = poll_s
        self.engine: FusionEngine | None = None
        self.current: tuple[int, ArrayRecord, ConfigRecord] | None = None
        self.sent_train: dict[int, Message] = {}  # node -> the message it was sent
        self.sent_eval: dict[int, Message] = {}
        self.rounds: list[dict] = []
        self._round = 0  # the round in progress (for status.json)

    # --- fusion ----------------------------------------------------------------------
    def fuse(self, engine: FusionEngine) -> FusionResult:
        raise NotImplementedError

    def _engine(self) -> FusionEngine:
        """The engine with every registered concept (statistics reloaded where kept)."""
        if self.engine is None:
            self.engine = FusionEngine(self.base, [], self.fusion_config)
        for name, entry in self.registry.entries.items():
            if name not in self.engine.packages:
                # accepted packages were checked against this base; one read back after a
                # restart was written by a server with the same base (Registry.open)
                self.engine.add(
                    self.registry.package(name), entry.origin or entry.token, checked=True
                )
                stats = self.registry.load_stats(name)
                if stats:
                    self.engine.load_statistics(name, stats)
        return self.engine

    def fuse_registered(self) -> int:
        """Fuse everything registered, publish the next version, return its number."""
        engine = self._engine()
        names = engine.names
        log.info("fusing %d concepts (%s, %s mode)", len(names), self.name, engine.config.mode)
        start = time.perf_counter()
        result = self.fuse(engine)
        seconds = time.perf_counter() - start
        for name in names:
            if not self.registry.stats_path(name).is_file():
                self.registry.save_stats(name, engine.statistics(name))
        report = grid = None
        if self.report:
            from .report import fidelity, sample_grid

            results = [result]
            if self.compare:  # the other strategy's fusion, for the report only
                other = "weight_fusion" if result.strategy == "gradient-fusion" else "fuse"
                results.append(getattr(engine, other)())
            report = fidelity(engine, results)
            report.update(
                strategy=result.strategy,
                config=engine.config.model_dump(),
                timings={**result.timings, "total_fusion_s": seconds},
                objective=result.objective,
                base={"source": self.base.source, "fingerprint": self.base.fingerprint},
            )
            grid = sample_grid(engine, results)
        packages = [engine.packages[n] for n in names]
        fused = FusedModel.from_packages(result.strategy, result.factors, packages, engine.sources)
        mv = self.registry.publish(fused, report, grid)
        arrays, meta = fused_to_records(fused, mv.version)
        self.current = (mv.version, arrays, meta)
        log.info(
            "published fused model v%d with %s (%.1f s)", mv.version, ", ".join(names), seconds
        )
        return mv.version

    def resume(self) -> ArrayRecord:
        """On start: fuse packages received before a restart; return the current model."""
        if self.registry.pending():
            log.info(
                "registry holds %d concepts not yet fused (%s): fusing them without retraining",
                len(self.registry.pending()),
                ", ".join(self.registry.pending()),
            )
            self.fuse_registered()
        elif (mv := self.registry.latest()) is not None:
            fused = self.registry.load_model(mv)
            arrays, meta = fused_to_records(fused, mv.version)
            self.current = (mv.version, arrays, meta)
            log.info("current fused model: v%d (%s)", mv.version, ", ".join(mv.concepts))
        return self.current[1] if self.current else ArrayRecord()

    # --- Flower strategy ----------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_clients_s
        nodes = sorted(grid.get_node_ids())
        announced = -1
        while len(nodes) < self.min_clients:
            if len(nodes) != announced:
                log.info("waiting for clients: %d of %d connected", len(nodes), self.min_clients)
                announced = len(nodes)
                self.registry.write_status(
                    "waiting", nodes=nodes, min_clients=self.min_clients, round=self._round + 1
                )
            if time.monotonic() > deadline:
                raise NotEnoughClients(
                    f"only {len(nodes)} of {self.min_clients} clients connected within "
                    f"{self.wait_clients_s:.0f} s (start them with mos-client --superlink, or "
                    "lower --min-clients)"
                )
            time.sleep(self.poll_s)
            nodes = sorted(grid.get_node_ids())
        return nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._wait_for_nodes(grid)
        self._round = server_round
        log.info("round %d: asking %d clients for their concept", server_round, len(nodes))
        self.registry.write_status("training", nodes=nodes, round=server_round)
        content = ConfigRecord(
            {
                **dict(config),
                "round": server_round,
                "train-config": self.train_config.model_dump_json(),
                "base-fingerprint": self.base.fingerprint,
                "base-source": self.base.source,
                "registered": json.dumps(self.registry.registered()),
            }
        )
        self.sent_train = {
            n: Message(RecordDict({fed.TRAIN_CONFIG: content}), dst_node_id=n, message_type="train")
            for n in nodes
        }
        return list(self.sent_train.values())

    def _validate(self, reply: Message, taken: dict[str, int]) -> ConceptPackage:
        content = reply.content
        node = reply.metadata.src_node_id
        origin = f"node {node}"
        if fed.PACKAGE not in content.array_records or fed.MANIFEST not in content.config_records:
            raise PackageError(f"{origin}: the reply has no concept package")
        package = package_from_records(
            content.array_records[fed.PACKAGE],
            content.config_records[fed.MANIFEST],
            self.max_package_bytes,
            origin,
        )
        try:
            package.check_against(self.base)
        except PackageError as err:
            raise PackageError(f"{origin}: {err}") from err
        return self._unclash(package, node, taken)

    def _unclash(self, package: ConceptPackage, node: int, taken: dict[str, int]) -> ConceptPackage:
        """The collision rule (``free_name``): a name another node sent in this round, or
        registered from another node with other weights, is renamed ``<name-2>``, ... The
        same node sending other weights under its registered name is refused later
        (``Registry.check``)."""
        name = package.concept.name
        entry = self.registry.entries.get(name)
        clash = f"also came from node {taken[name]} in this round" if name in taken else ""
        if (
            not clash
            and entry is not None
            and entry.node_id not in (node, 0)
            and entry.sha256 != package.sha256
        ):
            clash = f"is registered from {entry.origin or 'another node'}"
        if not clash:
            return package
        renamed = package.renamed(free_name(name, set(taken) | set(self.registry.entries)))
        log.warning(
            "node %d: concept <%s> %s: renamed %s", node, name, clash, renamed.concept.token
        )
        self.renamed.append(
            {"node": node, "from": package.concept.token, "to": renamed.concept.token}
        )
        return renamed

    def _triage(
        self, reply: Message, node: int, taken: dict[str, int]
    ) -> tuple[str, str, ConceptPackage | None]:
        """One training reply, validated once: ``(status, text, package)`` with status
        ``rejected`` (text: the reason), ``known`` (already registered; text: the concept
        name; the package when it was sent again) or ``new``."""
        if reply.has_error():
            return "rejected", f"node {node}: failed ({reply.error.reason})", None
        content = reply.content
        if fed.REFUSAL in content.config_records:
            reason = content.config_records[fed.REFUSAL]["reason"]
            return "rejected", f"node {node} refused: {reason}", None
        manifest = content.config_records.get(fed.MANIFEST)
        if manifest is not None and manifest.get("status") == "registered":
            name = str(manifest.get("concept", "")).strip("<>")
            if name in self.registry.entries:
                return "known", name, None
        try:
            package = self._validate(reply, taken)
            status = self.registry.check(package, f"node {node}")
        except PackageError as err:
            return "rejected", str(err), None
        return status, package.concept.name, package

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        record: dict = {"round": server_round, "accepted": [], "known": [], "rejected": []}
        self.renamed = []  # this round's renamings (_unclash)
        seen = {_sender(r, self.sent_train) for r in replies}
        self.registry.write_status("fusing", nodes=sorted(seen), round=server_round)
        record["missing"] = sorted(set(self.sent_train) - seen)
        for node in record["missing"]:
            log.warning("round %d: node %d sent no reply in time", server_round, node)
        taken: dict[str, int] = {}
        new_packages: list[tuple[ConceptPackage, int]] = []
        for reply in replies:
            node = _sender(reply, self.sent_train)
            status, text, package = self._triage(reply, node, taken)
            if status == "rejected":
                log.warning("round %d: rejected: %s", server_round, text)
                record["rejected"].append({"node": node, "reason": text})
                continue
            if package is not None:  # a concept once per round
                taken[package.concept.name] = node
            if status == "known":
                log.info("round %d: node %d: %s already registered", server_round, node, text)
                record["known"].append(text)
            else:
                assert package is not None
                new_packages.append((package, node))
        for package, node in new_packages:
            self.registry.accept(package, f"node {node}", node, server_round)
            record["accepted"].append(package.concept.name)
            log.info(
                "round %d: accepted %s from node %d", server_round, package.concept.token, node
            )
        record["renamed"] = self.renamed
        metrics: dict[str, float] = {
            "accepted": len(record["accepted"]),
            "rejected": len(record["rejected"]),
            "missing": len(record["missing"]),
            "concepts": len(self.registry.entries),
        }
        arrays = None
        if self.registry.pending():
            start = time.perf_counter()
            version = self.fuse_registered()
            metrics["fusion_s"] = time.perf_counter() - start
            record["version"] = version
        elif self.current is None:
            log.warning("round %d: nothing to fuse yet", server_round)
        if self.current is not None:
            arrays = self.current[1]
            metrics["version"] = self.current[0]
        record["metrics"] = metrics
        self.rounds.append(record)
        self.registry.log_round({"stage": "train", "time": time.time(), **record})
        return arrays, MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.current is None:
            return []
        version, fused_arrays, meta = self.current
        # every connected node, except those that went silent in this round's training
        # (most likely gone; waiting for them again would only cost another timeout)
        silent = set(self.rounds[-1]["missing"]) if self.rounds else set()
        nodes = sorted(n for n in grid.get_node_ids() if n not in silent)
        log.info(
            "round %d: sending fused model v%d to %d clients", server_round, version, len(nodes)
        )
        self.registry.write_status("evaluating", nodes=nodes, round=server_round, version=version)
        meta = ConfigRecord({**dict(meta), **dict(config), "round": server_round})
        self.sent_eval = {
            n: Message(
                RecordDict({fed.FUSED: fused_arrays, fed.FUSED_META: meta}),
                dst_node_id=n,
                message_type="evaluate",
            )
            for n in nodes
        }
        return list(self.sent_eval.values())

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        clients = []
        replies = list(replies)
        for reply in replies:
            node = _sender(reply, self.sent_eval)
            if reply.has_error():
                log.warning(
                    "round %d: node %d did not store the model: %s",
                    server_round,
                    node,
                    reply.error.reason,
                )
                continue
            content = reply.content
            if fed.REFUSAL in content.config_records:
                log.warning(
                    "round %d: node %d refused the model: %s",
                    server_round,
                    node,
                    content.config_records[fed.REFUSAL]["reason"],
                )
                continue
            m = dict(content.metric_records.get(fed.METRICS, MetricRecord()))
            clients.append({"node": node, **m})
            log.info(
                "round %d: node %d stored v%s%s",
                server_round,
                node,
                int(m.get("version", 0)),
                (
                    f"; own-photo loss fused/own {m['loss_ratio']:.4f}, "
                    f"tuning gain kept {m['gain_kept']:.2f}"
                )
                if "loss_ratio" in m
                else "",
            )
        missing = sorted(set(self.sent_eval) - {_sender(r, self.sent_eval) for r in replies})
        self.registry.log_round(
            {
                "stage": "evaluate",
                "round": server_round,
                "time": time.time(),
                "clients": clients,
                "missing": missing,
            }
        )
        if self.rounds:
            self.rounds[-1]["clients"] = clients
            self.rounds[-1]["missing_evaluate"] = missing
        metrics: dict[str, float] = {"stored": float(len(clients))}
        for key in ("loss_ratio", "gain_kept"):
            values = [c[key] for c in clients if key in c]
            if values:
                metrics[f"{key}_mean"] = sum(values) / len(values)
                metrics[f"{key}_worst"] = max(values) if key == "loss_ratio" else min(values)
        return MetricRecord(metrics)

    def summary(self) -> None:
        log.info(
            "%s: min %d clients, %d steps of %s training, fusion %s mode, state in %s",
            self.name,
            self.min_clients,
            self.train_config.steps,
            self.train_config.method,
            self.fusion_config.mode,
            self.registry.root,
        )


def _sender(reply: Message, sent: dict[int, Message]) -> int:
    """The node a reply is about. Errors the SuperLink writes for an unreachable node carry
    the SuperLink as sender; the message they answer names the node."""
    for node, msg in sent.items():
        if (
            msg.metadata.message_id
            and msg.metadata.message_id == reply.metadata.reply_to_message_id
        ):
            return node
    return reply.metadata.src_node_id


class GradientFusionStrategy(ConceptFusionStrategy):
    """Gradient fusion (docs/method.md, section 2): regress each layer onto every concept model's own features."""

    name = "gradient-fusion"

    def fuse(self, engine: FusionEngine) -> FusionResult:
        return engine.fuse()


class WeightFusionStrategy(ConceptFusionStrategy):
    """The baseline: ``W0 + mean_i dW_i`` and the concatenated embeddings."""

    name = "weight-fusion"

    def fuse(self, engine: FusionEngine) -> FusionResult:
        return engine.weight_fusion()


STRATEGIES: dict[str, type[ConceptFusionStrategy]] = {
    s.name: s for s in (GradientFusionStrategy, WeightFusionStrategy)
}
