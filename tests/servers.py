"""The OpenAI server of vLLM on a checkpoint, for tests: started on 127.0.0.1 with the CPU test settings, stopped
after use."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

HOST = "127.0.0.1"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def openai_server(checkpoint: Path, log_path: Path):
    """`python -m vllm.entrypoints.openai.api_server` on ``checkpoint`` at 127.0.0.1 with the CPU test settings;
    yields (base URL, process) once /health answers; terminated on exit."""
    from tests.conftest import VLLM_TEST_ENGINE

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--quantization", "outliertune", "--host", HOST, "--port", str(port), "--enforce-eager",
               "--dtype", "float32", "--max-model-len", str(VLLM_TEST_ENGINE["max_model_len"]),
               "--kv-cache-memory-bytes", str(VLLM_TEST_ENGINE["kv_cache_memory_bytes"]),
               "--no-enable-prefix-caching", "--seed", "0"]
    with serving(command, port, log_path, START_TIMEOUT_S, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}) as started:
        yield started


@contextlib.contextmanager
def serving(command: list[str], port: int, log_path: Path, timeout_s: float, env: dict[str, str] | None = None):
    """Run a server command listening on 127.0.0.1:`port`, logging to `log_path`; yields (base URL, process) once
    /health answers (raises with the log's tail if it exits or takes longer than `timeout_s`); terminated on exit."""
    with log_path.open("w") as log:  # a file, not a pipe: an unread pipe fills up and stalls the server
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://{HOST}:{port}"
    try:
        started = time.monotonic()
        while not healthy(base):
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"server not healthy after {timeout_s} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        print(f"\nserver healthy after {time.monotonic() - started:.0f} s", flush=True)
        yield base, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False
