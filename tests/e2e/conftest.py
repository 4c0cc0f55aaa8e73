"""Fixtures for the end-to-end tests: a real Postfix backend on the host, a seed disk
made by scripts/make-seed, and the built image booted under QEMU in front of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.appliance import (
    BACKEND_AS_SEEN_BY_GUEST,
    BUILD_KEY,
    TOP,
    Appliance,
    built,
    require_tools,
)
from tests.support.postfix import PostfixBackend

DOMAIN = "example.test"
GATE_HOSTNAME = "mx.example.test"
BOOT_TIMEOUT = 420  # seconds to the banner under TCG on a busy 2-core host


@pytest.fixture(scope="session")
def backend():
    with PostfixBackend(domain=DOMAIN, users=("alice", "bob")) as server:
        yield server


def gate_config(**dha) -> str:
    """The site's portcullis.yaml: a small DHA budget so that a burst trips it quickly."""
    dha_settings = {"tarpit_after": 2, "suspect_after": 3, "ban_after": 5, "tarpit_step": 0.2,
                    "tarpit_max": 0.5, "suspect_delay": 0.5, **dha}
    dha_yaml = "\n".join(f"  {key}: {value}" for key, value in dha_settings.items())
    return textwrap.dedent(f"""\
        hostname: {GATE_HOSTNAME}
        listen: ["0.0.0.0:25"]
        relay_domains: [{DOMAIN}]
        recipients:
          source: static
          file: /etc/portcullis/recipients
        backend:
          servers: ["{BACKEND_AS_SEEN_BY_GUEST}"]
        ban_socket: /run/portcullis-ban/ban.sock
        limits:
          pregreet_delay: 0.5
        dns:
          fcrdns:
            action: "off"
        dha:
        """) + dha_yaml + "\n"


def make_seed(directory: Path, config_text: str, checked: bool = True) -> Path:
    """A seed disk made the way administrators make one (scripts/make-seed), or, with
    checked=False, written past make-seed's checks as a hand-made or corrupted one."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "portcullis.yaml").write_text(config_text)
    (directory / "recipients").write_text(f"alice@{DOMAIN}\nbob@{DOMAIN}\n")
    (directory / "admin.pub").write_text(Path(f"{BUILD_KEY}.pub").read_text())
    (directory / "site.yaml").write_text(textwrap.dedent("""\
        gate_config: portcullis.yaml
        recipients: recipients
        admin_keys: admin.pub
        network:
          - interface: eth0
            address: 10.0.2.15/24
            gateway: 10.0.2.2
          - interface: eth1
        """))
    seed = directory / "seed.iso"
    if checked:
        subprocess.run([sys.executable, str(TOP / "scripts" / "make-seed"),
                        str(directory / "site.yaml"), str(seed)],
                       check=True, capture_output=True, text=True)
        return seed
    staging = directory / "unchecked"
    staging.mkdir()
    for source, name in (("portcullis.yaml", "portcullis.yaml"), ("recipients", "recipients"),
                         ("admin.pub", "admin_keys")):
        (staging / name).write_bytes((directory / source).read_bytes())
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "PORTCULLIS-SEED", "-r", "-J",
                    "-o", str(seed), str(staging)], check=True, capture_output=True)
    return seed


def make_data_disk(path: Path) -> Path:
    """A data disk made the way administrators make one: `make data-disk DATA=path`."""
    subprocess.run(["make", "-s", "-C", str(TOP), "data-disk", f"DATA={path}"],
                   check=True, capture_output=True, text=True)
    return path


@pytest.fixture(scope="session")
def seed(tmp_path_factory):
    return make_seed(tmp_path_factory.mktemp("seed"), gate_config())


@pytest.fixture(scope="session")
def boot_figures():
    """Figures the session measured, printed and kept at its end (never asserted on)."""
    figures: dict[str, float | int | str] = {}  # a float is seconds
    yield figures
    if figures:
        lines = "".join(f"{name}: {value:.1f} s\n" if isinstance(value, float)
                        else f"{name}: {value}\n" for name, value in figures.items())
        (TOP / "build" / "e2e-figures.txt").write_text(lines)
        print("\ne2e figures (build/e2e-figures.txt):\n" + lines)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory, backend, seed, boot_figures):
    """The qcow2 booted once per module, with the seed and a new data disk (as deployed),
    in front of the backend."""
    require_tools()
    disk = built("qcow2")
    workdir = tmp_path_factory.mktemp("appliance")
    with Appliance(workdir, disk=disk, seed=seed, data=make_data_disk(workdir / "data.img"),
                   backend=f"{backend.host}:{backend.port}") as box:
        boot_figures["qcow2 boot to banner"] = box.wait_for_banner(BOOT_TIMEOUT)
        yield box
