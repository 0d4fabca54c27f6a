"""Score samples 0-5 for educational value with a teacher LLM and the rubric (cached and resumable).

The teacher is any synth teacher spec: "smollm2" (local), a model directory or .gguf, "phiforge:<dir>", or
"openai:<model>@<base_url>" (an OpenAI-compatible endpoint). Output: JSONL with id, sha256, score, response
and text; rerunning skips samples already scored. The output can be passed to `phiforge classifier train`.
"""

from __future__ import annotations

import argparse

from phiforge.commands.flags import add_max_new_tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--in", dest="inputs", nargs="+", help="input glob(s) of .jsonl / .parquet records")
    src.add_argument("--stdlib", type=int, metavar="N",
                     help="annotate the N labelled standard-library units instead of input files")
    parser.add_argument("--out", required=True, help="output JSONL (also the cache: rerun to resume)")
    parser.add_argument("--teacher", required=True, help="teacher spec, as for `phiforge synth`")
    parser.add_argument("--text-field", default="text", help="record field holding the sample")
    parser.add_argument("--id-field", default="id", help="record field used as the sample id (else file:line)")
    parser.add_argument("--limit", type=int, default=None, help="annotate at most this many samples")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per teacher call")
    add_max_new_tokens(parser, 256, "answer length limit")


def _samples(args):
    import itertools

    if args.stdlib is not None:
        import json

        from phiforge.data.curate.classifier import STDLIB_LABELS, read_stdlib_unit

        rows = json.loads(STDLIB_LABELS.read_text())["labels"][: args.stdlib]
        gen = ((f"{r['path']}::{r['qualname']}", read_stdlib_unit(r["path"], r["qualname"])) for r in rows)
        return ((i, t) for i, t in gen if t is not None)
    from phiforge.data.curate.shards import Record, expand_inputs, read_records

    def gen():
        for f in expand_inputs(args.inputs):
            for rec in read_records(f, args.text_field):
                if isinstance(rec, Record):
                    yield str(rec.data.get(args.id_field, rec.src)), rec.data[args.text_field]
    return itertools.islice(gen(), args.limit) if args.limit else gen()


def main(args: argparse.Namespace) -> int:
    from phiforge.data.curate.annotate import annotate
    from phiforge.data.synth.teachers import make_teacher

    teacher = make_teacher(args.teacher)
    counts = annotate(_samples(args), teacher, args.out, teacher_name=args.teacher, batch_size=args.batch_size,
                      sampling={"max_new_tokens": args.max_new_tokens})
    print(f"annotated {counts['scored']} (unparsed {counts['unparsed']}, cached {counts['cached']}) "
          f"of {counts['total']} samples -> {args.out}")
    return 0
