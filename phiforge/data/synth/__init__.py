"""Synthetic textbooks and exercises (the Phi recipe's synthetic data).

- `prompts`: topic tree x audiences x formats x sampled constraints (all data files in `data/`), seeded.
- `teachers`: `Teacher` protocol, `make_teacher(spec)` (local transformers, OpenAI-compatible, native phiforge),
  `CachedTeacher` (sqlite), usage / cost accounting and a budget cap.
- `procedural`: Python exercises and math word problems that are correct by construction.
- `pipeline`: `run_synth(cfg, out)`: resumable JSONL shards with provenance, verification, dedup and stats.
"""
