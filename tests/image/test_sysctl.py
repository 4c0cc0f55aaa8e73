"""Every sysctl the roles set has its value in the running kernel."""

import pytest
from conftest import role_defaults

HARDEN = role_defaults("harden")["harden_sysctl"]
DOS = role_defaults("sysctl_dos")["sysctl_dos_sysctl"]
SETTINGS = {**HARDEN, **DOS}
# The DoS settings (role sysctl_dos) hold on a host too; the hardening ones on the image.
HOST_KEYS = {key for key in DOS if SETTINGS[key] == DOS[key]}


@pytest.mark.parametrize("key", [pytest.param(key, marks=pytest.mark.host) if key in HOST_KEYS else key
                                 for key in sorted(SETTINGS)])
def test_sysctl_value(host, key):
    assert str(host.sysctl(key)) == str(SETTINGS[key])


@pytest.mark.host
def test_conntrack_table_sized_to_memory(host, sysctl_dos):
    mem_kib = int(host.check_output("awk '/^MemTotal:/ {print $2}' /proc/meminfo"))
    expected = mem_kib * 1024 // 100 * sysctl_dos["sysctl_dos_conntrack_memory_percent"] \
        // sysctl_dos["sysctl_dos_conntrack_entry_bytes"]
    expected = max(expected, sysctl_dos["sysctl_dos_conntrack_min"])
    assert host.sysctl("net.netfilter.nf_conntrack_max") == expected
    # The kernel rounds the bucket count up to whole pages of 512 list heads.
    buckets = int(host.file("/sys/module/nf_conntrack/parameters/hashsize").content_string)
    wanted = expected // sysctl_dos["sysctl_dos_conntrack_entries_per_bucket"]
    assert wanted <= buckets < wanted + 512
