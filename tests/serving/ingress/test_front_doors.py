"""References, keyframes and the convention's extra fields through the HTTP front doors (`/v1/videos` in JSON and
multipart, the Seedance-compatible tasks API), on the real ingress service: a real SQLite job store, local storage,
the tiny checkpoints' tokenizers and the families' own admission. No Ray: nothing here runs a job."""

from __future__ import annotations

import base64
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from cluster.auth_config import ReferencesConfig
from cluster.config import JobsConfig, RewriterConfig, StorageConfig
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.ingress.http import OPENAI_FIELD_NAMES, error_response, parse_create_request
from serving.ingress.seedance import SeedanceTasks, task_answer, task_size
from serving.ingress.service import VideoService
from serving.protocol import JobStatus
from serving.tenancy.auth import Tenant
from serving.views import model_object, video_object
from tests.conftest import png_with_claimed_size
from tests.serving.families.minimax_h3.conftest import encode_image, encode_mp4, encode_wav

TENANT = Tenant(name="default")
IMAGE = encode_image(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8))
VIDEO = encode_mp4(2.0, 24, 64, 32, audio_rate=None)
AUDIO = encode_wav(1.0)


def data_url(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


IMAGE_URL, VIDEO_URL, AUDIO_URL = data_url(IMAGE, "image/png"), data_url(VIDEO, "video/mp4"), data_url(AUDIO, "audio/wav")


class MediaServer:
    """A plain HTTP server on loopback holding one PNG, for the URL allow-list."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                body = IMAGE if self.path == "/media/photo.png" else b"missing"
                self.send_response(200 if self.path == "/media/photo.png" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.prefix = f"http://127.0.0.1:{self.server.server_port}/media/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def media_server():
    server = MediaServer()
    yield server
    server.server.shutdown()


def _app(service: VideoService) -> TestClient:
    """The ingress's routes for creating and reading, over ``service`` (the deployment's own route bodies)."""
    app = FastAPI()
    tasks = SeedanceTasks(service)

    @app.exception_handler(Exception)
    async def _error(request: Request, error: Exception):
        return error_response(error)

    @app.post("/v1/videos")
    async def create(request: Request):
        fields = await parse_create_request(request, 60_000_000)
        return video_object(await service.create(TENANT, field_names=OPENAI_FIELD_NAMES, **fields))

    @app.post("/api/v3/contents/generations/tasks")
    async def create_task(request: Request):
        return await task_answer(lambda: tasks.create(TENANT, request))

    @app.get("/api/v3/contents/generations/tasks")
    async def list_tasks(request: Request):
        return await task_answer(lambda: tasks.list(TENANT, request))

    @app.get("/api/v3/contents/generations/tasks/{task_id}")
    async def get_task(request: Request, task_id: str):
        return await task_answer(lambda: tasks.get(TENANT, request, task_id))

    @app.delete("/api/v3/contents/generations/tasks/{task_id}")
    async def delete_task(request: Request, task_id: str):
        return await task_answer(lambda: tasks.delete(TENANT, task_id))

    return TestClient(app, raise_server_exceptions=False)


def _service(model, tmp_path, references: ReferencesConfig | None = None) -> VideoService:
    jobs = JobsConfig(sqlite_path=str(tmp_path / "jobs.sqlite3"), max_queue_wait_s=600)
    storage = StorageConfig(results_url=str(tmp_path / "results"), artifacts_url=str(tmp_path / "artifacts"))
    return VideoService(model, jobs, RewriterConfig(enabled=False), storage=storage, references=references)


@pytest.fixture(scope="module")
def h3(tmp_path_factory, media_server):
    from serving.families.minimax_h3.tiny import build_tiny_minimax_h3  # noqa: PLC0415 - keeps collection of `make check` fast

    checkpoint = build_tiny_minimax_h3(tmp_path_factory.mktemp("h3"))
    model = MiniMaxH3ModelConfig.tiny(path=str(checkpoint), device="cpu")
    references = ReferencesConfig(allowed_url_prefixes=[media_server.prefix], refuse_private_addresses=False)
    service = _service(model, tmp_path_factory.mktemp("h3-service"), references)
    yield service, _app(service)


@pytest.fixture(scope="module")
def ltx2(tiny_config, tmp_path_factory):
    service = _service(tiny_config, tmp_path_factory.mktemp("ltx2-service"))
    yield service, _app(service)


H3 = {"prompt": "a cat turns its head", "size": "64x32", "seconds": 5}


def _inputs(service, job_id: str) -> list[tuple[str, str, bytes]]:
    record = service.store.get(job_id)
    return [(spec["name"], spec["role"], service.storage.load_input(job_id, spec["name"])) for spec in record.inputs]


# ---------------------------------------------------------------------------------------------- /v1/videos


def test_json_references_are_stored_in_the_order_the_model_reads_them(h3):
    service, client = h3
    references = [{"type": "image", "url": IMAGE_URL}, {"type": "video", "url": VIDEO_URL},
                  {"type": "audio", "url": AUDIO_URL}]
    answer = client.post("/v1/videos", json={**H3, "references": references})
    assert answer.status_code == 200, answer.text
    assert _inputs(service, answer.json()["id"]) == [("ref-0", "reference_image", IMAGE),
                                                    ("ref-1", "reference_video", VIDEO),
                                                    ("ref-2", "reference_audio", AUDIO)]


def test_first_and_last_frame_in_every_json_form_and_from_an_allowed_url(h3, media_server):
    service, client = h3
    for first in (IMAGE_URL, {"image_url": IMAGE_URL}, {"image_url": {"url": IMAGE_URL}},
                  media_server.prefix + "photo.png"):
        answer = client.post("/v1/videos", json={**H3, "input_reference": first, "last_frame": IMAGE_URL})
        assert answer.status_code == 200, (first if isinstance(first, str) and len(first) < 80 else "", answer.text)
        assert _inputs(service, answer.json()["id"]) == [("first_frame", "first_frame", IMAGE),
                                                        ("last_frame", "last_frame", IMAGE)]


def test_multipart_reference_files(h3):
    service, client = h3
    files = [("reference_images", ("a.png", IMAGE, "image/png")), ("reference_audios", ("a.wav", AUDIO, "audio/wav")),
             ("reference_images", ("b.png", IMAGE, "image/png"))]
    answer = client.post("/v1/videos", data={k: str(v) for k, v in H3.items()}, files=files)
    assert answer.status_code == 200, answer.text
    assert [(name, role) for name, role, _ in _inputs(service, answer.json()["id"])] == [
        ("ref-0", "reference_image"), ("ref-1", "reference_audio"), ("ref-2", "reference_image")]


def _refs(kind: str, url: str, count: int) -> list[dict]:
    return [{"type": kind, "url": url} for _ in range(count)]


LONG_VIDEO = data_url(encode_mp4(20.0, 4, 64, 32, audio_rate=None), "video/mp4")
BAD_INPUTS = [
    ("ten images", {"references": _refs("image", IMAGE_URL, 10)}, "references", "at most 9"),
    ("four videos", {"references": _refs("video", VIDEO_URL, 4)}, "references", "at most 3"),
    ("four audio clips", {"references": _refs("image", IMAGE_URL, 1) + _refs("audio", AUDIO_URL, 4)}, "references",
     "at most 3"),
    ("audio alone", {"references": _refs("audio", AUDIO_URL, 1)}, "references", "image or video"),
    ("a first frame with references", {"input_reference": IMAGE_URL, "references": _refs("image", IMAGE_URL, 1)},
     "input_reference", "cannot be combined"),
    ("a 20 s video", {"references": [{"type": "video", "url": LONG_VIDEO}]}, "references[0]", "15 s"),
    ("a 40 MP image", {"references": [{"type": "image", "url": data_url(png_with_claimed_size(8000, 5000),
                                                                         "image/png")}]}, "references[0]", "pixels"),
    ("a data URL that is not base64", {"input_reference": "data:image/png,notbase64"}, "input_reference", "base64"),
    ("a text file as a video", {"references": [{"type": "video", "url": data_url(b"hello, world\n" * 50,
                                                                                   "video/mp4")}]},
     "references[0]", "not a video"),
    ("an unknown reference type", {"references": [{"type": "model", "url": IMAGE_URL}]}, "references[0].type",
     "image, video, audio"),
    ("a URL from a host not allowed", {"input_reference": "https://example.org/cat.png"}, "input_reference",
     "not under an allowed prefix"),
    ("too many steps", {"num_inference_steps": 500}, "num_inference_steps", "from 2 to 100"),
    ("a guidance scale this deployment does not run", {"guidance_scale": 7.5}, "guidance_scale", "guidance_scale 1"),
    ("a clip shorter than the model makes", {"seconds": 2}, "seconds", "too short"),
    ("a canvas of the wrong shape", {"size": "256x32"}, "size", "1:4 and 4:1"),
    ("num_frames against seconds", {"num_frames": 200, "seconds": 5}, "num_frames", "send one of the two"),
]


@pytest.mark.parametrize("body, field, words", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_a_400_naming_the_field_and_the_limit(h3, body, field, words):
    service, client = h3
    before = len(service.store.list(after=None, limit=100, order="desc")[0])
    answer = client.post("/v1/videos", json={**H3, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and words in error["message"], error
    assert len(service.store.list(after=None, limit=100, order="desc")[0]) == before  # no job


def test_private_addresses_are_refused_even_under_an_allowed_prefix(h3, tmp_path, media_server):
    service, _ = h3
    strict = _app(_service(service.model, tmp_path, ReferencesConfig(allowed_url_prefixes=[media_server.prefix])))
    answer = strict.post("/v1/videos", json={**H3, "input_reference": media_server.prefix + "photo.png"})
    assert answer.status_code == 400 and "non-public address" in answer.json()["error"]["message"]
    closed = _app(_service(service.model, tmp_path / "closed"))
    answer = closed.post("/v1/videos", json={**H3, "input_reference": media_server.prefix + "photo.png"})
    assert answer.status_code == 400 and "fetches no URLs" in answer.json()["error"]["message"]


def test_steps_and_frames_are_taken_within_bounds(h3):
    service, client = h3
    answer = client.post("/v1/videos", json={**H3, "num_inference_steps": 6, "num_frames": 124, "guidance_scale": 1.0,
                                             "seconds": None})
    assert answer.status_code == 200, answer.text
    record = service.store.get(answer.json()["id"])
    assert record.num_inference_steps == record.total_steps == 6
    assert round(record.seconds * record.fps) == 124


def test_ltx2_takes_one_first_frame_and_names_what_it_does_not_take(ltx2):
    service, client = ltx2
    photo = data_url(encode_image(np.zeros((64, 64, 3), np.uint8)), "image/png")
    answer = client.post("/v1/videos", json={"prompt": "a fox", "size": "64x64", "seconds": 1,
                                             "input_reference": {"image_url": photo}, "num_inference_steps": 3})
    assert answer.status_code == 200, answer.text
    record = service.store.get(answer.json()["id"])
    assert [spec["name"] for spec in record.inputs] == ["photo"] and record.num_inference_steps == 3
    for body, field in (({"last_frame": photo}, "last_frame"),
                        ({"references": [{"type": "image", "url": photo}]}, "references[0]")):
        refused = client.post("/v1/videos", json={"prompt": "a fox", **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text


def test_models_describe_each_family(h3, ltx2):
    h3_model, ltx2_model = model_object(h3[0].model), model_object(ltx2[0].model)
    assert h3_model["object"] == "model" and h3_model["family"] == "minimax_h3"
    assert h3_model["workflows"] == ["t2va", "fl2va", "ref2va"]
    assert h3_model["limits"]["references"]["max_images"] == 9 and h3_model["limits"]["frames"] == "17n + 5"
    assert ltx2_model["family"] == "ltx2" and ltx2_model["limits"]["references"] is None


# ---------------------------------------------------------------------------------------------- Seedance's tasks API


def test_seedance_task_lifecycle_with_its_status_names(h3):
    service, client = h3
    body = {"model": service.model.name, "content": [
        {"type": "text", "text": "a cat turns its head --duration 5 --seed 11"},
        {"type": "image_url", "image_url": {"url": IMAGE_URL}, "role": "reference_image"},
        {"type": "audio_url", "audio_url": {"url": AUDIO_URL}, "role": "reference_audio"},
    ], "resolution": "64x32", "execution_expires_after": 3600, "return_last_frame": True}
    created = client.post("/api/v3/contents/generations/tasks", json=body)
    assert created.status_code == 200, created.text
    task_id = created.json()["id"]
    task = client.get(f"/api/v3/contents/generations/tasks/{task_id}").json()
    assert task["status"] == "queued" and task["seed"] == 11 and task["duration"] == 5.0
    assert task["execution_expires_after"] == 600  # the server's own bound is lower
    record = service.store.get(task_id)
    assert record.prompt == "a cat turns its head" and record.return_last_frame
    assert [spec["role"] for spec in record.inputs] == ["reference_image", "reference_audio"]
    listed = client.get("/api/v3/contents/generations/tasks",
                        params={"filter.status": "queued", "page_size": 100}).json()
    assert task_id in [item["id"] for item in listed["items"]] and listed["total"] >= 1
    assert client.delete(f"/api/v3/contents/generations/tasks/{task_id}").status_code == 200
    assert service.store.get(task_id).status == JobStatus.CANCELLED
    assert client.get(f"/api/v3/contents/generations/tasks/{task_id}").json()["status"] == "cancelled"


@pytest.mark.parametrize("content, field", [
    ([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": IMAGE_URL}, "role": "poster"}],
     "content[1].role"),
    ([{"type": "text", "text": "x"}, {"type": "video_url", "video_url": {"url": VIDEO_URL}, "role": "first_frame"}],
     "content[1].role"),
    ([{"type": "text", "text": "x"}, {"type": "document_url"}], "content[1].type"),
    ([], "content"),
])
def test_seedance_refusals_name_the_field_with_its_error_code(h3, content, field):
    _, client = h3
    answer = client.post("/api/v3/contents/generations/tasks", json={"content": content})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == field and answer.json()["error"]["code"] == "InvalidParameter"


def test_seedance_resolution_and_ratio_become_a_size_of_the_models_multiple():
    assert task_size("720p", "16:9", "1344x768", 32) == "1280x704"
    assert task_size("480p", "9:16", "1344x768", 32) == "480x832"
    assert task_size(None, "1:1", "1344x768", 32) == "768x768"
    assert task_size("720p", "adaptive", "1344x768", 32) == "1248x704"


def test_multipart_refuses_unknown_fields_and_h3_takes_24_fps_only(h3):
    _, client = h3
    flattened = client.post("/v1/videos", data={**{k: str(v) for k, v in H3.items()},
                                                "references[][type]": "image"})
    assert flattened.status_code == 400 and flattened.json()["error"]["param"] == "references[][type]"
    slow = client.post("/v1/videos", json={**H3, "fps": 12})
    assert slow.status_code == 400 and slow.json()["error"]["param"] == "fps"
    guided = client.post("/v1/videos", json={**H3, "guidance_scale": 3})
    assert guided.status_code == 400 and "guidance-distilled" in guided.json()["error"]["message"]


def test_urls_are_checked_before_any_fetch_and_a_slow_server_is_cut_off(h3, tmp_path):
    service, client = h3
    many = [{"type": "image", "url": f"https://media.example.com/{i}.png"} for i in range(40)]
    answer = client.post("/v1/videos", json={**H3, "references": many})
    assert answer.status_code == 400 and "at most 14" in answer.json()["error"]["message"]  # no URL was fetched
    backslash = client.post("/v1/videos", json={**H3, "input_reference": "http://127.0.0.1/media/..\\\\x.png"})
    assert backslash.status_code == 400 and backslash.json()["error"]["param"] == "input_reference"


def test_a_trickling_media_server_is_cut_off_at_the_fetch_timeout(h3, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def trickle():
        connection, _ = listener.accept()
        connection.recv(4096)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(40):  # a byte every 0.1 s: each read is quick, the whole fetch is not
            try:
                connection.sendall(b"x")
            except OSError:
                break
            time.sleep(0.1)
        connection.close()

    threading.Thread(target=trickle, daemon=True).start()
    service, _ = h3
    references = ReferencesConfig(allowed_url_prefixes=[f"http://127.0.0.1:{port}/"], refuse_private_addresses=False,
                                  fetch_timeout_s=1.0)
    slow = _app(_service(service.model, tmp_path, references))
    started = time.monotonic()
    answer = slow.post("/v1/videos", json={**H3, "input_reference": f"http://127.0.0.1:{port}/a.png"})
    assert answer.status_code == 400 and "references.fetch_timeout_s" in answer.json()["error"]["message"]
    assert time.monotonic() - started < 3
    listener.close()


def test_inputs_that_once_broke_the_create_path_are_400s(h3, tmp_path):
    """A lone surrogate in the prompt, a video whose header is not UTF-8 or whose codec is unknown, odd page
    numbers and Seedance's own -1 seed."""
    service, client = h3
    surrogate = client.post("/v1/videos", content=b'{"prompt": "\\ud800 cat"}',
                            headers={"content-type": "application/json"})
    assert surrogate.status_code == 400 and surrogate.json()["error"]["param"] == "prompt"
    broken = bytearray(VIDEO)
    at = broken.find(b"mdat") + 16
    broken[at:at + 8] = b"\xff" * 8  # mangled sample data; the header still parses
    mangled_meta = VIDEO.replace(b"Lavf", b"\xff\xfe\xfd\xfc", 1)  # the encoder tag, no longer UTF-8
    for data in (bytes(broken), mangled_meta, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64):
        answer = client.post("/v1/videos", json={**H3, "references": [
            {"type": "image", "url": IMAGE_URL}, {"type": "video", "url": data_url(data, "video/mp4")}]})
        assert answer.status_code in (200, 400), answer.text
    for page in ("\u00b2", "9" * 5000, "-1"):
        listed = client.get("/api/v3/contents/generations/tasks", params={"page_num": page})
        assert listed.status_code == 400 and listed.json()["error"]["param"] == "page_num"
    seeded = client.post("/api/v3/contents/generations/tasks", json={
        "content": [{"type": "text", "text": "a cat --seed -1"}], "resolution": "64x32", "seed": -1})
    assert seeded.status_code == 200, seeded.text
    upper = client.post("/v1/videos", data={k: str(v) for k, v in H3.items()},
                        headers={"content-type": "MULTIPART/FORM-DATA; boundary=x"})
    assert upper.status_code == 400  # read as a form (and refused as one), not as JSON
