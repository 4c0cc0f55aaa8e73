#!/bin/sh
# Seal the image, then power off: Packer's shutdown command, run as root via sudo by
# the build account. Removes everything that must differ per appliance or that only the
# build needed: SSH host keys, machine-id, the build account and its key, logs, caches.
set -eu
build_user=${SUDO_USER:?run through sudo by the build account}

rm -f /etc/ssh/ssh_host_*                 # regenerated at first boot (ssh-host-keys.service)
: > /etc/machine-id                       # empty: systemd makes a new one at first boot
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/* /var/tmp/*
journalctl --rotate >/dev/null 2>&1 || true
rm -rf /var/log/journal/* /var/log/audit/*.log* /root/.ansible
find /var/log -type f -name '*.log' -exec truncate -s 0 {} +
userdel --force --remove "$build_user" 2>/dev/null || userdel --force "$build_user"
sync
fstrim -av || true                        # free blocks read as zeros: a small qcow2
systemctl poweroff
