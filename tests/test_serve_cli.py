"""`lvlm-fix serve` as users run it: a real process with its own private Ray cluster."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import subprocess
import sys
import time

import httpx
import psutil
from service_helpers import free_port

from lvlm_fix.tiny import build_tiny


def _start_cli(model: str, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "lvlm_fix.cli", "serve", "--model", model]
    command += ["--host", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    # A session of its own: only the signals this test sends reach it.
    return subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)


def _wait_healthy(cli: subprocess.Popen, url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert cli.poll() is None, "lvlm-fix serve exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("lvlm-fix serve did not answer /health")


def _listeners(processes: list) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket."""
    out = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = " ".join(process.cmdline())[:60]
        except psutil.NoSuchProcess:
            continue
        for conn in connections:
            udp = conn.type == 2  # SOCK_DGRAM
            if conn.laddr and (conn.status == psutil.CONN_LISTEN or udp and not conn.raddr):
                out.append((name, conn.laddr.ip, conn.laddr.port))
    return out


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_serve_listens_on_loopback_only_and_stops_cleanly(tmp_path):
    model = str(build_tiny("llava", tmp_path / "llava"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:
        cli = _start_cli(model, port, log)
    tree = []
    try:
        _wait_healthy(cli, url, seconds=90)
        tree = [psutil.Process(cli.pid), *psutil.Process(cli.pid).children(recursive=True)]
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        for part in ("gcs_server", "raylet", "ServeController", "ProxyActor", "ModelServer"):
            assert part in names  # the whole Ray session is in this process tree
        listeners = _listeners(tree)
        assert any(p == port for _, _, p in listeners)
        exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
        assert not exposed, f"listening beyond loopback: {exposed}"

        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if cli.poll() is None:
            cli.kill()
        for process in tree:  # by pid, only what this test started
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        print((tmp_path / "serve.log").read_text()[-3000:])
