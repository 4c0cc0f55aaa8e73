"""A worker's reports to the gate arrive even when the gate reads them late.

The test plays the gate: it starts a real `portcullis worker`, hands it real client
connections over a SOCK_SEQPACKET pair, and stops reading while the sessions end.
The gate's per-client counts come back only through the `done` reports, so none may
be lost when the control socket is full.
"""

import array
import json
import socket
import subprocess
import sys
import time

from tests.support.fault_backend import FaultBackend
from tests.support.gate import GateProcess

SESSIONS = 150


def _hand_over(control: socket.socket, connection_id: int, sock: socket.socket) -> None:
    header = json.dumps({"id": connection_id, "ip": "127.0.0.1", "port": 1,
                         "stress": False, "allowlisted": True, "pregreet_failed": False})
    control.sendmsg([header.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", [sock.fileno()]))])


def _reports(control: socket.socket, timeout: float):
    control.settimeout(timeout)
    while True:
        try:
            message = control.recv(65536)
        except TimeoutError:
            return
        if not message:
            return
        yield json.loads(message)


def test_done_reports_survive_a_full_control_socket(tmp_path):
    with FaultBackend() as backend:
        config = GateProcess(tmp_path, f"127.0.0.1:{backend.port}").config_path
        gate_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills quickly
        worker = subprocess.Popen(
            [sys.executable, "-m", "portcullis.cli", "worker", "-c", str(config),
             "--control-fd", str(worker_end.fileno()), "--number", "0"],
            pass_fds=[worker_end.fileno()])
        worker_end.close()
        try:
            assert next(_reports(gate_end, 15)) == {"ready": True}
            listener = socket.create_server(("127.0.0.1", 0))
            for connection_id in range(SESSIONS):
                with socket.create_connection(listener.getsockname(), timeout=10) as client:
                    accepted, _ = listener.accept()
                    _hand_over(gate_end, connection_id, accepted)
                    accepted.close()
                    client.sendall(b"QUIT\r\n")  # the gate sent the banner, not the worker
                    assert client.recv(1024).startswith(b"221 ")
                time.sleep(0.002)  # sessions end one by one: one report each
            done: set[int] = set()
            deadline = time.monotonic() + 20
            for report in _reports(gate_end, 3):
                done.update(report.get("done", ()))
                if len(done) == SESSIONS or time.monotonic() > deadline:
                    break
            assert done == set(range(SESSIONS)), f"{SESSIONS - len(done)} sessions never reported"
        finally:
            worker.terminate()
            worker.wait(20)
            gate_end.close()
