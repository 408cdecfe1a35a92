"""`accelerate launch -m twinfold.train CONFIG.yaml [section.key=value ...] [--debug]`: run a training recipe."""
import argparse
import logging
import os
import sys

from twinfold.losses import ReplayMismatch
from twinfold.models.loading import ModelLoadError
from twinfold.train.config import ConfigError, load_config
from twinfold.train.data.pairs import DataError
from twinfold.train.eval.beir import BeirFormatError
from twinfold.train.evaluate import StsFormatError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, BeirFormatError, StsFormatError)


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("config", help="YAML recipe, e.g. configs/scifact.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-5")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from twinfold.train.loop import TrainingError, train
    from twinfold.train.signals import StoppedBySignal

    try:
        final = train(load_config(args.config, args.overrides))
    except (*USER_ERRORS, TrainingError, ReplayMismatch) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoppedBySignal as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    if os.environ.get("RANK", "0") == "0":
        print(f"done: exported model in {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
