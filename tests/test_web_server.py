"""The dashboard server (no VMs): page, assets, /screenshot, /ws, addresses and ports."""
from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest

from vmlab.errors import ConfigError
from vmlab.web.dashboard import Dashboard
from vmlab.web.eventbus import EventKind
from vmlab.web.server import parse_addr, stable_port


@pytest.mark.parametrize("addr,want", [
    (None, ("127.0.0.1", 0)), ("", ("127.0.0.1", 0)), ("8080", ("127.0.0.1", 8080)),
    (":8080", ("127.0.0.1", 8080)), ("0.0.0.0:0", ("0.0.0.0", 0)), ("localhost", ("localhost", 0)),
    ("[::1]:9000", ("::1", 9000)),
])
def test_parse_addr(addr, want):
    assert parse_addr(addr) == want


@pytest.mark.parametrize("addr", ["host:99999", "host:http", "[::1"])
def test_parse_addr_rejects(addr):
    with pytest.raises(ConfigError):
        parse_addr(addr)


def test_stable_port_is_deterministic_and_in_range():
    assert stable_port("test_nat") == stable_port("test_nat")
    assert stable_port("test_nat") != stable_port("test_dhcp")
    assert all(20000 <= stable_port(f"t{i}") < 40000 for i in range(200))


def make_dash(title: str) -> Dashboard:
    dash = Dashboard(title, web="127.0.0.1:0")
    dash.plan_node("alice", "appliance", [("home", "52:CC:CC:CC:CC:01", "192.168.1.101")])
    return dash


async def _with_server(title, body):
    dash = make_dash(title)
    url = await dash.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            await body(dash, url, http)
    finally:
        await dash.stop_server()


def test_stable_port_used_then_fallback_when_taken():
    title = "test_web_server_port_fallback"

    async def first(dash, url, http):
        assert dash.server.port == stable_port(title)

    asyncio.run(_with_server(title, first))
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", stable_port(title)))
        blocker.listen()

        async def second(dash, url, http):
            assert dash.server.port not in (0, stable_port(title))
            async with http.get(url) as r:
                assert r.status == 200
        asyncio.run(_with_server(title, second))


def test_page_assets_and_screenshot_endpoint():
    async def body(dash, url, http):
        async with http.get(url) as r:
            page = await r.text()
            assert r.status == 200 and "test&lt;x&gt;" in page and "/static/app.js" in page
            assert "http://" not in page.replace(url, "") and "https://" not in page  # no CDN
        for name in ("app.js", "style.css"):
            async with http.get(url + f"static/{name}") as r:
                assert r.status == 200 and len(await r.read()) > 500
        for bad in ("static/index.html", "static/..%2F__init__.py", "screenshot/mallory",
                    "screenshot/..%2F..%2Fetc%2Fpasswd", "screenshot/alice"):  # alice: no screen yet
            async with http.get(url + bad) as r:
                assert r.status == 404, bad
        dash.board.full_screens["alice"] = b"\x89PNG fake"
        async with http.get(url + "screenshot/alice") as r:
            assert r.status == 200 and r.content_type == "image/png"
            assert await r.read() == b"\x89PNG fake"

    asyncio.run(_with_server("test<x>", body))


def test_websocket_sends_state_then_history_then_live_events():
    async def body(dash, url, http):
        dash.publish(EventKind.CONSOLE, "alice", "before")
        dash.on_vnet_event("dhcp", {"network": "home", "kind": "ack", "mac": "52:cc:cc:cc:cc:01",
                                    "ip": "192.168.1.101", "hostname": "alice"})
        dash.publish(EventKind.SCREENSHOT, "alice", "screenshot", thumbnail="data:x")
        async with http.ws_connect(url + "ws") as ws:
            state = json.loads((await ws.receive(timeout=5)).data)
            assert state["type"] == "state" and state["seq"] == 3
            alice = state["nodes"][0]
            assert alice["console"] == ["before"] and alice["screenshot"] == "data:x"
            assert alice["nics"][0]["dhcp"] == "Got 192.168.1.101"
            replay = [json.loads((await ws.receive(timeout=5)).data) for _ in range(2)]
            assert [e["kind"] for e in replay] == ["console_output", "dhcp_ack"]
            assert replay[1]["node"] == "alice"
            dash.publish(EventKind.CONSOLE, "alice", "after")
            live = json.loads((await ws.receive(timeout=5)).data)
            assert (live["type"], live["message"], live["seq"]) == ("event", "after", 4)

    asyncio.run(_with_server("ws", body))


def test_websocket_of_a_page_that_fell_behind_is_closed_for_a_resync(monkeypatch):

    async def body(dash, url, http):
        orig = dash.bus.subscribe
        monkeypatch.setattr(dash.bus, "subscribe", lambda **kw: orig(capacity=3))
        for i in range(10):
            dash.publish(EventKind.CONSOLE, "alice", f"l{i}")
        async with http.ws_connect(url + "ws") as ws:
            msgs = []
            while True:
                m = await ws.receive(timeout=5)
                if m.type != aiohttp.WSMsgType.TEXT:
                    break
                msgs.append(json.loads(m.data))
            assert msgs[0]["type"] == "state"
            assert ws.close_code == 1013

    asyncio.run(_with_server("behind", body))
