"""Lynis audit of the appliance. Lynis is copied in from the host's Debian package for
the run and removed afterwards: it never stays on the box."""

import io
import os
import pathlib
import re
import tarfile

import pytest

AUDIT_DIR = "/root/lynis-audit"
# The target hardening index; PORTCULLIS_LYNIS_MIN_INDEX overrides it.
MIN_INDEX = int(os.environ.get("PORTCULLIS_LYNIS_MIN_INDEX", "90"))
PROFILE = pathlib.Path(__file__).with_name("lynis-portcullis.prf")

pytestmark = pytest.mark.lynis


def lynis_bundle() -> bytes:
    """The host's Lynis (program, include files, plugins, database, default profile)."""
    sources = {"/usr/sbin/lynis": "lynis", "/usr/share/lynis": ".", "/etc/lynis": ".",
               str(PROFILE): "custom.prf"}
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        pytest.fail(f"Lynis not found on this host ({', '.join(missing)}): apt-get install lynis")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, name in sources.items():
            tar.add(path, arcname=name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lynis_report(host) -> str:
    """Copy Lynis in over SFTP, run the audit as root, read its report, remove it all."""
    sftp = host.backend.client.open_sftp()
    with sftp.open("lynis.tar.gz", "wb") as f:
        f.write(lynis_bundle())
    bundle = sftp.normalize(".") + "/lynis.tar.gz"
    sftp.close()
    try:
        host.check_output(f"install -d -m 700 {AUDIT_DIR} && "
                          f"tar -C {AUDIT_DIR} --no-same-owner -xzf {bundle}")
        host.run(f"cd {AUDIT_DIR} && sh ./lynis audit system --quick --no-colors --profile "
                 f"custom.prf --logfile {AUDIT_DIR}/lynis.log --report-file {AUDIT_DIR}/report.dat")
        return host.file(f"{AUDIT_DIR}/report.dat").content_string
    finally:
        host.run(f"rm -rf {AUDIT_DIR} {bundle}")


def test_hardening_index(lynis_report):
    index = int(re.search(r"^hardening_index=(\d+)$", lynis_report, re.MULTILINE).group(1))
    suggestions = re.findall(r"^suggestion\[\]=([^|]+)\|([^|]*)", lynis_report, re.MULTILINE)
    warnings = re.findall(r"^warning\[\]=([^|]+)\|([^|]*)", lynis_report, re.MULTILINE)
    print(f"Lynis hardening index {index}; {len(warnings)} warnings, "
          f"{len(suggestions)} suggestions")
    for test_id, text in warnings + suggestions:
        print(f"  {test_id}: {text}")
    assert index >= MIN_INDEX


def test_lynis_removed(host, lynis_report):
    assert not host.exists("lynis")
    assert not host.file(AUDIT_DIR).exists
