"""The CLI path a user types: vLLM's own serve parser with our --kv-compression flag,
an OpenAI-compatible server, and per-request overrides through vllm_xargs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest

from vllm_kvcomp.demo import wait_healthy

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
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill and block vLLM
    proc = subprocess.Popen(
        [CLI, "serve", tiny_model, "--kv-compression", "h2o:0.25", "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "4096", "--block-size", "32",
         "--served-model-name", "tiny"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout=150, alive=lambda: proc.poll() is None)
    except (RuntimeError, SystemExit):
        proc.kill()
        log.seek(0)
        raise RuntimeError(log.read()[-3000:]) from None
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


def test_readme_demo_runs_against_the_server(server, tiny_model, capsys):
    # The README's serve command ends in this demo (scripts/serve.sh); the tiny model's
    # answers are gibberish, so only the plumbing is checked here (the real model's
    # answers: README).
    from vllm_kvcomp import demo

    assert demo.main(["--url", server, "--model", tiny_model, "--served-model-name", "tiny",
                      "--spec", "h2o:0.25", "--length", "1024"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[demo] pass key ") and len(lines) == 3
    assert lines[1].startswith("[compressed (h2o:0.25)] prompt ")
    assert lines[2].startswith("[full cache (override: none)] prompt ")
    n = int(lines[1].split(" prompt ")[1].split()[0])
    assert 900 <= n <= 1024 and f"prompt {n} tokens" in lines[2]
