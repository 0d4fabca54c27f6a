"""Synthetic textbooks and exercises (the Phi recipe's synthetic data).

- `prompts`: topic tree x audiences x formats x sampled constraints (all data files in `data/`), seeded.
- `teachers`: `make_teacher(spec)`: an LM backend of `phiforge.lm` (local transformers, OpenAI-compatible with
  retries and a budget cap, native phiforge) asked with synthesis' sampling dicts; `CachedTeacher` (SQLite).
- `procedural`: Python exercises and math word problems that are correct by construction.
- `pipeline`: `run_synth(cfg, out)`: resumable JSONL shards with provenance, verification, dedup and stats.
"""
