"""Start a command as `world` processes with the environment torchrun gives each rank (a module, not conftest:
test_distributed.py and test_launchers.py both launch gloo ranks this way)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest


def run_ranks(command: list[str], world: int, env: dict[str, str] | None = None,
              timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run `command` on `world` ranks (world=0: one plain process, no process group), on the CPU, with `env` added;
    a rank still running after `timeout` seconds kills them all and fails the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(max(world, 1)):
        rank_env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        rank_env |= {"CUDA_VISIBLE_DEVICES": ""} | (env or {})
        if world:
            rank_env |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(command, env=rank_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung")
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out
