"""``mos-studio``: a web page to compose fused concepts in boxes, and a read-only view of a
federation's state.

    mos-studio --model demo-out/server/models/v1          # http://127.0.0.1:7860/
    mos-studio --model ./dog1-model --state-dir ./server-state
    mos-studio --state-dir ./server-state                 # the federation view only

The studio renders exactly what ``mos-sample`` renders for the same scene (both call
:func:`mos.client.sample.render`); "copy as command" gives that ``mos-sample`` command and
"save scene" its scene file. It serves on localhost only: a page that runs a GPU and reads a
server's registry is not for the open network (reach it from elsewhere through an SSH
tunnel, ``ssh -L 7860:127.0.0.1:7860 HOST``).

The HTTP layer is the standard library's; the page is one HTML file with its script
(``studio_web/``), no other dependency.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import ipaddress
import json
import logging
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from ..common.adapters import AdapterError
from ..common.base import BaseModelError
from ..common.cli import UsageError, resolve_device, run_command
from ..common.concepts import ConceptError
from ..common.package import PackageError
from ..common.pipeline import MixOfShowPipeline
from ..common.regions import RegionError
from ..common.settings import validation_message
from .sample import Scene, load_model, read_scene, render, scene_command, scene_pnginfo

log = logging.getLogger("mos.studio")
WEB = Path(__file__).with_name("studio_web")
MAX_UPLOAD = 16 * 1024 * 1024
THUMB_STEPS = 20
MAX_JOBS = 64  # renders kept for the page to fetch
# what a user can get wrong: shown in the page as one line, never a traceback
USER_ERRORS = (
    UsageError,
    ConceptError,
    RegionError,
    AdapterError,
    BaseModelError,
    PackageError,
    ValueError,  # pydantic's ValidationError, json errors
    OSError,
)


class StudioError(ValueError):
    """A request the studio cannot serve, with the message the page shows."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def user_message(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        return validation_message(err, name=str)
    return str(err)


@dataclass
class Job:
    """One render: its progress, then its PNG (with the scene in it) or its error."""

    id: str
    scene: Scene
    grid: int
    done: int = 0
    total: int = 0
    state: str = "running"  # running, done, failed
    error: str = ""
    png: bytes = b""
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    thread: threading.Thread | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "error": self.error,
            "seconds": round(self.seconds, 2),
        }
        if self.state == "done":
            out["image"] = f"/api/image/{self.id}.png"
        return out


class Studio:
    """The model the page works on and what it rendered; every model use holds ``lock``
    (regions install attention processors, so two renders must not overlap)."""

    def __init__(
        self,
        model: Path | None = None,
        *,
        base_model: str | None = None,
        base_config: str | None = None,
        device: str = "auto",
        state_dir: Path | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self.base_model = base_model
        self.base_config = base_config
        self.device = resolve_device(device)
        self.state_dir = state_dir
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="mos-studio-"))
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.thumbs: dict[str, bytes] = {}
        self.model: Path | None = None
        self.pipe: MixOfShowPipeline | None = None
        self.source = ""
        if model is not None:
            self.open(model)

    # --- the model ------------------------------------------------------------------------
    def open(self, spec: Path, base_model: str | None = None) -> dict[str, Any]:
        """Load a fused model (folder, compact file, a client's model folder)."""
        spec = spec.expanduser().resolve()
        if not spec.exists():
            raise StudioError(f"{spec}: no such file or folder")
        base_model = base_model or self.base_model
        with self.lock:
            base, concepts = load_model(spec, base_model, self.base_config)
            base.to(self.device)
            self.pipe = MixOfShowPipeline.from_base(base, concepts)
            self.model, self.source, self.thumbs = spec, base.source, {}
            if base_model:
                self.base_model = base_model
        log.info("opened %s (%d concepts on %s)", spec, len(concepts), base.source)
        return self.model_info()

    def _pipe(self) -> MixOfShowPipeline:
        if self.pipe is None:
            raise StudioError("no model is open: open a fused model first")
        return self.pipe

    def model_info(self) -> dict[str, Any]:
        if self.pipe is None:
            return {"model": None, "concepts": [], "federation": self.state_dir is not None}
        size = self.pipe.default_resolution
        concepts = []
        for c in self.pipe.concepts:
            concepts.append(
                {
                    "token": c.token,
                    "name": c.name,
                    "class_word": c.class_word,
                    "method": c.method,
                    "trigger": c.trigger,
                    "thumbnail": f"/api/thumbnail/{c.name}.png",
                }
            )
        return {
            "model": str(self.model),
            "base": self.source,
            "base_model": self.base_model,
            "resolution": size,
            "concepts": concepts,
            "federation": self.state_dir is not None,
            "defaults": Scene(prompt="-").model_dump(exclude={"prompt"}),
        }

    def thumbnail(self, name: str) -> bytes:
        """A small sample of ``a photo of a <name>`` (seed 0), made once per model."""
        pipe = self._pipe()
        if name not in pipe.concepts:
            raise StudioError(f"no concept {name!r} in this model", HTTPStatus.NOT_FOUND)
        if name not in self.thumbs:
            token = next(c.token for c in pipe.concepts if c.name == name)
            scene = Scene(prompt=f"a photo of a {token}", steps=THUMB_STEPS)
            with self.lock:
                image = render(pipe, scene)
            self.thumbs[name] = _png(image)
        return self.thumbs[name]

    # --- scenes ---------------------------------------------------------------------------
    def scene(self, data: Any) -> Scene:
        """A scene from the page, checked as ``mos-sample`` checks it (boxes, tokens)."""
        if not isinstance(data, dict):
            raise StudioError("a scene is a JSON object")
        scene = Scene.model_validate(data)
        pipe = self._pipe()
        width = scene.width or pipe.default_resolution
        height = scene.height or pipe.default_resolution
        factor = pipe.vae_scale_factor
        if width % factor or height % factor:
            raise StudioError(f"width and height must be multiples of {factor} on this base")
        regions = scene.to_regions(width, height)
        for prompt in (scene.prompt, *(r.prompt for r in regions)):
            pipe.concepts.expand(prompt, 1)
        for a in scene.adapters:
            if not Path(a.image).is_file():
                raise StudioError(f"adapter {a.name}: condition image {a.image} is not a file")
        return scene

    def start_render(self, data: Any) -> Job:
        scene = self.scene(data.get("scene") if isinstance(data, dict) else None)
        grid = _grid(data)
        job = Job(uuid.uuid4().hex[:12], scene, grid, total=grid * scene.steps)
        for old in [j for j in self.jobs.values() if j.state != "running"][: -MAX_JOBS + 1]:
            del self.jobs[old.id]  # keep the latest renders only
        self.jobs[job.id] = job
        job.thread = threading.Thread(target=self._render, args=(job,), daemon=True)
        job.thread.start()
        return job

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the renders in progress (before shutting down)."""
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(timeout)

    def _render(self, job: Job) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            with self.lock:
                image = render(self._pipe(), job.scene, grid=job.grid, callback=progress)
            job.png = _png(image, job.scene)
            job.state = "done"
            log.info("rendered %s (%d regions)", job.id, len(job.scene.regions))
        except USER_ERRORS as err:
            job.state, job.error = "failed", user_message(err)
        except Exception as err:  # shown in the page; the traceback goes to the log
            log.exception("render %s failed", job.id)
            job.state, job.error = "failed", f"the render failed: {type(err).__name__}: {err}"
        finally:
            job.seconds = time.monotonic() - job.started

    def command(self, data: Any) -> dict[str, str]:
        """The ``mos-sample`` command (and the scene file it may need) for a scene."""
        scene = self.scene(data.get("scene") if isinstance(data, dict) else None)
        assert self.model is not None
        out = str(data.get("out") or "scene.png")
        text = scene_command(
            self.model,
            scene,
            out,
            grid=_grid(data),
            base_model=self.base_model,
            scene_file="scene.json",
        )
        return {"command": text, "scene": scene.model_dump_json(indent=2)}

    def read_scene_file(self, body: bytes) -> dict[str, Any]:
        """A scene from an uploaded ``mos-sample`` PNG or scene JSON."""
        suffix = ".png" if body[:8] == b"\x89PNG\r\n\x1a\n" else ".json"
        path = self.work_dir / f"upload-{uuid.uuid4().hex[:8]}{suffix}"
        path.write_bytes(body)
        try:
            return read_scene(path).model_dump()
        finally:
            path.unlink(missing_ok=True)

    def upload_condition(self, body: bytes) -> dict[str, str]:
        """Keep an uploaded condition image (keypose, sketch) for adapters; returns its path."""
        try:
            with Image.open(io.BytesIO(body)) as img:
                img.verify()
        except (UnidentifiedImageError, OSError) as err:
            raise StudioError(f"the condition image is not an image ({err})") from err
        name = hashlib.sha256(body).hexdigest()[:16] + ".png"
        path = self.work_dir / "conditions" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(io.BytesIO(body)) as img:
            img.convert("RGB").save(path)
        return {"path": str(path)}

    # --- the federation -------------------------------------------------------------------
    def federation(self) -> dict[str, Any]:
        if self.state_dir is None:
            raise StudioError(
                "no federation: start mos-studio with --state-dir", HTTPStatus.NOT_FOUND
            )
        return federation_state(self.state_dir)

    def report_file(self, version: int, name: str) -> Path:
        if self.state_dir is None or name not in REPORT_FILES:
            raise StudioError("no such file", HTTPStatus.NOT_FOUND)
        path = self.state_dir / "models" / f"v{version}" / name
        if not path.is_file():
            raise StudioError(f"v{version} has no {name}", HTTPStatus.NOT_FOUND)
        return path


REPORT_FILES = ("fusion_report.png", "fusion_report.md", "fusion_report.json")


def _grid(data: Any) -> int:
    grid = data.get("grid", 1) if isinstance(data, dict) else 1
    if not isinstance(grid, int) or not 1 <= grid <= 16:
        raise StudioError("grid: a whole number of seeds from 1 to 16")
    return grid


def _png(image: Image.Image, scene: Scene | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=scene_pnginfo(scene) if scene else None)
    return buf.getvalue()


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def federation_state(state_dir: Path) -> dict[str, Any]:
    """What a server's ``--state-dir`` says: its live status, registered concepts and who
    sent them, rounds (with rejected packages and their reasons), model versions and their
    fusion reports. Read-only; files a running server has not written yet are left out."""
    state_dir = Path(state_dir)
    if not (state_dir / "registry.json").is_file():
        raise StudioError(
            f"{state_dir}: not a server state folder (no registry.json; it is the "
            "mos-server --state-dir, e.g. demo-out/server)",
            HTTPStatus.NOT_FOUND,
        )
    registry = _read_json(state_dir / "registry.json", {})
    rounds: list[dict[str, Any]] = []
    log_file = state_dir / "rounds.jsonl"
    for line in log_file.read_text().splitlines() if log_file.is_file() else []:
        try:
            rounds.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    models = []
    for mv in registry.get("models", []):
        folder = state_dir / str(mv.get("path", ""))
        report = _read_json(folder / "fusion_report.json", None)
        models.append(
            {
                **mv,
                "report": _report_rows(report) if report else None,
                "objective": (report or {}).get("objective", {}),
                "grid": f"/api/report/{mv['version']}/fusion_report.png"
                if (folder / "fusion_report.png").is_file()
                else None,
            }
        )
    rejected = [
        {"round": r.get("round"), **x}
        for r in rounds
        if r.get("stage") == "train"
        for x in r.get("rejected", [])
    ]
    return _safe_ints(
        {
            "state_dir": str(state_dir),
            "base": {
                "source": registry.get("base_source", ""),
                "fingerprint": registry.get("base_fingerprint", ""),
            },
            "status": _read_json(state_dir / "status.json", None),
            "result": _read_json(state_dir / "result.json", None),
            "concepts": registry.get("concepts", []),
            "models": models,
            "rounds": rounds,
            "rejected": rejected,
        }
    )


def _safe_ints(value: Any) -> Any:
    """Node ids are 64-bit; JavaScript's numbers hold 53 bits: larger ints become strings."""
    if isinstance(value, dict):
        return {k: _safe_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_ints(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)
    return value


def _report_rows(report: dict[str, Any]) -> dict[str, Any]:
    """The fusion report's per-concept table: columns ``strategy: metric``."""
    columns: list[str] = []
    rows = []
    for c in report.get("concepts", []):
        row: dict[str, Any] = {"concept": c.get("concept"), "source": c.get("source", "")}
        for key, value in c.items():
            if isinstance(value, dict):
                for metric, number in value.items():
                    col = f"{key}: {metric}"
                    if col not in columns:
                        columns.append(col)
                    row[col] = number
        rows.append(row)
    return {"columns": columns, "rows": rows, "strategy": report.get("strategy", "")}


# --- HTTP -----------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server: StudioServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve(self._get)

    def do_POST(self) -> None:
        self._serve(self._post)

    def _serve(self, route) -> None:
        studio = self.server.studio
        try:
            route(studio, urlparse(self.path).path)
        except StudioError as err:
            self._json({"error": str(err)}, err.status)
        except USER_ERRORS as err:
            self._json({"error": user_message(err)}, HTTPStatus.BAD_REQUEST)
        except Exception as err:
            log.exception("%s %s failed", self.command, self.path)
            self._json({"error": f"{type(err).__name__}: {err}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _get(self, studio: Studio, path: str) -> None:
        if path in ("/", "/index.html"):
            page = "studio.html" if studio.pipe is not None or studio.state_dir is None else None
            if page is None:
                return self._redirect("/federation")
            return self._file(WEB / page, "text/html; charset=utf-8")
        if path == "/favicon.ico":
            return self._bytes(b"", "image/x-icon", HTTPStatus.NO_CONTENT)
        if path == "/federation":
            return self._file(WEB / "federation.html", "text/html; charset=utf-8")
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            kinds = {".js": "text/javascript", ".css": "text/css"}
            target = WEB / name
            if "/" in name or target.suffix not in kinds or not target.is_file():
                raise StudioError("not found", HTTPStatus.NOT_FOUND)
            return self._file(target, kinds[target.suffix] + "; charset=utf-8")
        if path == "/api/model":
            return self._json(studio.model_info())
        if path.startswith("/api/thumbnail/") and path.endswith(".png"):
            name = unquote(path.removeprefix("/api/thumbnail/").removesuffix(".png"))
            return self._bytes(studio.thumbnail(name), "image/png")
        if path.startswith("/api/job/"):
            job = studio.jobs.get(path.removeprefix("/api/job/"))
            if job is None:
                raise StudioError("no such render", HTTPStatus.NOT_FOUND)
            return self._json(job.as_json())
        if path.startswith("/api/image/") and path.endswith(".png"):
            job = studio.jobs.get(path.removeprefix("/api/image/").removesuffix(".png"))
            if job is None or job.state != "done":
                raise StudioError("no such image", HTTPStatus.NOT_FOUND)
            return self._bytes(job.png, "image/png")
        if path == "/api/federation":
            return self._json(studio.federation())
        if path.startswith("/api/report/"):
            version, _, name = path.removeprefix("/api/report/").partition("/")
            if not version.isdigit():
                raise StudioError("not found", HTTPStatus.NOT_FOUND)
            target = studio.report_file(int(version), name)
            kind = {".png": "image/png", ".md": "text/markdown", ".json": "application/json"}
            return self._file(target, kind[target.suffix])
        raise StudioError(f"no page {path}", HTTPStatus.NOT_FOUND)

    def _post(self, studio: Studio, path: str) -> None:
        body = self._body()
        if path == "/api/open":
            data = _json_body(body)
            spec = str(data.get("model") or "").strip()
            if not spec:
                raise StudioError("give the path of a fused model")
            return self._json(studio.open(Path(spec), data.get("base_model") or None))
        if path == "/api/render":
            return self._json(studio.start_render(_json_body(body)).as_json())
        if path == "/api/command":
            return self._json(studio.command(_json_body(body)))
        if path == "/api/scene":
            return self._json({"scene": studio.scene(_json_body(body).get("scene")).model_dump()})
        if path == "/api/read-scene":
            return self._json({"scene": studio.read_scene_file(body)})
        if path == "/api/condition":
            return self._json(studio.upload_condition(body))
        raise StudioError(f"no action {path}", HTTPStatus.NOT_FOUND)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_UPLOAD:
            raise StudioError(f"the upload is over {MAX_UPLOAD // 2**20} MB")
        return self.rfile.read(length) if length else b""

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._bytes(json.dumps(data).encode(), "application/json", status)

    def _file(self, path: Path, kind: str) -> None:
        self._bytes(path.read_bytes(), kind)

    def _redirect(self, where: str) -> None:
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _bytes(self, data: bytes, kind: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError as err:
        raise StudioError(f"the request is not JSON ({err})") from err
    if not isinstance(data, dict):
        raise StudioError("the request is not a JSON object")
    return data


class StudioServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], studio: Studio) -> None:
        super().__init__(address, Handler)
        self.studio = studio


def check_host(host: str) -> None:
    """Only loopback addresses: the studio has no TLS or authentication of its own."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(
            f"--host {host}: the studio serves on this machine only (127.0.0.1); it has no "
            "TLS or authentication, and it can run the GPU and read the server's registry. "
            "From another machine use an SSH tunnel: ssh -L 7860:127.0.0.1:7860 THIS_HOST"
        )


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860) -> StudioServer:
    """A started server (in a thread); ``server.shutdown()`` ends it."""
    check_host(host)
    server = StudioServer((host, port), studio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mos-studio", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        type=Path,
        help="a fused model: folder, compact file, or a client's model folder (its latest)",
    )
    p.add_argument("--base-model", help="the base of a compact model (default: its own)")
    p.add_argument("--base-config", help="configs of a single-file checkpoint (offline)")
    p.add_argument("--state-dir", type=Path, help="a server's --state-dir: the federation view")
    p.add_argument("--host", default="127.0.0.1", help="loopback only (127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="(7860)")
    p.add_argument("--device", default="auto")
    return p


def run(args: argparse.Namespace) -> None:
    check_host(args.host)
    if args.model is None and args.state_dir is None:
        raise UsageError("give --model (a fused model to compose with) and/or --state-dir")
    state_dir = args.state_dir.expanduser().resolve() if args.state_dir else None
    if state_dir is not None:
        federation_state(state_dir)  # a wrong folder fails now, with the reason
    try:
        studio = Studio(
            args.model,
            base_model=args.base_model,
            base_config=args.base_config,
            device=args.device,
            state_dir=state_dir,
        )
    except StudioError as err:
        raise UsageError(f"--model: {err}") from err
    try:
        server = StudioServer((args.host, args.port), studio)
    except OSError as err:
        raise UsageError(f"port {args.port}: {err.strerror} (pick another with --port)") from err
    url = f"http://{args.host}:{server.server_address[1]}/"
    print(f"mos-studio: {url}" + (f"  (federation: {url}federation)" if state_dir else ""))
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        studio.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    return run_command("mos-studio", build_parser(), run, USER_ERRORS, argv)


if __name__ == "__main__":
    sys.exit(main())
