"""Bad Env specifications fail early with errors that name the cause and the fix (no VM)."""
from __future__ import annotations

import os

import pytest

from vmlab import Env
from vmlab.errors import ConfigError, EnvironmentProblem, StateError


def test_overlapping_lans_are_rejected():
    env = Env()
    env.add_network(wan_ip="2.1.1.1", lan="192.168.0.0/16")
    with pytest.raises(ConfigError, match="overlaps .* own prefix"):
        env.add_network(wan_ip="2.1.1.2", lan="192.168.1.0/24")


def test_wan_ip_used_twice_is_rejected():
    env = Env()
    env.add_network(wan_ip="2.1.1.1", lan="192.168.1.0/24")
    with pytest.raises(ConfigError, match="2.1.1.1 is already net1's"):
        env.add_network(wan_ip="2.1.1.1", lan="192.168.2.0/24")


@pytest.mark.parametrize("wan, msg", [
    ("10.1.1.1", "not a public address"),
    ("52.52.0.9", "keeps for its own services"),
    ("nonsense", "give wan_ip like"),
])
def test_bad_wan_ip(wan, msg):
    with pytest.raises(ConfigError, match=msg):
        Env().add_network(wan_ip=wan, lan="192.168.1.0/24")


def test_unknown_nat_type_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown NAT type 'weird'.*easy"):
        Env().add_network(wan_ip="2.1.1.1", nat="weird")


def test_node_without_network():
    with pytest.raises(ConfigError, match="at least one network"):
        Env().add_node()


def test_node_on_foreign_network():
    other = Env().add_network(wan_ip="2.1.1.1")
    with pytest.raises(ConfigError, match="not a network of this Env"):
        Env().add_node(other)


def test_unknown_image_lists_known_ones():
    env = Env()
    net = env.add_network(wan_ip="2.1.1.1")
    with pytest.raises(ConfigError, match="unknown image 'windows95'.*appliance"):
        env.add_node(net, image="windows95")


def test_one2one_takes_one_node():
    env = Env()
    net = env.add_network(wan_ip="2.1.1.1", nat="one2one")
    env.add_node(net, name="first")
    with pytest.raises(ConfigError, match="one2one .* exactly one node"):
        env.add_node(net)


def test_start_without_nodes_and_use_before_start():
    env = Env()
    with pytest.raises(ConfigError, match="no nodes"):
        env.start()
    net = env.add_network(wan_ip="2.1.1.1")
    node = env.add_node(net)
    with pytest.raises(StateError, match="call env.start"):
        node.exec("true")


def test_unwritable_cache_is_reported(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("")
        monkeypatch.setenv("VMLAB_CACHE", str(blocker / "cache"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv("VMLAB_CACHE", str(ro / "cache"))
    env = Env()
    env.add_node(env.add_network(wan_ip="2.1.1.1"))
    with pytest.raises(EnvironmentProblem, match="not writable.*VMLAB_CACHE"):
        env.start()


def test_missing_qemu_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no qemu-system-x86_64
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "cache"))
    env = Env()
    env.add_node(env.add_network(wan_ip="2.1.1.1"))
    with pytest.raises(EnvironmentProblem, match="qemu-system-x86_64 not found.*apt-get install"):
        env.start()


def test_lan_over_vmlab_service_addresses_is_rejected():
    with pytest.raises(ConfigError, match="52.52.0.0/24, where vmlab runs its own services"):
        Env().add_network(wan_ip="2.1.1.1", lan="52.52.0.0/16")


def test_overlap_with_default_lan_says_it_is_the_default():
    env = Env()
    env.add_network(wan_ip="2.1.1.1")
    with pytest.raises(ConfigError, match=r"lan defaults to 192.168.0.0/24.*lan=\"192.168.2.0/24\""):
        env.add_network(wan_ip="2.1.1.2")
