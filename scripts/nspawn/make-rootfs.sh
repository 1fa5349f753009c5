#!/bin/bash
# Build (once) the Debian bookworm rootfs every AMOSKYS test and lab machine boots under systemd-nspawn.
# Usage: make-rootfs.sh [DEST]   (default /var/cache/nspawn-rootfs/amoskys-bookworm)
# Cached: when DEST/.complete holds this script's hash, nothing is done (edit the script to rebuild).
# Machines boot it with --volatile=overlay, so the cache itself is never modified.
set -euo pipefail
dest=${1:-/var/cache/nspawn-rootfs/amoskys-bookworm}
stamp="$(sha256sum "$0" | cut -c1-16)"
if [ -f "$dest/.complete" ] && [ "$(cat "$dest/.complete")" = "$stamp" ]; then echo "rootfs cached: $dest"; exit 0; fi
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null || {
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap systemd-container; }
# python3-venv: the amoskys venv under /opt/amoskys; prometheus: the "existing Prometheus" the prometheus
# role integrates with; snmpd: a real SNMP device (127.0.0.1) for the snmp agent; ieee-data: the scanner's
# MAC vendor names; procps/iproute2: ps, ss.
packages=systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,sudo,iproute2,procps,openssh-server,prometheus,snmpd,ieee-data
rm -rf "$dest.tmp"; mkdir -p "$(dirname "$dest")"
debootstrap --variant=minbase --include="$packages" bookworm "$dest.tmp" "$mirror"
rm -f "$dest.tmp/etc/hostname"                               # each machine takes its --machine name
chroot "$dest.tmp" systemctl disable prometheus.service      # started by the prometheus role once configured
echo 'PermitRootLogin prohibit-password' > "$dest.tmp/etc/ssh/sshd_config.d/amoskys-test.conf"
rm -f "$dest.tmp"/etc/ssh/ssh_host_*; chroot "$dest.tmp" ssh-keygen -A >/dev/null   # shared host keys: test only
mkdir -p -m700 "$dest.tmp/root/.ssh"
chroot "$dest.tmp" apt-get clean
rm -rf "$dest"; mv "$dest.tmp" "$dest"; echo "$stamp" > "$dest/.complete"
du -sh "$dest"
