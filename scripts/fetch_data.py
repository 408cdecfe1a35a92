"""Download public datasets into $TWINFOLD_DATA (default ./data) in twinfold's layouts.

    python scripts/fetch_data.py scifact      # BEIR folder scifact/ + scifact-train-pairs/train.jsonl
    python scripts/fetch_data.py stsb         # stsb/{train,dev,test}.tsv: sentence1, sentence2, score

Needs a network. The conversions (BEIR train judgments -> pairs, STS Benchmark -> TSV) are plain functions
that also run on local files.
"""
import argparse
import csv
import io
import json
import os
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

SOURCES = {
    "scifact": "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip",
    "stsb": "https://ixa2.si.ehu.eus/stswiki/images/4/48/Stsbenchmark.tar.gz",
}


def beir_pairs(beir_dir: Path, split: str = "train") -> list[dict]:
    """One {"anchor": query, "positive": "title abstract"} pair per positive judgment of `split`."""
    def read(name):
        with open(beir_dir / name, encoding="utf-8") as f:
            return {row["_id"]: row for row in map(json.loads, f)}

    corpus, queries = read("corpus.jsonl"), read("queries.jsonl")
    pairs = []
    with open(beir_dir / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["score"]) > 0:
                doc = corpus[row["corpus-id"]]
                pairs.append({"anchor": queries[row["query-id"]]["text"],
                              "positive": f"{doc.get('title', '')} {doc['text']}".strip()})
    return pairs


def stsb_rows(raw: str) -> list[dict]:
    """Rows of an original STS Benchmark file (genre, file, year, id, score, s1, s2[, ...]) as dicts."""
    rows = []
    for line in raw.splitlines():
        fields = line.split("\t")
        if len(fields) >= 7:
            rows.append({"sentence1": fields[5], "sentence2": fields[6], "score": fields[4]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["sentence1", "sentence2", "score"], delimiter="\t",
                                quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def fetch(name: str, root: Path) -> None:
    with urllib.request.urlopen(SOURCES[name], timeout=120) as response:
        payload = response.read()
    if name == "scifact":
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            z.extractall(root)
        write_jsonl(root / "scifact-train-pairs" / "train.jsonl", beir_pairs(root / "scifact", "train"))
    else:
        with tarfile.open(fileobj=io.BytesIO(payload)) as t:
            for split, member in (("train", "sts-train.csv"), ("dev", "sts-dev.csv"), ("test", "sts-test.csv")):
                raw = t.extractfile(f"stsbenchmark/{member}").read().decode("utf-8")
                write_tsv(root / "stsb" / f"{split}.tsv", stsb_rows(raw))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+", choices=sorted(SOURCES))
    args = p.parse_args(argv)
    root = Path(os.environ.get("TWINFOLD_DATA", "data"))
    for name in args.names:
        try:
            fetch(name, root)
        except OSError as e:
            print(f"error: cannot download {name} from {SOURCES[name]}: {e}", file=sys.stderr)
            return 2
        print(f"{name} -> {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
