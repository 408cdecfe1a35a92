"""Training pairs from a corpus alone (title, crop or ict), written as an ordinary pair file with its provenance.

The file has `anchor` and `positive` columns; `OUT.provenance.json` goes beside it.

    python -m twinfold.train.corpus_pairs --corpus BEIR_DIR|DOCS.jsonl --method title|crop|ict --out PAIRS.jsonl
        [--per-doc 1] [--seed 42] [--overwrite]
    python -m twinfold.train.corpus_pairs --corpus C --method generate --generator MODEL --out PAIRS.jsonl
        [--per-doc 3] [--prompt TEXT] [--batch-size 16] [--max-new-tokens 64] [--max-doc-tokens 300] [--top-p 0.95]

- `title`: the document's title is the anchor, its text the positive (one pair per document; documents without a
  title are skipped, and a corpus where none has one is an error).
- `crop` (independent cropping, Contriever, Izacard et al. 2021): two spans of the document's words (title and text,
  split at whitespace), each of `int(r * n)` of its `n` words for a ratio `r` drawn uniformly from [0.1, 0.5], at a
  start drawn uniformly; the two are drawn independently, so they may overlap, nest or lie apart. A document needs
  10 words (a span of at least one word).
- `ict` (inverse cloze task, Lee et al. 2019): one sentence of the text is the anchor; the positive is the title and
  the other sentences in order, and with probability 0.1 the sentence itself stays among them. Sentences end at
  `.`, `!` or `?` followed by whitespace; a document needs two.

- `generate` (GPL, Wang et al. 2022): a seq2seq or causal generator model samples N queries per document, each
  paired with the document (title and text); resumable (see `twinfold.train.generate`).

`--per-doc N`: crop draws N pairs per document, ict takes N distinct sentences (all of them where it has fewer),
generate samples N queries (default 3; repeated queries of a document are kept once).
Each document draws from its own generator, seeded by (seed, method, document id), so a document's pairs do not
depend on the others. The corpus is read one document at a time and the file written as it goes, through a
temporary file: a run that fails writes nothing. Documents too short for the method are skipped and counted. An
existing OUT is replaced only if it is a pair file twinfold wrote, unchanged (`--overwrite`: anything but the
corpus file).
"""
import argparse
import hashlib
import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from twinfold.models.encode import non_positive_option
from twinfold.models.files.atomic import OverwriteRefused, atomic_file, atomic_write_bytes, check_writable
from twinfold.models.generator import CAUSAL_PROMPT, SEQ2SEQ_PROMPT, QueryGenerator
from twinfold.models.loading import ModelLoadError
from twinfold.train.data.pairs import DataError
from twinfold.train.eval.beir import BeirFormatError, Document, corpus_file, iter_documents
from twinfold.train.generate import write_generated_pairs
from twinfold.train.mine import check_pair_output, provenance_path

METHODS = ("title", "crop", "ict", "generate")
CROP_RATIO = (0.1, 0.5)  # a span's share of the document's words (Contriever's ratio_min, ratio_max)
CROP_MIN_WORDS = 10  # int(0.1 * n) >= 1: every span holds a word
ICT_KEEP = 0.1  # the chance that the anchor sentence stays in its context (Lee et al. 2019)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SHORT = {"title": "no title or no text", "crop": f"fewer than {CROP_MIN_WORDS} words", "ict": "fewer than 2 sentences",
         "generate": "no query generated"}


def document_rng(seed: int, method: str, doc_id: str) -> random.Random:
    """The generator of one document's pairs (Python's string seeding: the same on every platform and run)."""
    return random.Random(f"{seed}\0{method}\0{doc_id}")


def random_crop(words: list[str], rng: random.Random) -> list[str]:
    """A span of `int(r * len(words))` consecutive words, `r` uniform in CROP_RATIO, at a uniform start."""
    length = int(len(words) * rng.uniform(*CROP_RATIO))
    start = rng.randint(0, len(words) - length)
    return words[start:start + length]


def sentences(text: str) -> list[str]:
    """The sentences of a text: split after `.`, `!` or `?` followed by whitespace."""
    return [s for s in SENTENCE_END.split(text.strip()) if s]


def document_pairs(doc: Document, method: str, per_doc: int, seed: int) -> list[tuple[str, str]]:
    """The (anchor, positive) pairs of one document (none: too short for the method), as the module says."""
    rng = document_rng(seed, method, doc.id)
    if method == "title":
        return [(doc.title.strip(), doc.text.strip())] if doc.title.strip() and doc.text.strip() else []
    if method == "crop":
        words = doc.full_text.split()
        if len(words) < CROP_MIN_WORDS:
            return []
        return [(" ".join(random_crop(words, rng)), " ".join(random_crop(words, rng))) for _ in range(per_doc)]
    parts = sentences(doc.text)
    if len(parts) < 2:
        return []
    pairs = []
    for i in sorted(rng.sample(range(len(parts)), min(per_doc, len(parts)))):
        context = parts if rng.random() < ICT_KEEP else parts[:i] + parts[i + 1:]
        pairs.append((parts[i], " ".join([doc.title.strip(), *context]).strip()))
    return pairs


def corpus_pairs(corpus: str | Path, method: str, per_doc: int, seed: int, counts: dict) -> Iterator[tuple[str, str]]:
    """The pairs of every document of `corpus`, one document at a time; `counts` gets documents, skipped, rows_out."""
    counts.update(documents=0, skipped=0, rows_out=0)
    for doc in iter_documents(corpus_file(corpus)):
        pairs = document_pairs(doc, method, per_doc, seed)
        counts["documents"] += 1
        counts["skipped"] += not pairs
        counts["rows_out"] += len(pairs)
        yield from pairs


def write_corpus_pairs(out: str | Path, corpus: str | Path, method: str, per_doc: int = 1, seed: int = 42) -> dict:
    """Write the pair file and `OUT.provenance.json`; return the provenance. A corpus without any title for
    `title`, or without any document long enough, raises `DataError` and writes nothing."""
    counts: dict = {}
    digest = hashlib.sha256()
    source = corpus_file(corpus)
    with atomic_file(out) as f:
        for anchor, positive in corpus_pairs(corpus, method, per_doc, seed, counts):
            line = (json.dumps({"anchor": anchor, "positive": positive}, ensure_ascii=False) + "\n").encode()
            f.write(line)
            digest.update(line)
        if not counts["rows_out"]:
            what = "no document has a title; use --method crop or ict" if method == "title" else \
                f"every document has {SHORT[method]}, too short for --method {method}"
            raise DataError(f"{source}: {what}; nothing was written")
    settings = {"per_doc": per_doc, "seed": seed, **{
        "crop": {"ratio_min": CROP_RATIO[0], "ratio_max": CROP_RATIO[1], "min_words": CROP_MIN_WORDS},
        "ict": {"keep_probability": ICT_KEEP, "min_sentences": 2}}.get(method, {})}
    provenance = {"corpus": str(corpus), "method": method, "settings": settings, **counts,
                  "skipped_because": SHORT[method], "sha256": digest.hexdigest(),
                  "columns": {"anchor": "anchor", "positive": "positive"}}
    atomic_write_bytes(provenance_path(out), (json.dumps(provenance, indent=2) + "\n").encode())
    return provenance


def main(argv: list[str] | None = None, prog: str = "python -m twinfold.train.corpus_pairs") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, type=Path, help="BEIR folder or JSONL of documents (_id, title, text)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="title: title -> text; crop: two random spans; ict: a sentence -> the rest of its passage; "
                        "generate: queries written by --generator -> the document")
    p.add_argument("--out", required=True, type=Path, help="the pair file (JSONL: anchor, positive)")
    p.add_argument("--per-doc", type=int, help="pairs per document (crop, ict: default 1) or queries (generate: 3)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true", help="replace --out even if twinfold did not write it")
    add_generator_options(p)
    args = p.parse_args(argv)
    per_doc = args.per_doc if args.per_doc is not None else 3 if args.method == "generate" else 1
    problem = non_positive_option({"--per-doc": per_doc, **generator_numbers(args)})
    if not problem and args.method == "title" and per_doc > 1:
        problem = f"--per-doc {per_doc}: --method title makes one pair per document"
    if not problem and (args.method == "generate") != (args.generator is not None):
        problem = "--method generate needs --generator MODEL" if args.generator is None else \
            f"--generator: only --method generate uses a generator, not --method {args.method}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        check_pair_output(args.out, corpus_file(args.corpus), args.overwrite, "--corpus")
        check_writable(args.out, "--out")
        if args.method == "generate":
            provenance = write_generated_pairs(args.out, args.corpus, load_generator(args), args.generator, per_doc,
                                               args.seed, args.batch_size)
        else:
            provenance = write_corpus_pairs(args.out, args.corpus, args.method, per_doc, args.seed)
    except (DataError, BeirFormatError, ModelLoadError, OverwriteRefused, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped by SIGINT" + ("; run the same command again to go on generating" if args.method == "generate"
                                     else ""), file=sys.stderr)
        return 130
    c = provenance
    print(f"wrote {c['rows_out']} pair(s) ({args.method}) from {c['documents'] - c['skipped']} of {c['documents']} "
          f"documents to {args.out}; {c['skipped']} skipped ({SHORT[args.method]})")
    return 0


def add_generator_options(p: argparse.ArgumentParser) -> None:
    """The options that load and drive a query generator (`pairs --method generate`, `adapt`)."""
    p.add_argument("--generator", help="seq2seq or causal language model: folder or hub id (generate)")
    p.add_argument("--prompt", help=f"the generator's input, {{text}} standing for the document (default: "
                                    f"{SEQ2SEQ_PROMPT!r} for seq2seq, {CAUSAL_PROMPT!r} for causal models)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per generate call")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens of a query at most")
    p.add_argument("--max-doc-tokens", type=int, default=300, help="the document is cut to this many tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")
    p.add_argument("--trust-remote-code", action="store_true", help="run the generator's own code")


def generator_numbers(args) -> dict:
    """The generator options that must be positive, by option name."""
    return {"--batch-size": args.batch_size, "--max-new-tokens": args.max_new_tokens,
            "--max-doc-tokens": args.max_doc_tokens}


def load_generator(args) -> QueryGenerator:
    """The generator the options name."""
    return QueryGenerator.from_pretrained(args.generator, args.allow_pickle, args.trust_remote_code, prompt=args.prompt,
                                          max_doc_tokens=args.max_doc_tokens, max_new_tokens=args.max_new_tokens,
                                          top_p=args.top_p)


if __name__ == "__main__":
    sys.exit(main())
