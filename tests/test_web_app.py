"""The RAG web app (gist_memory.server, served by `gist-memory serve`): its HTTP API on 127.0.0.1 with the tiny model (documents, uploads and
their refusals, questions, bad requests, limits), and one headless-Chromium run of the page (Playwright driving
Debian's /usr/bin/chromium): upload, ask, answer panel, chart, escaping.

`GIST_SCREENSHOT=1` runs the browser test with the default model instead and saves docs/screenshot.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("GIST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = bool(os.environ.get("GIST_SCREENSHOT"))

LIGHTHOUSE = (
    "# Velmora harbour\n\nThe Velmora lighthouse was built in 1887 by the engineer Ada Lindqvist. Its lamp stands "
    "42 metres above the sea and can be seen from 19 nautical miles away. The harbour master keeps the logbook "
    "under the archive code VH-2291.\n\nFerries leave Velmora for the island of Skarholm every morning at 7:15, "
    "and the crossing takes two hours.\n"
)
STATION = (
    "The Prythwaite weather station sits at an altitude of 4,301 metres. It was founded in 1931 by the "
    "meteorologist Henrik Sollum and records the wind speed every ten minutes.\n"
)
XSS_TITLE = '<img src=x onerror="window.__xss=1">'
XSS_TEXT = ("Zorbluth notes: <script>window.__xss=2</script> <b>bold?</b> <img src=x onerror=\"window.__xss=3\"> "
            "The Zorbluth tram depot opened in 1902.")


@pytest.fixture(scope="module", autouse=True)
def _threads_for_a_busy_machine():
    """torch threads `auto` (fewer on a busy CPU, where waiting OpenMP threads stall), restored afterwards."""
    import torch

    from gist_memory.cli import set_threads

    before = torch.get_num_threads()
    set_threads("auto")
    yield
    torch.set_num_threads(before)


# ---- a server in a thread ------------------------------------------------------------------------------------
class Server:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a daemon thread."""

    def __init__(self, app) -> None:  # noqa: ANN001
        import uvicorn

        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120):  # noqa: ANN001
        """(status, parsed JSON body or text)."""
        data = body
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
        return status, (json.loads(raw) if "json" in ctype else raw.decode("utf-8", "replace"))

    def upload(self, files):  # noqa: ANN001 - [(filename, bytes)]
        boundary = "gistboundary" + uuid.uuid4().hex
        parts = [
            (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
            for name, data in files
        ]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", "/api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


@pytest.fixture(scope="module")
def webapp():
    from gist_memory import server

    return server


@pytest.fixture(scope="module")
def tiny_gist(tiny_base_dir):
    from gist_memory.cli import load_model

    return load_model(base=tiny_base_dir)


@pytest.fixture(scope="module")
def server(webapp, tiny_gist):
    model, desc = tiny_gist
    app = webapp.create_app(model, None, max_upload_bytes=4096, k=2, max_new_tokens=4, model_description=desc)
    s = Server(app)
    yield s
    s.stop()


# ---- API -----------------------------------------------------------------------------------------------------
def test_page_and_assets_are_local(server):
    status, html = server.request("GET", "/")
    assert status == 200 and "<title>" in html and 'id="answer"' in html
    for asset in ("/static/app.js", "/static/style.css"):
        status, text = server.request("GET", asset)
        assert status == 200 and text
        html += text
    # no CDN or any other outside address: only the SVG namespace URI appears
    assert re.findall(r"https?://[^\s\"')]+", html) == ["http://www.w3.org/2000/svg"]
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html


def test_documents_upload_and_ask(server):
    status, info = server.request("GET", "/api/info")
    assert status == 200 and info["max_upload_bytes"] == 4096 and "pool+anchors" in info["model"]
    status, d = server.request("POST", "/api/documents", {"title": "Station", "text": STATION})
    assert status == 200 and d["passages"] >= 1 and d["ratio"] > 1.5 and d["title"] == "Station"
    status, res = server.upload([("harbour.md", LIGHTHOUSE.encode())])
    assert status == 200, res
    assert [a["title"] for a in res["added"]] == ["harbour.md"] and res["rejected"] == []
    status, docs = server.request("GET", "/api/documents")
    assert {x["title"] for x in docs["documents"]} >= {"Station", "harbour.md"}
    status, ans = server.request("POST", "/api/ask", {"question": "Who built the Velmora lighthouse?"})
    assert status == 200, ans
    assert isinstance(ans["answer"], str) and 1 <= len(ans["sources"]) <= 2
    assert ans["sources"][0]["title"] == "harbour.md"
    assert ans["ratio"] > 1.5 and ans["kept_rows"] < ans["raw_tokens"]
    g, f = ans["gist"], ans["full"]
    assert 0 < g["positions"] < f["positions"] and 0 < g["kv_bytes"] < f["kv_bytes"]
    assert g["kv_bytes"] == g["positions"] * ans["kv_bytes_per_position"]
    assert f["new_tokens"] <= 1 and ans["full_answer"] == ""  # the twin is measured to its first token only
    status, ans = server.request("POST", "/api/ask", {"question": "Where is the station?", "k": 1,
                                                      "full_answer": True})
    assert status == 200 and len(ans["sources"]) == 1 and ans["full"]["new_tokens"] >= 0


@pytest.mark.parametrize(
    "name, data, status, needle",
    [
        ("notes.pdf", b"%PDF-1.4 ...", 415, "only .txt, .md, .markdown"),
        ("blob.txt", b"abc\x00\x01\x02" * 20, 415, "binary"),
        ("latin1.md", "caf\xe9 cr\xe8me".encode("latin-1"), 415, "not UTF-8"),
        ("empty.txt", b"   \n\n ", 400, "empty"),
        ("big.txt", b"word " * 1000, 413, "too large"),
    ],
)
def test_bad_uploads_are_refused_with_a_message(server, name, data, status, needle):
    got, body = server.upload([(name, data)])
    assert got == status and needle in body["error"], body


def test_bad_requests_then_still_works(server):
    bad = [
        server.upload([("ok.md", b"The Orvik bridge opened in 1911."), ("bad.exe", b"MZ\x00\x00")]),
        server.request("POST", "/api/ask", {"question": "   "}),
        server.request("POST", "/api/ask", {"question": "x" * 3000}),
        server.request("POST", "/api/ask", {"question": "why?", "k": 99}),
        server.request("POST", "/api/ask", b"{not json", {"Content-Type": "application/json"}),
        server.request("POST", "/api/ask", {"nothing": 1}),
        server.request("POST", "/api/documents", {"title": "x", "text": ""}),
        server.request("POST", "/api/documents", {"title": "x", "text": "long " * 2000}),
        server.request("POST", "/api/upload", b"not multipart", {"Content-Type": "text/plain"}),
        server.request("POST", "/api/upload", b"x" * 100_000, {"Content-Type": "application/octet-stream"}),
        server.request("DELETE", "/api/documents/doc-nope"),
        server.request("GET", "/api/nothing-here"),
    ]
    statuses = [s for s, _ in bad]
    assert statuses == [200, 400, 400, 400, 422, 422, 400, 413, 422, 413, 404, 404]
    partial = bad[0][1]
    assert [a["title"] for a in partial["added"]] == ["ok.md"] and "bad.exe" in partial["rejected"][0]["error"]
    for _, body in bad[1:]:
        assert isinstance(body, dict) and body["error"]
    status, ans = server.request("POST", "/api/ask", {"question": "When did the Orvik bridge open?"})
    assert status == 200 and ans["sources"]


def test_delete_document(server):
    status, d = server.request("POST", "/api/documents", {"title": "temp", "text": "The Quillon mill burned in 1790."})
    assert status == 200
    status, res = server.request("DELETE", f"/api/documents/{d['id']}")
    assert status == 200 and res["removed"] == d["passages"]
    status, docs = server.request("GET", "/api/documents")
    assert d["id"] not in {x["id"] for x in docs["documents"]}


def test_ask_on_an_empty_memory(webapp, tiny_gist):
    model, _ = tiny_gist
    s = Server(webapp.create_app(model, None))
    try:
        status, body = s.request("POST", "/api/ask", {"question": "anything?"})
        assert status == 400 and "add a document" in body["error"]
    finally:
        s.stop()


# ---- the page in headless Chromium ---------------------------------------------------------------------------
def _browser_model(tiny_gist):
    if not SCREENSHOT:
        return tiny_gist
    from gist_memory.cli import load_model, set_threads

    set_threads("auto")
    return load_model()  # the default model: shipped adapter, else the training-free compressor


def test_page_in_headless_chromium(webapp, tiny_gist, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium binary at {CHROMIUM} (apt-get install chromium; `make venv` does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-extra)")
    model, desc = _browser_model(tiny_gist)
    app = webapp.create_app(model, None, max_upload_bytes=64 * 1024, k=2, max_new_tokens=48 if SCREENSHOT else 4,
                            model_description=desc)
    srv = Server(app)
    timeout = 300_000 if SCREENSHOT else 60_000
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(timeout)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('info').textContent.startsWith('model:')")

            # a non-text file is refused with a message
            page.set_input_files("#file-input", files=[{"name": "photo.txt", "mimeType": "text/plain",
                                                        "buffer": b"\x89PNG\x00\x00\x00binary"}])
            page.click("#upload-button")
            page.wait_for_selector("#doc-message.error")
            assert "binary" in page.text_content("#doc-message")

            # two documents upload and are listed with their compression ratio
            page.set_input_files("#file-input", files=[
                {"name": "velmora-harbour.md", "mimeType": "text/markdown", "buffer": LIGHTHOUSE.encode()},
                {"name": "prythwaite-station.txt", "mimeType": "text/plain", "buffer": STATION.encode()},
            ])
            page.click("#upload-button")
            page.wait_for_selector("#doc-message.ok")
            assert "added velmora-harbour.md" in page.text_content("#doc-message")
            page.wait_for_function("document.querySelectorAll('#doc-list li').length === 2")
            assert "x" in page.text_content("#doc-list li .ratio")

            # ask: answer panel, stats, chart and sources render
            page.fill("#question", "Who built the Velmora lighthouse?")
            page.click("#ask-button")
            page.wait_for_selector("#result:not([hidden])")
            page.wait_for_function("!document.getElementById('ask-button').disabled")
            assert page.text_content("#answer").strip()
            assert page.locator("#chart svg rect.bar.gist").count() == 3
            assert page.locator("#chart svg rect.bar.full").count() == 3
            assert "%" in page.text_content("#chart svg")
            assert "compression ratio" in page.text_content("#stats")
            assert page.text_content("#sources li .src-title") == "velmora-harbour.md"
            widths = page.eval_on_selector_all(
                "#chart rect.bar[data-metric='KV memory']", "els => els.map(e => +e.getAttribute('width'))")
            assert widths[0] < widths[1]  # gist states use less KV memory than the full text
            if SCREENSHOT:
                out = ROOT / "docs" / "screenshot.png"
                out.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(out), full_page=True)

            # markup in titles and texts is shown as text, never run or rendered
            page.fill("#paste-title", XSS_TITLE)
            page.fill("#paste-text", XSS_TEXT)
            page.click("#paste-button")
            page.wait_for_selector("#doc-message.ok")
            page.wait_for_function("document.querySelectorAll('#doc-list li').length === 3")
            assert XSS_TITLE in page.text_content("#doc-list")
            page.fill("#question", "When did the Zorbluth tram depot open?")
            page.click("#ask-button")
            page.wait_for_function(
                "document.querySelector('#sources li .src-title') && "
                "document.querySelector('#sources li .src-title').textContent.includes('<img')")
            assert "<script>window.__xss=2</script>" in page.text_content("#sources")
            assert page.evaluate("window.__xss") is None
            assert page.locator("#sources b, #sources img, #sources script, #doc-list img").count() == 0

            # the page keeps working after a refused request
            page.fill("#question", "x" * 10)
            page.evaluate("document.getElementById('question').value = '   '")
            page.click("#ask-button")
            assert page.text_content("#ask-message") == "type a question first"
            assert errors == []
            browser.close()
    finally:
        srv.stop()


def test_example_is_a_thin_wrapper_of_the_package_app():
    """examples/rag_web_app/app.py still loads by file path and serves the in-package app and page."""
    import importlib.util

    import gist_memory.server as server
    from gist_memory.server.app import STATIC

    spec = importlib.util.spec_from_file_location("rag_web_app_example", ROOT / "examples" / "rag_web_app" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.create_app is server.create_app
    assert STATIC.is_relative_to(Path(server.__file__).parent) and (STATIC / "index.html").is_file()
