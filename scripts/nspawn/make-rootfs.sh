#!/bin/bash
# Build (once) the Debian bookworm rootfs every AMOSKYS test and lab machine boots under systemd-nspawn.
# Usage: make-rootfs.sh [DEST]   (default /var/cache/nspawn-rootfs/amoskys-bookworm)
# Cached: DEST is a symlink to DEST.<hash of this script>; when that exists, nothing is done (edit the script
# to rebuild). A rebuild makes a new directory and flips the symlink, so machines still running on the old
# one (their --volatile=overlay lower dir) are left intact; old versions no mount uses are removed.
set -euo pipefail
dest=${1:-/var/cache/nspawn-rootfs/amoskys-bookworm}
stamp="$(sha256sum "$0" | cut -c1-16)"
build="$dest.$stamp"
if [ -f "$build/.complete" ] && [ "$(readlink "$dest" 2>/dev/null)" = "$build" ]; then echo "rootfs cached: $dest -> $build"; exit 0; fi
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null ||
  "$(dirname "$0")/../setup-host.sh" --for lab   # installs them without upgrading the host's systemd
# python3-venv: the amoskys venv under /opt/amoskys; prometheus: the "existing Prometheus" the prometheus
# role integrates with; snmpd: a real SNMP device (127.0.0.1) for the snmp agent; ieee-data: the scanner's
# MAC vendor names; libpcap0.8: the flow agent's BPF compiler; procps/iproute2: ps, ss.
packages=systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,sudo,iproute2,procps,openssh-server,prometheus,snmpd,ieee-data,libpcap0.8
if [ ! -f "$build/.complete" ]; then
  rm -rf "$build.tmp"; mkdir -p "$(dirname "$dest")"
  debootstrap --variant=minbase --include="$packages" bookworm "$build.tmp" "$mirror"
  rm -f "$build.tmp/etc/hostname"                              # each machine takes its --machine name
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$build.tmp/etc/hosts"
  chroot "$build.tmp" systemctl disable prometheus.service     # started by the prometheus role once configured
  echo 'PermitRootLogin prohibit-password' > "$build.tmp/etc/ssh/sshd_config.d/amoskys-test.conf"
  rm -f "$build.tmp"/etc/ssh/ssh_host_*; chroot "$build.tmp" ssh-keygen -A >/dev/null   # shared host keys: test only
  mkdir -p -m700 "$build.tmp/root/.ssh"
  chroot "$build.tmp" apt-get clean
  echo "$stamp" > "$build.tmp/.complete"
  mv "$build.tmp" "$build"
fi
if [ -d "$dest" ] && [ ! -L "$dest" ]; then mv "$dest" "$dest.unversioned"; fi   # a build from before versioning
ln -sfn "$build" "$dest.link" && mv -T "$dest.link" "$dest"
for old in "$dest".*; do                                       # versions no machine has mounted any more
  case "$old" in "$build"|*.tmp|*.link) continue;; esac
  [ -d "$old" ] || continue
  if ! grep -qsF " $old" /proc/[0-9]*/mountinfo && ! grep -qsF "lowerdir=$old" /proc/[0-9]*/mountinfo; then rm -rf "$old"; fi
done
du -sh "$build"
