"""The session, the pairs file, the HTTP server's safety and the CLI's bad input
(no browser needed)."""

from __future__ import annotations

import csv
import http.client
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.annotate.helpers import ROOT
from westar.annotate.sampling import PAIR_SLOTS
from westar.annotate.server import make_server, static_files
from westar.annotate.store import AnnotationSession
from westar.cli import main
from westar.data import DataError, load_pairs


def make_images(folder: Path, n: int = 3, size=(40, 50), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


class Served:
    """An AnnotationSession behind a real HTTP server in a thread."""

    def __init__(self, session: AnnotationSession):
        self.session = session
        self.server = make_server(session, "127.0.0.1", 0)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=hdrs)  # the path goes out as written
        res = conn.getresponse()
        out = res.status, res.read()
        conn.close()
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path):
    images = make_images(tmp_path / "images")
    s = Served(AnnotationSession(images, tmp_path / "pairs.json"))
    yield s
    s.close()


# --------------------------------------------------------------------------- session + file


def test_resume_restores_everything_and_keeps_existing_pairs(tmp_path):
    images = make_images(tmp_path / "images")
    out = tmp_path / "pairs.json"
    existing = {"a": [1, 2], "b": [30, 20], "relation": "closer"}
    doc = {
        "version": 1, "coordinates": "xy", "source": "someone", "seed": 3,
        "images": {
            "im0": {"width": 50, "height": 40, "pairs": [existing]},
            "elsewhere": {"width": 9, "height": 9, "pairs": []},  # not in the folder: kept
        },
    }  # fmt: skip
    out.write_text(json.dumps(doc))
    s = AnnotationSession(images, out)
    assert s.image_state(0)["existing"] == [existing]
    st = s.image_state(0)["samples"]
    # an answer identical to the existing pair: both must survive a resume
    s.move(0, 0, "p", [1, 2])
    s.move(0, 0, "anchor", [30, 20])
    s.answer(0, 0, 0, "closer")
    s.answer(0, 1, 2, "equal")
    s.skip(1)
    s.answer(2, 4, 1, "farther")
    saved = json.loads(out.read_text())
    assert saved["source"] == "someone" and saved["seed"] == 3
    assert saved["images"]["elsewhere"] == doc["images"]["elsewhere"]
    pairs = load_pairs(out)
    assert pairs["im0"]["pairs"][0] == existing and len(pairs["im0"]["pairs"]) == 3
    assert pairs["im1"]["pairs"] == [] and saved["images"]["im1"]["annotate"]["skipped"]

    r = AnnotationSession(images, out)
    for i in range(3):
        assert r.image_state(i) == s.image_state(i)
    assert r.image_state(0)["existing"] == [existing]
    assert r.image_state(0)["samples"][0]["q"] == st[0]["q"]
    assert r.summary()["pairs_done"] == s.summary()["pairs_done"] == 3
    r.undo()  # nothing recorded in this run
    assert json.loads(out.read_text()) == saved


def test_answers_move_undo_and_progress(tmp_path):
    s = AnnotationSession(make_images(tmp_path / "images", n=2), tmp_path / "p.json", samples=2)
    assert s.summary()["pairs_total"] == 12 and s.summary()["next"] == 0
    for sample in range(2):
        for slot, rel in enumerate(("farther", "closer", "farther")):
            s.answer(0, sample, slot, rel)
    sm = s.summary()
    assert sm["images_done"] == 1 and sm["pairs_done"] == 6 and sm["next"] == 1
    s.move(0, 1, "q", [0, 0])
    st = s.image_state(0)
    assert st["samples"][1]["answers"] == ["farther", None, None] and not st["done"]
    assert s.undo() == 0
    assert s.image_state(0)["samples"][1]["answers"] == ["farther", "closer", "farther"]
    s.answer(0, 0, 2, "closer")  # P>A, Q<A, P<Q
    st = s.image_state(0)
    assert sorted(st["conflicts"]) == [[0, 0], [0, 1], [0, 2]] and not st["done"]
    assert json.loads(s.out.read_text())["annotate"]["unresolved_conflicts"] == {"im0": 3}
    with pytest.raises(ValueError, match="relation"):
        s.answer(0, 0, 0, "nearer")
    with pytest.raises(ValueError, match="no pair"):
        s.answer(0, 2, 0, "equal")
    with pytest.raises(ValueError, match="outside"):
        s.move(0, 0, "p", [50, 0])
    with pytest.raises(ValueError, match=r"\[x, y\]"):
        s.move(0, 0, "p", [1.5, 0])
    with pytest.raises(KeyError):
        s.answer(5, 0, 0, "equal")


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    s = AnnotationSession(make_images(tmp_path / "images", n=1), tmp_path / "p.json")
    s.answer(0, 0, 0, "farther")
    before = (tmp_path / "p.json").read_bytes()

    def broken_dump(obj, f, **kw):
        f.write('{"version": 1, "ima')  # half written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        s.answer(0, 0, 1, "closer")
    assert (tmp_path / "p.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "p.json"]  # no temp left


def test_bad_input_names_the_file(tmp_path):
    images = make_images(tmp_path / "images", n=2)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "p.json"
    s = AnnotationSession(images, out)
    assert len(s.items) == 2 and any("broken.jpg" in n for n in s.notes)
    assert any("broken.jpg" in n for n in s.summary()["notes"])  # shown in the page
    cases = [
        ("{not json", "is not valid JSON"),
        ('{"images": []}', '"images" mapping'),
        ('{"images": {"im0": {"width": 51, "height": 40, "pairs": []}}}', "annotated as 51x40"),
        ('{"images": {"im0": {"width": 50, "height": 40, "pairs": [{"a": [60, 1], "b": [0, 0], '
         '"relation": "equal"}]}}}', "outside"),
        ('{"images": {"im0": {"width": 50, "height": 40, "pairs": [], "annotate": {"samples": '
         '[{"anchor": [0, 0], "p": [1, 1], "q": [99, 1]}]}}}}', r"annotate: samples\[0\]: point \[x=99"),
    ]  # fmt: skip
    for text, message in cases:
        out.write_text(text)
        with pytest.raises(DataError, match=message) as info:
            AnnotationSession(images, out)
        assert str(info.value).startswith(str(out))
        assert out.read_text() == text  # never overwritten
    with pytest.raises(DataError, match="is a folder"):
        AnnotationSession(images, tmp_path)
    with pytest.raises(DataError, match="folder of --out not found"):
        AnnotationSession(images, tmp_path / "nope" / "p.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        AnnotationSession(empty, out)
    (empty / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="no readable images"):
        AnnotationSession(empty, tmp_path / "q.json")


def test_tiff_is_sent_as_png(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    arr = np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(arr).save(folder / "a.tif")
    s = AnnotationSession(folder, tmp_path / "p.json")
    body, ctype = s.image_bytes(0)
    assert ctype == "image/png"
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))), arr)


# --------------------------------------------------------------------------- HTTP


ESCAPES = [
    "/static/../store.py", "/static/%2e%2e/store.py", "/static/..%2fstore.py",
    "/static/..%2F..%2Fdata.py", "/static/%2e%2e%2f%2e%2e%2fdata.py", "/static/",
    "/static/annotate.js/../../store.py", "/static/annotate.js%00.py", "/static/.",
    "/static/%2fetc%2fpasswd", "/static//etc/passwd", "/static/..\\..\\data.py",
    "/image/../../../etc/passwd", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/image/0/../../cli.py", "/image/-1", "/image/1e0", "/image/%30", "/image/00",
    "/image/3", "/image/99999999999", "/image/0%00", "/image/0/", "//etc/passwd",
    "/api/image/../../etc/passwd", "/api/image/..%2f..%2fsecret.txt", "/../secret.txt",
    "/%2e%2e/secret.txt", "/images/../secret.txt", "/secret.txt", "/im0.png",
]  # fmt: skip


def test_requests_cannot_escape(tmp_path):
    images = make_images(tmp_path / "images", n=2)
    (tmp_path / "secret.txt").write_text("SECRET")
    outside = make_images(tmp_path / "outside", n=1, seed=9) / "im0.png"
    os.symlink(outside, images / "link_out.png")  # points outside: not served
    os.symlink(images / "im1.png", images / "link_in.png")  # inside the folder: fine
    os.symlink(tmp_path / "secret.txt", images / "secret.png")
    s = Served(AnnotationSession(images, tmp_path / "p.json"))
    try:
        stems = [it.stem for it in s.session.items]
        assert stems == ["im0", "im1", "link_in"]
        notes = " ".join(s.session.notes)
        assert "link_out.png" in notes and "secret.png" in notes
        secrets = [outside.read_bytes(), b"SECRET"]
        served = []
        for i in range(3):
            status, body = s.request("GET", f"/image/{i}")
            assert status == 200
            served.append(body)
        assert served[0] == (images / "im0.png").read_bytes()
        assert served[2] == (images / "im1.png").read_bytes()
        for path in ESCAPES:
            status, body = s.request("GET", path)
            assert status == 404, (path, status)
            assert all(secret not in body for secret in secrets)
            assert b"import" not in body  # no source file
        for name, data in static_files().items():
            assert s.request("GET", f"/static/{name}") == (200, data)
        # other sites cannot drive the server through the browser
        assert s.request("GET", "/api/summary", headers={"Host": "evil.example"})[0] == 403
        status, _ = s.request("POST", "/api/answer", body=None,
                              headers={"Content-Type": "text/plain"})  # fmt: skip
        assert status == 415
        assert not (tmp_path / "p.json").exists()
    finally:
        s.close()


def test_api_errors_are_clear(served):
    ok = served.request(
        "POST", "/api/answer", {"image": 0, "sample": 0, "slot": 0, "relation": "equal"}
    )
    assert ok[0] == 200 and json.loads(ok[1])["summary"]["pairs_done"] == 1
    bad = [
        ({"image": 0, "sample": 0, "slot": 0, "relation": "far"}, "relation must be one of"),
        ({"image": 7, "sample": 0, "slot": 0, "relation": "equal"}, "no image"),
        ({"image": 0, "sample": 9, "slot": 0, "relation": "equal"}, "no pair"),
        ({"image": 0, "slot": 0, "relation": "equal"}, "missing or unknown 'sample'"),
    ]
    for body, message in bad:
        status, data = served.request("POST", "/api/answer", body)
        assert status == 400 and message in json.loads(data)["error"], (body, data)
    status, data = served.request(
        "POST", "/api/move", {"image": 0, "sample": 0, "point": "p", "x": -1, "y": 0}
    )
    assert status == 400 and "outside" in json.loads(data)["error"]
    assert served.request("POST", "/api/nothing", {})[0] == 404


def test_page_needs_no_network():
    """Every asset the page loads is a local /static/ file; no CDN, no absolute URL."""
    import re

    files = static_files()
    assert {"index.html", "annotate.js", "annotate.css"} <= set(files)
    html = files["index.html"].decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/static/") and r[8:] in files for r in refs), refs
    for name, data in files.items():
        text = data.decode()
        assert "https://" not in text and "@import" not in text and "url(" not in text, name
        assert set(re.findall(r"http://[^\"' ]+", text)) <= {"http://www.w3.org/2000/svg"}, name


def test_static_files_are_packaged():
    """pyproject's package-data patterns match every file of westar/annotate/static, so a
    regular (non-editable) install ships the page."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["westar"]
    package = ROOT / "westar"
    files = [p for p in (package / "annotate" / "static").rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        rel = path.relative_to(package).as_posix()
        assert any(
            fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in patterns
        ), f"{rel} is not matched by package-data {patterns}"


# --------------------------------------------------------------------------- CLI


def test_cli_bad_input_exits_2(tmp_path, capsys):
    images = make_images(tmp_path / "images", n=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2")
    base = ["annotate", "--images", str(images), "--out", str(tmp_path / "p.json"), "--port", "0"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (["annotate", "--images", str(empty), "--out", "p.json"], f"{empty}: no images"),
            (["annotate", "--images", str(tmp_path / "x"), "--out", "p.json"], "image folder not found"),
            (["annotate", "--images", str(images), "--out", str(bad_json)], f"{bad_json}: pairs file is not valid JSON"),
            (base[:-2] + ["--port", str(port)], f"--port {port}: already in use"),
            (base + ["--adapter", "a"], "--adapter needs --model"),
            (base + ["--model", str(tmp_path / "nomodel")], "nomodel: model directory not found"),
            (base + ["--samples", "0"], "--samples must be in 1..50"),
            (base[:-2] + ["--port", "70000"], "--port must be in 0..65535"),
        ]  # fmt: skip
        for args, message in cases:
            assert main(args) == 2, args
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (args, err)
            assert err.startswith("westar annotate: error:")
    assert bad_json.read_text() == "[1, 2"


# --------------------------------------------------------------------------- training


def test_pairs_made_with_the_tool_train(tmp_path, tiny_model):
    """A person (here: answers from the true depth) labels a dataset through the HTTP API;
    `westar train` reads the file and its ordinal loss is active."""
    from tests.trainer.helpers import make_dataset
    from westar.pairs import relation

    root = make_dataset(tmp_path / "ds", n=4, size=(56, 56), pairs=False)
    out = root / "pairs.json"
    s = Served(AnnotationSession(root / "images", out, samples=5))
    try:
        for i, item in enumerate(s.session.items):
            depth = np.load(root / "depth" / f"{item.stem}.npy")
            st = json.loads(s.request("GET", f"/api/image/{i}")[1])
            for si, sample in enumerate(st["samples"]):
                for k, (a, b) in enumerate(PAIR_SLOTS):
                    (xa, ya), (xb, yb) = sample[a], sample[b]
                    rel = relation(float(depth[ya, xa]), float(depth[yb, xb]))
                    body = {"image": i, "sample": si, "slot": k, "relation": rel}
                    assert s.request("POST", "/api/answer", body)[0] == 200
        assert s.session.summary()["images_done"] == 4
    finally:
        s.close()
    assert sum(len(e["pairs"]) for e in load_pairs(out).values()) == 60
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model), "--data", str(root), "--output-dir", str(run),
            "--image-size", "56", "--steps", "3", "--batch-size", "2", "--no-progress",
            "--log-every", "1"]  # fmt: skip
    assert main(args) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 3 and all(float(r["weak"]) > 0 for r in rows)
    assert (run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.9])
def test_sigkill_during_writes_leaves_a_valid_file(tmp_path, delay):
    """Answers posted back to back (each write ~0.1 MB) while the server is SIGKILLed at
    some moment: the file is valid, holds every acknowledged answer and at most the one
    in flight besides."""
    from tests.annotate.helpers import ServerProcess

    images = make_images(tmp_path / "images", n=6, size=(40, 50))
    out = tmp_path / "pairs.json"
    rng = np.random.default_rng(0)
    existing = {
        f"im{i}": {"width": 50, "height": 40, "pairs": [
            {"a": [int(rng.integers(50)), int(rng.integers(40))], "b": [1, 1], "relation": "equal"}
            for _ in range(300)]}
        for i in range(6)
    }  # fmt: skip
    out.write_text(json.dumps({"version": 1, "coordinates": "xy", "images": existing}))
    server = ServerProcess(images, out)
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    acked: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def post_answers():
        for i in range(6):
            for sample in range(5):
                for slot in range(3):
                    if stop.is_set():
                        return
                    try:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                        body = {"image": i, "sample": sample, "slot": slot, "relation": "closer"}
                        conn.request("POST", "/api/answer", json.dumps(body),
                                     {"Content-Type": "application/json"})  # fmt: skip
                        if conn.getresponse().status == 200:
                            acked.append((i, sample, slot))
                    except OSError:
                        return

    worker = threading.Thread(target=post_answers)
    worker.start()
    stop.wait(delay)
    server.kill()
    stop.set()
    worker.join()
    assert acked, "no answer got through before the kill"
    pairs = load_pairs(out)  # valid, by the trainer's reader
    doc = json.loads(out.read_text())
    saved = {
        (int(stem[2:]), s, k)
        for stem, e in doc["images"].items()
        if "annotate" in e
        for s, sample in enumerate(e["annotate"]["samples"])
        for k, r in enumerate(sample["answers"])
        if r is not None
    }
    assert set(acked) <= saved and len(saved) <= len(acked) + 1
    for stem, entry in existing.items():
        assert pairs[stem]["pairs"][:300] == entry["pairs"]
    # a kill mid-write may leave the temporary file: the next run removes it
    (tmp_path / ".pairs.json.stale.tmp").write_text("{")
    AnnotationSession(images, out)
    assert not list(tmp_path.glob(".pairs.json.*.tmp"))
