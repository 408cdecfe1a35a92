"""The `twinfold` command: `twinfold COMMAND [ARGS]` runs the `python -m` entry point of that name.

Each command is that module's `main`, with its options, help and exit codes; `twinfold train CONFIG [overrides]`
is `python -m twinfold.train CONFIG [overrides]` (use `accelerate launch -m twinfold.train` for several processes).
"""
import argparse
import importlib

COMMANDS = {  # command: (module whose main(argv, prog) it runs, summary for `twinfold --help`)
    "train": ("twinfold.train.__main__", "run a training recipe"),
    "evaluate": ("twinfold.train.evaluate", "retrieval evaluation of models on a BEIR folder (and BM25, STS)"),
    "mine": ("twinfold.train.mine", "mine hard negatives into a pair file"),
    "pairs": ("twinfold.train.corpus_pairs", "make a pair file from a corpus alone (title, crop, ict, generate)"),
    "adapt": ("twinfold.train.adapt", "adapt to a corpus alone: generate queries, mine, score, distil (GPL)"),
    "score": ("twinfold.train.score", "add a teacher's scores (cross-encoder or bi-encoder) to a pair file"),
    "merge": ("twinfold.train.merge", "interpolate a fine-tuned model's weights with its base's (alpha, or auto)"),
    "encode": ("twinfold.models.encode", "embed texts into an embedding file or a sharded dataset; keep it up to date"),
    "export": ("twinfold.models.export", "export a model folder that sentence-transformers loads too"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinfold", description=__doc__.splitlines()[0],
                                     epilog="`twinfold COMMAND --help` lists the options of a command.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)  # its own main parses (and helps with) the rest
    args, rest = parser.parse_known_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(rest, prog=f"twinfold {args.command}")
