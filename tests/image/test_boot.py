"""What a boot runs before the banner: a small initramfs, no unit for what the appliance
never uses, and a gate that waits for its firewall and state but not for DHCP."""

import pytest
from conftest import role_defaults, unit_property

STRIP = role_defaults("strip")


@pytest.fixture(scope="module")
def initramfs_modules(host) -> set[str]:
    """The module files in the initramfs the image boots, by path under kernel/."""
    listing = host.check_output("lsinitramfs /initrd.img")
    return {line.split("/kernel/", 1)[1] for line in listing.splitlines()
            if line.endswith(".ko") and "/kernel/" in line}


def test_initramfs_is_built_from_the_list(host):
    assert host.file("/etc/initramfs-tools/conf.d/portcullis-modules.conf").contains("^MODULES=list$")


@pytest.mark.parametrize("module", STRIP["strip_initramfs_modules"])
def test_initramfs_holds_the_boot_drivers(initramfs_modules, module):
    names = {path.rsplit("/", 1)[1].removesuffix(".ko").replace("-", "_") for path in initramfs_modules}
    assert module.replace("-", "_") in names


@pytest.mark.parametrize("directory", STRIP["strip_initramfs_pruned"])
def test_initramfs_drops_what_the_boot_never_loads(initramfs_modules, directory):
    assert not [path for path in initramfs_modules if path.startswith(directory + "/")]


@pytest.mark.parametrize("unit", STRIP["strip_masked_units"])
def test_unused_units_are_masked(host, unit):
    assert unit_property(host, unit, "LoadState") == "masked"


@pytest.mark.host
def test_gate_waits_for_its_firewall_but_not_for_the_network(host):
    """The listeners bind with IP_FREEBIND, so DHCP need not be done (the metrics
    endpoint's address may come later); nftables is loaded before port 25 listens."""
    after = unit_property(host, "portcullis.service", "After").split()
    wants = unit_property(host, "portcullis.service", "Wants").split()
    assert "nftables.service" in after or "portcullis-nftables.service" in after
    assert "network-online.target" not in after + wants


@pytest.mark.host
def test_firewall_modules_are_loaded_before_the_ruleset(host):
    """systemd-modules-load loads the ruleset's modules in one go; left to nft, each one
    costs a modprobe and a replay of the whole transaction."""
    listed = [line for line in host.file("/etc/modules-load.d/portcullis-nftables.conf")
              .content_string.splitlines() if line and not line.startswith("#")]
    loaded = {line.split()[0] for line in host.file("/proc/modules").content_string.splitlines()}
    assert "nf_tables" in listed
    assert set(listed) <= loaded


@pytest.mark.parametrize("module", STRIP["strip_unused_drivers"])
def test_unused_drivers_are_not_loaded(host, module):
    loaded = {line.split()[0] for line in host.file("/proc/modules").content_string.splitlines()}
    assert module not in loaded
