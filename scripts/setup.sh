#!/usr/bin/env bash
# Installs what vmlab needs on Debian/Ubuntu: QEMU and the image-building tools from Debian
# packages (only those missing), then a virtual environment in .venv with vmlab and its
# test dependencies. Safe to run again; it only does what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# qemu-system-x86/qemu-utils: the hypervisor; lz4, cpio: unpacking the kernel and packing the
# initramfs; busybox: host-side agent tests use its ping; python3-venv: the virtualenv.
packages=(qemu-system-x86 qemu-utils lz4 cpio busybox python3-venv ca-certificates)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Image builds fetch Debian packages with `apt-get download`, which needs package lists.
if [ ${#missing[@]} -gt 0 ] || ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
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
