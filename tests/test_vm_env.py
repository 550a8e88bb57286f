"""VM tests: real guests under QEMU on vnet (run with --run-vm-tests).

One Env with three nodes serves the connectivity and exec tests of this module, because a
cold boot under TCG costs seconds per node; tests that need their own Env make one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vmlab import Env
from vmlab.errors import AgentTimeout, CommandFailed

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def world():
    env = Env(name="test_vm_env")
    home = env.add_network(name="home", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
    dc = env.add_network(name="dc", wan_ip="5.6.7.8", lan="10.0.5.0/24", nat="one2one")
    a = env.add_node(home, name="alice")
    b = env.add_node(home, name="bob")
    c = env.add_node(dc, name="carol")
    try:
        env.start()
        yield env, home, dc, a, b, c
    except BaseException:
        env.keep_work_dir = True
        raise
    finally:
        env.close()


def test_lan_ping_both_ways(world):
    _env, _home, _dc, a, b, _c = world
    assert a.ping(b.lan_ip()).received > 0
    r = b.ping(a.lan_ip(), count=2)
    assert r.received == 2 and r.loss == 0 and len(r.rtts_ms) == 2


def test_agent_reports_dhcp_address(world):
    _env, _home, _dc, a, _b, _c = world
    st = a.status()
    assert st["hostname"] == "alice"
    eth0 = [i for i in st["interfaces"] if i["name"] == "eth0"][0]
    assert eth0["mac"] == a.mac and f"{a.lan_ip()}/24" in eth0["ipv4"]


def test_natted_node_reaches_public_node(world):
    _env, _home, _dc, a, b, c = world
    assert a.ping(c.wan_ip()).received > 0
    assert b.ping(c.wan_ip()).received > 0


def test_tcp_through_nat_arrives_from_wan_ip(world):
    _env, _home, _dc, a, _b, c = world
    c.exec("python3 -m http.server 8081 >/tmp/t.log 2>&1 &", check=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            resp = a.http_get(f"http://{c.wan_ip()}:8081/", timeout_s=5)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert resp.status == 200
    assert "2.1.1.1" in c.exec("cat /tmp/t.log").stdout


def test_unsolicited_inbound_is_dropped(world):
    env, home, _dc, a, _b, c = world
    assert c.ping(home.wan_ip, count=2, timeout_s=2).received == 0
    assert c.ping(a.lan_ip(), count=2, timeout_s=2).received == 0
    drops = env.vnet_drops()
    assert any("unsolicited" in reason for reason in drops), drops


def test_exec_exit_codes_and_streams(world):
    *_, a, _b, _c = world
    r = a.exec("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = a.exec(["printf", "a b\\0c"])
    assert r.exit_code == 0 and r.stdout_bytes == b"a b\0c"
    with pytest.raises(CommandFailed) as err:
        a.exec(["false"], check=True)
    assert err.value.exit_code == 1 and err.value.node == "alice"
    r = a.exec(["/no/such/program"])
    assert r.exit_code == 127


def test_exec_large_output(world):
    *_, a, _b, _c = world
    r = a.exec("head -c 3000000 /dev/zero | tr '\\0' x", timeout_s=120)
    assert r.exit_code == 0 and r.stdout_bytes == b"x" * 3_000_000


def test_exec_timeout_kills_command(world):
    *_, a, _b, _c = world
    r = a.exec("sleep 30; echo never", timeout_s=1)
    assert r.timed_out and "never" not in r.stdout
    assert a.exec("pgrep -f 'sleep 30' || true").stdout.strip() == ""


def test_agent_timeout_names_node_and_shows_console(tmp_path):
    env = Env(name="timeout", agent_timeout_s=0.3)
    net = env.add_network(wan_ip="3.3.3.3", lan="192.168.9.0/24")
    # A cold boot: no guest boots in 0.3 s, while a snapshot restore now sometimes connects
    # that fast (this test then saw no timeout).
    env.add_node(net, name="slowpoke", cold_boot=True)
    with pytest.raises(AgentTimeout) as err:
        env.start()
    assert "slowpoke" in str(err.value) and err.value.node == "slowpoke"
    assert env._state == "closed"
    # the console the message points at is still there to read
    console = env.work_dir / "slowpoke" / "console.log"
    assert str(console) in str(err.value) and console.exists()
    import shutil
    shutil.rmtree(env.work_dir)


CHILD = textwrap.dedent("""
    import sys, time
    from vmlab import Env
    env = Env(name="orphan")
    net = env.add_network(wan_ip="4.4.4.4", lan="192.168.4.0/24")
    env.add_node(net, name="victim")
    env.agent_timeout_s = 600
    import threading
    def report():
        while True:
            n = env.nodes[0]
            if n.vm is not None and n.vm.pid:
                print(n.vm.pid, flush=True)
                return
            time.sleep(0.05)
    threading.Thread(target=report, daemon=True).start()
    env.start()
    time.sleep(600)
""")


def test_no_qemu_survives_a_killed_test_process(tmp_path):
    # TMPDIR: the killed process cannot remove its work dir; let pytest's tmp_path hold it.
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        qemu_pid = int(child.stdout.readline())
        assert os.path.exists(f"/proc/{qemu_pid}")
        with open(f"/proc/{qemu_pid}/cmdline", "rb") as f:
            assert b"qemu-system" in f.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    state = ""
    if os.path.exists(f"/proc/{qemu_pid}"):
        state = open(f"/proc/{qemu_pid}/stat").read().split()[2]
    assert state in ("", "Z"), f"QEMU {qemu_pid} outlived its test process (state {state})"
