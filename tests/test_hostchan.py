"""The host channel protocol, both ends for real, over a unix socket standing in for the
virtio-serial chardev (QEMU's side is a plain stream socket it listens on)."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading

import pytest

from vmlab.agent import agent as guest
from vmlab.hostchan import HostChannel


def _guest_end(path):
    """Listen where QEMU would and hand the accepted socket to the guest side."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_poll_wait_then_config_then_applied_and_up(tmp_path):
    path = tmp_path / "hc.sock"
    server = _guest_end(path)
    results = {}

    def guest_side():
        conn, _ = server.accept()
        conn.setblocking(False)
        chan = guest.HostChannel(conn.detach(), "test", is_socket=True)
        results["config"] = chan.wait_for_config({"state": "waiting"})
        chan.applied({"mode": "static"}, timeout_s=5)
        results["up"] = True

    async def main():
        applied = []

        async def on_applied(info):
            applied.append(info)

        host = HostChannel("n1", path, on_applied=on_applied)
        host.start()
        t = threading.Thread(target=guest_side, daemon=True)
        t.start()
        await asyncio.wait_for(host.wait_polled(3), 10)  # the guest keeps polling, gets "wait"
        assert "config" not in results
        host.set_config({"ip": "192.168.1.101", "hostname": "alice"})
        await asyncio.wait_for(host.applied.wait(), 10)
        await asyncio.to_thread(t.join, 10)
        assert applied == [{"mode": "static"}]
        await host.close()

    asyncio.run(main())
    assert results["config"] == {"ip": "192.168.1.101", "hostname": "alice"}
    assert results["up"]


def test_guest_accepts_wait_without_newline_and_pushed_config():
    a, b = socket.socketpair()
    b.setblocking(False)
    chan = guest.HostChannel(b.detach(), "pair", is_socket=True)
    a.sendall(b"wait")
    assert chan.read_line(1.0) == "wait"
    a.sendall(b'{"ip": "10.0.0.5"}\n')
    assert chan.read_line(1.0) == '{"ip": "10.0.0.5"}'
    assert chan.read_line(0.05) is None


def test_config_set_before_connect_is_pushed_on_connect(tmp_path):
    # A restored guest is blocked waiting for an answer to a poll it sent before the save:
    # the host must not wait for a new poll.
    path = tmp_path / "hc.sock"

    async def main():
        accepted: asyncio.Queue = asyncio.Queue()
        server = await asyncio.start_unix_server(
            lambda r, w: accepted.put_nowait((r, w)), str(path))
        host = HostChannel("n1", path)
        host.set_config({"ip": "10.0.0.9"})
        host.start()
        reader, writer = await asyncio.wait_for(accepted.get(), 5)
        assert await asyncio.wait_for(reader.readline(), 5) == b'{"ip":"10.0.0.9"}\n'
        await host.close()
        writer.close()
        server.close()

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_configure_nic_sets_mac_address_and_default_route():
    ns = f"vmlab-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = ("from vmlab.agent.agent import configure_nic; "
                "configure_nic('v0', '52:cc:cc:cc:01:00', '10.9.8.101', '255.255.255.0', '10.9.8.1')")
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                        "ip link add v0 type veth peer name v1 && ip link set v1 up"], check=True)
        import sys
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True)
        addr = subprocess.run(["ip", "netns", "exec", ns, "ip", "addr", "show", "v0"],
                              capture_output=True, text=True, check=True).stdout
        route = subprocess.run(["ip", "netns", "exec", ns, "ip", "route"],
                               capture_output=True, text=True, check=True).stdout
        assert "52:cc:cc:cc:01:00" in addr and "10.9.8.101/24" in addr and "UP" in addr
        assert "default via 10.9.8.1 dev v0" in route
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_rename_in_hosts_replaces_the_snapshot_name(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost vmlab-snapshot\n::1 localhost ip6-localhost\n")
    guest.rename_in_hosts("vmlab-snapshot", "alice", str(hosts))
    assert hosts.read_text() == "127.0.0.1 localhost alice\n::1 localhost ip6-localhost\n"
    hosts.write_text("127.0.0.1 localhost\n")
    guest.rename_in_hosts("debian", "bob", str(hosts))
    assert hosts.read_text() == "127.0.0.1 localhost\n127.0.1.1 bob\n"
