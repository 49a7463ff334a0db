"""The Flower ServerApp (``[tool.flwr.app.components] serverapp``).

Reads the run config, loads the base on the server's GPU when there is one, opens the
registry in ``state-dir``, fuses anything received before a restart, then runs the rounds
with the chosen strategy (``server/strategy.py``). It ends by writing
``<state-dir>/result.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from ..common.base import BaseModelError, load_base_model
from ..common.cli import resolve_device, setup_logging
from ..common.federation import RunSettings, SettingsError
from ..common.files import atomic_write
from .registry import Registry, RegistryError
from .strategy import STRATEGIES, NotEnoughClients

log = logging.getLogger("mos.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    try:
        run(grid, RunSettings.from_run_config(context.run_config))
    except (SettingsError, BaseModelError, RegistryError, NotEnoughClients) as err:
        # one clear line in the run's log instead of a traceback; no result.json is written
        log.error("the run stopped: %s", err)


def run(grid: Grid, settings: RunSettings) -> dict:
    server = settings.server
    device = resolve_device(server.device)
    base = load_base_model(server.base_model, config=server.base_config or None).to(device)
    state = settings.state_path()
    registry = Registry.open(state, base)
    strategy = STRATEGIES[server.strategy](
        base,
        registry,
        settings.train,
        settings.fusion,
        min_clients=server.min_clients,
        wait_clients_s=server.wait_clients,
        max_package_bytes=settings.max_package_bytes,
        report=server.report,
        compare=server.compare,
    )
    log.info(
        "server: base %s (%s) on %s; state in %s", base.source, base.fingerprint[:12], device, state
    )
    start = time.perf_counter()
    initial = strategy.resume()
    try:
        strategy.start(
            grid,
            initial_arrays=initial,
            num_rounds=server.rounds,
            timeout=server.round_timeout,
            evaluate_config=ConfigRecord({"final-round": server.rounds}),
        )
    except BaseException as err:
        registry.write_status("stopped", reason=str(err) or type(err).__name__)
        raise
    latest = registry.latest()
    result: dict[str, Any] = {
        "strategy": server.strategy,
        "rounds": strategy.rounds,
        "seconds": time.perf_counter() - start,
        "version": latest.version if latest else None,
        "concepts": latest.concepts if latest else [],
        "model": str(state / latest.path) if latest else None,
    }
    text = json.dumps(result, indent=2, default=str)
    atomic_write(state / "result.json", lambda tmp: Path(tmp).write_text(text))
    registry.write_status("done", rounds=len(strategy.rounds), version=result["version"])
    log.info(
        "done: fused model v%s with %d concepts in %s",
        result["version"],
        len(result["concepts"]),
        result["model"],
    )
    return result
