"""models.tokens.TextTokenizer.ids_and_truncated: ids equal to the tokenizer's own truncation, though long texts
are encoded only up to a space past max_length, on real data, adversarial texts and other tokenizer families."""
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from twinfold.models.tokens import CHARS_PER_TOKEN, TextTokenizer, space_bounded

ADVERSARIAL = [
    "", "cell", "x" * 5000, "a" * 150 + " b" * 100, ("word " * 40).strip(), "w3  w4 " * 40, "w\t w\u00a0 w\n w " * 30,
    "Café naïve résumé " * 20, "Cafe\u0301 nai\u0308ve " * 30, "ΟΔΟΣ ΣΟΦΟΣ " * 30, "İstanbul ǅemal ﬁne ß " * 25,
    "北京大学的研究人员发现" * 40, "emoji 🙂🙃 " * 40, "ctrl\x00 \x1f zero\u200bwidth " * 30, "´ ¨ ˜ " * 60,
    "[SEP] [CLS] [MASK] tokens " * 25, "   leading spaces then words " * 20, "trailing spaces " * 20 + " " * 50,
    "hyphen-ated, punctu.ated! (text) " * 25, "12345 678.90 1e10 0x1f " * 25, "longword" * 30 + " tail" * 40,
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of random words, separators and lengths around the prefix length (fuzz)."""
    rng = random.Random(seed)
    words = ["a", "the", "résumé", "e\u0301", "ΟΣ", "北京", "🙂", "x" * 120, "don't", "U.S.", "3.14", "[SEP]", "ﬁ",
             "\u200b", "İ", "ǅ", "´"]
    separators = [" ", " ", " ", "  ", "\t", "\n ", "\u00a0", "", "-", " \u0301"]
    return ["".join(rng.choice(words) + rng.choice(separators) for _ in range(rng.randint(0, 200)))
            for _ in range(n)]


def check(tokenizer, texts: list[str], max_length: int, prefix: str = "") -> None:
    """ids == the tokenizer's own truncation, truncated == (untruncated length > max_length), for both kinds."""
    tt = TextTokenizer(tokenizer, max_length, query_prefix=prefix)
    for kind in ("query", "document"):
        ids, truncated = tt.ids_and_truncated(texts, kind)
        assert ids == tt.ids(texts, kind)
        assert truncated == [n > max_length for n in tt.lengths(texts, kind)]


def test_real_data_at_several_max_lengths(minilm_path, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    assert space_bounded(tokenizer)  # the prefix path is the one under test
    rows = [json.loads(line) for line in (data_dir / "pubmedqa-pairs" / "train.jsonl").open()][:120]
    corpus = [json.loads(line)["text"] for line in (data_dir / "scifact" / "corpus.jsonl").open()][:120]
    texts = [r["anchor"] for r in rows] + [r["positive"] for r in rows] + corpus
    for max_length in (8, 32, 256):
        check(tokenizer, texts, max_length, prefix="query: ")


def test_adversarial_texts(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = ADVERSARIAL + random_texts(200)
    for max_length in (4, 8, 32):
        check(tokenizer, texts, max_length, prefix="query: ")
    # the first space past the prefix length follows one word of 150 characters ([UNK]): the prefix holds too
    # few tokens, so the whole text is encoded
    assert CHARS_PER_TOKEN * 8 < 150
    check(tokenizer, ["x" * 150 + " y" * 20, "x" * 150 + " y"], 8)


def trained(model, trainer, normalizer, pre_tokenizer, decoder, corpus):
    tokenizer = Tokenizer(model)
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoder
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("family", ["byte-level BPE", "metaspace unigram"])
def test_other_tokenizer_families(family):
    corpus = ADVERSARIAL + random_texts(60, seed=1)
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    if family == "byte-level BPE":  # GPT-2 / RoBERTa style: a space joins the word after it
        tokenizer = trained(models.BPE(), trainers.BpeTrainer(vocab_size=400, special_tokens=special),
                            normalizers.NFC(), pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                            corpus)
    else:  # sentencepiece style: spaces become "▁"
        tokenizer = trained(models.Unigram(), trainers.UnigramTrainer(vocab_size=300, special_tokens=special,
                                                                      unk_token="<unk>"),
                            normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
                            pre_tokenizers.Metaspace(), decoders.Metaspace(), corpus)
    assert space_bounded(tokenizer)
    texts = ADVERSARIAL + random_texts(150, seed=2)
    for max_length in (6, 32):
        check(tokenizer, texts, max_length, prefix="q: ")


def test_tokenizers_that_may_look_across_spaces_encode_whole_texts(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [spec["normalizer"],
                                                              {"type": "Replace", "pattern": {"String": "a b"},
                                                               "content": "ab"}]}
    joining = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), cls_token="[CLS]",
                                      sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    assert not space_bounded(joining)
    left = AutoTokenizer.from_pretrained(minilm_path, truncation_side="left")
    assert not space_bounded(left)
    texts = ["x " * (CHARS_PER_TOKEN * 8) + "a b" * 3, *ADVERSARIAL]
    check(joining, texts, 8)
    check(left, texts, 8)
