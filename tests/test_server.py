"""The CLI path a user types: vLLM's own serve parser with our --kv-compression flag,
an OpenAI-compatible server, and per-request overrides through vllm_xargs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

CLI = os.path.join(os.path.dirname(sys.executable), "vllm-kvcomp")
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def test_bad_spec_fails_at_startup_with_one_clear_message(tiny_model):
    proc = subprocess.run([CLI, "serve", tiny_model, "--kv-compression", "h2o:0.25,colour=red"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "argument --kv-compression: unknown key 'colour' for policy 'h2o'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def server(tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [CLI, "serve", tiny_model, "--kv-compression", "h2o:0.25", "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "4096", "--block-size", "32",
         "--served-model-name", "tiny"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 150
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read()[-3000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise TimeoutError("server did not come up")
    yield base
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_openai_completions_with_compression_and_overrides(server):
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 120)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    status, out = _post(server + "/v1/completions", body)
    assert status == 200 and out["usage"]["completion_tokens"] == 8
    status, out = _post(server + "/v1/completions", {**body, "vllm_xargs": {"kv_compression": "none"}})
    assert status == 200 and out["usage"]["completion_tokens"] == 8
    status, out = _post(server + "/v1/completions", {**body, "vllm_xargs": {"kv_compression": "h2o:0"}})
    assert status == 400 and "budget 0" in json.dumps(out)
