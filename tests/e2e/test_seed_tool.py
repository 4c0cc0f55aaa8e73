"""scripts/make-seed: what a seed disk holds, and clear errors for bad site files."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.e2e.appliance import TOP
from tests.e2e.conftest import gate_config

MAKE_SEED = [sys.executable, str(TOP / "scripts" / "make-seed")]


def run_make_seed(site_dir, site_text):
    (site_dir / "portcullis.yaml").write_text(gate_config())
    (site_dir / "recipients").write_text("alice@example.test\n")
    (site_dir / "admin.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7 admin@site\n")
    (site_dir / "site.yaml").write_text(textwrap.dedent(site_text))
    return subprocess.run(MAKE_SEED + [str(site_dir / "site.yaml"), str(site_dir / "seed.iso")],
                          capture_output=True, text=True, check=False)


def iso_listing(path, directory="/"):
    result = subprocess.run(["xorriso", "-indev", str(path), "-ls", directory],
                            capture_output=True, text=True, check=True)
    return result.stdout


def test_seed_holds_config_recipients_keys_and_network_files(tmp_path):
    result = run_make_seed(tmp_path, """\
        gate_config: portcullis.yaml
        recipients: recipients
        admin_keys: admin.pub
        network:
          - interface: eth1
            address: 192.0.2.10/24
            gateway: 192.0.2.1
        """)
    assert result.returncode == 0, result.stderr
    listing = iso_listing(tmp_path / "seed.iso")
    for name in ("portcullis.yaml", "recipients", "admin_keys", "network"):
        assert f"'{name}'" in listing
    assert "'eth1.network'" in iso_listing(tmp_path / "seed.iso", "/network")
    volume = subprocess.run(["xorriso", "-indev", str(tmp_path / "seed.iso"), "-pvd_info"],
                            capture_output=True, text=True, check=True).stdout
    assert "PORTCULLIS-SEED" in volume


@pytest.mark.parametrize(("site", "message"), [
    ("gate_config: portcullis.yaml\nbogus: 1\n", "line 2: key 'bogus': unknown key"),
    ("recipients: recipients\n", "key 'gate_config': required"),
    ("gate_config: missing.yaml\n", "key 'gate_config': no such file"),
    ("gate_config: portcullis.yaml\ntls_cert: recipients\n", "give tls_cert and tls_key together"),
    ("gate_config: portcullis.yaml\nnetwork:\n  - interface: eth1\n    address: 10.0.0.300/24\n",
     "key 'network' (eth1)"),
    ("gate_config: portcullis.yaml\nadmin_keys: recipients\n", "holds no SSH public keys"),
])
def test_bad_site_files_fail_with_the_key_named(tmp_path, site, message):
    result = run_make_seed(tmp_path, site)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "seed.iso").exists()


def test_invalid_gate_config_is_refused_with_its_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("relay_domains: [example.test]\nlimits:\n  max_recipients: 0\n")
    result = run_make_seed(tmp_path, "gate_config: bad.yaml\n")
    assert result.returncode == 1
    assert "line 3" in result.stderr and "limits.max_recipients" in result.stderr
