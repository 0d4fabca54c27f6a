"""`phiforge serve` as a user starts it: startup failures are one `phiforge: error:` line with exit code 2, the
startup line names the backend, --api-key / PHIFORGE_API_KEY protect the API, a non-loopback host without a
key prints a warning."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi
    from phiforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat. hello world"] * 10, 300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(Phi(tiny_config(vocab_size=320)), path, tokenizer=tok)
    return path


def serve(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `phiforge serve ARGS` run in this process (it fails before serving)."""
    from phiforge.cli import main

    code = main(["serve", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_busy_port_is_one_error_line(ckpt, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        code, out, err = serve(capsys, "--model", str(ckpt), "--port", str(port))
    finally:
        busy.close()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("phiforge: error: ")
    assert f"127.0.0.1:{port}" in err and "in use" in err
    assert "serving" not in out  # it never claimed to serve


def test_bad_model_or_flags_are_one_error_line(ckpt, capsys):
    for args in (["--model", "no/such/dir"], ["--model", "tiny"], ["--model", "openai:m@http://127.0.0.1:9/v1"],
                 ["--model", str(ckpt), "--quant", "int8", "--compile", "--host", "no.such.host.invalid"],
                 ["--model", str(ckpt), "--max-body-mb", "0"], ["--model", str(ckpt), "--api-key", " "]):
        code, out, err = serve(capsys, *args, "--port", "0")
        assert code == 2 and err.count("\n") == 1 and err.startswith("phiforge: error: "), (args, err)
        assert "serving" not in out


class Running:
    """`phiforge serve` in a subprocess until the block ends; `port` and `line` come from its startup line."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "phiforge", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})

    def __enter__(self) -> Running:
        self.line = self.proc.stdout.readline()
        m = re.search(r":(\d+)/v1", self.line)
        assert m, (self.line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.port = int(m.group(1))
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        _, self.stderr = self.proc.communicate(timeout=30)

    def get(self, path: str, key: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def test_api_key_from_the_environment_and_the_open_host_warning(ckpt):
    env_key = {"PHIFORGE_API_KEY": "k3y"}
    with Running("--model", str(ckpt), "--port", "0", env=env_key) as keyed, \
            Running("--model", str(ckpt), "--port", "0", "--host", "0.0.0.0",
                    env={"PHIFORGE_API_KEY": ""}) as open_:  # empty: unset
        assert "phiforge backend" in keyed.line and "API key required" in keyed.line
        assert keyed.get("/v1/models")[0] == 401
        assert keyed.get("/v1/models", key="nope")[0] == 401
        status, body = keyed.get("/v1/models", key="k3y")
        assert status == 200 and body["data"][0]["id"] == "tiny"
        assert keyed.get("/health")[0] == 200
        assert open_.get("/v1/models")[0] == 200
    assert "warning" not in keyed.stderr
    warnings = [line for line in open_.stderr.splitlines() if line.startswith("phiforge: warning:")]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "--api-key" in warnings[0]


def test_is_loopback():
    from phiforge.commands.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))
