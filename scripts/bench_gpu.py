"""Every GPU speed configuration in one call: training (bench_train.py) and encoding (bench_encode.py)
against sentence-transformers on the same device, each table written to `--out`.

    python scripts/bench_gpu.py --out $OUT [--device cuda] [--rounds 2] [--tiny]

Training: all-MiniLM-L6-v2 at batch 32, 256 (cached, mini-batch 64) and 256; a BERT-base-size encoder (12 layers,
hidden 768, random weights with MiniLM's tokenizer, built here) at batch 128 and 1024 (cached, mini-batch 128).
Encoding: the SciFact corpus with all-MiniLM-L6-v2. MiniLM at batch 256 uncached, BERT-base at batch 128 and the
encoding also run unpadded (`--unpad`: twinfold's `model.unpad`, and sentence-transformers with flash_attention_2
where flash-attn is installed). Each training side's operators in one profiled step go to
`profile.md`. `--tiny` runs every configuration at toy sizes (a CPU check that
the script works before the one GPU call).
"""
import argparse
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def bert_base(folder: Path, tiny: bool) -> Path:
    """A random BERT-base-size encoder (tiny: 2 layers, hidden 128) saved with all-MiniLM-L6-v2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from twinfold.models import resolve_model_path

    size = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per configuration (each side a fresh process)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = bert_base(args.out / "bert-base", args.tiny)
    minilm = "sentence-transformers/all-MiniLM-L6-v2"
    # (model, batch, mini-batch, unpadded sides too)
    train = [(minilm, 32, 0, False), (minilm, 256, 64, False), (minilm, 256, 0, True), (str(base), 128, 0, True),
             (str(base), 1024, 128, False)]
    steps, rounds, length = ("1", "1", "32") if args.tiny else ("5", str(args.rounds), "256")
    runs = [("train", ["--model", model, "--batch-size", str(b // 16 if args.tiny else b),
                       "--mini-batch-size", str(m // 16 if args.tiny else m), "--steps", steps, "--rounds", rounds,
                       "--profile", str(args.out / "profile.md"), *(["--unpad"] if unpad else [])])
            for model, b, m, unpad in train]
    runs.append(("encode", ["--docs", "16" if args.tiny else "5183", "--batch-size", "32" if args.tiny else "256",
                            "--rounds", rounds, "--unpad"]))
    failed = 0
    for i, (kind, flags) in enumerate(runs):
        command = [sys.executable, str(SCRIPTS / f"bench_{kind}.py"), "--device", args.device, "--max-length",
                   length, *flags]
        result = subprocess.run(command, capture_output=True, text=True)
        report = f"$ {' '.join(command[1:])}\n{result.stdout}{result.stderr[-3000:] if result.returncode else ''}"
        (args.out / f"{i}-{kind}.md").write_text(report)
        print(report, flush=True)
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
