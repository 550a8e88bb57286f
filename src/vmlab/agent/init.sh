#!/bin/busybox sh
# vmlab appliance /init (PID 1): mount the basics, load the NIC and host-channel drivers,
# then run the agent forever. The console (ttyS0) stays quiet except for vmlab-* lines.
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run

# With a VGA device (PCI class 0x0300), mirror what this script and the agent print onto the
# screen too (screen.py says why the kernel cannot), so the dashboard's screenshots show the
# guest's own lines; screen.py copies everything to the serial port (/dev/console, the host's
# console.log) first.
if cat /sys/bus/pci/devices/*/class 2>/dev/null | grep -q '^0x0300'; then
  mkfifo /run/console.fifo
  # `cat` takes over should screen.py ever fail: this pipe must always have a reader.
  { python3 -u /vmlab/screen.py || exec cat; } < /run/console.fifo > /dev/console 2>&1 &
  exec > /run/console.fifo 2>&1
fi

# One module per line, dependencies first (the image builder derives the order from each
# module's depends= field).
while read -r m; do
  [ -n "$m" ] && { insmod "/lib/modules/$m.ko" || echo "vmlab-init: insmod $m failed"; }
done < /vmlab/modules.list
# mdev creates nodes for what the modules just brought up (/dev/vport*, /dev/vsock).
mdev -s

name=vmlab
for word in $(cat /proc/cmdline); do
  case "$word" in vmlab.hostname=?*) name=${word#vmlab.hostname=} ;; esac
done
hostname "$name"
echo "127.0.0.1 localhost $name" > /etc/hosts
ip link set lo up

echo "vmlab-init: starting agent"
while true; do
  python3 -u /vmlab/agent.py
  echo "vmlab-init: agent exited with code $?; restarting in 0.5 s"
  sleep 0.5
done
