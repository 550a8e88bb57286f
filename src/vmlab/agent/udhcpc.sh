#!/bin/sh
# busybox udhcpc hook for the vmlab agent. udhcpc sets $interface, $ip, $mask (prefix length),
# $router, $dns. Only the first NIC (the agent sets VMLAB_PRIMARY_NIC=1 for it; the guest may
# call it eth0 or ens3) gets the default route and /etc/resolv.conf: the other NICs are LAN-only.
# The agent discards udhcpc's own chatter, so this logs to the console itself.
# Flushes are IPv4-only: a plain flush would remove the kernel's IPv6 link-local and SLAAC
# addresses too, and they do not come back until the link goes down and up.
log() { echo "vmlab-agent: $*" > /dev/console 2>/dev/null || echo "vmlab-agent: $*"; }
state=/run/udhcpc.$interface.ip

case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    rm -f "$state"
    ;;
  bound|renew)
    new="$ip/${mask:-24}"
    [ "$1" = renew ] && [ "$(cat "$state" 2>/dev/null)" = "$new" ] && exit 0
    ip -4 addr flush dev "$interface"
    ip addr add "$new" dev "$interface"
    echo "$new" > "$state"
    gw=${router%% *}
    if [ "${VMLAB_PRIMARY_NIC:-0}" = 1 ]; then
      [ -n "$gw" ] && { ip route del default 2>/dev/null; ip route add default via "$gw" dev "$interface"; }
      : > /etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    fi
    log "$interface bound $new via ${gw:-none}"
    ;;
esac
exit 0
