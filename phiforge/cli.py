"""The `phiforge` command line: one table from command name to the module that implements it.

Each command lives in `phiforge/commands/<name>.py` and defines two functions:

    def add_arguments(parser: argparse.ArgumentParser) -> None   # flags, each with help text
    def main(args: argparse.Namespace) -> int | None              # does the work; returns the exit code

Command modules are imported only when their command runs (or its --help is asked for), so `phiforge --help`
is instant and one command's heavy imports never slow another.
Errors the user can fix are `PhiforgeError`s: printed as one `phiforge: error: ...` line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import textwrap
from typing import NoReturn

# name -> (module, one-line summary). Listed in the order of the loop: model, data, train, eval, run, serve.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("phiforge.commands.info", "print a checkpoint's config, parameter count, dtype and size"),
    "generate": ("phiforge.commands.generate", "generate text from a checkpoint (KV cache, sampling, streaming)"),
    "convert": ("phiforge.commands.convert", "convert an original microsoft/phi checkpoint to the HF layout"),
    "curate": ("phiforge.commands.curate", "filter, deduplicate and decontaminate a corpus"),
    "annotate": ("phiforge.commands.annotate", "score samples 0-5 for educational value with a teacher LLM"),
    "classifier": ("phiforge.commands.classifier", "train / apply the educational-value classifier"),
    "synth": ("phiforge.commands.synth", "generate synthetic textbooks and exercises"),
    "tokenize": ("phiforge.commands.tokenize", "train a tokenizer and pack a corpus into token shards"),
    "train": ("phiforge.commands.train", "pretrain or fine-tune a Phi model (CPU, DDP, FSDP)"),
    "grow": ("phiforge.commands.grow", "grow a trained small Phi into a larger one"),
    "eval": ("phiforge.commands.eval", "run the Phi-2 benchmark suite on a model"),
    "data": ("phiforge.commands.data", "fetch benchmark data from the hub for offline evaluation (data pull)"),
    "run": ("phiforge.commands.run", "the whole Phi recipe end to end, with a report"),
    "report": ("phiforge.commands.report", "rebuild the report of a run directory"),
    "chat": ("phiforge.commands.chat", "interactive terminal chat with a model"),
    "serve": ("phiforge.commands.serve", "OpenAI-compatible HTTP server"),
    "export": ("phiforge.commands.export", "export a checkpoint (e.g. GGUF for llama.cpp)"),
}


def available_commands() -> dict[str, tuple[str, str]]:
    """The commands whose module is installed in this version."""
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def _top_help(cmds: dict[str, tuple[str, str]]) -> str:
    width = max(len(n) for n in cmds) if cmds else 8
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in cmds.items()]
    return textwrap.dedent(
        """\
        usage: phiforge [--debug] [--quiet] COMMAND [ARGS...]

        phiforge: make small language models the Phi way (textbook-quality data beats scale).

        commands:
        {cmds}

        options:
          -h, --help  show this help (use `phiforge COMMAND --help` for a command's flags)
          --debug     show full tracebacks for errors
          --quiet     no progress bars
          --version   print the version
        """
    ).format(cmds="\n".join(lines))



class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: a usage mistake (an unknown flag, a bad choice) is one line,
    `phiforge: error: COMMAND: what (see phiforge COMMAND --help)`, exit 2; --help still prints the usage. Sub-
    commands' parsers (export gguf) are of this class too (argparse makes them like their parent)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"phiforge: error: {self.prog.removeprefix('phiforge ')}: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `phiforge` console script."""
    from phiforge import __version__
    from phiforge.errors import PhiforgeError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = quiet = False
    while argv and argv[0] in ("--debug", "--quiet"):
        debug |= argv[0] == "--debug"
        quiet |= argv[0] == "--quiet"
        argv.pop(0)
    cmds = available_commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help(cmds))
        return 0
    if argv[0] == "--version":
        print(f"phiforge {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in cmds:
        print(_top_help(cmds), file=sys.stderr)
        print(f"phiforge: error: unknown command {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(cmds[name][0])
    parser = _Parser(
        prog=f"phiforge {name}",
        description=(module.__doc__ or cmds[name][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", default=debug, help="show full tracebacks for errors")
    parser.add_argument("--quiet", action="store_true", default=quiet, help="no progress bars")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    if args.quiet:
        from phiforge.progress import set_quiet

        set_quiet(True)
    try:
        code = module.main(args)
    except PhiforgeError as e:
        if args.debug:
            raise
        print(f"phiforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("phiforge: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
