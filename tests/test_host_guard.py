"""The guard's Host check against DNS rebinding: without an API key only loopback names (and
`Settings.allowed_hosts`) are served, over HTTP and the /ws handshake; with a key any name is."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from test_server_api import folders, serving
from websockets.sync.client import connect

from sdlab.server.cli import host_name, host_names, is_loopback
from sdlab.server.state import Settings

EVIL = "evil.example"
LOCAL_NAMES = ("localhost", "127.0.0.1", "127.0.0.5", "[::1]")


def requests(client: httpx.Client, host: str, **extra: str) -> dict[str, int]:
    """The status of each guarded route when asked for as host:port (with a matching Origin)."""
    headers = {"Host": host, "Origin": f"http://{host}", **extra}
    return {
        "txt2img": client.post("/sdapi/v1/txt2img", json={"steps": "many"}, headers=headers).status_code,
        "history": client.get("/history", headers=headers).status_code,
        "view": client.get("/view", params={"filename": "x.png"}, headers=headers).status_code,
        "options": client.get("/sdapi/v1/options", headers=headers).status_code,
        "options_set": client.post("/sdapi/v1/options", json={}, headers=headers).status_code,
    }


def ws_handshake(base: str, host: str, **extra: str) -> None:
    """Open /ws on the server at base, sending `Host: host` (raises if the handshake is refused)."""
    port = urlsplit(base).port
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    origin = f"http://{host}"
    with connect(f"ws://{host}/ws", sock=sock, origin=origin, additional_headers=extra, proxy=None):
        pass


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("host")
    with serving(Settings(folders(root, root / "none"))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=60) as c:
        yield c


def test_other_hosts_are_refused(base: str, client: httpx.Client) -> None:
    port = urlsplit(base).port
    for host in (f"{EVIL}:{port}", EVIL, f"localhost.{EVIL}:{port}", f"127.0.0.1.{EVIL}", f"[::2]:{port}"):
        assert set(requests(client, host).values()) == {403}, host
        with pytest.raises(Exception, match="403"):
            ws_handshake(base, host)
    r = client.get("/history", headers={"Host": f"{EVIL}:{port}"})
    assert r.status_code == 403
    detail = r.json()["detail"]
    assert f"{EVIL}:{port}" in detail and f"--allowed-hosts {EVIL}" in detail


def test_loopback_hosts_are_served(base: str, client: httpx.Client) -> None:
    port = urlsplit(base).port
    for name in LOCAL_NAMES:
        for host in (f"{name}:{port}", name):
            statuses = requests(client, host)
            assert 403 not in statuses.values(), (host, statuses)
            assert statuses["history"] == 200 and statuses["view"] == 404, (host, statuses)
        ws_handshake(base, f"{name}:{port}")
    assert client.get("/history", headers={"Host": f"LOCALHOST.:{port}"}).status_code == 200
    # the Origin check still applies to a loopback Host
    cross = {"Host": f"localhost:{port}", "Origin": f"http://{EVIL}:{port}"}
    assert client.get("/history", headers=cross).status_code == 403


def test_allowed_hosts_are_served(tmp_path: Path) -> None:
    settings = Settings(folders(tmp_path, tmp_path / "none"), allowed_hosts=(EVIL, "Box.LAN."))
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        port = urlsplit(url).port
        for host in (f"{EVIL}:{port}", f"box.lan:{port}", f"localhost:{port}"):
            assert 403 not in requests(client, host).values(), host
            ws_handshake(url, host)
        assert set(requests(client, f"other.example:{port}").values()) == {403}


def test_api_key_serves_any_host(tmp_path: Path) -> None:
    with serving(Settings(folders(tmp_path, tmp_path / "none"), api_key="s3cret")) as url:
        port = urlsplit(url).port
        key = {"Authorization": "Bearer s3cret"}
        with httpx.Client(base_url=url, timeout=60) as client:
            for host in (f"{EVIL}:{port}", f"localhost:{port}"):
                statuses = requests(client, host, **key)
                assert 403 not in statuses.values() and 401 not in statuses.values(), (host, statuses)
                assert set(requests(client, host).values()) == {401}, host  # no key
                ws_handshake(url, host, **key)
                with pytest.raises(Exception, match="403"):
                    ws_handshake(url, host)
            # the Origin check stays
            cross = {"Host": f"{EVIL}:{port}", "Origin": "http://elsewhere.example", **key}
            assert client.get("/history", headers=cross).status_code == 403


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("localhost", "localhost"),
        ("localhost:7860", "localhost"),
        ("LOCALHOST:7860", "localhost"),
        ("localhost.", "localhost"),
        ("localhost.:7860", "localhost"),
        ("localhost:", "localhost"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[::1]:7860", "::1"),
        ("[::1]:", "::1"),
        ("::1", "::1"),
        ("Evil.Example:1", "evil.example"),
        (" evil.example ", "evil.example"),
        ("[::1]evil", "[::1]evil"),  # malformed: kept whole, so it matches no name
        ("[::1", "[::1"),
        ("localhost:x", "localhost:x"),
        ("", ""),
    ],
)
def test_host_name(value: str, name: str) -> None:
    assert host_name(value) == name


def test_loopback_names() -> None:
    for value in ("localhost", "LocalHost.:1", "127.0.0.1", "127.255.0.9:80", "[::1]:7860"):
        assert is_loopback(host_name(value)), value
    others = ("evil.example", "localhost.evil.example", "127.0.0.1.evil", "[::2]", "0.0.0.0", "", "[::1]x")
    for value in others:
        assert not is_loopback(host_name(value)), value


def test_allowed_hosts_option() -> None:
    assert host_names("evil.example,Box.LAN.:8080, x") == ("evil.example", "box.lan", "x")
    with pytest.raises(Exception, match="NAME"):
        host_names(",")


def test_missing_host_is_refused(base: str) -> None:
    """HTTP/1.0 may omit Host; without an API key such a request is refused (browsers always send it)."""
    with socket.create_connection(("127.0.0.1", urlsplit(base).port), timeout=5) as sock:
        sock.sendall(b"GET /history HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403") and b"--allowed-hosts" in reply
