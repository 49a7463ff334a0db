"""Federation pieces without processes or ray: records on the wire, the strategies with a
stand-in Grid, the registry on disk, and the ClientApp's handlers."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from mos.client.client_app import (
    ClientSettings,
    ClientSetupError,
    handle_evaluate,
    handle_train,
)
from mos.client.layout import DONE, LATEST
from mos.common import federation as fed
from mos.common.base import build_tiny
from mos.common.checksum import digest
from mos.common.config import TrainConfig
from mos.common.fused import FusedModel
from mos.common.package import PackageError
from mos.common.wire import (
    fused_from_records,
    fused_to_records,
    package_from_records,
    package_to_records,
)
from mos.server.fusion import FusionConfig, FusionEngine
from mos.server.registry import Registry, RegistryError
from mos.server.strategy import GradientFusionStrategy, NotEnoughClients, WeightFusionStrategy
from tests.conftest import make_photos, random_fused, random_package

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run id, which Flower sets inside its app processes."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def package_reply(to: Message, package, corrupt: bool = False) -> Message:
    arrays, manifest = package_to_records(package)
    if corrupt:
        key = next(iter(arrays))
        arrays[key] = Array(np.full(arrays[key].shape, np.nan, dtype=arrays[key].dtype))
    return Message(RecordDict({fed.PACKAGE: arrays, fed.MANIFEST: manifest}), reply_to=to)


def unavailable(to: Message) -> Message:
    """The error the SuperLink writes for a node that stopped: its sender is the SuperLink."""
    reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=to)
    reply.metadata.__dict__["_src_node_id"] = 1
    return reply


def strategy(tmp_path, base, cls=GradientFusionStrategy, **kw):
    registry = Registry.open(tmp_path / "state", base)
    config = FusionConfig(mode="independent", steps=3, resolution=16)
    kw = {"min_clients": 1, "wait_clients_s": 1.0, "poll_s": 0.05, **kw}
    return cls(base, registry, TrainConfig(steps=2), config, report=False, **kw)


# --- app definition ------------------------------------------------------------------
def test_pyproject_declares_the_flower_app_with_the_shared_defaults():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = data["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "mos.server.server_app:app",
        "clientapp": "mos.client.client_app:app",
    }
    assert app["config"] == fed.RUN_CONFIG_DEFAULTS
    assert "federations" not in data["tool"]["flwr"]  # legacy in Flower 1.42
    rendered = tomllib.loads(fed.render_app_pyproject())["tool"]["flwr"]["app"]
    assert rendered["config"] == fed.RUN_CONFIG_DEFAULTS
    assert rendered["components"] == app["components"]


def test_run_settings_validate_with_the_key_named():
    s = fed.RunSettings.from_run_config(fed.RUN_CONFIG_DEFAULTS)
    assert s.train.steps == fed.RUN_CONFIG_DEFAULTS["steps"]
    assert s.fusion.mode == fed.RUN_CONFIG_DEFAULTS["fusion-mode"]
    assert s == fed.RunSettings()
    with pytest.raises(fed.SettingsError, match="min-clients"):
        fed.RunSettings.from_run_config({**fed.RUN_CONFIG_DEFAULTS, "min-clients": 0})
    with pytest.raises(fed.SettingsError, match="strategy"):
        fed.RunSettings.from_run_config({**fed.RUN_CONFIG_DEFAULTS, "strategy": "fedavg"})
    with pytest.raises(fed.SettingsError, match="fusion-steps"):
        fed.RunSettings.from_run_config({"fusion-steps": 0})
    with pytest.raises(fed.SettingsError, match="unknown key.*lr-text-lora"):
        fed.RunSettings.from_run_config({"lr-text-lora": 1e-4})


def test_server_and_simulation_options_reach_the_clients_training_settings(tmp_path):
    from mos.common.cli import UsageError
    from mos.server.launch import _overrides, server_parser, simulate_parser

    for parser, extra in ((server_parser(), []), (simulate_parser(), ["--clients", "2",
                          "--data-root", str(tmp_path)])):  # fmt: skip
        args = parser.parse_args([*extra, "--steps", "7", "--lr-embedding", "0.005",
                                  "--lr-text", "0.0001", "--lr-unet", "0.001",
                                  "--flip-p", "0.5"])  # fmt: skip
        values = _overrides(args)
        t = fed.RunSettings.from_run_config({**fed.RUN_CONFIG_DEFAULTS, **values}).train
        assert (t.steps, t.lr_embedding, t.lr_text, t.lr_unet) == (7, 5e-3, 1e-4, 1e-3)
        assert t.flip_p == 0.5
        unset = fed.RunSettings.from_run_config(_overrides(parser.parse_args(extra)))
        assert unset.train.flip_p == 0.0  # the model's default stays
        args = parser.parse_args([*extra, "--lr-unet", "-1"])
        with pytest.raises(UsageError, match="--lr-unet"):
            _overrides(args)
        args = parser.parse_args([*extra, "--flip-p", "1.5"])
        with pytest.raises(UsageError, match="--flip-p"):
            _overrides(args)


# --- records -------------------------------------------------------------------------
def test_package_round_trips_through_records_and_bf16_goes_as_fp32():
    base = build_tiny()
    pkg = random_package(base, "dog1", seed=1)
    key = next(iter(pkg.lora))
    pkg.lora[key] = pkg.lora[key].to(torch.bfloat16)
    arrays, manifest = package_to_records(pkg)
    assert {a.dtype for a in arrays.values()} <= {"float16", "float32"}
    back = package_from_records(arrays, manifest)
    assert back.concept == pkg.concept
    for k, v in pkg.tensors().items():
        torch.testing.assert_close(back.tensors()[k].float(), v.float(), rtol=0, atol=0)
    assert manifest["sha256"] == digest(back.tensors())


def test_tampered_oversized_or_lying_records_are_refused():
    base = build_tiny()
    arrays, manifest = package_to_records(random_package(base, "dog1", seed=1))
    unsigned = ConfigRecord({k: v for k, v in manifest.items() if k != "sha256"})
    with pytest.raises(PackageError, match="no sha256"):  # uploads must carry their digest
        package_from_records(arrays, unsigned)
    key = next(iter(arrays))
    good = arrays[key]
    arrays[key] = Array(good.numpy() + 1)
    with pytest.raises(PackageError, match="sha256"):
        package_from_records(arrays, manifest)
    arrays[key] = Array(good.numpy().astype(np.int64))
    with pytest.raises(PackageError, match="dtype"):
        package_from_records(arrays, manifest)
    arrays[key] = Array(dtype="float32", shape=(10**6, 10**6), stype="numpy.ndarray", data=b"x")
    with pytest.raises(PackageError, match="limit"):  # refused before anything is decoded
        package_from_records(arrays, manifest)
    arrays[key] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=good.data)
    with pytest.raises(PackageError, match="claims"):
        package_from_records(arrays, manifest, max_bytes=1 << 30)


def test_fused_model_round_trips_and_is_verified(tmp_path):
    base = build_tiny()
    fused = random_fused(base, [random_package(base, "dog1", 1), random_package(base, "cat2", 2)])
    arrays, meta = fused_to_records(fused, 3)
    back, version = fused_from_records(arrays, meta)
    assert version == 3 and [c.name for c in back.concepts] == ["dog1", "cat2"]
    for k, v in fused.tensors().items():
        assert torch.equal(back.tensors()[k], v)
    meta["sha256"] = "0" * 64
    with pytest.raises(PackageError, match="sha256"):
        fused_from_records(arrays, meta)


# --- strategies ----------------------------------------------------------------------
def test_a_round_accepts_good_packages_and_rejects_bad_ones_with_reasons(tmp_path, monkeypatch):
    base = build_tiny()
    s = strategy(tmp_path, base)
    grid = FakeGrid([1, 2, 3, 4, 5, 6])
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, None, ConfigRecord(), grid)}
    assert set(msgs) == {1, 2, 3, 4, 5, 6}
    for m in msgs.values():  # what pushing them through Flower's Grid does
        m.metadata.__dict__["_message_id"] = m.object_id
    sent = msgs[1].content.config_records[fed.TRAIN_CONFIG]
    assert sent["base-fingerprint"] == base.fingerprint
    assert TrainConfig.model_validate_json(sent["train-config"]).steps == 2
    other_base = build_tiny(seed=1)
    replies = [
        package_reply(msgs[1], random_package(base, "dog1", seed=1)),
        package_reply(msgs[2], random_package(base, "cat2", seed=2), corrupt=True),
        package_reply(msgs[3], random_package(other_base, "owl3", seed=3)),
        package_reply(msgs[4], random_package(base, "dog1", seed=4)),  # name clash
        unavailable(msgs[5]),
        # node 6 never answers
    ]

    # single pass: an accepted package is fused from memory, never read back from disk
    def no_read_back(*args, **kwargs):
        raise AssertionError("a package was read back")

    monkeypatch.setattr("mos.common.package.ConceptPackage.load", no_read_back)
    arrays, metrics = s.aggregate_train(1, replies)
    monkeypatch.undo()
    record = s.rounds[-1]
    # the clash is renamed by the documented rule (free_name), not refused
    assert record["accepted"] == ["dog1", "dog1-2"]
    assert record["renamed"] == [{"node": 4, "from": "<dog1>", "to": "<dog1-2>"}]
    reasons = {r["node"]: r["reason"] for r in record["rejected"]}
    assert "sha256" in reasons[2] or "NaN" in reasons[2]
    assert "another base model" in reasons[3]
    assert 4 not in reasons
    assert "Node Unavailable" in reasons[5]
    assert record["missing"] == [6]
    assert metrics["accepted"] == 2 and metrics["rejected"] == 3 and metrics["version"] == 1
    # the accepted package and v1 are on disk; the fused model goes to every node
    assert (tmp_path / "state/packages/dog1.safetensors").is_file()
    evals = list(s.configure_evaluate(1, arrays, ConfigRecord({"final-round": 1}), grid))
    # every node but the silent one (it would only cost another timeout)
    assert sorted(m.metadata.dst_node_id for m in evals) == [1, 2, 3, 4, 5]
    fused, version = fused_from_records(
        evals[0].content.array_records[fed.FUSED], evals[0].content.config_records[fed.FUSED_META]
    )
    assert version == 1 and [c.name for c in fused.concepts] == ["dog1", "dog1-2"]
    # a later round: node 7's own <dog1> clashes with the registered one, node 1's again is known
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(2, None, ConfigRecord(), grid)}
    for m in msgs.values():
        m.metadata.__dict__["_message_id"] = m.object_id
    s.aggregate_train(2, [package_reply(msgs[3], random_package(base, "dog1", seed=7))])
    assert s.rounds[-1]["accepted"] == ["dog1-3"]


def test_not_enough_clients_is_a_clear_error(tmp_path):
    s = strategy(tmp_path, build_tiny(), min_clients=3, wait_clients_s=0.2, poll_s=0.05)
    with pytest.raises(NotEnoughClients, match="only 1 of 3 clients"):
        s.configure_train(1, None, ConfigRecord(), FakeGrid([9]))


def test_restart_fuses_registered_packages_without_clients(tmp_path):
    base = build_tiny()
    registry = Registry.open(tmp_path / "state", base)
    for i, name in enumerate(("dog1", "cat2")):
        registry.accept(random_package(base, name, seed=i), f"node {i}")
    # the server stopped here, before fusing; a new one starts on the same folder
    s = strategy(tmp_path, build_tiny())
    arrays = s.resume()
    assert len(arrays) > 0
    latest = s.registry.latest()
    assert latest.version == 1 and latest.concepts == ["dog1", "cat2"]
    # statistics were kept: a later server adding a concept samples only the new one
    assert (tmp_path / "state/stats/dog1.safetensors").is_file()
    s2 = strategy(tmp_path, build_tiny())
    s2.resume()
    assert s2.current[0] == 1  # nothing new: the current model is reused, no new version
    msgs = list(s2.configure_train(2, None, ConfigRecord(), FakeGrid([4])))
    registered = json.loads(msgs[0].content.config_records[fed.TRAIN_CONFIG]["registered"])
    assert set(registered) == {"dog1", "cat2"}
    s2.aggregate_train(2, [package_reply(msgs[0], random_package(s2.base, "owl3", seed=5))])
    latest = s2.registry.latest()
    assert latest.version == 2 and latest.concepts == ["dog1", "cat2", "owl3"]
    # v2 equals fusing the three packages from scratch (independent mode is exact)
    fresh = build_tiny()
    pkgs = [s2.registry.package(n) for n in ("dog1", "cat2", "owl3")]
    config = FusionConfig(mode="independent", steps=3, resolution=16)
    expected = FusionEngine(fresh, pkgs, config).fuse(progress=False)
    got = s2.registry.load_model(latest)
    for key, (up, down) in expected.factors.items():
        delta = up.double() @ down.double()
        g_up, g_down = got.factors[key]
        err = (g_up.double() @ g_down.double() - delta).norm() / delta.norm()
        # fp32 storage and batched sampling in other groupings: rounding only
        assert err < 1e-4, (key, float(err))


def test_registry_refuses_another_base_and_survives_a_lost_file(tmp_path):
    base = build_tiny()
    registry = Registry.open(tmp_path, base)
    registry.accept(random_package(base, "dog1", seed=1), "node 1")
    registry.accept(random_package(base, "cat2", seed=2), "node 2")
    with pytest.raises(RegistryError, match="base changed.*another --state-dir.*another --out"):
        Registry.open(tmp_path, build_tiny(seed=3))
    (tmp_path / "packages/cat2.safetensors").unlink()
    assert list(Registry.open(tmp_path, base).entries) == ["dog1"]


def test_weight_fusion_strategy_publishes_the_average(tmp_path):
    base = build_tiny()
    s = strategy(tmp_path, base, cls=WeightFusionStrategy)
    msgs = list(s.configure_train(1, None, ConfigRecord(), FakeGrid([1, 2])))
    pkgs = [random_package(base, "dog1", seed=1), random_package(base, "cat2", seed=2)]
    s.aggregate_train(1, [package_reply(m, p) for m, p in zip(msgs, pkgs, strict=True)])
    fused = s.registry.load_model(s.registry.latest())
    assert fused.strategy == "weight-fusion"
    key = next(iter(fused.factors))
    up, down = fused.factors[key]
    want = sum(p.lora[f"{key}.lora_B.weight"] @ p.lora[f"{key}.lora_A.weight"] for p in pkgs) / 2
    torch.testing.assert_close(up @ down, want, rtol=1e-5, atol=1e-6)


# --- the ClientApp's handlers ----------------------------------------------------------
def train_message(base, registered=None) -> Message:
    config = ConfigRecord(
        {
            "round": 1,
            "train-config": TrainConfig(steps=2, batch_size=1, resolution=16).model_dump_json(),
            "base-fingerprint": base.fingerprint,
            "base-source": base.source,
            "registered": json.dumps(registered or {}),
        }
    )
    return Message(RecordDict({fed.TRAIN_CONFIG: config}), dst_node_id=3, message_type="train")


@pytest.fixture
def settings(tmp_path) -> ClientSettings:
    return ClientSettings(
        data=make_photos(tmp_path / "photos", count=2, size=24),
        concept="dog1",
        class_word="dog",
        model_dir=tmp_path / "model",
        device="cpu",
    )


def test_client_trains_once_reuses_its_package_and_refuses_another_base(tmp_path, settings):
    base = build_tiny()
    reply = handle_train(train_message(base), settings)
    content = reply.content
    assert fed.PACKAGE in content.array_records
    pkg = package_from_records(
        content.array_records[fed.PACKAGE], content.config_records[fed.MANIFEST]
    )
    assert pkg.concept.name == "dog1" and pkg.base_fingerprint == base.fingerprint
    assert content.metric_records[fed.METRICS]["cached"] == 0
    # nothing but the package goes: no image-sized array, no photo path in the manifest
    assert all(a.shape[-1] != 24 for a in content.array_records[fed.PACKAGE].values())
    assert str(tmp_path) not in json.dumps(dict(content.config_records[fed.MANIFEST]))
    again = handle_train(train_message(base), settings).content
    assert again.metric_records[fed.METRICS]["cached"] == 1
    sha = content.config_records[fed.MANIFEST]["sha256"]
    known = handle_train(train_message(base, {"dog1": sha}), settings).content
    assert fed.PACKAGE not in known.array_records
    assert known.config_records[fed.MANIFEST]["status"] == "registered"
    settings.base_model = "tiny"  # this client's own base, not what the server names
    with pytest.raises(ClientSetupError, match="base model mismatch"):
        handle_train(train_message(build_tiny(seed=2)), settings)


def test_client_stores_the_fused_model_and_reports_only_numbers(settings):
    base = build_tiny()
    reply = handle_train(train_message(base), settings).content
    own = package_from_records(reply.array_records[fed.PACKAGE], reply.config_records[fed.MANIFEST])
    fused = random_fused(base, [own, random_package(base, "cat2", seed=2)])
    arrays, meta = fused_to_records(fused, 1)
    meta["round"], meta["final-round"] = 1, 1
    msg = Message(
        RecordDict({fed.FUSED: arrays, fed.FUSED_META: meta}),
        dst_node_id=3,
        message_type="evaluate",
    )
    out = handle_evaluate(msg, settings).content
    metrics = dict(out.metric_records[fed.METRICS])
    assert set(out.keys()) == {fed.METRICS}
    assert metrics["version"] == 1 and metrics["concepts"] == 2
    assert metrics["own_loss"] > 0 and metrics["fused_loss"] > 0 and "gain_kept" in metrics
    latest = json.loads((settings.model_dir / LATEST).read_text())
    assert latest["concepts"] == ["<dog1>", "<cat2>"]
    stored = FusedModel.load_compact(latest["file"])
    assert [c.name for c in stored.concepts] == ["dog1", "cat2"]
    assert (settings.model_dir / DONE).is_file()
    # a corrupted v2 is refused and v1 stays the latest
    arrays2, meta2 = fused_to_records(fused, 2)
    key = next(iter(arrays2))
    arrays2[key] = Array(arrays2[key].numpy() * 2)
    bad = Message(
        RecordDict({fed.FUSED: arrays2, fed.FUSED_META: meta2}),
        dst_node_id=3,
        message_type="evaluate",
    )
    with pytest.raises(PackageError, match="sha256"):
        handle_evaluate(bad, settings)
    assert json.loads((settings.model_dir / LATEST).read_text())["version"] == 1
    assert not (settings.model_dir / "fused/v2.safetensors").exists()


def test_the_client_app_refuses_with_a_reason_instead_of_crashing(tmp_path):
    from flwr.app import Context

    from mos.client.client_app import app

    context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
    reply = app(train_message(build_tiny()), context)
    reason = reply.content.config_records[fed.REFUSAL]["reason"]
    assert "node config lacks data, concept" in reason
    node = {"data": str(tmp_path / "none"), "concept": "dog1"}
    context = Context(run_id=7, node_id=3, node_config=node, state=RecordDict(), run_config={})
    reason = app(train_message(build_tiny()), context).content.config_records[fed.REFUSAL]
    assert "not a folder" in reason["reason"]


def test_a_received_packages_digest_is_computed_once(monkeypatch):
    import mos.common.package as package_module
    import mos.common.wire as wire_module

    base = build_tiny()
    arrays, manifest = package_to_records(random_package(base, "dog1", seed=1))
    calls = []
    real = wire_module.digest
    counting = lambda tensors: calls.append(1) or real(tensors)  # noqa: E731
    monkeypatch.setattr(wire_module, "digest", counting)
    monkeypatch.setattr(package_module, "digest", counting)
    package = package_from_records(arrays, manifest)
    assert package.sha256 == manifest["sha256"]
    assert len(calls) == 1


def test_a_node_sends_an_imported_package_without_photos(tmp_path):
    from mos.client.cli import main as client_main
    from mos.client.importer import import_lora

    from .test_interop import _kohya_file

    base = build_tiny()
    _kohya_file(base, tmp_path / "k.safetensors")
    pkg, _ = import_lora(base, tmp_path / "k.safetensors", "rex", trigger="sks dog")
    pkg.save(tmp_path / "rex.safetensors")
    settings = ClientSettings(
        data=None,
        package=tmp_path / "rex.safetensors",
        concept="rex",
        class_word="dog",
        model_dir=tmp_path / "model",
        device="cpu",
    )
    content = handle_train(train_message(base), settings).content
    sent = package_from_records(
        content.array_records[fed.PACKAGE], content.config_records[fed.MANIFEST]
    )
    assert sent.sha256 == pkg.sha256 and sent.concept.trigger == "sks dog"
    assert content.metric_records[fed.METRICS]["photos"] == 0
    known = handle_train(train_message(base, {"rex": pkg.sha256}), settings).content
    assert known.config_records[fed.MANIFEST]["status"] == "registered"
    with pytest.raises(ClientSetupError, match="mos-import"):
        handle_train(train_message(build_tiny(seed=2)), settings)
    # the command line: a package goes to a federation only, and not with photos
    assert client_main(["--package", str(tmp_path / "rex.safetensors")]) == 2
    assert client_main(["--package", "x.safetensors", "--data", "d", "--superlink", "h:1"]) == 2
