"""Domain adaptation from a corpus alone (GPL, Wang et al. 2022), in one command: generate queries, mine negatives
with the student, score with a teacher, train with MarginMSE, evaluate.

    python -m twinfold.train.adapt --corpus BEIR_DIR|DOCS.jsonl --generator G --teacher X --out DIR
        [--model STUDENT] [--queries-per-doc 3] [--recipe RECIPE.yaml] [--eval BEIR_DIR [--eval-split test]]
        [--prepare-only] [section.key=value ...]

Every step writes into DIR and is reused when the command runs again with the same inputs:
1. `generated.jsonl`: `--queries-per-doc` queries per document by the generator (`pairs --method generate`;
   resumable within the step);
2. `mined/`: a hard negative per query, mined by the student over the corpus (drawn at random from its top 50,
   the document itself excluded; no false-negative guard: a negative the teacher scores like the positive gets a
   small margin; cached by the student's fingerprint and the inputs);
3. `scored.jsonl`: the teacher's scores of each (query, positive) and (query, negative) (`score`);
4. `recipe.yaml` and `run/`: a training recipe on the scored file, with `loss.kind: margin_mse`, trained and
   evaluated like any run (`train.resume: true`, so a killed run goes on from its last checkpoint).
The recipe starts from `--recipe` (its model, schedule, seed and evaluation) or from twinfold's defaults (batch 32,
one epoch, lr 2e-5, `--seed`); its data is the scored file, its output `DIR/run`; overrides apply last. With a
cross-encoder teacher `loss.teacher_temperature` is 1 (its logits as they are) unless the recipe sets it.
`--prepare-only` stops before training and prints the command that trains the recipe (`accelerate launch` for
several processes).
DIR is the command's own: a folder holding anything else is refused.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from twinfold.models import BiEncoder
from twinfold.models.encode import non_positive_option
from twinfold.models.files.atomic import OverwriteRefused, atomic_write_bytes, file_sha256
from twinfold.train.config import ConfigError, DatasetConfig, HardNegativesConfig, load_config
from twinfold.train.corpus_pairs import add_generator_options, generator_numbers, load_generator
from twinfold.train.eval.beir import corpus_file
from twinfold.train.generate import write_generated_pairs
from twinfold.train.mine import MemoEncoder, mine_dataset, provenance_path
from twinfold.train.score import KINDS, load_teacher, teacher_kind, write_scores

log = logging.getLogger(__name__)
MARKER = "adapt.json"  # the command's settings; marks DIR as the command's own
STEPS = ("generated.jsonl", "generated.jsonl.generating.jsonl", "mined", "scored.jsonl", "recipe.yaml", "run", MARKER)
DEFAULT_STUDENT = "sentence-transformers/all-MiniLM-L6-v2"
# GPL's negatives: one drawn from the student's top 50, no false-negative guard (the teacher's margin decides)
MINING = {"num_negatives": 1, "range_min": 0, "range_max": 50, "sampling": "random", "max_score_ratio": None}


def claim_folder(out: Path) -> None:
    """Refuse a DIR that holds anything but this command's steps (`ConfigError`, nothing written)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    strangers = sorted(p.name for p in out.iterdir() if p.name not in STEPS and not
                       (p.name.endswith(".provenance.json") or p.name.startswith(".tmp-"))) if out.exists() else []
    if strangers:
        raise ConfigError(f"--out {out}: holds files that `twinfold adapt` did not write ({', '.join(strangers[:3])}); "
                          "choose a new folder")


def _reusable(out: Path, expected: dict) -> bool:
    """Whether `out` is a finished step whose provenance records `expected` and whose file is unchanged."""
    try:
        provenance = json.loads(provenance_path(out).read_text())
        return all(provenance.get(k) == v for k, v in expected.items()) and \
            provenance["sha256"] == file_sha256(out)
    except (OSError, ValueError, KeyError):
        return False


def prepare(args, out: Path) -> tuple[Path, str]:
    """Steps 1-3; return the scored pair file and the teacher's kind."""
    corpus = str(corpus_file(args.corpus))
    generated, scored = out / "generated.jsonl", out / "scored.jsonl"
    generator = load_generator(args)
    settings = {**generator.settings(), "per_doc": args.queries_per_doc, "seed": args.seed,
                "batch_size": args.batch_size}
    expected = {"corpus": corpus, "settings": settings,
                "generator": {"name": args.generator, "fingerprint": generator.fingerprint()}}
    if _reusable(generated, expected):
        log.info("%s: reusing the generated queries", generated)
    else:
        p = write_generated_pairs(generated, args.corpus, generator, args.generator, args.queries_per_doc, args.seed,
                                  args.batch_size)
        log.info("%s: %d queries for %d of %d documents", generated, p["rows_out"], p["documents"] - p["skipped"],
                 p["documents"])
    del generator
    student = BiEncoder.from_pretrained(args.student)
    mined = mine_dataset(DatasetConfig(path=str(generated), hard_negatives=HardNegativesConfig(
        **MINING, corpus=str(args.corpus), seed=args.seed)), MemoEncoder(student, args.encode_batch_size),
        out / "mined", args.student, "--out")
    del student
    kind = teacher_kind(args.teacher, args.teacher_kind)
    teacher = load_teacher(args.teacher, kind)
    expected = {"teacher": args.teacher, "kind": kind, "fingerprint": teacher.fingerprint(), "data": mined.path}
    if _reusable(scored, expected):
        log.info("%s: reusing the teacher's scores", scored)
    else:
        write_scores(teacher, args.teacher, kind, Path(mined.path), scored, args.encode_batch_size)
    return scored, kind


def read_recipe(path: str | None) -> dict:
    """The `--recipe` to start from, as written (empty without one)."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise ConfigError(f"--recipe {path}: not found")
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"--recipe {path}: not a YAML mapping of sections")
    return cfg


def recipe(args, cfg: dict, out: Path, scored: Path, kind: str) -> dict:
    """The training recipe, as the module says, from the `--recipe` read (`cfg`)."""
    sections = {name: dict(cfg.get(name) or {}) for name in ("model", "data", "loss", "train", "eval")}
    sections["model"]["name_or_path"] = args.student
    sections["data"]["train"] = [{"path": str(scored.resolve())}]
    loss = sections["loss"]
    loss["kind"] = loss.get("kind") if loss.get("kind") in ("margin_mse", "kl") else "margin_mse"
    loss.setdefault("temperature", 0.05)
    if kind == "cross-encoder":
        loss.setdefault("teacher_temperature", 1.0)
    train = sections["train"]
    if not args.recipe:
        train.update(batch_size=32, epochs=1, lr=2e-5, warmup_ratio=0.1)
    train.update(output_dir=str((out / "run").resolve()), resume=True)
    train.setdefault("seed", args.seed)
    if args.eval:
        sections["eval"].update(data=str(args.eval), split=args.eval_split)
    return {**cfg, **{k: v for k, v in sections.items() if v}}


def student_of(args, cfg: dict) -> str:
    """The student: `--model`, else the recipe's model, else all-MiniLM-L6-v2."""
    return args.model or (cfg.get("model") or {}).get("name_or_path") or DEFAULT_STUDENT


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.train.adapt") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, type=Path, help="BEIR folder or JSONL of documents (_id, title, text)")
    p.add_argument("--teacher", required=True, help="cross-encoder or bi-encoder: folder or hub id")
    p.add_argument("--out", required=True, type=Path, help="the command's folder (steps, recipe, run)")
    p.add_argument("--model", help=f"the student (default: the recipe's model, else {DEFAULT_STUDENT})")
    p.add_argument("--queries-per-doc", type=int, default=3)
    p.add_argument("--recipe", help="a training recipe (YAML) to start from")
    p.add_argument("--eval", help="BEIR folder to evaluate the base and the trained model on")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--teacher-kind", choices=KINDS, default="auto")
    p.add_argument("--encode-batch-size", type=int, default=64, help="mining and scoring batch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--prepare-only", action="store_true", help="stop before training; print the command")
    add_generator_options(p)
    p.add_argument("overrides", nargs="*", help="section.key=value for the training recipe, e.g. train.lr=3e-5")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.generator is None:
        p.error("the following arguments are required: --generator")
    problem = non_positive_option({"--queries-per-doc": args.queries_per_doc, **generator_numbers(args),
                                   "--encode-batch-size": args.encode_batch_size})
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from twinfold.train.__main__ import USER_ERRORS
    from twinfold.train.loop import TrainingError, train
    from twinfold.train.signals import StoppedBySignal

    out = args.out
    try:
        base = read_recipe(args.recipe)
        args.student = student_of(args, base)
        claim_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        command = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        atomic_write_bytes(out / MARKER, (json.dumps(command, indent=2) + "\n").encode())
        scored, kind = prepare(args, out)
        recipe_path = out / "recipe.yaml"
        atomic_write_bytes(recipe_path, yaml.safe_dump(recipe(args, base, out, scored, kind), sort_keys=False).encode())
        cfg = load_config(recipe_path, args.overrides)
        if args.prepare_only:
            print(f"prepared {recipe_path}; train it with: accelerate launch -m twinfold.train {recipe_path} "
                  + " ".join(args.overrides))
            return 0
        final = Path(cfg.train.output_dir) / "final"
        if (final / "twinfold.json").exists():
            print(f"done: {final} exists (remove {final.parent} to train again)")
            return 0
        final = train(cfg)
    except (*USER_ERRORS, TrainingError, OverwriteRefused, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoppedBySignal as e:
        print(f"stopped: {e} (run the same command again to go on)", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stopped by SIGINT; run the same command again to go on from the last finished step", file=sys.stderr)
        return 130
    print(f"done: exported model in {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
