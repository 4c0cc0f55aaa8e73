#!/bin/sh
# Remove the setuid/setgid bits of FILE, recorded with dpkg-statoverride so that
# package upgrades keep them off. Usage: drop-setuid.sh FILE
set -eu
file=$1
set -- $(stat -c '%U %G %a' "$file")
mode=$(printf '%o' $(( 0$3 & 0777 )))
dpkg-statoverride --remove "$file" >/dev/null 2>&1 || true
dpkg-statoverride --update --add "$1" "$2" "$mode" "$file"
echo "$file: $3 -> $mode"
