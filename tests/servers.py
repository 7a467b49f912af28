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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def openai_server(checkpoint: Path, log_path: Path):
    """`python -m vllm.entrypoints.openai.api_server` on ``checkpoint`` at 127.0.0.1; yields its base URL once
    /health answers; terminated on exit."""
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--quantization", "outliertune", "--host", HOST, "--port", str(port), "--enforce-eager",
               "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.05",
               "--no-enable-prefix-caching", "--seed", "0"]
    with log_path.open("w") as log:  # a file, not a pipe: an unread pipe fills up and stalls the server
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "auto"})
        base = f"http://{HOST}:{port}"
        try:
            started = time.monotonic()
            while not healthy(base):
                assert server.poll() is None, \
                    f"server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}"
                assert time.monotonic() - started < START_TIMEOUT_S, f"server not healthy after {START_TIMEOUT_S} s"
                time.sleep(1)
            print(f"\nserver healthy after {time.monotonic() - started:.0f} s")
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
