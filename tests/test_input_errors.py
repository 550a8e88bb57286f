"""Bad input to the public API fails at once, with a ConfigError naming the cause and the
fix, before any image is built or VM booted. No VM here."""
from __future__ import annotations

import base64
import io
import re
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from vmlab import ConfigError, Env, ImageSpec, Provision
from vmlab.cli import main as cli
from vmlab.files import pack

SHA = "a" * 64


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="debian", packages="curl"), "must be a list"),
    (dict(kind="debian", packages=None), "must be a list"),
    (dict(kind="debian", packages=[1, "curl"]), "not Debian package names"),
    (dict(kind="debian", packages=["Bad Name!"]), "not Debian package names"),
    (dict(kind="debian", packages=["-rf"]), "not Debian package names"),
    (dict(kind="cloud", url="http://x/y.qcow2", sha256=SHA), "https:// or file://"),
    (dict(kind="cloud", url="ftp://x/y.qcow2", sha256=SHA), "https:// or file://"),
    (dict(kind="cloud", url="https://x/y.qcow2", sha256="abc"), "64 hex"),
    (dict(kind="cloud", url="https://x/y.qcow2", sha256="z" * 64), "64 hex"),
    (dict(kind="cloud", url="https://x/y.qcow2", sha256=12345), "64 hex"),
    (dict(kind="cloud", url="https://x/y.qcow2", sha256=b"\xaa" * 32), "64 hex"),
    (dict(kind=None), "unknown image"),
], ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None)
def test_image_specs_are_checked_when_made(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ImageSpec(**kwargs)


def test_a_cloud_specs_sha256_is_taken_in_either_case():
    assert ImageSpec("cloud", url="file:///x.qcow2", sha256="AB" * 32).sha256 == "ab" * 32


@pytest.mark.parametrize("kwargs, match", [
    (dict(commands=None), "list of command lines"),
    (dict(commands=b"echo"), "list of command lines"),
    (dict(commands=[1, 2]), "non-empty shell command line"),
    (dict(commands=[["apt-get", "update"]]), "shlex.join"),
    (dict(commands=[""]), "non-empty"),
    (dict(files=None), "must be a dict"),
    (dict(files=[("/a", "x")]), "must be a dict"),
    (dict(timeout_s="10"), "positive number"),
    (dict(timeout_s=-5), "positive number"),
    (dict(files={"/": "hi"}), "plainly"),
    (dict(files={"/srv/": "hi"}), "plainly"),
    (dict(files={"/srv/../etc/passwd": "x"}), "plainly"),
    (dict(files={"/a": "x", "/a/b": "y"}), "also the folder"),
], ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None)
def test_provisions_are_checked_when_made(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Provision("p", **kwargs)


@pytest.fixture
def env():
    env = Env(name="t")
    env.lan = env.add_network(name="net1", wan_ip="2.1.1.1")
    return env


@pytest.mark.parametrize("kwargs, match", [
    (dict(image=["debian"]), "image name like"),
    (dict(name=123), "hostname"),
    (dict(name=""), "hostname"),
    (dict(name="my node/1"), "hostname"),
    (dict(name="../x"), "hostname"),
    (dict(name="/etc/evil"), "hostname"),
    (dict(name="x" * 64), "hostname"),
    (dict(cold_boot="no"), "True or False"),
    (dict(no_agent="no"), "True or False"),
    (dict(memory_mb=10 ** 7), "65536"),
    (dict(memory_mb=True), "65536"),
], ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None)
def test_add_node_checks_its_options(env, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        env.add_node(env.lan, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(snapshots="no"), "True or False"),
    (dict(accel="nonsense"), "'kvm', 'tcg' or None"),
    (dict(agent_timeout_s=-1), "positive"),
    (dict(agent_timeout_s="60"), "positive"),
])
def test_env_checks_its_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Env(**kwargs)


def test_lan_ping_names_what_is_wrong(env):
    dark = env.add_node(env.lan, name="dark", no_agent=True)
    other = env.add_network(name="net2", wan_ip="3.1.1.1", lan="192.168.2.0/24")
    far = env.add_node(other, name="far")
    with pytest.raises(ConfigError, match="not a node of this Env"):
        env.lan_ping(None)
    with pytest.raises(ConfigError, match="network 'net2' is not one dark is on.*net1"):
        env.lan_ping(dark, network="net2")
    with pytest.raises(ConfigError, match="dark and far share no LAN"):
        env.lan_ping(dark, source=far)
    with pytest.raises(ConfigError, match="source far is not on net1"):
        env.lan_ping(dark, source=far, network=env.lan)
    # A network given by name is the network: the next complaint is that nothing runs yet.
    with pytest.raises(Exception, match="start"):
        env.lan_ping(dark, network="net1")


def test_node_file_and_exec_arguments(env, tmp_path):
    node = env.add_node(env.lan, name="n")
    with pytest.raises(ConfigError, match="argv list of str"):
        node.exec(123)
    with pytest.raises(ConfigError, match="argv list of str"):
        node.exec([])
    f = tmp_path / "a.txt"
    f.write_text("x")
    assert pack(f, PurePosixPath("/opt/x"))[0] == "/opt"       # a guest path as a PurePosixPath
    assert pack(f, "/opt/")[0] == "/opt"                       # into the folder, as cp does
    _dest, b64 = pack(f, "/opt/")
    names = tarfile.open(fileobj=io.BytesIO(base64.b64decode(b64))).getnames()
    assert names == ["a.txt"]
    with pytest.raises(ConfigError, match="absolute path in the guest"):
        pack(f, Path("relative"))


@pytest.mark.parametrize("argv, match", [
    (["demo", "--images", ","], "no image named"),
    (["demo", "--images", "appliance,nosuch"], "unknown image 'nosuch'"),
    (["image", "build", "debian", "nosuch"], "unknown image 'nosuch'"),
    (["image", "build", "cloud"], "needs a URL and sha256"),
])
def test_the_cli_checks_every_image_name_before_building_or_booting(argv, match, capsys):
    assert cli(argv) == 2
    assert re.search(match, capsys.readouterr().err)
