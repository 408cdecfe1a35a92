"""A recipe end to end: twinfold's run (training and its evaluations) against sentence-transformers' trainer on
the same recipe plus one evaluation; wall time and nDCG@10 at every Matryoshka dim.

    python scripts/bench_recipe.py configs/scifact_gpu.yaml --out DIR [section.key=value ...]

twinfold: `accelerate launch -m twinfold.train CONFIG` (one process), timed from launch to exit; nDCG@10 (float32) of
its final model from its own report. sentence-transformers: `SentenceTransformerTrainer` with the recipe's model,
max_length, data (anchor and positive roles), batch, epochs (or max_steps), lr, linear warmup, weight decay,
clipping, seed, mixed precision and the NO_DUPLICATES batch sampler, MultipleNegativesRankingLoss (its Cached
variant with the recipe's mini-batch) at scale 1/temperature inside MatryoshkaLoss; timed from process start
until its model is saved; then its model is evaluated once by `train.evaluate` on the recipe's eval set and dims
(timed apart). Both read nDCG@10 with the same evaluator.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, machine  # noqa: E402


def timed(command: list[str], log: Path) -> float:
    """Run `command` in the repository, its output into `log`; seconds from start to exit."""
    start = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    return seconds


def ndcg_by_dim(report: Path, model: str) -> dict[int, float]:
    rows = json.loads(report.read_text())["results"]
    return {r["dim"]: r["ndcg@10"] for r in rows if r["model"] == model and r["precision"] == "float32"}


def st_train(cfg, out: Path) -> None:
    """Train with sentence-transformers' trainer on the recipe and save the model into `out`."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from twinfold.models import resolve_model_path
    from twinfold.train.data.pairs import load_pairs

    t, loss_cfg = cfg.train, cfg.loss
    pairs = load_pairs(cfg.data.train[0])
    dataset = Dataset.from_dict({"anchor": pairs.anchor, "positive": pairs.positive})
    model = SentenceTransformer(resolve_model_path(cfg.model.name_or_path))
    if cfg.model.max_length:
        model.max_seq_length = cfg.model.max_length
    scale = 1 / loss_cfg.temperature
    inner = (CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=loss_cfg.mini_batch_size)
             if loss_cfg.mini_batch_size else MultipleNegativesRankingLoss(model, scale=scale))
    loss = MatryoshkaLoss(model, inner, matryoshka_dims=loss_cfg.matryoshka_dims) if loss_cfg.matryoshka_dims \
        else inner
    steps = t.max_steps or t.epochs * math.ceil(len(dataset) / t.batch_size)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=t.batch_size, learning_rate=t.lr,
        max_steps=steps, warmup_steps=int(t.warmup_ratio * steps), weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler, max_grad_norm=t.max_grad_norm or 0.0, seed=t.seed,
        bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16",
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", logging_steps=10)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    model.save(str(out / "model"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--st-child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    from twinfold.train.config import load_config

    cfg = load_config(args.config, overrides)
    if args.st_child:
        st_train(cfg, args.out)
        return 0
    if len(cfg.data.train) != 1 or cfg.data.train[0].hard_negatives or cfg.eval.data is None:
        parser.error("the comparison takes a recipe with one pair dataset, no mined negatives and an eval set")
    args.out.mkdir(parents=True, exist_ok=True)
    ours, theirs = args.out / "twinfold", args.out / "sentence-transformers"
    theirs.mkdir(exist_ok=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "twinfold.train",
              str(args.config), f"train.output_dir={ours}", *overrides]
    ours_s = timed(launch, args.out / "twinfold.log")
    eval_s = sum(json.loads(line).get("eval_s", 0) for line in (ours / "metrics.jsonl").read_text().splitlines())
    found = ndcg_by_dim(ours / "eval" / "report.json", "final")  # printed now: a call cut short keeps this side
    print(f"twinfold: {ours_s:.1f} s ({eval_s:.1f} s evaluating), nDCG@10 "
          + ", ".join(f"@{d} {v:.4f}" for d, v in sorted(found.items(), reverse=True)), flush=True)
    theirs_s = timed([sys.executable, __file__, str(args.config), "--out", str(theirs), "--st-child", *overrides],
                     args.out / "sentence-transformers.log")
    dims = cfg.eval.dims or cfg.loss.matryoshka_dims
    evaluate = [sys.executable, "-m", "twinfold.train.evaluate", "--model", str(theirs / "model"),
                "--data", cfg.eval.data, "--split", cfg.eval.split, "--batch-size", str(cfg.eval.batch_size),
                "--out", str(theirs / "eval"),
                "--no-progress", *(["--dims", ",".join(map(str, dims))] if dims else [])]
    theirs_eval_s = timed(evaluate, args.out / "sentence-transformers-eval.log")

    ndcg = {"twinfold": ndcg_by_dim(ours / "eval" / "report.json", "final"),
            "sentence-transformers": ndcg_by_dim(theirs / "eval" / "report.json", str(theirs / "model"))}
    dims = sorted(ndcg["twinfold"], reverse=True)
    lines = [f"machine: {machine()}", f"recipe: {args.config} {' '.join(overrides)}", "",
             "| | wall s (end to end) | of which evaluation s | " + " | ".join(f"nDCG@10 @{d}" for d in dims) + " |",
             "|---|---:|---:|" + "---:|" * len(dims),
             f"| twinfold (training + its evaluations) | {ours_s:.1f} | {eval_s:.1f} | "
             + " | ".join(f"{ndcg['twinfold'][d]:.4f}" for d in dims) + " |",
             f"| sentence-transformers (trainer + one evaluation) | {theirs_s + theirs_eval_s:.1f} | "
             f"{theirs_eval_s:.1f} | " + " | ".join(f"{ndcg['sentence-transformers'].get(d, float('nan')):.4f}"
                                                     for d in dims) + " |"]
    (args.out / "recipe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
