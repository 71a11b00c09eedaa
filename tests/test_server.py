"""The HTTP server, through a real HTTP client against a real uvicorn server (a thread, or `emu3 serve`)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from emu3.generate import Engine, Request, Sampling, image_template
from emu3.pipeline import Emu3
from tests.conftest import scene, write_video_file

uvicorn = pytest.importorskip("uvicorn")
from emu3.server import ServeConfig, create_app  # noqa: E402
from tests.harness import ServerProcess, free_port  # noqa: E402


class Running:
    def __init__(self, app, port):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def emu(model_folder):
    return Emu3.from_pretrained(model_folder)


@pytest.fixture(scope="module")
def server(emu):
    r = Running(create_app(emu, ServeConfig(model_name="tiny", max_rows=6, max_queue=8, max_body_bytes=2**20,
                                            max_image_pixels=512 * 512)), free_port())
    yield r
    r.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def huge_png() -> bytes:
    """A PNG whose header declares 100000 x 100000 pixels (and holds almost nothing)."""
    raw = bytearray(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    return bytes(raw)


def chat_body(image: bytes, question: str = "what is this?", **kw) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                      {"type": "text", "text": question}]}], **kw}


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_images_match_the_library_and_seeds_are_reproducible(client, emu):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 10})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [10, 11]
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in data]
    ref = emu.generate_images(["a red circle"], n=2, seed=10)
    for img, g in zip(images, ref):
        assert img.shape == (32, 32, 3) and np.array_equal(img, g.pixels)
    wide = client.post("/v1/images/generations", json={"prompt": "x", "size": "48x24", "seed": 1}).json()["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(wide["b64_json"]))).size == (48, 24)


def test_a_jacobi_server_matches_the_library_s_jacobi_decoding(model_folder):
    """`emu3 serve --decoding jacobi`: the batcher runs speculative Jacobi passes, and an image is the one the
    library's jacobi decoding draws for the same seed."""
    jacobi = Emu3.from_pretrained(model_folder)
    jacobi.defaults.decoding, jacobi.defaults.jacobi_window = "jacobi", 6
    want = jacobi.generate_images(["a red circle"], n=2, seed=10)
    r = Running(create_app(jacobi, ServeConfig(max_rows=4)), free_port())
    try:
        with httpx.Client(base_url=r.url, timeout=60) as c:
            data = c.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 10}).json()["data"]
    finally:
        r.stop()
    for d, g in zip(data, want):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))), g.pixels)


def test_same_seed_same_image_whatever_else_is_in_the_batch(client, server):
    body = {"prompt": "two blue squares", "seed": 7, "cfg_scale": 3.0}
    alone = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    results = {}

    def other(i):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results[i] = c.post("/v1/images/generations", json={"prompt": f"noise {i} " * (i + 1), "seed": i,
                                                                 "n": 1 + i % 2}).status_code

    threads = [threading.Thread(target=other, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    busy = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    for t in threads:
        t.join(60)
    assert busy == alone and set(results.values()) == {200}


def test_image_progress_stream(client):
    with client.stream("POST", "/v1/images/generations",
                       json={"prompt": "a circle", "seed": 3, "stream": True, "preview": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[0]["type"] == "started"
    progress = [e for e in events[1:-1] if e["type"] == "progress"]
    assert [e["rows_done"] for e in progress] == list(range(1, 9)) and progress[-1]["rows_total"] == 8
    last_preview = Image.open(io.BytesIO(base64.b64decode(progress[-1]["preview"])))
    assert last_preview.size == (32, 32)
    first_preview = Image.open(io.BytesIO(base64.b64decode(progress[0]["preview"])))
    assert first_preview.size == (32, 4)  # one row of codes, 4 pixels high
    image = [e for e in events if isinstance(e, dict) and e["type"] == "image"]
    full = client.post("/v1/images/generations", json={"prompt": "a circle", "seed": 3}).json()["data"][0]
    assert image[0]["b64_json"] == full["b64_json"]


def test_chat_plain_and_streamed_equal_the_library(client, emu):
    pixels = scene(40, 40)
    want = emu.chat(Image.fromarray(pixels), "what is this?", max_new_tokens=8)
    r = client.post("/v1/chat/completions", json=chat_body(png_bytes(pixels), max_tokens=8))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"] == want
    assert out["choices"][0]["finish_reason"] in ("stop", "length") and out["usage"]["completion_tokens"] <= 8
    with client.stream("POST", "/v1/chat/completions",
                       json=chat_body(png_bytes(pixels), max_tokens=8, stream=True,
                                      stream_options={"include_usage": True})) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text.strip() == want
    assert events[-2]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]


def test_tokens_endpoint_equals_the_engine(client, emu):
    v = emu.vocab
    prompt = [v.bos, 5, 6, 7]
    r = client.post("/v1/tokens/generations", json={"prompt": prompt, "image": [2, 3], "seed": 4, "top_k": 5})
    assert r.status_code == 200, r.text
    req = Request(np.array(prompt), image_template(v, 2, 3), visual=Sampling(1.0, 5, 1.0), seed=4)
    (ref,) = Engine(emu.model, v).generate([req])
    assert r.json()["ids"] == ref.tokens.tolist() and r.json()["finished"]
    models = client.get("/v1/models").json()["data"][0]
    assert models["id"] == "tiny" and models["vocab_size"] == v.size and models["visual_offset"] == v.visual_offset


def test_video_endpoint_returns_a_playable_file(client, tmp_path):
    r = client.post("/v1/videos/generations", json={"prompt": "rolling", "frames": 2, "seed": 1, "format": "mp4"})
    assert r.status_code == 200, r.text
    d = r.json()["data"][0]
    path = tmp_path / "v.mp4"
    path.write_bytes(base64.b64decode(d["b64_json"]))
    from emu3.media import read_video

    video = read_video(path)
    assert video.frames.shape[0] == d["frames"] and video.frames.shape[1:3] == (32, 32)
    # continuing an uploaded clip: 8 frames (2 latent frames) + 1 generated latent frame = 12 frames
    clip = write_video_file(tmp_path / "in.mp4", np.stack([scene(32, 32, seed=i) for i in range(8)]), 8.0)
    body = {"prompt": "more", "frames": 1, "seed": 2, "format": "gif",
            "video": data_url(clip.read_bytes(), "video/mp4")}
    r = client.post("/v1/videos/generations", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["frames"] == 12 and r.json()["data"][0]["fps"] == 8.0
    bad = client.post("/v1/videos/generations", json={**body, "video": data_url(b"not a video", "video/mp4")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "video"
    wrong = client.post("/v1/videos/generations", json={**body, "video": data_url(b"x", "video/x-flv")})
    assert wrong.status_code == 400 and "not accepted" in wrong.json()["error"]["message"]


BAD = [
    ("/v1/images/generations", b'{"prompt": "x",', 400, None, "not valid JSON"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt", "missing"),
    ("/v1/images/generations", {"prompt": "   "}, 400, "prompt", "empty"),
    ("/v1/images/generations", {"prompt": 3}, 400, "prompt", "string"),
    ("/v1/images/generations", {"prompt": "x", "n": "2"}, 400, "n", "integer"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, 400, "n", "at most 8"),
    ("/v1/images/generations", b'{"prompt": "x", "cfg_scale": NaN}', 400, "cfg_scale", "finite"),
    ("/v1/images/generations", {"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal"),
    ("/v1/images/generations", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ("/v1/images/generations", {"prompt": "x", "seed": -3}, 400, "seed", "greater than or equal to 0"),
    ("/v1/images/generations", {"prompt": "x", "size": "33x32"}, 400, "size", "multiples of 4"),
    ("/v1/images/generations", {"prompt": "x", "size": "4000x4000"}, 400, "size", "context of 4096"),
    ("/v1/images/generations", {"prompt": "x", "aspect_ratio": "wide"}, 400, "aspect_ratio", "W:H"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "response_format", "b64_json"),
    ("/v1/images/generations", {"prompt": "x", "quality": "hd"}, 400, "quality", "Extra inputs"),
    ("/v1/tokens/generations", {"prompt": [1, 10**9]}, 400, "prompt", "prompt[1] = 1000000000 is not a token id"),
    ("/v1/tokens/generations", {"prompt": []}, 400, "prompt", "at least 1"),
    ("/v1/tokens/generations", {"prompt": [1], "max_new_tokens": 4096}, 400, "max_new_tokens", "context of 4096"),
    ("/v1/tokens/generations", {"prompt": [1], "cfg_scale": 2.0}, 400, "negative_prompt", "needs a negative"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "messages", "exactly one image"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                        "image_url": {"url": 3}}]}]},
     400, "messages[0].content[0].image_url.url", "valid string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400,
     "messages[0].content[0]", "does not match"),
    ("/v1/videos/generations", {"prompt": "x", "frames": 0}, 400, "frames", "greater than or equal to 1"),
    ("/v1/chat/completions", chat_body(png_bytes(scene(32, 32)), max_tokens=4090), 400, "max_tokens",
     "max_tokens can be at most"),
    ("/v1/chat/completions", chat_body(png_bytes(scene(32, 32)), "why " * 5000), 400, "messages[0].content",
     "more than the context of 4096"),
]


@pytest.mark.parametrize("path,body,status,param,message", BAD, ids=[f"{b[3]}-{b[4][:20]}" for b in BAD])
def test_bad_input_gets_an_openai_style_400_naming_the_parameter(client, path, body, status, param, message):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("image,message", [
    (huge_png(), "far larger than the limit of 262144 pixels"),
    (png_bytes(scene(32, 32))[:60], "corrupt or truncated"),
    (b"definitely not an image", "not an image file"),
    (png_bytes(scene(32, 32), "TIFF"), "TIFF images are not accepted"),
], ids=["huge", "truncated", "garbage", "tiff"])
def test_bad_images_are_refused_before_decoding(client, image, message):
    r = client.post("/v1/chat/completions", json=chat_body(image))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[0].image_url.url" and message in err["message"]
    assert " object at 0x" not in err["message"]  # no Python reprs reach the client
    r = client.post("/v1/chat/completions", json=chat_body(b"", question="q") | {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                     {"type": "text", "text": "q"}]}]})
    assert r.status_code == 400 and "fetches nothing from the network" in r.json()["error"]["message"]


def test_oversized_bodies_get_413(client):
    r = client.post("/v1/images/generations", content=b'{"prompt": "' + b"x" * 2**20 + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 1048576 bytes" in r.json()["error"]["message"]

    def chunks():  # no content-length: counted while it streams
        for _ in range(40):
            yield b"x" * 32768

    r = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_health_models_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/tokens/generations", json={"prompt": [1, 2], "max_new_tokens": 3})
    m = client.get("/metrics").text
    for name in ("emu3_queue_length", "emu3_running_rows", "emu3_tokens_per_second", "emu3_generated_tokens_total"):
        assert f"\n{name} " in "\n" + m
    assert 'emu3_http_requests_total{path="/v1/tokens/generations",status="200"}' in m
    # histograms (prometheus_client): latency by path; queue wait and time to first token by route; occupancy
    route = 'route="/v1/tokens/generations"'
    for name in ("emu3_queue_wait_seconds", "emu3_time_to_first_token_seconds", "emu3_generation_seconds"):
        count = [line for line in m.splitlines() if line.startswith(f"{name}_count{{{route}}}")]
        assert count and float(count[0].split()[-1]) >= 1, name
    assert 'emu3_http_request_seconds_bucket{le="+Inf",path="/v1/tokens/generations"}' in m
    assert float(next(line for line in m.splitlines() if line.startswith("emu3_batch_rows_count")).split()[-1]) >= 3
    assert "emu3" in client.get("/").text and "<script>" in client.get("/").text


def test_api_key(emu):
    r = Running(create_app(emu, ServeConfig(api_key="s3cret")), free_port())
    try:
        with httpx.Client(base_url=r.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            for path in ("/v1/models", "/metrics", "/"):
                assert c.get(path).status_code == 401
            assert c.post("/v1/tokens/generations", json={"prompt": [1]}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get("/?api_key=s3cret").status_code == 200
    finally:
        r.stop()


def long_request(v, n=3000) -> dict:
    return {"prompt": [v.bos, 5], "max_new_tokens": n, "text_temperature": 1.0, "allowed": list(range(10, 400))}


def test_full_queue_429_health_fast_disconnect_frees_the_slot_and_deadlines(emu):
    r = Running(create_app(emu, ServeConfig(max_rows=1, max_queue=1)), free_port())
    v = emu.vocab
    try:
        with httpx.Client(base_url=r.url, timeout=60) as c:
            # a streaming request holds the only row; the client goes away after its first event
            with c.stream("POST", "/v1/images/generations",
                          json={"prompt": "x", "size": "240x240", "stream": True, "cfg_scale": 1.0}) as s:
                next(s.iter_lines())
            deadline = time.monotonic() + 10
            while 'emu3_generations_total{status="cancelled"} 1' not in (m := c.get("/metrics").text):
                assert time.monotonic() < deadline, f"the disconnected client's row was not freed:\n{m}"
                time.sleep(0.05)
            assert "emu3_running_rows 0" in c.get("/metrics").text
            # the same for a plain request whose rows keep arriving while its client is gone
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/images/generations", json={"prompt": "x", "size": "240x240", "cfg_scale": 1.0},
                       timeout=0.5)
            deadline = time.monotonic() + 10
            while 'emu3_generations_total{status="cancelled"} 2' not in c.get("/metrics").text:
                assert time.monotonic() < deadline, "the plain request's row was not freed"
                time.sleep(0.05)
            assert "emu3_running_rows 0" in c.get("/metrics").text

            out = {}

            def hold(i):
                with httpx.Client(base_url=r.url, timeout=60) as c2:
                    out[i] = c2.post("/v1/tokens/generations", json=long_request(v))

            t1 = threading.Thread(target=hold, args=(1,))
            t1.start()
            while "emu3_running_rows 1" not in c.get("/metrics").text:
                time.sleep(0.01)
            t2 = threading.Thread(target=hold, args=(2,))
            t2.start()
            while "emu3_queue_length 1" not in c.get("/metrics").text:
                time.sleep(0.01)
            full = c.post("/v1/tokens/generations", json={"prompt": [1], "max_new_tokens": 2})
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full", (full.text,
                                                                                             c.get("/metrics").text)
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            assert time.perf_counter() - t0 < 0.5  # health does not wait on the model
            t1.join(60)
            t2.join(60)
            assert out[1].status_code == 200 and out[2].status_code == 200, (out[1].text, out[2].text)

            late = c.post("/v1/tokens/generations", json={**long_request(v), "timeout": 0.05})
            assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded", late.text
    finally:
        r.stop()


def test_sigterm_drains_running_requests_and_refuses_new_ones(model_folder, emu):
    with ServerProcess(["--model", str(model_folder), "--log-level", "warning"], timeout=60) as server:
        url, proc = server.url, server.proc
        out = {}
        t = threading.Thread(target=lambda: out.setdefault(
            "r", httpx.post(url + "/v1/tokens/generations", json=long_request(emu.vocab), timeout=60)))
        t.start()
        while "emu3_running_rows 1" not in httpx.get(url + "/metrics").text:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        refused = httpx.post(url + "/v1/tokens/generations", json={"prompt": [1], "max_new_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_shutting_down"
        assert httpx.get(url + "/health").status_code == 503
        t.join(60)
        assert out["r"].status_code == 200 and len(out["r"].json()["ids"]) > 0
        assert proc.wait(30) == 0, server.output()


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page at `url` (the system's chromium through playwright; skips without one)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_web_page_in_headless_chromium(server, emu, tmp_path):
    """Type a prompt and see the image appear; upload an image and ask. A screenshot shows the image."""
    ref = emu.generate_images(["three green triangles"], seed=5)[0].pixels
    upload = tmp_path / "shapes.png"
    Image.fromarray(scene(40, 40)).save(upload)
    answer = emu.chat(Image.open(upload), "how many shapes are there?")
    with browser_page(server.url + "/") as page:
        page.fill("#prompt", "three green triangles")
        page.fill("#seed", "5")
        page.click("#go")
        page.wait_for_selector('#image[data-done="1"]', timeout=60_000)
        assert "done in" in page.inner_text("#status")
        page.screenshot(path=str(tmp_path / "page.png"))
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#image").screenshot())).convert("RGB"))
        scale = shot.shape[1] // 32  # the page shows the 32x32 image pixelated, 256 px wide
        assert scale == 8 and abs(shot.shape[0] - 256) <= 1  # (+1: a fractional y offset)
        centres = shot[scale // 2::scale, scale // 2::scale][:32]  # the middle of each shown pixel
        assert np.abs(centres.astype(int) - ref.astype(int)).mean() < 3
        page.set_input_files("#file", str(upload))
        page.click("#ask")
        page.wait_for_function("document.getElementById('chatstatus').textContent === 'done'", timeout=60_000)
        assert page.inner_text("#answer").strip() == answer
    assert Image.open(tmp_path / "page.png").size == (1200, 640)


def test_web_page_tells_a_story_in_headless_chromium():
    """With "answer with pictures" and no image, the page continues a story: the built-in model's text and
    its three pictures appear in order, as the library writes them."""
    builtin = Emu3.from_pretrained()
    want = builtin.generate_interleaved("first, a red circle appears.", seed=0)
    r = Running(create_app(builtin, ServeConfig(model_name="builtin", max_rows=4)), free_port())
    try:
        with browser_page(r.url + "/") as page:
            page.fill("#question", "first, a red circle appears.")
            page.check("#pictures")
            page.click("#ask")
            page.wait_for_function("document.getElementById('chatstatus').textContent === 'done'", timeout=60_000)
            assert page.locator("#answer img").count() == sum(hasattr(s, "pixels") for s in want) == 3
            assert page.inner_text("#answer").split() == " ".join(s.text for s in want
                                                                  if not hasattr(s, "pixels")).split()
    finally:
        r.stop()


def test_server_process_that_cannot_start_raises_with_its_output(tmp_path):
    server = ServerProcess(["--model", str(tmp_path / "nothing-here")], timeout=60)
    with pytest.raises(RuntimeError, match="exited with status") as e:
        with server:
            pass
    assert "nothing-here" in str(e.value)  # the CLI's own error, quoted
    assert "nothing-here" in server.output()  # still readable once the process and its log are gone


def test_interleaved_chat_answer_over_http(tmp_path):
    """With "image" in modalities the answer holds images where the model opens them: the built-in model
    continues a story, text and pictures, as the library does; streamed, the text comes as deltas and each
    picture once it is complete. max_images without the modality is refused."""
    import base64

    builtin = Emu3.from_pretrained()
    want = builtin.generate_interleaved("first, a red circle appears.", max_images=3, seed=4)
    r = Running(create_app(builtin, ServeConfig(model_name="builtin", max_rows=4)), free_port())
    body = {"messages": [{"role": "user", "content": "first, a red circle appears."}],
            "modalities": ["text", "image"], "max_images": 3, "seed": 4}

    def picture(part) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))))

    try:
        with httpx.Client(base_url=r.url, timeout=120) as c:
            out = c.post("/v1/chat/completions", json=body)
            assert out.status_code == 200, out.text
            parts = out.json()["choices"][0]["message"]["content"]
            assert [p["type"] for p in parts] == ["image_url" if hasattr(s, "pixels") else "text" for s in want]
            assert sum(p["type"] == "image_url" for p in parts) == 3
            for p, s in zip(parts, want):
                if p["type"] == "text":
                    assert p["text"] == s.text
                else:
                    assert np.array_equal(picture(p), s.pixels)
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
                events = sse_events(resp)
            deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
            images = [d[0] for d in deltas if isinstance(d, list)]
            text = "".join(d for d in deltas if isinstance(d, str))
            assert len(images) == 3 and all(np.array_equal(picture(a), picture(b))
                                            for a, b in zip(images, [p for p in parts if p["type"] == "image_url"]))
            assert text == " ".join(p["text"] for p in parts if p["type"] == "text")
            bad = c.post("/v1/chat/completions", json=chat_body(png_bytes(scene(32, 32)), max_images=2))
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_images"
    finally:
        r.stop()
