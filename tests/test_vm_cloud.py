"""VM tests for the `cloud` image kind (--run-vm-tests): a qcow2 that vmlab knows nothing about
but its URL and sha256, booted by its own bootloader, given vmlab's SSH key by cloud-init.

No cloud image can be downloaded here, so the qcow2 is built locally the way Debian builds its
generic cloud images (images/cloudbuild.py: GRUB, initramfs-tools, udev, cloud-init) and handed
to vmlab as a `file://` URL. Nothing of vmlab is in it: the agent arrives over SSH at snapshot
preparation, as it would on a downloaded image.
"""
from __future__ import annotations

import pytest

from vmlab import Env
from vmlab.images import cloudbuild, ensure_image

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def local_cloud():
    return cloudbuild.ensure()


@pytest.fixture(scope="module")
def world(local_cloud):
    env = Env(name="test_vm_cloud")
    lan = env.add_network(name="lan", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
    gk = env.add_node(lan, name="gk")
    cl = env.add_node(lan, name="cl", image=local_cloud.spec())
    # A cold boot has no host-channel config: the agent runs DHCP, with the busybox it
    # brought (the image has none).
    cold = env.add_node(lan, name="cold", image=local_cloud.spec(), cold_boot=True)
    try:
        env.start()
        yield env, gk, cl, cold
    except BaseException:
        env.keep_work_dir = True
        raise
    finally:
        env.close()


def test_cloud_node_is_restored_from_a_snapshot(world):
    _env, gk, cl, _cold = world
    assert [n.boot_mode for n in (gk, cl)] == ["restore", "restore"], \
        [(n.name, n.fallback_reason) for n in (gk, cl)]


def test_it_booted_through_its_own_grub_and_cloud_init_took_the_seed(world, local_cloud):
    _env, _gk, cl, _cold = world
    cmdline = cl.exec("cat /proc/cmdline", check=True).stdout
    # GRUB, not QEMU's -kernel, started this kernel: only GRUB sets BOOT_IMAGE.
    assert "BOOT_IMAGE=/boot/vmlinuz-" in cmdline and "vmlab." not in cmdline
    ds = cl.exec("cat /run/cloud-init/status.json", check=True).stdout
    assert "DataSourceNoCloud" in ds and "/dev/vdb" in ds
    pub = ensure_image(local_cloud.spec()).ssh_key.with_suffix(".pub").read_text().split()[1]
    assert pub in cl.exec("cat /root/.ssh/authorized_keys", check=True).stdout


def test_agent_finds_its_nic_under_a_predictable_name(world):
    _env, _gk, cl, _cold = world
    nics = {i["mac"]: i for i in cl.status()["interfaces"]}
    mine = nics[cl.mac]
    assert not mine["name"].startswith("eth"), mine  # udev named it (ens3 ...)
    assert mine["up"] and mine["ipv4"] == [f"{cl.lan_ip()}/24"]
    prep = nics["52:cc:cc:cc:fe:00"]
    assert prep["ipv4"] == [] and not prep["up"]
    route = cl.exec("ip route show default", check=True).stdout.split()
    assert route[:5] == ["default", "via", "192.168.1.1", "dev", mine["name"]]


def test_cloud_node_and_appliance_ping_each_other_and_reach_the_internet(world):
    env, gk, cl, _cold = world
    assert cl.ping(gk.lan_ip(), count=2).received > 0
    assert gk.ping(cl.lan_ip(), count=2).received > 0
    assert env.lan_ping(cl, timeout_s=30).ok
    env.serve_http("5.5.5.5", 80, {"/hello": b"hello from the internet\n"})
    assert cl.http_get("http://5.5.5.5/hello").body == b"hello from the internet\n"


def test_identity_is_the_nodes_not_the_images(world):
    _env, _gk, cl, _cold = world
    assert cl.exec("hostname", check=True).stdout.strip() == "cl"
    assert cl.os.startswith("cloud image disk.qcow2")  # what vmlab knows of the image
    assert cl.status()["os"].startswith("Debian GNU/Linux 12 (bookworm) (kernel 6.")  # the guest's


def test_a_cold_booted_cloud_node_gets_its_address_by_dhcp(world):
    _env, gk, _cl, cold = world
    assert cold.boot_mode == "cold"
    assert cold.exec("command -v busybox").exit_code != 0  # not the image's: vmlab's own
    assert cold.exec("test -x /vmlab/bin/busybox").exit_code == 0
    assert cold.exec("ip -4 -o addr show", check=True).stdout.count(f"{cold.lan_ip()}/24") == 1
    assert cold.ping(gk.lan_ip(), count=2).received > 0
