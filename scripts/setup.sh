#!/usr/bin/env bash
# Installs what vmlab needs on Debian/Ubuntu: QEMU and the image-building tools from Debian
# packages (only those missing), then a virtual environment in .venv with vmlab and its
# test dependencies. Safe to run again; it only does what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# qemu-system-x86/qemu-utils: the hypervisor; lz4, cpio: unpacking the kernel and packing the
# initramfs; busybox: host-side agent tests use its ping; python3-venv: the virtualenv;
# chromium: the dashboard's browser test drives it headless through Playwright (Playwright's
# own browser download is not used: it needs a host outside the package registries).
# stun-client, natpmpc, miniupnpc: STUN, NAT-PMP and UPnP clients that vmlab did not write, which
# tests/test_vm_nat.py copies into guests to check vnet's NAT behaviours and port mapping.
# debootstrap: builds the `debian` image (a systemd Debian on a qcow2 disk; as root);
# openssh-client: snapshot preparation logs into disk images over SSH to install the agent;
# e2fsprogs: mkfs.ext4 -d makes the debian image's root filesystem.
# tshark: the pcap tests read vnet's pcapng captures with Wireshark's own dissectors.
packages=(qemu-system-x86 qemu-utils lz4 cpio busybox python3-venv ca-certificates chromium
          stun-client natpmpc miniupnpc debootstrap openssh-client e2fsprogs tshark)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Image builds fetch Debian packages with `apt-get download`, which needs package lists.
if [ ${#missing[@]} -gt 0 ] || ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  echo "setup: apt-get update"
  need_root apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: vmlab needs Python 3.11 or newer; $python is $("$python" --version 2>&1)" >&2
  echo "setup: install python3.11 (Debian 12 has it) and run again with PYTHON=python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
echo "setup: installing vmlab into .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done"
