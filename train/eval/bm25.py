"""BM25 (bm25s, Lucene scoring) with explicit settings: k1, b, stemming and an identifier-splitting tokenizer.

`PRESETS`: "bm25s" (the library's defaults, k1 1.5, b 0.75) and "anserini" (Anserini's BEIR runs, k1 0.9, b 0.4).
"""
import re
import sys
from dataclasses import asdict, dataclass

import numpy as np

PRESETS = {"bm25s": (1.5, 0.75), "anserini": (0.9, 0.4)}
_IDENTIFIER = re.compile(r"\w+(?:\.\w+)*")
# Identifier parts: "parseHTTPResponse_v2" -> parse HTTP Response v2; "foo.bar_baz" -> foo bar baz
_IDENTIFIER_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


@dataclass(frozen=True)
class BM25Settings:
    """How text is tokenized and scored; `describe()` is the label a report prints beside the row."""

    k1: float = PRESETS["bm25s"][0]
    b: float = PRESETS["bm25s"][1]
    stemmer: str | None = None  # a Snowball language, e.g. "english" (needs PyStemmer)
    split_identifiers: bool = False  # camelCase, snake_case and dotted names become their words too

    def __post_init__(self):
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ValueError(f"BM25 k1 {self.k1} must be >= 0 and b {self.b} in [0, 1]")
        if self.stemmer:
            _stemmer(self.stemmer)

    def describe(self) -> str:
        extra = [f"stemmer {self.stemmer}" if self.stemmer else "no stemming"]
        extra += ["identifiers split"] if self.split_identifiers else []
        return f"k1 {self.k1:g}, b {self.b:g}, lowercase, English stopwords, {', '.join(extra)}"

    def to_dict(self) -> dict:
        return asdict(self)


def settings_from(preset: str | None = None, **values) -> BM25Settings:
    """Settings from a preset name (default "bm25s") with any of k1, b, stemmer, split_identifiers overriding it."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"BM25 preset {preset!r} is not one of {', '.join(PRESETS)}")
    k1, b = PRESETS[preset or "bm25s"]
    given = {k: v for k, v in values.items() if v is not None}
    return BM25Settings(**{"k1": k1, "b": b, **given})


def split_identifiers(text: str) -> str:
    """`text` with each identifier followed by its parts: "getUserId" -> "getUserId get User Id"."""
    def expand(m: re.Match) -> str:
        word = m.group(0)
        parts = [p for piece in re.split(r"[._]", word) for p in _IDENTIFIER_PART.findall(piece)]
        return word if len(parts) < 2 else word + " " + " ".join(parts)
    return _IDENTIFIER.sub(expand, text)


def tokenize(texts: list[str], settings: BM25Settings) -> list[list[str]]:
    """Lowercased word tokens without English stopwords, stemmed and identifier-split as `settings` say."""
    bm25s = _bm25s()
    stemmer = _stemmer(settings.stemmer) if settings.stemmer else None
    if settings.split_identifiers:
        texts = [split_identifiers(t) for t in texts]
    return bm25s.tokenize(texts, stemmer=stemmer, show_progress=False, return_ids=False)


def _bm25s():
    """The bm25s module, imported without JAX. Where JAX is installed, importing bm25s imports it and runs a JAX
    operation (its optional top-k backend), which on a GPU machine starts JAX's CUDA client: seconds of start-up and,
    by JAX's default, most of the GPU's memory taken beside PyTorch's. twinfold's top-k runs in NumPy. A process
    that has imported JAX itself keeps it."""
    if "bm25s" in sys.modules or "jax" in sys.modules:
        import bm25s
        return bm25s
    sys.modules["jax"] = None  # `import jax` raises ImportError while bm25s is imported
    try:
        import bm25s
    finally:
        del sys.modules["jax"]
    return bm25s


def _stemmer(language: str):
    try:
        import Stemmer
    except ImportError:
        raise ValueError("BM25 stemming needs PyStemmer: pip install PyStemmer") from None
    if language not in Stemmer.algorithms():
        raise ValueError(f"BM25 stemmer {language!r} is not one of {', '.join(sorted(Stemmer.algorithms()))}")
    return Stemmer.Stemmer(language)


class BM25Index:
    """A BM25 index over `texts`; `search` returns (indices, scores) of the top k, zero scores as NaN."""

    def __init__(self, texts: list[str], settings: BM25Settings = BM25Settings()):
        self.settings = settings
        self.index = _bm25s().BM25(k1=settings.k1, b=settings.b, method="lucene")
        self.index.index(tokenize(texts, settings), show_progress=False)
        self.size = len(texts)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        indices, scores = self.index.retrieve(tokenize(queries, self.settings), k=min(k, self.size),
                                              show_progress=False, backend_selection="numpy")
        # a zero score means no query term matched: a search engine would not return that document
        return indices, np.where(scores > 0, scores, np.nan)

    @property
    def bytes(self) -> int:
        return sum(a.nbytes for a in self.index.scores.values() if isinstance(a, np.ndarray))
