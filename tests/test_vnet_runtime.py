"""The runtime over real unix sockets, with this test playing QEMU's `-netdev stream,server=on`."""
from __future__ import annotations

import asyncio
import struct
from ipaddress import IPv4Address, IPv4Network

from framekit import dhcp_message, dhcp_reply_options
from vmlab.vnet.core import NetworkConfig, VNet, node_mac
from vmlab.vnet.dhcp import OFFER
from vmlab.vnet.nat import NatType
from vmlab.vnet.runtime import VNetRuntime


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    return await reader.readexactly(length)


def test_stream_framing_and_reconnect(tmp_path):
    async def main():
        vnet = VNet()
        vnet.add_network(NetworkConfig("home", IPv4Network("192.168.1.0/24"),
                                       IPv4Address("2.1.1.1"), NatType.EASY, 1))
        port = vnet.add_port("a/eth0", "home", node_mac(1), IPv4Address("192.168.1.101"))
        runtime = VNetRuntime(vnet)
        path = tmp_path / "nic0.sock"
        accepted: asyncio.Queue = asyncio.Queue()

        async def on_conn(reader, writer):
            await accepted.put((reader, writer))

        # vnet starts connecting before "QEMU" listens, as when QEMU is still starting
        nic = runtime.attach_stream(port, path)
        await asyncio.sleep(0.05)
        server = await asyncio.start_unix_server(on_conn, str(path))
        try:
            for attempt in range(2):
                reader, writer = await asyncio.wait_for(accepted.get(), 5)
                discover = dhcp_message(node_mac(1), 1, xid=attempt)
                # two frames in one write: the reader must split them by their lengths
                writer.write(struct.pack("!I", len(discover)) + discover +
                             struct.pack("!I", len(discover)) + discover)
                for _ in range(2):
                    reply = await asyncio.wait_for(_read_frame(reader), 5)
                    yiaddr, opts = dhcp_reply_options(reply)
                    assert opts[53] == bytes([OFFER]) and yiaddr == IPv4Address("192.168.1.101")
                writer.close()  # QEMU side drops the connection: vnet must come back
            assert nic.frames_in == 4 and nic.frames_out == 4
        finally:
            server.close()
            await runtime.close()

    asyncio.run(main())


def test_oversized_length_resets_connection_without_crashing(tmp_path):
    async def main():
        vnet = VNet()
        vnet.add_network(NetworkConfig("home", IPv4Network("192.168.1.0/24"),
                                       IPv4Address("2.1.1.1"), NatType.EASY, 1))
        port = vnet.add_port("a/eth0", "home", node_mac(1), IPv4Address("192.168.1.101"))
        runtime = VNetRuntime(vnet)
        path = tmp_path / "nic0.sock"
        accepted: asyncio.Queue = asyncio.Queue()
        server = await asyncio.start_unix_server(
            lambda r, w: accepted.put_nowait((r, w)), str(path))
        runtime.attach_stream(port, path)
        try:
            reader, writer = await asyncio.wait_for(accepted.get(), 5)
            writer.write(struct.pack("!I", 10_000_000))
            assert await asyncio.wait_for(reader.read(), 5) == b""  # vnet hung up
            reader, writer = await asyncio.wait_for(accepted.get(), 5)  # and reconnected
            discover = dhcp_message(node_mac(1), 1)
            writer.write(struct.pack("!I", len(discover)) + discover)
            assert dhcp_reply_options(await asyncio.wait_for(_read_frame(reader), 5))[1][53] == bytes([OFFER])
        finally:
            server.close()
            await runtime.close()

    asyncio.run(main())
