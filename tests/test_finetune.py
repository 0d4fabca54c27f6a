"""Fine-tuning on prompt/completion and chat examples (issue 18): tokenize with a loss mask, pack whole examples
apart, masked loss (hand-checked), gradient accumulation, LoRA through peft and merging, bad input, the CLI."""

from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phiforge.data.pack import open_masks, open_split, pack_corpus, read_offsets
from phiforge.errors import ConfigError, DataError
from phiforge.train import train
from phiforge.train.config import from_dict

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "def", "foo", "return", "x", "print", "hello", "world", "python", "code", "loop", "list"]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 64}


def exercises(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion records of varied lengths: '<n digits> =' -> words."""
    rng = random.Random(seed)
    return [{"prompt": "sum " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 6))) + " =",
             "completion": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))} for _ in range(n)]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_config(tmp_path, data, **kw):
    base = dict(model="tiny", model_overrides=TINY, data=str(data), out=str(tmp_path / "run"), seq_len=32,
                micro_batch=4, max_steps=4, warmup=1, lr=3e-3, min_lr=3e-4, eval_every=0, eval_batches=2,
                save_every=0, keep_last=1, threads=1)
    base.update(kw)
    return from_dict(base)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A briefly pretrained tiny Phi (checkpoint with its tokenizer) and exercises tokenized for it."""
    tmp = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    write_jsonl(tmp / "c.jsonl", [{"text": " ".join(rng.choice(WORDS + list("0123456789=")) for _ in range(40))}
                                  for _ in range(200)])
    pack_corpus([tmp / "c.jsonl"], tmp / "tok", train_vocab=400, val_fraction=0.1, workers=1)
    ckpt = train(tiny_config(tmp, tmp / "tok", out=str(tmp / "pre"), max_steps=6)).checkpoint
    write_jsonl(tmp / "ex.jsonl", exercises(150))
    pack_corpus([tmp / "ex.jsonl"], tmp / "ex", tokenizer=ckpt, records="completion", seq_len=32,
                val_fraction=0.2, workers=1)
    return tmp, ckpt, tmp / "ex"


def _model(ckpt):
    from phiforge.checkpoint import load_checkpoint

    return load_checkpoint(ckpt).eval()


def _hand_loss(phi, loader, rows):
    """Mean CE over completion targets of the examples in `rows`, each example run alone (no packing)."""
    total, count = 0.0, 0
    for r in rows:
        for e in loader.rows[r]:
            ids, mask = loader.example(e)
            with torch.no_grad():
                logits = phi(torch.from_numpy(ids[:-1])[None])[0].double()
            ce = F.cross_entropy(logits, torch.from_numpy(ids[1:]), reduction="none")
            keep = torch.from_numpy(mask[1:] == 1)
            total += float(ce[keep].sum())
            count += int(keep.sum())
    return total / count, count


# ---- data -----------------------------------------------------------------------------------------------------
def test_completion_tokens_mask_and_boundaries(base):
    from phiforge.tokenizer import load_tokenizer

    tmp, ckpt, ex = base
    tok = load_tokenizer(ckpt)
    ids = np.concatenate(open_split(ex, "train") + open_split(ex, "val"))
    masks = np.concatenate(open_masks(ex, "train") + open_masks(ex, "val"))
    assert len(masks) == len(ids)
    offsets = read_offsets(ex, "train")
    recs = {(r["prompt"], r["completion"]) for r in exercises(150)}
    assert json.loads((ex / "manifest.json").read_text())["examples"]["truncated"] == 0
    for i in range(len(offsets) - 1):
        a, b = offsets[i], offsets[i + 1]
        example, mask = ids[a:b], masks[a:b]
        assert example[-1] == tok.eos_token_id and mask[-1] == 1  # EOS closes every example, trained
        prompt, completion = tok.decode(example[mask == 0]), tok.decode(example[mask == 1][:-1])
        assert (prompt, completion) in recs  # 1 exactly on the completion's tokens (none truncated here)
        assert mask.tolist() == sorted(mask.tolist())  # prompt first, then completion


def test_overlong_examples_are_truncated_from_the_prompt_or_dropped(base, tmp_path):
    tmp, ckpt, _ = base
    long_prompt = {"prompt": "sum " + " ".join("7" for _ in range(60)) + " =", "completion": " cat sat"}
    long_completion = {"prompt": "sum 1 =", "completion": " " + " ".join("cat" for _ in range(60))}
    write_jsonl(tmp_path / "x.jsonl", [long_prompt, long_completion] + exercises(5))
    m = pack_corpus([tmp_path / "x.jsonl"], tmp_path / "t", tokenizer=ckpt, records="completion", seq_len=16,
                    val_fraction=0.0, workers=1).manifest
    ex = m["examples"]
    assert (ex["truncated"], ex["dropped"], ex["max_tokens"], ex["overlong"]) == (1, 1, 17, "truncate")
    assert m["documents"] == 6 and ex["longest"] == 17
    ids, mask = open_split(tmp_path / "t", "train")[0], open_masks(tmp_path / "t", "train")[0]
    first = slice(0, read_offsets(tmp_path / "t", "train")[1])
    from phiforge.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    assert len(ids[first]) == 17 and tok.decode(ids[first][mask[first] == 1][:-1]) == " cat sat"  # completion kept
    assert tok.decode(ids[first][mask[first] == 0]).endswith("7 7 =")  # the prompt's left was cut
    m2 = pack_corpus([tmp_path / "x.jsonl"], tmp_path / "t2", tokenizer=ckpt, records="completion", seq_len=16,
                     overlong="drop", val_fraction=0.0, workers=1).manifest
    assert (m2["examples"]["truncated"], m2["examples"]["dropped"], m2["documents"]) == (0, 2, 5)


def test_chat_templates_render_and_mask_the_assistant(base, tmp_path):
    from phiforge.tokenizer import load_tokenizer

    tmp, ckpt, _ = base
    tok = load_tokenizer(ckpt)
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sum 1 2"},
                         {"role": "assistant", "content": "cat"}, {"role": "user", "content": "again"},
                         {"role": "assistant", "content": "mat"}]}
    write_jsonl(tmp_path / "c.jsonl", [chat])
    for name, text, trained in [
        ("phi-2", "be brief\nInstruct: sum 1 2\nOutput: cat\nInstruct: again\nOutput: mat\n", " cat\n mat\n"),
        ("chatml", "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsum 1 2<|im_end|>\n"
                   "<|im_start|>assistant\ncat<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                   "<|im_start|>assistant\nmat<|im_end|>\n", "cat<|im_end|>\nmat<|im_end|>\n")]:
        m = pack_corpus([tmp_path / "c.jsonl"], tmp_path / name, tokenizer=ckpt, records="chat", template=name,
                        val_fraction=0.0, workers=1).manifest
        assert m["template"]["name"] == name and m["records"] == "chat"
        ids, mask = open_split(tmp_path / name, "train")[0], open_masks(tmp_path / name, "train")[0]
        assert tok.decode(ids) == text + tok.eos_token
        assert tok.decode(ids[mask == 1]) == trained + tok.eos_token
    # A template is data: a YAML file of roles; one without a trained role is refused.
    (tmp_path / "mine.yaml").write_text('roles:\n  user: {text: "Q: {content}\\n"}\n'
                                        '  assistant: {prefix: "A:", text: " {content}\\n", train: true}\n')
    write_jsonl(tmp_path / "qa.jsonl", [{"messages": chat["messages"][1:3]}])
    pack_corpus([tmp_path / "qa.jsonl"], tmp_path / "mine", tokenizer=ckpt, records="chat",
                template=str(tmp_path / "mine.yaml"), val_fraction=0.0, workers=1)
    ids, mask = open_split(tmp_path / "mine", "train")[0], open_masks(tmp_path / "mine", "train")[0]
    assert tok.decode(ids) == "Q: sum 1 2\nA: cat\n" + tok.eos_token
    assert tok.decode(ids[mask == 1]) == " cat\n" + tok.eos_token
    (tmp_path / "bad.yaml").write_text('roles:\n  user: {text: "{content}"}\n')
    with pytest.raises(ConfigError, match=r"bad\.yaml: no role has `train: true`"):
        pack_corpus([tmp_path / "c.jsonl"], tmp_path / "x", tokenizer=ckpt, records="chat",
                    template=str(tmp_path / "bad.yaml"), workers=1)


def test_bad_records_name_file_and_line_and_strict_makes_them_fatal(base, tmp_path, capsys):
    from phiforge.cli import main

    tmp, ckpt, _ = base
    good = exercises(4)
    write_jsonl(tmp_path / "pc.jsonl", [good[0], {"prompt": "sum 1 ="}, good[1], {"completion": " cat"},
                                        {"prompt": "sum 2 =", "completion": ""}, good[2]])
    code = main(["--quiet", "tokenize", str(tmp_path / "pc.jsonl"), "--format", "completion", "--tokenizer",
                 str(ckpt), "--out", str(tmp_path / "t1"), "--workers", "1", "--val-fraction", "0"])
    out = capsys.readouterr()
    assert code == 0 and "3 documents" in out.out
    err = out.err.splitlines()
    assert [line.split(": ", 2)[1] for line in err] == [f"skipped {tmp_path / 'pc.jsonl'}:{n}" for n in (2, 4, 5)]
    assert "field 'completion' missing" in err[0] and "field 'prompt' missing" in err[1]
    assert "completion tokenizes to no tokens" in err[2]
    manifest = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert manifest["bad_lines"]["count"] == 3
    write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "cat"}]}])
    code = main(["--quiet", "tokenize", str(tmp_path / "chat.jsonl"), "--format", "chat", "--tokenizer", str(ckpt),
                 "--out", str(tmp_path / "t2"), "--workers", "1", "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert code == 0 and "chat.jsonl:2: message 2: unknown role 'bot' (template phi-2 knows: system, user, " \
        "assistant)" in err
    for src, fmt, where in [("pc.jsonl", "completion", "pc.jsonl:2: field 'completion' missing"),
                            ("chat.jsonl", "chat", "chat.jsonl:2: message 2: unknown role 'bot'")]:
        code = main(["tokenize", str(tmp_path / src), "--format", fmt, "--tokenizer", str(ckpt), "--out",
                     str(tmp_path / "t3"), "--workers", "1", "--strict"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("phiforge: error: ") and err.count("\n") == 1, err
        assert where in err and "(--strict)" in err
        assert not (tmp_path / "t3").exists()


# ---- packing and the masked loss ----------------------------------------------------------------------------------
def test_masked_loss_equals_hand_computed_cross_entropy(base):
    from phiforge.train.data import ExampleLoader
    from phiforge.train.parallel import CausalLMLoss

    _, ckpt, ex = base
    phi = _model(ckpt)
    loader = ExampleLoader(ex, "train", 32, 4, shuffle=False)
    batch = loader.next_batch()
    assert all(len(loader.rows[r]) >= 2 for r in range(4))  # really packed
    want, count = _hand_loss(phi, loader, range(4))
    assert count == int(batch.loss_mask.sum())
    loss = CausalLMLoss(phi)(*batch)  # grad enabled: the fused, chunked head
    with torch.no_grad():
        plain = CausalLMLoss(phi)(*batch)  # the plain head
    assert loss.item() == pytest.approx(want, rel=1e-5) and plain.item() == pytest.approx(want, rel=1e-5)
    # Not the loss over every target, nor over the row without boundaries:
    everything = CausalLMLoss(phi)(batch.inputs, batch.targets).item()
    assert abs(everything - want) > 0.05


def test_packed_row_logits_equal_each_example_run_alone(base):
    from phiforge.train.data import ExampleLoader
    from phiforge.train.parallel import packed_attention_mask

    _, ckpt, ex = base
    phi = _model(ckpt)
    loader = ExampleLoader(ex, "train", 32, 1, shuffle=False)
    r = next(i for i in range(loader.n_chunks) if len(loader.rows[i]) >= 3)
    inputs, _, _, pos, seg = (torch.from_numpy(a)[None] for a in loader.row(r))
    with torch.no_grad():
        packed = phi(inputs, attention_mask=packed_attention_mask(seg), position_ids=pos)[0]
        unseparated = phi(inputs)[0]
    at = 0
    for j, e in enumerate(loader.rows[r]):
        ids, _ = loader.example(e)
        n = len(ids) - 1
        with torch.no_grad():
            alone = phi(torch.from_numpy(ids[:-1])[None])[0]
        torch.testing.assert_close(packed[at:at + n], alone, rtol=1e-5, atol=1e-5)
        if j >= 1:  # without the block-diagonal mask and restarted positions, example 2 on sees the others
            assert (unseparated[at:at + n] - alone).abs().max() > 1e-3
        at += n


def test_gradient_accumulation_equals_one_big_batch(base):
    from phiforge.train.config import TrainConfig
    from phiforge.train.data import ExampleLoader
    from phiforge.train.loop import forward_backward
    from phiforge.train.parallel import CausalLMLoss, Dist, prepare_model

    _, ckpt, ex = base
    big = ExampleLoader(ex, "train", 32, 4, shuffle=False).next_batch()
    small = ExampleLoader(ex, "train", 32, 2, shuffle=False)
    halves = [small.next_batch(), small.next_batch()]
    counts = [int(h.loss_mask.sum()) for h in halves]
    assert counts[0] != counts[1]  # so a mean of the two micro-batch means would be wrong

    def grads(batches):
        torch.manual_seed(0)
        model = prepare_model(CausalLMLoss(_model(ckpt)), TrainConfig(max_steps=1), Dist())
        params = [p for p in model.parameters() if p.requires_grad]
        loss, _ = forward_backward(model, params, batches, 0.0, torch.device("cpu"), contextlib.nullcontext)
        return loss, [p.grad.clone() for p in params]

    loss_big, g_big = grads([big])
    loss_acc, g_acc = grads(halves)
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_acc, g_big):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- training -------------------------------------------------------------------------------------------------
def test_fine_tuning_learns_completions_and_reports_completion_val_loss(base, tmp_path):
    from phiforge.train.data import ExampleLoader, eval_batches
    from phiforge.train.metrics import read_log

    tmp, ckpt, ex = base
    res = train(tiny_config(tmp_path, ex, model=str(ckpt), model_overrides={}, max_steps=12, eval_every=6,
                            eval_batches=3, lr=1e-2, warmup=2))
    start = read_log(res.log_path, "start")[0]
    assert start["packing"]["examples"] > start["packing"]["rows"] > 0 and start["packing"]["fill"] > 0.6
    recs = read_log(res.log_path)
    assert all(r["loss_tokens"] > 0 for r in recs) and recs[-1]["loss"] < recs[0]["loss"]
    # The logged validation loss is the mean CE over the completion tokens of the held-out rows it covers.
    val = ExampleLoader(ex, "val", 32, 4, shuffle=False)
    n_rows = len(eval_batches(val, 3)) * 4
    want, _ = _hand_loss(_model(res.checkpoint), val, range(n_rows))
    assert res.val_loss == pytest.approx(want, rel=1e-5)


def test_lora_trains_only_adapters_merges_and_transformers_loads_it(base, tmp_path):
    from safetensors import safe_open

    from phiforge.checkpoint import load_checkpoint
    from phiforge.train.lora import load_lora_model

    transformers = pytest.importorskip("transformers")
    tmp, ckpt, ex = base
    res = train(tiny_config(tmp_path, ex, model=str(ckpt), model_overrides={}, max_steps=6, lr=2e-2,
                            lora_rank=4, lora_alpha=8, merge=True))
    # The checkpoint holds the adapters only (PEFT layout) and AdamW state for them only.
    names = {p.name for p in res.checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    with safe_open(res.checkpoint / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 6 * 2 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    state = torch.load(res.checkpoint / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == len(keys)
    # Merged = base + adapters: only the adapted projections changed; logits equal the un-merged model's.
    merged, base_model = load_checkpoint(res.merged).eval(), _model(ckpt)
    for (name, p), q in zip(merged.named_parameters(), base_model.parameters()):
        adapted = name.endswith(".weight") and any(f".{t}." in name for t in ("q_proj", "k_proj", "v_proj",
                                                                               "dense", "fc1", "fc2"))
        assert torch.equal(p, q) != adapted, name  # embeddings, norms, biases and lm_head stayed frozen
    unmerged = load_lora_model(res.checkpoint).eval()
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = merged(x)
        torch.testing.assert_close(ours, unmerged(x), rtol=1e-5, atol=1e-5)
        hf = transformers.PhiForCausalLM.from_pretrained(res.merged).eval()
        torch.testing.assert_close(hf(x).logits, ours, rtol=1e-4, atol=1e-4)
        # peft itself reads our adapter checkpoint onto a transformers base model
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(transformers.PhiForCausalLM.from_pretrained(ckpt), res.checkpoint)
        torch.testing.assert_close(peft_model.eval()(x).logits, ours, rtol=1e-4, atol=1e-4)


def test_lora_needs_a_checkpoint_and_merge_needs_lora(base, tmp_path):
    _, ckpt, ex = base
    with pytest.raises(ConfigError, match="LoRA adapts a trained checkpoint"):
        train(tiny_config(tmp_path, ex, lora_rank=4))
    with pytest.raises(ConfigError, match="merge folds LoRA adapters"):
        tiny_config(tmp_path, ex, model=str(ckpt), model_overrides={}, merge=True)
    with pytest.raises(ConfigError, match="not among Phi's linear layers"):
        train(tiny_config(tmp_path, ex, model=str(ckpt), model_overrides={}, lora_rank=4, lora_targets="qkv"))
    with pytest.raises(DataError, match="examples of up to .* tokens, but a row of seq_len 8"):
        train(tiny_config(tmp_path, ex, model=str(ckpt), model_overrides={}, seq_len=8))


def test_cli_fine_tunes_a_trained_phi_with_the_recipe_with_and_without_lora(base, tmp_path, capsys):
    """A fresh clone's path: tokenize prompt/completion JSONL for a checkpoint, fine-tune with the shipped
    recipe (sized down), with and without LoRA; the merged output loads in phiforge."""
    from phiforge.checkpoint import load_checkpoint
    from phiforge.cli import main

    tmp, ckpt, _ = base
    write_jsonl(tmp_path / "ex.jsonl", exercises(80, seed=1))
    assert main(["--quiet", "tokenize", str(tmp_path / "ex.jsonl"), "--format", "completion", "--tokenizer",
                 str(ckpt), "--seq-len", "32", "--out", str(tmp_path / "tok"), "--workers", "1"]) == 0
    assert "completion examples" in capsys.readouterr().out
    small = ["--set", f"model={ckpt}", "--set", f"data={tmp_path / 'tok'}", "--set", "seq_len=32", "--set",
             "micro_batch=4", "--set", "grad_accum=1", "--set", "max_steps=3", "--set", "eval_every=0",
             "--set", "threads=1", "--set", "activation_checkpointing=false"]
    assert main(["--quiet", "train", "--config", "phi-1-exercises", "--set", f"out={tmp_path / 'full'}",
                 *small]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert main(["--quiet", "train", "--config", "phi-1-exercises", "--set", f"out={tmp_path / 'lora'}",
                 "--lora-rank", "4", "--merge", *small]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "merged LoRA adapters into" in out
    assert load_checkpoint(tmp_path / "lora" / "merged").config.num_hidden_layers == 2
    assert main(["info", str(tmp_path / "lora" / "merged")]) == 0
