"""Data-path integrity (issue 22): no silent loss in curate, synth and training; every malformed file a clear
one-line error; staging litter removed at the next start. One test per case the issue lists; the readers' own
property tests are in test_readers.py, the corruption sweep in corruption_sweep.py."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import JSONServer

from phiforge.cli import main
from phiforge.errors import CheckpointError, ConfigError, DataError

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "def", "foo", "return", "x", "print", "hello", "world",
         "python", "code", "loop", "list"]


def one_error_line(err: str, *parts: str) -> str:
    """The one `phiforge: error:` line of a run's stderr (no traceback), holding every part."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("phiforge: error:")]
    assert len(lines) == 1, err
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


# ---- curate: a bad line costs only itself, and is said --------------------------------------------------------
def _code_docs(n: int) -> list[bytes]:
    return [json.dumps({"id": i, "text": f"def f{i}(x):\n    return x + {i}\n"}).encode() for i in range(n)]


def test_curate_non_utf8_line_loses_only_itself_and_names_its_line(tmp_path, capsys):
    lines = _code_docs(11)
    lines[3] = b'{"id": 3, "text": "caf\xe9"}'  # line 4: latin-1, not UTF-8
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "c.yaml").write_text("steps:\n  - type: exact_dedup\n")
    code = main(["curate", "--config", str(tmp_path / "c.yaml"), "--in", str(tmp_path / "a.jsonl"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0
    kept = (tmp_path / "o" / "a.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in kept] == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # all 10 good records
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["bad_records"] == 1 and stats["bad_examples"][0].startswith(f"{tmp_path / 'a.jsonl'}:4: ")
    assert f"phiforge: skipped {tmp_path / 'a.jsonl'}:4: undecodable bytes" in err


def test_curate_non_utf8_in_a_big_shard_keeps_every_other_document(tmp_path):
    from phiforge.data.curate.shards import BadRecord, read_records

    lines = _code_docs(2289)
    lines[999] = b'{"id": 999, "text": "\xff\xfe"}'  # line 1000, deep inside the text reader's first chunk
    (tmp_path / "big.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    got = list(read_records(tmp_path / "big.jsonl"))
    bad = [r for r in got if isinstance(r, BadRecord)]
    assert len(got) == 2289 and [b.src for b in bad] == [f"{tmp_path / 'big.jsonl'}:1000"]


def test_curate_bad_records_are_named_on_stderr_and_in_stats_and_strict_stops(tmp_path, capsys):
    lines = _code_docs(6)
    lines[1] = b"{not json"
    lines[4] = b'{"id": 4, "body": "no text field"}'
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "c.yaml").write_text("steps:\n  - type: exact_dedup\n")
    args = ["curate", "--config", str(tmp_path / "c.yaml"), "--in", str(tmp_path / "a.jsonl")]
    assert main(args + ["--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    a = tmp_path / "a.jsonl"
    assert f"phiforge: skipped {a}:2: invalid JSON" in err and f"phiforge: skipped {a}:5: missing" in err
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert [e.split(": ")[0] for e in stats["bad_examples"]] == [f"{a}:2", f"{a}:5"]
    assert main(args + ["--out", str(tmp_path / "strict"), "--strict"]) == 2
    one_error_line(capsys.readouterr().err, f"{a}:2: invalid JSON", "--strict")


# ---- config.json: types and ranges, the field named --------------------------------------------------------------
@pytest.mark.parametrize("field,value,says", [
    ("layer_norm_eps", "abc", "'layer_norm_eps' should be a number"),
    ("num_hidden_layers", "4", "'num_hidden_layers' should be an integer"),
    ("hidden_size", "abc", "'hidden_size' should be an integer"),
    ("hidden_size", 128.5, "'hidden_size' should be an integer, got 128.5"),
    ("tie_word_embeddings", "yes", "'tie_word_embeddings' should be true or false"),
    ("layer_norm_eps", -1e-5, "'layer_norm_eps' must be in (0, 1]"),
    ("resid_pdrop", 1.5, "'resid_pdrop' must be in [0, 1)"),
    ("rope_parameters", 3, "rope_parameters should be an object"),
])
def test_config_json_fields_are_checked_by_type_and_range(tiny_model, tmp_path, capsys, field, value, says):
    from phiforge.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tiny_model, tmp_path / "c")
    cfg_file = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_checkpoint(tmp_path / "c")
    assert says in str(e.value) and str(cfg_file) in str(e.value)
    assert main(["info", str(tmp_path / "c")]) == 2  # info reads the same config: it refuses it too
    one_error_line(capsys.readouterr().err, says)


# ---- token shards, resume, NaN weights ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from phiforge.data.pack import pack_corpus

    tmp = tmp_path_factory.mktemp("tokens")
    rng = random.Random(0)
    (tmp / "c.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n"
                                         for _ in range(120)))
    pack_corpus([tmp / "c.jsonl"], tmp / "tok", train_vocab=300, val_fraction=0.1, workers=1)
    (tmp / "r.yaml").write_text(f"""model: tiny
model_overrides: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
                  max_position_embeddings: 64}}
data: {tmp / 'tok'}
seq_len: 32
micro_batch: 2
max_steps: 2
warmup: 1
eval_every: 0
eval_batches: 1
save_every: 1
keep_last: 1
threads: 1
""")
    return tmp


def test_truncated_token_shard_is_a_clear_error(tokens, tmp_path):
    import shutil

    from phiforge.data.pack import open_split, read_manifest

    tok = tmp_path / "tok"
    shutil.copytree(tokens / "tok", tok)
    shard = tok / read_manifest(tok)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-1])  # an odd byte count: half a uint16
    with pytest.raises(DataError, match=rf"{shard.name}: \d+ bytes is not a whole number of uint16 items"):
        open_split(tok, "train")


def test_resume_of_a_finished_run_says_so_and_leaves_the_log_alone(tokens, tmp_path, capsys):
    train = ["train", "--config", str(tokens / "r.yaml"), "--set", f"out={tmp_path / 'o'}"]
    assert main(train) == 0
    log = (tmp_path / "o" / "log.jsonl").read_bytes()
    capsys.readouterr()
    for _ in range(2):
        assert main(train + ["--resume"]) == 2
        one_error_line(capsys.readouterr().err, "already finished (step 2 of 2)", "max_steps")
    assert (tmp_path / "o" / "log.jsonl").read_bytes() == log


def test_nan_weights_are_an_error_at_generate(tiny_model, tokens, tmp_path, capsys):
    import torch

    from phiforge.checkpoint import save_checkpoint

    with torch.no_grad():
        tiny_model.model.layers[1].mlp.fc1.weight[3, 5] = float("nan")
    save_checkpoint(tiny_model, tmp_path / "c", tokenizer=tokens / "tok" / "tokenizer")
    assert main(["generate", "--model", str(tmp_path / "c"), "hello"]) == 2
    one_error_line(capsys.readouterr().err, "model.layers.1.mlp.fc1.weight", "NaN", "model.safetensors")


# ---- model specs: missing paths, hub ids, offline ----------------------------------------------------------------
def test_missing_local_paths_are_said_not_to_exist(tmp_path, monkeypatch):
    from phiforge.lm.spec import looks_like_hub_id, parse_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("does/not/exist", "hf:does/not/exist", "runs/tiny", "./m", "hf:runs/tiny"):
        with pytest.raises(ConfigError, match="no such file or directory"):
            parse_spec(spec)
    assert looks_like_hub_id("microsoft/phi-2") and not looks_like_hub_id("runs/tiny")
    assert not looks_like_hub_id("a--b/c") and not looks_like_hub_id("-a/b")


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_offline_hub_ids_never_reach_the_network(tmp_path, monkeypatch, no_network):
    from phiforge.lm.spec import load_lm

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the flag alone must do it
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for spec in ("no-such-org/no-such-model", "hf:no-such-org/no-such-model", "phiforge:no-such-org/no-model"):
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
            load_lm(spec, offline=True)
        assert time.monotonic() - t0 < 5
    assert no_network == []


# ---- convert: Microsoft's own config keys and tensor names ---------------------------------------------------------
def _original(tiny_model, out: Path, *, sequential: bool = False, old_mlp: bool = False, **config_extra):
    import re

    from safetensors.torch import load_file, save_file
    from test_checkpoint import to_original_layout

    src = to_original_layout(tiny_model, out)
    L = tiny_model.config.num_hidden_layers
    sd = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        if old_mlp:
            k = k.replace(".mlp.fc1.", ".mlp.fc_in.").replace(".mlp.fc2.", ".mlp.fc_out.")
        if sequential:
            k = re.sub(r"^transformer\.embd\.", "layers.0.", k)
            k = re.sub(r"^transformer\.h\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + 1}.", k)
            k = re.sub(r"^lm_head\.", f"layers.{L + 1}.", k)
        sd[k] = v
    save_file(sd, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_extra)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_convert_accepts_microsofts_config_keys_and_old_mlp_names(tiny_model, tmp_path):
    import torch

    from phiforge.checkpoint import convert_original, load_checkpoint

    extra = {"embd_layer": "default", "phyagi_version": "0.0.4.dev", "gradient_checkpointing": False,
             "cross_sample_token_id": 50256, "cp_size": 1, "tp_size": 1}
    src = _original(tiny_model, tmp_path / "orig", old_mlp=True, **extra)
    model = load_checkpoint(convert_original(src, tmp_path / "hf"))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(ids), tiny_model(ids), rtol=0, atol=0)


def test_convert_errors_name_tensors_as_the_file_does(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from phiforge.checkpoint import convert_original

    src = _original(tiny_model, tmp_path / "orig", sequential=True)
    sd = load_file(str(src / "model.safetensors"))
    sd["layers.1.mixer.Wqkv.weight"] = sd["layers.1.mixer.Wqkv.weight"][:-1]
    del sd["layers.2.mlp.fc2.bias"]
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.fc2\.bias"):
        convert_original(src, tmp_path / "a")
    sd["layers.2.mlp.fc2.bias"] = load_file(str(tmp_path / "orig" / "model.safetensors")).get(
        "layers.1.mlp.fc2.bias", sd["layers.1.mlp.fc2.bias"])
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor layers\.1\.mixer\.Wqkv\.weight has shape"):
        convert_original(src, tmp_path / "b")
    cfg = json.loads((src / "config.json").read_text())
    cfg["embd_layer"] = "image"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="embd_layer 'image'"):
        convert_original(src, tmp_path / "c")


# ---- litter: staging of killed writes, half-pruned checkpoints -----------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_tokenize_removes_a_killed_runs_staging_but_not_a_live_ones(tokens, tmp_path):
    from phiforge.data.pack import pack_corpus

    stale = [tmp_path / ".tok.k3j9x2ab.tmp", tmp_path / f".tok.{_dead_pid()}.a1b2c3d4.tmp"]  # old and dead pid
    live = tmp_path / f".tok.{os.getppid()}.zz9zz9zz.tmp"
    for d in stale + [live]:
        (d / ".parts").mkdir(parents=True)
        (d / ".parts" / "00000.train.bin").write_bytes(b"\0" * 100)
    other = tmp_path / ".other.k3j9x2ab.tmp"
    other.mkdir()
    pack_corpus([tokens / "c.jsonl"], tmp_path / "tok", tokenizer=tokens / "tok" / "tokenizer", workers=1)
    assert not any(d.exists() for d in stale) and live.exists() and other.exists()


def test_training_start_removes_killed_saves_and_half_pruned_checkpoints(tokens, tmp_path, capsys):
    from phiforge.train.state import list_checkpoints, prune_checkpoints

    out = tmp_path / "o"
    assert main(["train", "--config", str(tokens / "r.yaml"), "--set", f"out={out}", "--set", "keep_last=0"]) == 0
    ckpts = out / "checkpoints"
    step1, step2 = ckpts / "step-000001", ckpts / "step-000002"
    (step1 / "model.safetensors").unlink()  # what a kill in the middle of an old-style prune left
    (step1 / "config.json").unlink()
    staging = ckpts / f".step-000003.{_dead_pid()}.q1w2e3r4.tmp"  # a killed save
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    pruning = ckpts / f".step-000000.{_dead_pid()}.prune.tmp"  # a prune killed mid-delete
    (pruning / "x").mkdir(parents=True)
    capsys.readouterr()
    assert main(["train", "--config", str(tokens / "r.yaml"), "--set", f"out={out}", "--resume"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert not step1.exists() and not staging.exists() and step2.exists() and not pruning.exists()
    assert list_checkpoints(out) == [step2]
    # pruning renames first: nothing that looks like a checkpoint is ever half deleted
    (ckpts / "step-000003").mkdir()
    for f in step2.iterdir():
        (ckpts / "step-000003" / f.name).write_bytes(f.read_bytes())
    prune_checkpoints(out, keep_last=1)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000003"]


# ---- synth: a ledger, rejects, Retry-After, batching-free cache keys, stats on error ------------------------------
class Endpoint(JSONServer):
    """A minimal OpenAI-compatible /chat/completions server, counting requests by (prompt, seed). `refuse(prompt)`
    -> an HTTP 400 with a reason; `throttle` first answers each request with 429 + Retry-After; `status` answers
    everything with that error; `hold` blocks requests until it is set."""

    def __init__(self, refuse=lambda p: False, throttle: float | None = None, status: int | None = None):
        self.asked: Counter = Counter()
        self.answered: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.refuse, self.throttle, self.status = refuse, throttle, status
        self.hold = threading.Event()
        self.hold.set()
        self.lock = threading.Lock()
        self.start()

    def close(self):
        self.hold.set()
        super().close()

    def send(self, h, code, obj, headers=()):
        payload = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def handle(self, h, body):
        prompt = body["messages"][-1]["content"]
        key = (prompt, body.get("seed"))  # one request: the same prompt with another seed is another sample
        with self.lock:
            self.asked[key] += 1
            n = self.asked[key]
            self.times.setdefault(prompt, []).append(time.monotonic())
        self.hold.wait(30)
        if self.status:
            return self.send(h, self.status, {"error": {"message": "invalid api key"}})
        if self.refuse(prompt):
            return self.send(h, 400, {"error": {"message": "This prompt was flagged by the content filter."}})
        if self.throttle is not None and n == 1:
            return self.send(h, 429, {"error": {"message": "slow down"}}, [("Retry-After", str(self.throttle))])
        rng = random.Random(f"{prompt}|{body.get('seed')}")  # sampled: the seed matters
        text = "Lesson. " + " ".join(rng.choice(WORDS) for _ in range(60)) + "."  # a whole passage (synth trims cut ones)
        with self.lock:
            self.answered[key] += 1
        self.send(h, 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200}})


@pytest.fixture
def endpoint():
    made = []

    def make(**kw):
        made.append(Endpoint(**kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


def synth_cfg(url, **kw):
    from phiforge.data.synth.pipeline import SynthConfig

    opts = dict(concurrency=4, timeout=5.0, max_retries=2, backoff=0.01, max_backoff=0.05)
    opts.update(kw.pop("teacher_options", {}))
    base = dict(n=10, seed=3, mix={"textbooks": 1.0}, teacher=f"openai:m@{url}", teacher_options=opts,
                sampling={"max_new_tokens": 64, "temperature": 0.7}, batch_size=4)
    base.update(kw)
    return SynthConfig.from_dict(base)


PRICED = {"price_per_1k_input": 1.0, "price_per_1k_output": 1.0}  # 0.2 a request (100 + 100 tokens)


def test_synth_budget_is_for_the_run_not_the_process(endpoint, tmp_path):
    from phiforge.data.synth.pipeline import run_synth

    ep = endpoint()
    cfg = synth_cfg(ep.url, n=30, teacher_options={**PRICED, "budget": 1.0})
    costs = []
    for _ in range(3):  # three reruns with budget 1.0 may spend 1.0 in all, not 3.0
        stats = run_synth(cfg, tmp_path / "o", log=lambda m: None)
        assert stats["stopped"] == "budget"
        costs.append(stats["cost"])
    assert costs == sorted(costs) and costs[-1] <= 1.0 + 1e-9  # cumulative, and within the one budget
    assert abs(sum(ep.answered.values()) * 0.2 - costs[-1]) < 1e-9 and (tmp_path / "o" / "spend.jsonl").exists()


KILLED = """
import sys
from phiforge.data.synth.pipeline import SynthConfig, run_synth
cfg = SynthConfig.from_dict(dict(n=8, seed=3, mix={"textbooks": 1.0}, teacher="openai:m@" + sys.argv[1],
                                 teacher_options=dict(concurrency=4, timeout=30.0, price_per_1k_input=1.0,
                                                      price_per_1k_output=1.0, budget=100.0),
                                 sampling={"max_new_tokens": 64}, batch_size=4))
run_synth(cfg, sys.argv[2], log=lambda m: None)
"""


def test_synth_cost_of_requests_in_flight_at_a_kill_is_kept(endpoint, tmp_path):
    from phiforge.lm.openai_api import SpendLedger

    ep = endpoint()
    ep.hold.clear()  # requests arrive and wait: the batch is in flight when the child dies
    child = subprocess.Popen([sys.executable, "-c", KILLED, ep.url, str(tmp_path / "o")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sum(ep.asked.values()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert sum(ep.asked.values()) == 4
    spent = SpendLedger(tmp_path / "o" / "spend.jsonl").spent
    # each request in flight is counted at its worst case (prompt estimate + all 64 new tokens), never as free
    assert spent.cost >= 4 * (64 / 1000) and spent.requests == 0


def test_synth_refused_prompts_are_rejects_with_the_reason_and_never_asked_again(endpoint, tmp_path):
    from phiforge.data.synth.pipeline import read_samples, run_synth

    ep = endpoint(refuse=lambda p: int.from_bytes(p.encode()[-4:], "little") % 3 == 0)
    stats = run_synth(synth_cfg(ep.url, n=12), tmp_path / "o", log=lambda m: None)
    refused = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    refused = [r for r in refused if r["reason"] == "teacher_rejected"]
    assert stats["kept"] == 12 and len(read_samples(tmp_path / "o")) == 12
    assert refused and stats["reasons"]["teacher_rejected"] == len(refused)
    assert all("flagged by the content filter" in r["detail"] and "HTTP 400" in r["detail"] for r in refused)
    asked = sum(ep.asked.values())
    stats = run_synth(synth_cfg(ep.url, n=16), tmp_path / "o", log=lambda m: None)
    assert stats["kept"] == 16 and all(v == 1 for v in ep.asked.values()) and sum(ep.asked.values()) > asked


def test_synth_stops_when_every_prompt_is_refused_and_writes_its_stats(endpoint, tmp_path):
    from phiforge.data.synth.pipeline import run_synth
    from phiforge.lm.openai_api import EndpointError

    ep = endpoint(refuse=lambda p: True)
    with pytest.raises(EndpointError, match="every prompt of the batch was refused"):
        run_synth(synth_cfg(ep.url), tmp_path / "o", log=lambda m: None)
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["stopped"] == "error" and "refused" in stats["error"]
    assert not (tmp_path / "o" / "rejects.jsonl").exists()  # a wrong setting is not the prompts' fault


def test_synth_that_stops_on_an_error_writes_stats(endpoint, tmp_path, capsys):
    ep = endpoint(status=401)
    (tmp_path / "s.yaml").write_text(f"n: 8\nmix: {{textbooks: 1.0}}\nteacher: openai:m@{ep.url}\n"
                                     f"teacher_options: {{max_retries: 0}}\nbatch_size: 4\n")
    assert main(["synth", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys.readouterr().err, "HTTP 401", "invalid api key")
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["stopped"] == "error" and "HTTP 401" in stats["error"] and stats["kept"] == 0


def test_retry_after_is_honoured(endpoint):
    from phiforge.data.synth.teachers import make_teacher

    ep = endpoint(throttle=0.8)
    t = make_teacher(f"openai:m@{ep.url}", max_retries=2, backoff=0.01, max_backoff=0.02, timeout=5.0)
    assert len(t.generate(["a prompt"], {"max_new_tokens": 8})) == 1
    first, second = ep.times["a prompt"]
    assert second - first >= 0.8 and t.usage.retries == 1


def test_synth_cache_keys_do_not_depend_on_batching(endpoint, tmp_path):
    from phiforge.data.synth.pipeline import read_samples, run_synth

    ep = endpoint()
    first = run_synth(synth_cfg(ep.url, n=10, batch_size=8), tmp_path / "o", log=lambda m: None)
    unused = sum(ep.asked.values()) - first["kept"] - first["rejected"]  # answered past n: not recorded
    assert unused > 0
    second = run_synth(synth_cfg(ep.url, n=20, batch_size=8), tmp_path / "o", log=lambda m: None)  # other batches
    assert len(read_samples(tmp_path / "o")) == 20
    assert second["cache_hits"] == unused  # every answer already paid for is found, none asked for again


def test_cached_local_teacher_samples_a_batch_with_one_seed_but_keys_each_prompt_by_its_own(tmp_path):
    from test_lm_cache import Threaded

    from phiforge.data.synth.teachers import CachedTeacher, LMTeacher

    class Local(Threaded):
        def _generate(self, requests, on_result=None):
            self.seeds = {r.sampling.seed for r in requests}
            return super()._generate(requests, on_result)

    inner = Local()
    t = CachedTeacher(LMTeacher(inner, "local"), tmp_path / "c.sqlite")
    assert t.generate(["a", "b", "c"], {"max_new_tokens": 4}, seeds=[7, 8, 9]) == ["A", "B", "C"]
    assert inner.seeds == {7}  # one generator for the batch
    assert t.generate(["c", "d"], {"max_new_tokens": 4}, seeds=[9, 10]) == ["C", "D"]
    assert inner.asked == ["a", "b", "c", "d"] and t.hits == 1
    t.close()


# ---- the corruption sweep -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_corruption_sweep_has_no_tracebacks_or_hangs(capsys):
    """corruption_sweep.py --quick (a few minutes): every file of a tiny real run, cut and overwritten in turn."""
    import corruption_sweep

    code = corruption_sweep.main(["--quick"])
    out = capsys.readouterr().out
    assert code == 0 and "RESULT corruption_tracebacks 0 count" in out, out
