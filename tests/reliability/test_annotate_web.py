"""Round two (issue 21): the annotate web app answers every request, takes only what its
API says, and serves nothing another site or a swapped file could abuse.
docs/reliability.md, "Annotate" rows."""

from __future__ import annotations

import http.client
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.annotate.test_server import Served, make_images
from westar.annotate.store import AnnotationSession


@pytest.fixture
def served(tmp_path):
    s = Served(AnnotationSession(make_images(tmp_path / "images", n=2), tmp_path / "pairs.json"))
    yield s
    s.close()


def raw_post(served: Served, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    out = res.status, res.read()
    conn.close()
    return out


def test_deeply_nested_json_gets_an_answer(served):
    body = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB limit; was: no response at all
    status, reply = raw_post(served, "/api/answer", body)
    assert status == 400 and b"nested too deeply" in reply
    status, _ = served.request("GET", "/api/summary")  # the server still answers
    assert status == 200


@pytest.mark.parametrize(
    "path, body",
    [("/api/answer", {"image": 0, "sample": True, "slot": 0, "relation": "farther"}),
     ("/api/answer", {"image": 0, "sample": 0, "slot": False, "relation": "farther"}),
     ("/api/move", {"image": 0, "sample": True, "point": "p", "x": 1, "y": 1}),
     ("/api/skip", {"image": 0, "skipped": "false"}),
     ("/api/skip", {"image": 0, "skipped": 1})],
)  # fmt: skip
def test_api_takes_json_booleans_and_integers_only(served, path, body):
    status, reply = served.request("POST", path, body)
    assert status == 400, reply
    assert not served.session.out.exists()  # nothing recorded
    state = served.session.image_state(0)
    assert not state["skipped"] and all(a is None for s in state["samples"] for a in s["answers"])
    assert served.request("POST", "/api/skip", {"image": 0, "skipped": False})[0] == 200
    assert served.session.image_state(0)["skipped"] is False


def test_responses_forbid_cross_site_reads(served):
    for path in ("/image/0", "/api/summary", "/api/image/0", "/"):
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        conn.request("GET", path)
        res = conn.getresponse()
        res.read()
        conn.close()
        assert res.status == 200
        assert res.getheader("Cross-Origin-Resource-Policy") == "same-origin", path


def test_file_replaced_by_a_symlink_after_start_is_not_served(served, tmp_path):
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((40, 50, 3), 7, np.uint8)).save(secret)
    image = Path(served.session.items[0].path)
    assert served.request("GET", "/image/0")[0] == 200
    image.unlink()
    image.symlink_to(secret)  # swapped after the start, when the folder was checked
    status, body = served.request("GET", "/image/0")
    assert status != 200 and secret.read_bytes() not in body
    assert served.request("GET", "/image/1")[0] == 200  # the others are still served
