"""The code rotation's settings, chosen without the test set: k-fold over the judged queries of a BEIR split
(SciFact train by default). In each fold the rotation is fitted on the other folds' queries and their relevant
documents, then the held-out queries search the whole corpus in float32 and in binary (the report's search). The
table gives, per number of steps a block, the mean nDCG@10 gap binary - float32 at each Matryoshka dim.

    python scripts/bench_rotation.py MODEL [--data DIR] [--split train] [--steps 0,200,800,1600] [--folds 5]

MODEL is a trained model folder without a rotation (a run without `rotation_steps`); its Matryoshka dims (or
`--dims`) cut the rotation's blocks. Steps 0 is the model as it is.
"""
import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine  # noqa: E402

from twinfold.models import BiEncoder  # noqa: E402
from twinfold.train.eval.beir import BeirData, load_beir  # noqa: E402
from twinfold.train.evaluate import RetrievalEvaluator  # noqa: E402
from twinfold.train.rotation import ROTATION_LR, fit_rotation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", default=os.path.join(os.environ.get("TWINFOLD_DATA", "data"), "scifact"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--steps", default="0,200,800,1600", help="steps a block, comma-separated")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--dims", help="comma-separated; default: the model's Matryoshka dims, else its width")
    parser.add_argument("--lr", type=float, default=ROTATION_LR)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    model = BiEncoder.from_pretrained(args.model)
    data = load_beir(args.data, args.split)
    dims = [int(d) for d in args.dims.split(",")] if args.dims else model.settings.matryoshka_dims or [model.dim]
    dims = sorted(dims, reverse=True)
    queries = model.encode(data.query_texts, args.batch_size, kind="query", convert_to_tensor=True).float()
    corpus = model.encode(data.corpus_texts, args.batch_size, kind="document", convert_to_tensor=True).float()
    row_of = {doc: i for i, doc in enumerate(data.corpus_ids)}
    order = np.random.default_rng(0).permutation(len(data.query_ids))
    folds = [fold(data, row_of, sorted(order[k::args.folds]), dims) for k in range(args.folds)]

    print(f"# {args.model} on {args.data} ({args.split}: {len(data.query_ids)} queries, {len(data.corpus_ids)} "
          f"documents), {args.folds} folds, lr {args.lr}, temperature {args.temperature}\n# {machine()}\n")
    print("| steps a block | fit seconds | " + " | ".join(f"gap at {d}" for d in dims) + " |")
    print("|---:|---:|" + "---:|" * len(dims))
    for steps in [int(s) for s in args.steps.split(",")]:
        gaps, seconds = [], 0.0
        for held, anchors, bank, targets, evaluator in folds:
            started = time.perf_counter()
            rotation, _ = fit_rotation(queries[anchors], corpus[bank], targets, dims, args.temperature, steps,
                                       lr=args.lr)
            seconds += time.perf_counter() - started
            rows = {(r["dim"], r["precision"]): r["ndcg@10"]
                    for r in evaluator.score_embeddings(queries[held] @ rotation, corpus @ rotation, "held-out")}
            gaps.append([rows[d, "binary"] - rows[d, "float32"] for d in dims])
        print(f"| {steps} | {seconds / args.folds:.1f} | " + " | ".join(f"{g:+.4f}" for g in np.mean(gaps, 0)) + " |",
              flush=True)


def fold(data: BeirData, row_of: dict[str, int], held: list[int], dims: list[int]):
    """One fold: the held-out queries' positions; the other queries' fitting pairs (each query once per relevant
    document: query positions, corpus rows of the bank, each pair's place in the bank); the held-out evaluator."""
    held_set = set(held)
    pairs = [(q, row_of[doc]) for q, qid in enumerate(data.query_ids) if q not in held_set
             for doc, grade in data.qrels[qid].items() if grade > 0]
    bank = list(dict.fromkeys(doc for _, doc in pairs))  # each relevant document once, in order
    slot = {doc: i for i, doc in enumerate(bank)}
    subset = dataclasses.replace(data, query_ids=[data.query_ids[q] for q in held],
                                 query_texts=[data.query_texts[q] for q in held],
                                 qrels={data.query_ids[q]: data.qrels[data.query_ids[q]] for q in held})
    return (held, [q for q, _ in pairs], bank, torch.tensor([slot[doc] for _, doc in pairs]),
            RetrievalEvaluator(subset, dims=dims, precisions=("float32", "binary")))


if __name__ == "__main__":
    main()
