"""The unix datagram NIC transport against a fake QEMU peer (real sockets, no VM)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket

from vmlab.vnet.transport import DgramNic


def test_dgram_nic_moves_one_frame_per_datagram_and_cleans_up(tmp_path, caplog):
    async def main():
        got = []
        nic = DgramNic("alice/eth0", tmp_path / "nic0.vnet", tmp_path / "nic0.sock", got.append)
        nic.open()
        nic.send(b"x" * 60)  # QEMU's socket does not exist yet: dropped, quietly
        assert nic.drops == 1
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        qemu.bind(str(tmp_path / "nic0.sock"))
        qemu.setblocking(False)
        frames = [bytes([i]) * (60 + i) for i in range(5)] + [b"\xab" * 1514]
        for f in frames:
            qemu.sendto(f, str(tmp_path / "nic0.vnet"))
        for _ in range(100):
            if len(got) == len(frames):
                break
            await asyncio.sleep(0.01)
        assert got == frames and nic.connected.is_set()  # boundaries kept, no header
        nic.send(b"\xcd" * 1500)
        assert qemu.recv(65536) == b"\xcd" * 1500
        qemu.close()  # QEMU exits, leaving its socket file behind
        nic.send(b"late")  # peer gone: dropped quietly
        nic.close()
        nic.close()  # idempotent
        return nic
    with caplog.at_level(logging.DEBUG, logger="vmlab.vnet.transport"):
        nic = asyncio.run(main())
    assert os.listdir(tmp_path) == []  # both socket files removed
    assert nic.drops == 2 and nic.frames_in == 6 and nic.frames_out == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_qemu_argv_for_dgram_nic(tmp_path):
    from pathlib import Path

    from vmlab.vm.qemu import NicConfig, VmConfig, build_argv
    cfg = VmConfig(name="a", run_dir=tmp_path, kernel=Path("vmlinux"), accel="tcg",
                   nics=(NicConfig("52:cc:cc:cc:01:00", tmp_path / "nic0.sock",
                                   dgram_peer=tmp_path / "nic0.vnet"),))
    argv = build_argv(cfg)
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == (f"dgram,id=net0,local.type=unix,local.path={tmp_path}/nic0.sock,"
                      f"remote.type=unix,remote.path={tmp_path}/nic0.vnet")
