"""Merge a fine-tuned model with its base: weights base * (1 - alpha) + tuned * alpha, written as an export.

The interpolation and its checks are models.merge; the folder loads in twinfold and sentence-transformers.

    python -m twinfold.train.merge BASE TUNED --alpha A --out DIR
    python -m twinfold.train.merge BASE TUNED --alpha auto --dev BEIR_DIR [--dev-split dev] --general STS_OR_BEIR
        [--general ...] [--general-split test] [--keep-gain 0.8] [--grid 0,0.1,...,1] --out DIR

alpha 0 is BASE, 1 is TUNED. `--alpha auto` scores every alpha of the grid (0 and 1 always among them) on the dev
split (nDCG@10 at full dimension, float32) and, for those that keep the gain, on the general sets (an STS file:
Spearman; a BEIR folder: nDCG@10 on `--general-split`; several: their mean). An alpha keeps the gain when
`dev(alpha) - dev(0) >= keep_gain * (dev(1) - dev(0))`; of those, the one with the largest general score is chosen
(ties: the smaller alpha). twinfold.json records both inputs' fingerprints, alpha and, for auto, every score.
DIR must be new, empty or an earlier twinfold export (`--overwrite` replaces anything else).
"""
import argparse
import logging
import sys
from pathlib import Path

from twinfold.models.bi_encoder import BiEncoder
from twinfold.models.encode import non_positive_option
from twinfold.models.export import check_not_a_checkpoint
from twinfold.models.files.atomic import OverwriteRefused, check_replaceable, check_writable
from twinfold.models.loading import ModelLoadError
from twinfold.models.merge import FORMULA, MergeError, check_mergeable, merge
from twinfold.train.eval.beir import BeirFormatError, load_beir
from twinfold.train.evaluate import GeneralEvaluator, RetrievalEvaluator, StsFormatError

log = logging.getLogger("twinfold")
DEFAULT_GRID = tuple(i / 10 for i in range(11))


def choose_alpha(scores: list[dict], keep_gain: float) -> dict:
    """The row of `scores` ({"alpha", "dev", "general"}, alpha 0 and 1 among them) that keeps `keep_gain` of the
    dev gain with the largest general score, as the module says (general None: not scored, never chosen)."""
    dev = {r["alpha"]: r["dev"] for r in scores}
    needed = keep_gain * (dev[1.0] - dev[0.0])
    kept = [r for r in scores if r["dev"] - dev[0.0] >= needed and r.get("general") is not None]
    return max(kept, key=lambda r: (r["general"], -r["alpha"]))


def search_alpha(base: BiEncoder, tuned: BiEncoder, dev: RetrievalEvaluator, general: list[GeneralEvaluator],
                 keep_gain: float, grid) -> tuple[float, list[dict]]:
    """Score the grid (dev for every alpha, the general sets for those that keep the gain); the chosen alpha and
    every row."""
    alphas = sorted({0.0, 1.0, *map(float, grid)})
    scores = []
    for alpha in alphas:
        scores.append({"alpha": alpha, "dev": dev(merge(base, tuned, alpha), f"alpha-{alpha:g}")[0]["ndcg@10"]})
        log.info("alpha %g: dev nDCG@10 %.4f", alpha, scores[-1]["dev"])
    gain = scores[-1]["dev"] - scores[0]["dev"]
    if gain <= 0:
        log.warning("TUNED does not beat BASE on the dev split (nDCG@10 %.4f vs %.4f)", scores[-1]["dev"],
                    scores[0]["dev"])
    for row in scores:
        if row["dev"] - scores[0]["dev"] >= keep_gain * gain:
            model = merge(base, tuned, row["alpha"])
            row["general_sets"] = {g.path: g(model) for g in general}
            row["general"] = sum(row["general_sets"].values()) / len(general)
            log.info("alpha %g: general %.4f (%s)", row["alpha"], row["general"],
                     ", ".join(f"{k} {v:.4f}" for k, v in row["general_sets"].items()))
    return choose_alpha(scores, keep_gain)["alpha"], scores


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1] (0: BASE, 1: TUNED)")
    return value


def _grid(text: str) -> list[float]:
    values = [_alpha(x.strip()) for x in text.split(",") if x.strip()]
    if not values or "auto" in values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return values


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.train.merge") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("base", help="the base model (folder or name)")
    p.add_argument("tuned", help="the fine-tuned model (folder or name) of the same architecture and tokenizer")
    p.add_argument("--alpha", required=True, type=_alpha, help=f"{FORMULA}: a number in [0, 1], or auto")
    p.add_argument("--out", required=True, type=Path, help="the merged model folder")
    p.add_argument("--dev", type=Path, help="auto: BEIR folder whose --dev-split measures the domain gain")
    p.add_argument("--dev-split", default="dev", help="auto: the split of --dev (qrels/SPLIT.tsv)")
    p.add_argument("--general", type=Path, action="append", default=[],
                   help="auto: STS file or BEIR folder that measures forgetting (repeat for several)")
    p.add_argument("--general-split", default="test", help="the split of a BEIR --general folder")
    p.add_argument("--keep-gain", type=float, default=0.8, help="auto: the share of the dev gain to keep")
    p.add_argument("--grid", type=_grid, default=list(DEFAULT_GRID), help="auto: the alphas tried (0 and 1 always)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch (auto)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")
    p.add_argument("--trust-remote-code", action="store_true", help="run the models' own code")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if twinfold did not write it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    auto = args.alpha == "auto"
    problem = non_positive_option({"--batch-size": args.batch_size})
    if auto and (args.dev is None or not args.general):
        problem = "--alpha auto needs --dev BEIR_DIR and at least one --general STS_OR_BEIR"
    elif not auto and (args.dev is not None or args.general):
        problem = "--dev and --general choose alpha: give them with --alpha auto only"
    elif not 0 < args.keep_gain <= 1:
        problem = f"--keep-gain {args.keep_gain} must be in (0, 1]"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        check_not_a_checkpoint(args.out)
        check_replaceable(args.out, args.overwrite, "Choose another folder or pass --overwrite to replace it")
        check_writable(args.out, "--out")
        if auto:  # the sets are read before any model is loaded
            dev = RetrievalEvaluator(load_beir(args.dev, args.dev_split), batch_size=args.batch_size, cache_size=1)
            general = [GeneralEvaluator(g, args.general_split, args.batch_size) for g in args.general]
        base, tuned = (BiEncoder.from_pretrained(m, allow_pickle=args.allow_pickle,
                                                 trust_remote_code=args.trust_remote_code).merged()
                       for m in (args.base, args.tuned))
        check_mergeable(base, tuned)
        record = {"formula": FORMULA, "base": {"model": args.base, "fingerprint": base.fingerprint()},
                  "tuned": {"model": args.tuned, "fingerprint": tuned.fingerprint()}}
        alpha = args.alpha
        if auto:
            alpha, scores = search_alpha(base, tuned, dev, general, args.keep_gain, args.grid)
            record["auto"] = {"dev": str(args.dev), "dev_split": args.dev_split, "dev_metric": "ndcg@10",
                              "general": [{"data": g.path, "metric": g.metric} for g in general],
                              "keep_gain": args.keep_gain, "scores": scores}
        kept = {k: v for k, v in tuned.info.items() if k not in ("eval", "general")}  # scores of TUNED, not of this
        info = {**kept, "merge": {**record, "alpha": alpha}}
        model = merge(base, tuned, alpha, info)
        model.save_pretrained(args.out, overwrite=args.overwrite)
    except (MergeError, ModelLoadError, BeirFormatError, StsFormatError, OverwriteRefused, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.base} and {args.tuned} at alpha {alpha:g} ({FORMULA}) -> {args.out} "
          f"(fingerprint {model.fingerprint()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
