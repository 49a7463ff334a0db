"""mos-studio: the scene -> command mapping, the federation state, the HTTP API's messages,
and (in a real headless Chromium) the two pages on the demo's fused model."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from mos.client import sample
from mos.client.sample import Scene, scene_command
from mos.client.studio import Studio, StudioError, federation_state, serve
from mos.common.base import build_tiny
from mos.common.cli import UsageError
from mos.common.processes import free_port
from tests.conftest import random_fused, random_package
from tests.test_hub import publish


@pytest.fixture
def compact(tmp_path) -> Path:
    base = build_tiny()
    fused = random_fused(base, [random_package(base, "dog1", 1), random_package(base, "cat2", 2)])
    return fused.save_compact(tmp_path / "fused.safetensors")


def scene_of(command: str) -> Scene:
    words = shlex.split(command)
    assert words[0] == "mos-sample"
    return sample.scene_from_args(sample.build_parser().parse_args(words[1:]))


@pytest.mark.parametrize(
    "scene",
    [
        Scene(prompt="a <dog1> and a <cat2>"),
        Scene(
            prompt="two pets, 'quoted' $HOME",
            negative_prompt="blurry",
            regions=[
                {"prompt": "a <dog1>", "box": (0, 0.1, 0.5, 1), "negative_prompt": "cat"},
                {"prompt": "a <cat2> in a hat", "box": (0.5, 0.125, 1, 1)},
            ],
            seed=7,
            steps=3,
            guidance=4.5,
            width=64,
            height=32,
            native_views=True,
            view_overlap=0.25,
        ),
        Scene(prompt="x", adapters=[{"model": "toy-sketch", "image": "/a b.png", "weight": 0.5}]),
    ],
)
def test_the_command_gives_back_the_same_scene(scene):
    cmd = scene_command(Path("/m o/fused"), scene, "out.png", grid=2)
    assert shlex.split(cmd)[-4:] == ["--grid", "2", "--out", "out.png"]
    back = scene_of(cmd).model_dump()
    for a in back["adapters"]:  # mos-sample makes a local path absolute
        a["image"] = "/a b.png"
    assert back == scene.model_dump()


def test_a_scene_the_options_cannot_spell_is_given_as_a_scene_file():
    scene = Scene(
        prompt="a <dog1>",
        regions=[{"prompt": "a <dog1>", "box": (0, 0, 1, 1), "adapter_weights": {"pose": 0}}],
        adapters=[{"name": "pose", "model": "toy-sketch", "image": "p.png"}],
    )
    cmd = scene_command(Path("m"), scene, "o.png", scene_file="scene.json")
    assert "--scene scene.json" in cmd and "--region" not in cmd
    with pytest.raises(UsageError, match="scene file"):
        scene_command(Path("m"), scene, "o.png")
    at = Scene(prompt="mail me @ home")
    assert "--scene" in scene_command(Path("m"), at, "o.png", scene_file="s.json")


def test_the_federation_state_lists_concepts_versions_reports_and_rejections(tmp_path):
    state = tmp_path / "state"
    publish(state, ["dog1", "cat2"])
    big = 12559656612139062776  # a real node id: more than JavaScript's 53 bits
    rounds = [
        {"stage": "train", "round": 1, "accepted": ["dog1"], "rejected": [
            {"node": big, "reason": "package for another base"}]},
        {"stage": "evaluate", "round": 1, "clients": [{"node": big, "loss_ratio": 0.9}]},
    ]  # fmt: skip
    text = "\n".join(json.dumps(r) for r in rounds) + "\n{half a line"
    (state / "rounds.jsonl").write_text(text)
    (state / "status.json").write_text(json.dumps({"stage": "waiting", "nodes": [big, 3]}))
    got = federation_state(state)
    assert [c["token"] for c in got["concepts"]] == ["<dog1>", "<cat2>"]
    assert got["concepts"][0]["origin"] == "node-dog1"
    (model,) = got["models"]
    assert model["version"] == 1 and model["report"]["columns"] == [
        "weight-fusion: text_drift",
        "weight-fusion: unet_drift",
    ]
    assert [r["concept"] for r in model["report"]["rows"]] == ["<dog1>", "<cat2>"]
    assert got["rejected"] == [{"round": 1, "node": str(big), "reason": "package for another base"}]
    assert got["status"]["nodes"] == [str(big), 3]
    assert len(got["rounds"]) == 2  # the half-written line is skipped
    with pytest.raises(StudioError, match="not a server state folder"):
        federation_state(tmp_path)


def test_the_server_writes_its_stage_for_the_federation_view(tmp_path):
    reg = publish(tmp_path / "state", ["dog1"])
    reg.write_status("waiting", nodes=[1], min_clients=2, round=1)
    status = json.loads((tmp_path / "state/status.json").read_text())
    assert status["stage"] == "waiting" and status["nodes"] == [1] and status["time"] > 0


def _post(url: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data)) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def api(compact, tmp_path):
    state = tmp_path / "state"
    publish(state, ["dog1", "cat2"])
    studio = Studio(compact, device="cpu", state_dir=state)
    server = serve(studio, port=free_port())
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    studio.wait()


@pytest.mark.parametrize(
    ("scene", "message"),
    [
        ({"prompt": "a <owl3>"}, "unknown concept token <owl3>"),
        ({"prompt": "a <dog1>", "regions": [{"prompt": "a <dog1>", "box": [0, 0, 40, 32]}]},
         "outside the 32x32 image"),
        ({"prompt": "a <dog1>", "regions": [{"prompt": "<cat9>", "box": [0, 0, 1, 1]}]},
         "unknown concept token <cat9>"),
        ({"prompt": "a <dog1>", "regions": [{"prompt": "a", "box": [0.5, 0, 0.5, 1]}]},
         "zero area"),
        ({"prompt": "   "}, "prompt: Value error, the prompt is empty"),
        ({"prompt": "a <dog1>", "steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"prompt": "a <dog1>", "width": 33}, "multiples of"),
        ({"prompt": "a", "adapters": [{"model": "toy-sketch", "image": "/no/such.png"}]},
         "is not a file"),
    ],
)  # fmt: skip
def test_bad_scenes_get_the_clis_messages_not_tracebacks(api, scene, message):
    for action in ("render", "command", "scene"):
        status, data = _post(f"{api}/api/{action}", {"scene": scene})
        assert status == 400 and message in data["error"], (action, data)
        assert "Traceback" not in data["error"]


def test_the_api_refuses_a_model_for_another_base_and_keeps_the_open_one(api, compact):
    status, data = _post(f"{api}/api/open", {"model": str(compact), "base_model": "tiny:3"})
    assert status == 400 and "made for base" in data["error"]
    status, data = _post(f"{api}/api/open", {"model": "/no/such/model"})
    assert status == 400 and "no such file" in data["error"]
    with urllib.request.urlopen(f"{api}/api/model") as resp:
        info = json.loads(resp.read())
    assert info["model"] == str(compact) and [c["token"] for c in info["concepts"]] == [
        "<dog1>",
        "<cat2>",
    ]
    status, data = _post(f"{api}/api/read-scene", b"not a scene")
    assert status == 400 and "--scene" in data["error"]
    status, data = _post(f"{api}/api/condition", b"not an image")
    assert status == 400 and "not an image" in data["error"]
    buf = io.BytesIO()
    Image.new("L", (16, 8), 255).save(buf, format="PNG")
    status, data = _post(f"{api}/api/condition", buf.getvalue())
    assert status == 200
    with Image.open(data["path"]) as kept:
        assert kept.size == (16, 8) and kept.mode == "RGB"
    status, data = _post(f"{api}/api/render", {"scene": {"prompt": "a <dog1>"}, "grid": 99})
    assert status == 400 and "grid" in data["error"]


def test_the_studio_is_refused_on_a_network_address(compact, capsys):
    from mos.client.studio import main

    assert main(["--model", str(compact), "--host", "0.0.0.0"]) == 2
    assert "SSH tunnel" in capsys.readouterr().err
    assert main([]) == 2
    assert "--model" in capsys.readouterr().err


# --- in a real browser ----------------------------------------------------------------------
def _chromium() -> str | None:
    return (
        os.environ.get("MOS_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


@pytest.fixture
def browser():
    """Headless Chromium (Debian's package) through Playwright. Where none is installed the
    tests skip, unless MOS_REQUIRE_BROWSER=1 (as in CI), where that is a failure."""
    required = os.environ.get("MOS_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    path = _chromium()
    if path is None:
        if required:
            pytest.fail("MOS_REQUIRE_BROWSER=1 but no chromium (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def demo_studio(demo_run):
    studio = Studio(
        demo_run.out / "server/models/v1", device="cpu", state_dir=demo_run.out / "server"
    )
    server = serve(studio, port=free_port())
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    studio.wait()


def _drag(page, box, x0, y0, x1, y1) -> None:
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=6)
    page.mouse.up()


@pytest.mark.slow
def test_two_boxes_drawn_in_the_browser_render_what_mos_sample_renders(
    browser, demo_studio, demo_run, tmp_path, monkeypatch
):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(demo_studio)
    page.wait_for_selector("body[data-ready='1']")
    tokens = page.locator(".concept").evaluate_all("els => els.map(e => e.dataset.token)")
    assert len(tokens) == 3
    assert page.locator(".concept img").count() == 3
    assert "fractions of the image" in page.inner_text("#box-convention")
    page.fill("#width", "64")
    page.dispatch_event("#width", "change")
    page.fill("#steps", "4")
    canvas = page.locator("#canvas").bounding_box()
    _drag(page, canvas, 0.02, 0.05, 0.48, 0.95)
    _drag(page, canvas, 0.52, 0.05, 0.98, 0.95)
    assert page.locator(".box-prompt").count() == 2
    page.fill(".box-prompt >> nth=1", "")
    page.click(".box >> nth=1 >> .chip >> nth=2")  # the third concept's token, from its chip
    assert page.input_value(".box-prompt >> nth=1") == tokens[2]
    page.click("#render")
    page.wait_for_function("document.getElementById('result').src.includes('/api/image/')")
    assert page.inner_text("#error") == ""
    command = page.input_value("#command")
    job = page.get_attribute("#result", "data-job")
    with urllib.request.urlopen(f"{demo_studio}/api/image/{job}.png") as resp:
        studio_png = resp.read()
    page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
    # the same scene through mos-sample's own command line
    words = shlex.split(command)
    assert words[0] == "mos-sample" and words.count("--region") == 2
    monkeypatch.chdir(tmp_path)
    assert sample.main(words[1:]) == 0
    with Image.open(tmp_path / "scene.png") as ours, Image.open(io.BytesIO(studio_png)) as theirs:
        assert ours.size == (64, 32)
        assert ours.tobytes() == theirs.tobytes()
        assert json.loads(ours.text[sample.SCENE_KEY]) == json.loads(theirs.text[sample.SCENE_KEY])
    # a bad token is a message in the page
    page.fill("#prompt", "a <nobody>")
    page.click("#render")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "unknown concept token <nobody>" in page.inner_text("#error")
    # a scene PNG opened in the page restores its boxes and prompts
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.set_input_files("#open-scene", str(tmp_path / "scene.png"))
    page.wait_for_function("document.querySelectorAll('.box-prompt').length == 2")
    assert page.input_value(".box-prompt >> nth=1") == tokens[2]
    assert page.input_value("#width") == "64"
    assert errors == []


@pytest.mark.slow
def test_the_federation_view_shows_the_demo_runs_concepts_version_and_report(
    browser, demo_studio, demo_run, tmp_path
):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{demo_studio}/federation")
    page.wait_for_selector("body[data-ready='1']")
    registry = json.loads((demo_run.out / "server/registry.json").read_text())
    tokens = [c["token"] for c in registry["concepts"]]
    assert len(tokens) == 3
    concepts = page.inner_text(".concepts-table")
    assert all(t in concepts for t in tokens)
    assert page.inner_text("#stage") == "done"
    model = page.locator(".model[data-version='1']")
    assert "v1: gradient-fusion, 3 concepts" in model.inner_text()
    report = page.inner_text(".report-table")
    assert all(t in report for t in tokens) and "drift" in report
    grid = page.locator(".model[data-version='1'] img.grid-img")
    assert grid.evaluate("img => img.complete && img.naturalWidth > 0")
    assert page.inner_text("#rejected").strip() == "none"
    page.screenshot(path=str(tmp_path / "federation.png"), full_page=True)
