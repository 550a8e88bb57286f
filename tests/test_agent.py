"""The guest agent, run on the host against a fake driver.

The agent is started as a subprocess (`--driver 127.0.0.1:PORT --no-dhcp`); FakeDriver accepts
its connections on an asyncio loop in a thread, reads each hello line and speaks HTTP/1.1 to it
as the real driver does.
"""
from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmlab.agent import agent as agent_mod

AGENT = Path(agent_mod.__file__)


class Conn:
    """One agent connection as the driver sees it."""

    def __init__(self, driver: "FakeDriver", reader, writer, hello: dict):
        self.driver, self.reader, self.writer, self.hello = driver, reader, writer, hello

    async def _request(self, method: str, path: str, body) -> tuple[int, dict]:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        assert headers["content-type"] == "application/json"
        payload = await self.reader.readexactly(int(headers["content-length"]))
        return status, json.loads(payload)

    def request(self, method: str, path: str, body=None, timeout: float = 30) -> tuple[int, dict]:
        return self.driver.call(self._request(method, path, body), timeout)

    def close(self) -> None:
        async def _close():
            self.writer.close()
        self.driver.call(_close(), 5)


class FakeDriver:
    """Accepts agent connections; `next_conn()` returns them in arrival order."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conns: asyncio.Queue = None
        self.server = self.call(self._start(), 5)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self):
        self.conns = asyncio.Queue()
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader, writer):
        line = await reader.readline()
        assert line.startswith(b"VMLAB-AGENT 1 "), line
        hello = json.loads(line[len(b"VMLAB-AGENT 1 "):])
        await self.conns.put(Conn(self, reader, writer, hello))

    def call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def next_conn(self, timeout: float = 10) -> Conn:
        async def _get():
            return await asyncio.wait_for(self.conns.get(), timeout)
        return self.call(_get(), timeout + 1)

    def pending(self) -> int:
        async def _n():
            return self.conns.qsize()
        return self.call(_n(), 5)

    def close(self):
        async def _stop():
            self.server.close()
        self.call(_stop(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def driver():
    d = FakeDriver()
    yield d
    d.close()


@pytest.fixture
def agent(driver, tmp_path):
    """The agent process, dialling `driver`; yields its console log path."""
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(AGENT), "--driver", f"127.0.0.1:{driver.port}", "--no-dhcp",
             "--hostname", "test-node"], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield log
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def conn(driver, agent) -> Conn:
    return driver.next_conn()


def exec_(conn: Conn, **body) -> dict:
    status, reply = conn.request("POST", "/exec", body, timeout=body.get("timeout_s", 60) + 10)
    assert status == 200, reply
    reply["stdout"] = base64.b64decode(reply["stdout_b64"])
    reply["stderr"] = base64.b64decode(reply["stderr_b64"])
    return reply


def test_hello(driver, agent):
    first, second = driver.next_conn(), driver.next_conn()
    for c in (first, second):
        assert set(c.hello) == {"mac", "hostname", "version", "conn_id", "instance"}
        assert c.hello["hostname"] == "test-node"
        assert c.hello["version"] == agent_mod.AGENT_VERSION
        assert isinstance(c.hello["conn_id"], int)
        assert c.hello["mac"] == c.hello["mac"].lower()
    assert first.hello["conn_id"] != second.hello["conn_id"]
    # One process, one instance; the driver drops a pool's connections when it changes.
    assert first.hello["instance"] == second.hello["instance"] != ""
    # The agent logs this after its hello went out: give it a moment.
    deadline = time.monotonic() + 5
    while "connected to driver 127.0.0.1" not in agent.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "connected to driver 127.0.0.1" in agent.read_text()


def test_exec_argv_exit_codes_and_streams(conn):
    r = exec_(conn, argv=["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r["exit_code"], r["stdout"], r["stderr"], r["timed_out"]) == (3, b"out\n", b"err\n", False)
    assert r["duration_s"] >= 0
    r = exec_(conn, argv=["true"])
    assert r["exit_code"] == 0


def test_exec_shell_stdin_env_cwd(conn, tmp_path):
    r = exec_(conn, shell="cat; echo $FOO; pwd", stdin_b64=base64.b64encode(b"in\x00put\n").decode(),
              env={"FOO": "bar"}, cwd=str(tmp_path))
    assert r["exit_code"] == 0
    assert r["stdout"] == b"in\x00put\nbar\n" + str(tmp_path).encode() + b"\n"


def test_exec_large_output_is_byte_exact(conn):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 8192)"  # 2 MiB
    r = exec_(conn, argv=[sys.executable, "-c", script])
    assert r["exit_code"] == 0
    assert r["stdout"] == bytes(range(256)) * 8192


def test_exec_timeout_kills_process_group(conn):
    t0 = time.monotonic()
    r = exec_(conn, shell="sleep 30 & echo $!; echo started; sleep 30", timeout_s=1)
    assert time.monotonic() - t0 < 10
    assert r["timed_out"] is True and r["exit_code"] == -9
    child_pid, marker = r["stdout"].split()
    assert marker == b"started"  # output written before the timeout is kept
    deadline = time.monotonic() + 5
    while Path(f"/proc/{int(child_pid)}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{int(child_pid)}/stat").read_text() if Path(f"/proc/{int(child_pid)}").exists() else ""
        if ") Z " in stat:  # a zombie waiting for its reaper is dead enough
            break
        time.sleep(0.05)
    alive = Path(f"/proc/{int(child_pid)}/stat")
    assert not alive.exists() or ") Z " in alive.read_text(), "background sleep survived the timeout"


def test_exec_missing_program_is_127(conn):
    r = exec_(conn, argv=["/nonexistent/program", "x"])
    assert r["exit_code"] == 127
    assert b"/nonexistent/program" in r["stderr"]


def test_bad_requests(conn):
    status, reply = conn.request("POST", "/exec", {"argv": "not a list"})
    assert status == 400 and "argv" in reply["error"]
    status, reply = conn.request("POST", "/exec", {})
    assert status == 400
    status, reply = conn.request("GET", "/nope")
    assert status == 404 and "/status" in reply["error"]
    status, reply = conn.request("GET", "/status")  # the connection survives bad requests
    assert status == 200


def test_status(conn):
    status, reply = conn.request("GET", "/status")
    assert status == 200
    assert reply["version"] == agent_mod.AGENT_VERSION
    assert reply["hostname"] == socket.gethostname()
    assert reply["uptime_s"] > 0 and abs(reply["time"] - time.time()) < 60
    assert isinstance(reply["os"], str) and reply["os"]
    lo = [i for i in reply["interfaces"] if i["name"] == "lo"]
    assert lo and lo[0]["up"] is True
    if shutil.which("ip"):
        assert "127.0.0.1/8" in lo[0]["ipv4"]


@pytest.mark.skipif(not (shutil.which("busybox") or shutil.which("ping")),
                    reason="needs busybox or ping on the host (apt-get install busybox)")
def test_ping_loopback(conn):
    status, reply = conn.request("POST", "/ping", {"address": "127.0.0.1", "count": 2, "timeout_s": 5})
    assert status == 200, reply
    assert reply["transmitted"] == 2 and reply["received"] == 2, reply["output"]
    assert reply["loss"] == 0.0 and len(reply["rtts_ms"]) == 2
    assert all(isinstance(x, float) for x in reply["rtts_ms"])


def test_parse_ping_unanswered():
    out = "PING 10.9.9.9 (10.9.9.9): 56 data bytes\n\n--- 10.9.9.9 ping statistics ---\n" \
          "3 packets transmitted, 0 packets received, 100% packet loss\n"
    assert agent_mod.parse_ping(out) == (3, 0, [])


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello " + self.path.encode()
        self.send_response(201)
        self.send_header("X-Test", "yes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_get(conn):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        status, reply = conn.request("POST", "/http_get", {"url": f"http://127.0.0.1:{port}/x?y=1"})
        assert status == 200, reply
        assert reply["status"] == 201 and reply["headers"]["X-Test"] == "yes"
        assert base64.b64decode(reply["body_b64"]) == b"hello /x?y=1"
    finally:
        server.shutdown()
        server.server_close()
    # A refused connection is a transport failure: 200 with "error", not an agent failure.
    status, reply = conn.request("POST", "/http_get", {"url": f"http://127.0.0.1:{port}/", "timeout_s": 2})
    assert status == 200 and "error" in reply and "status" not in reply


def test_keeps_two_idle_connections(driver, agent):
    a, b = driver.next_conn(), driver.next_conn()
    time.sleep(0.5)
    assert driver.pending() == 0, "more than two idle connections"
    assert a.request("GET", "/status")[0] == 200
    c = driver.next_conn(timeout=5)  # a became busy: one more is dialled
    time.sleep(0.5)
    assert driver.pending() == 0
    # The busy connection keeps working (keep-alive) alongside the others.
    assert a.request("GET", "/status")[0] == 200
    assert c.request("GET", "/status")[0] == 200


def test_reconnects_after_driver_closes_all(driver, agent):
    first = [driver.next_conn(), driver.next_conn()]
    ids = {c.hello["conn_id"] for c in first}
    for c in first:
        c.close()
    again = [driver.next_conn(timeout=10), driver.next_conn(timeout=10)]
    assert ids.isdisjoint(c.hello["conn_id"] for c in again)
    assert again[0].request("GET", "/status")[0] == 200


def test_concurrent_requests_on_separate_connections(driver, agent):
    a, b = driver.next_conn(), driver.next_conn()
    results = {}

    def slow():
        results["slow"] = a.request("POST", "/exec", {"shell": "sleep 1; echo slow"})

    t = threading.Thread(target=slow)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.1)
    assert b.request("POST", "/exec", {"argv": ["echo", "fast"]})[0] == 200
    assert time.monotonic() - t0 < 0.9, "a slow request on one connection blocked another"
    t.join(10)
    assert results["slow"][0] == 200


def test_nic_names_follow_pci_order_whatever_the_guest_calls_them(tmp_path):
    """NIC i of the host channel config is the guest's i-th NIC in PCI order: udev's
    predictable names (cloud images) sort differently from the slots, and virtual
    interfaces have no device at all."""
    devices = tmp_path / "devices/pci0000:00"
    net = tmp_path / "class/net"
    net.mkdir(parents=True)
    for name, slot in (("ens10", "0000:00:03.0"), ("ens4", "0000:00:0a.0"),
                       ("ens3", "0000:00:02.0")):
        dev = devices / slot / "virtio1"
        dev.mkdir(parents=True)
        (net / name).mkdir()
        (net / name / "device").symlink_to(dev)
    for virtual in ("lo", "wg0"):
        (net / virtual).mkdir()
    assert agent_mod.nic_names(str(net)) == ["ens3", "ens10", "ens4"]
    assert agent_mod.nic_names(str(tmp_path / "missing")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="vhangup(2) needs CAP_SYS_TTY_CONFIG")
def test_log_survives_a_getty_hanging_up_the_console(tmp_path):
    """A getty starting on the agent's serial console calls vhangup(2): every descriptor
    open on that tty then fails with EIO. In a cloud image (serial-getty@ttyS0 on) the agent
    died silently on its next line and its first connection to the driver with it."""
    import ctypes
    import select
    import signal
    master, slave = os.openpty()
    tty = os.ttyname(slave)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom vmlab.agent import agent\nagent.log('before')\n"
                               "sys.stdin.readline()\nagent.log('after')\n"],
        stdin=subprocess.PIPE, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        deadline = time.monotonic() + 10
        seen = b""
        while b"before" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        pid = os.fork()
        if pid == 0:  # a getty's move: take the tty as controlling terminal, hang it up
            try:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                os.setsid()
                os.open(tty, os.O_RDWR)
                os._exit(0 if ctypes.CDLL(None, use_errno=True).vhangup() == 0 else 1)
            finally:
                os._exit(2)
        assert os.waitpid(pid, 0)[1] == 0
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.wait(timeout=10) == 0, child.stderr.read().decode()
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                out += os.read(master, 4096)
            except OSError:
                break
        assert b"vmlab-agent: after" in out
    finally:
        child.kill()
        os.close(master)
