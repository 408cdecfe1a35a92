"""Model families: each loads, encodes, trains and exports as sentence-transformers computes it.

Per family a tiny random model (2 layers, hidden 32) built from its transformers config class, with a tokenizer
that has the family's special tokens, template and padding side, saved by sentence-transformers in the family's
layout. Embeddings equal sentence-transformers' within 1e-5 in float32 and exactly in bfloat16 (the same kernels in
the same dtype, pooling sums in float32 as sentence-transformers' do); two training steps run; exports round-trip.
"""
import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twinfold.models import BiEncoder, ModelLoadError
from twinfold.models.export import main as export_main
from twinfold.train.config import Config, ConfigError, DataConfig, DatasetConfig, ModelConfig, TrainConfig, validate
from twinfold.train.loop import build_model, train

TEXTS = ["a", "short text", "a much longer text about proteins, cells and the immune response of mice",
         "mid length sentence here", "Tokens: 1, 2, 3!"]
CORPUS = TEXTS + ["the quick brown fox jumps over the lazy dog", "embedding models map text to vectors",
                  "query: what is a cell? passage: cells are the units of life"] * 4
HIDDEN = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread each (training too) avoids oversubscribing shared CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWINFOLD_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def trained_tokenizer(kind, specials, template, padding_side="right", model_max_length=64, pad=None, eos=None,
                      bos=None, unk=None, vocab=None):
    """A fast tokenizer: byte-level BPE ("bpe"), sentencepiece-style Unigram ("unigram") trained on CORPUS, or
    WordPiece on a given vocabulary ("wordpiece"); `template` adds the family's special tokens to each text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token=unk))
    else:
        words = specials + [w for w in vocab if w not in specials]
        tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    single = template.split()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in single if t != "$A"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk,
                                   padding_side=padding_side, model_max_length=model_max_length,
                                   model_input_names=["input_ids", "attention_mask"])


def minilm_tokenizer(minilm_path, input_names=("input_ids", "token_type_ids", "attention_mask")):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path, model_input_names=list(input_names), model_max_length=64)


def decoder_sizes():
    return dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


def bert_sizes():
    return dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def family_bert(minilm_path):
    from transformers import BertConfig, BertModel

    tok = minilm_tokenizer(minilm_path)
    return BertModel(BertConfig(vocab_size=len(tok), max_position_embeddings=64, **bert_sizes())), tok, "mean", []


def family_roberta(_):
    from transformers import RobertaConfig, RobertaModel

    tok = trained_tokenizer("bpe", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>", bos="<s>",
                            eos="</s>", pad="<pad>", unk="<unk>")
    config = RobertaConfig(vocab_size=len(tok), max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, **bert_sizes())
    return RobertaModel(config), tok, "mean", []


def family_xlmr(_):  # the BGE-M3 layout: CLS pooling, normalised
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tok = trained_tokenizer("unigram", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>", bos="<s>",
                            eos="</s>", pad="<pad>", unk="<unk>")
    config = XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, **bert_sizes())
    return XLMRobertaModel(config), tok, "cls", []


def family_distilbert(minilm_path):
    from transformers import DistilBertConfig, DistilBertModel

    tok = minilm_tokenizer(minilm_path, ("input_ids", "attention_mask"))  # DistilBERT takes no token_type_ids
    config = DistilBertConfig(vocab_size=len(tok), max_position_embeddings=64, dim=HIDDEN, n_layers=2, n_heads=2,
                              hidden_dim=64)
    return DistilBertModel(config), tok, "mean", []


def family_modernbert(_):
    from transformers import ModernBertConfig, ModernBertModel

    tok = trained_tokenizer("bpe", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", pad="[PAD]",
                            unk="[UNK]")
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, cls_token_id=2,
                              sep_token_id=3, bos_token_id=2, eos_token_id=3, local_attention=16)
    return ModernBertModel(config), tok, "mean", []


def family_mpnet(minilm_path):  # MPNet's WordPiece: BERT's vocabulary behind <s> <pad> </s> <unk>
    from transformers import MPNetConfig, MPNetModel

    vocab = (minilm_path / "vocab.txt").read_text().split("\n")[:-1]
    tok = trained_tokenizer("wordpiece", ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos="<s>", eos="</s>",
                            pad="<pad>", unk="<unk>", vocab=vocab + ["<mask>"])
    config = MPNetConfig(vocab_size=len(tok), max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, **bert_sizes())
    return MPNetModel(config), tok, "mean", []


def family_t5(_):  # the sentence-t5 layout: T5 encoder, mean pooling, Dense without bias, normalised
    from transformers import T5Config, T5Model

    tok = trained_tokenizer("unigram", ["<pad>", "</s>", "<unk>"], "$A </s>", pad="<pad>", eos="</s>", unk="<unk>")
    config = T5Config(vocab_size=len(tok), d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5Model(config), tok, "mean", [(HIDDEN, 16, None, False)]


def family_qwen3(_):  # the Qwen3-Embedding layout: EOS appended, left padding, last-token pooling
    from transformers import Qwen3Config, Qwen3Model

    tok = trained_tokenizer("bpe", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "$A <|endoftext|>",
                            padding_side="left", pad="<|endoftext|>", eos="<|endoftext|>")
    config = Qwen3Config(vocab_size=len(tok), pad_token_id=0, eos_token_id=0, **decoder_sizes())
    return Qwen3Model(config), tok, "lasttoken", []


def family_mistral(_):  # the e5-mistral layout: <s> text </s>, left padding, last-token pooling
    from transformers import MistralConfig, MistralModel

    tok = trained_tokenizer("unigram", ["<unk>", "<s>", "</s>"], "<s> $A </s>", padding_side="left", pad="</s>",
                            bos="<s>", eos="</s>", unk="<unk>")
    config = MistralConfig(vocab_size=len(tok), pad_token_id=2, bos_token_id=1, eos_token_id=2, **decoder_sizes())
    return MistralModel(config), tok, "lasttoken", []


def family_gemma3(_):  # the EmbeddingGemma layout: bidirectional attention, mean pooling, two Dense, normalised
    from transformers import Gemma3TextConfig, Gemma3TextModel

    tok = trained_tokenizer("unigram", ["<pad>", "<eos>", "<bos>", "<unk>"], "<bos> $A <eos>", pad="<pad>",
                            eos="<eos>", bos="<bos>", unk="<unk>")
    config = Gemma3TextConfig(vocab_size=len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=2,
                              use_bidirectional_attention=True, sliding_window=16, **decoder_sizes())
    return Gemma3TextModel(config), tok, "mean", [(HIDDEN, 64, None, False), (64, HIDDEN, None, False)]


FAMILIES = {name.removeprefix("family_"): f for name, f in globals().items() if name.startswith("family_")}
DECODERS = ("qwen3", "mistral", "gemma3")


def save_family(name, minilm_path, folder):
    """Build family `name` and save it with sentence-transformers (float32); returns the folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    model, tok, pooling, dense = FAMILIES[name](minilm_path)
    model.save_pretrained(folder / "hf")
    tok.save_pretrained(folder / "hf")
    modules = [Transformer(str(folder / "hf"), max_seq_length=64), Pooling(HIDDEN, pooling)]
    modules += [Dense(i, o, bias=bias, activation_function=act) for i, o, act, bias in dense]
    SentenceTransformer(modules=[*modules, Normalize()], device="cpu").save(str(folder / "st"))
    return folder / "st"


@pytest.fixture(scope="module")
def families(minilm_path, tmp_path_factory):
    """Each family's sentence-transformers folder, in float32 and (saved by sentence-transformers) in bfloat16."""
    from sentence_transformers import SentenceTransformer

    out = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp(name)
        fp32 = save_family(name, minilm_path, folder)
        SentenceTransformer(str(fp32), device="cpu").to(torch.bfloat16).save(str(folder / "bf16"))
        out[name] = {"float32": fp32, "bfloat16": folder / "bf16"}
    return out


def sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").eval()


# the special tokens each text starts and ends with, and the padding side, as the family's real tokenizer has them
TEMPLATES = {"bert": ("[CLS]", "[SEP]", "right"), "roberta": ("<s>", "</s>", "right"), "xlmr": ("<s>", "</s>", "right"),
             "distilbert": ("[CLS]", "[SEP]", "right"), "modernbert": ("[CLS]", "[SEP]", "right"),
             "mpnet": ("<s>", "</s>", "right"), "t5": (None, "</s>", "right"), "qwen3": (None, "<|endoftext|>", "left"),
             "mistral": ("<s>", "</s>", "left"), "gemma3": ("<bos>", "<eos>", "right")}


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizers_have_the_familys_special_tokens_and_padding_side(name, families):
    model = BiEncoder.from_pretrained(families[name]["float32"])
    first, last, side = TEMPLATES[name]
    tokens = model.tokenizer.convert_ids_to_tokens(model.token_ids(["short text"])[0])
    assert (tokens[0] == first if first else tokens[0] not in model.tokenizer.all_special_tokens) and tokens[-1] == last
    assert model.tokenizer.padding_side == side
    assert model.padder.token_type_ids == (name == "bert")  # only BERT's tokenizer gives token_type_ids


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_embeddings_equal_sentence_transformers(name, families):
    st, ours = sentence_transformer(families[name]["float32"]), BiEncoder.from_pretrained(families[name]["float32"])
    assert ours.encoder.dtype == torch.float32 and ours.checkpoint_dtype == "float32"
    # one text per batch: a decoder's (and RoBERTa's, by its position ids) states depend on the padding
    assert np.abs(ours.encode(TEXTS, batch_size=1) - st.encode(TEXTS, batch_size=1)).max() < 1e-5
    features = ours.tokenize(TEXTS)
    left = ours.tokenizer.padding_side == "left"
    assert (features["attention_mask"][:, 0 if left else -1] == 0).any()  # a padded batch, on the family's side
    with torch.no_grad():
        ours.eval()
        torch.testing.assert_close(ours(**features), st(dict(features))["sentence_embedding"], atol=1e-5, rtol=0)
        if name in DECODERS:  # no key/value cache is built
            assert ours.encoder(**features).past_key_values is None


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_checkpoint_encodes_in_bfloat16_as_sentence_transformers(name, families):
    folder = families[name]["bfloat16"]
    st, ours = sentence_transformer(folder), BiEncoder.from_pretrained(folder)
    assert ours.encoder.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in ours.head.parameters())
    assert np.array_equal(ours.encode(TEXTS, batch_size=1), st.encode(TEXTS, batch_size=1))
    upcast = BiEncoder.from_pretrained(folder, dtype="float32")  # other embeddings, so another fingerprint
    assert upcast.encoder.dtype == torch.float32 and upcast.fingerprint() != ours.fingerprint()
    assert not np.array_equal(upcast.encode(TEXTS), ours.encode(TEXTS))


@pytest.mark.parametrize("name", FAMILIES)
def test_export_round_trip_keeps_embeddings_and_dtype(name, families, tmp_path):
    src = families[name]["bfloat16"]
    assert export_main([str(src), str(tmp_path / "out")]) == 0
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    ours, again = BiEncoder.from_pretrained(src), BiEncoder.from_pretrained(tmp_path / "out")
    assert again.fingerprint() == ours.fingerprint()
    expected = ours.encode(TEXTS, batch_size=1)
    assert np.array_equal(again.encode(TEXTS, batch_size=1), expected)
    assert np.array_equal(sentence_transformer(tmp_path / "out").encode(TEXTS, batch_size=1), expected)


def test_export_dtype_flag_converts_the_weights(families, tmp_path):
    src = families["bert"]["float32"]
    assert export_main([str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    converted = BiEncoder.from_pretrained(tmp_path / "bf16")
    assert converted.encoder.dtype == torch.bfloat16
    assert converted.fingerprint() != BiEncoder.from_pretrained(src).fingerprint()
    assert json.loads((tmp_path / "bf16" / "twinfold.json").read_text())["fingerprint"] == converted.fingerprint()
    assert np.array_equal(converted.encode(TEXTS), sentence_transformer(tmp_path / "bf16").encode(TEXTS))


def recipe(folder, out, data, **model):
    cfg = Config(model=ModelConfig(name_or_path=str(folder), max_length=32, dropout=0.0, **model),
                 data=DataConfig(train=[DatasetConfig(path=str(data), columns={"anchor": "anchor",
                                                                               "positive": "positive"})]),
                 train=TrainConfig(batch_size=4, max_steps=2, lr=1e-3, warmup_ratio=0.0, output_dir=str(out),
                                   log_steps=1))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": f"question {i} about {t}", "positive": t}) + "\n"
                            for i, t in enumerate(CORPUS[:8])))
    return path


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", FAMILIES)
def test_two_training_steps_and_the_export_loads_in_sentence_transformers(name, families, pairs, tmp_path):
    folder = families[name]["float32"]
    final = train(recipe(folder, tmp_path / "run", pairs))
    assert len(losses(tmp_path / "run")) == 2 and all(np.isfinite(losses(tmp_path / "run")))
    before, after = load_file(folder / "model.safetensors"), load_file(final / "model.safetensors")
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4  # the weights moved
    trained = BiEncoder.from_pretrained(final)
    assert np.abs(trained.encode(TEXTS, batch_size=1) - sentence_transformer(final).encode(TEXTS, batch_size=1)
                  ).max() < 1e-5


def test_auto_dtype_trains_float32_master_weights_and_exports_the_base_dtype(families, pairs, tmp_path, data_dir):
    cfg = recipe(families["qwen3"]["bfloat16"], tmp_path / "run", pairs)
    cfg.eval.data = str(data_dir / "scifact-nano")
    final = train(cfg)
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())  # the final rows are the export's
    fingerprint = json.loads((final / "twinfold.json").read_text())["fingerprint"]
    assert {r["fingerprint"] for r in report["results"] if r["model"] == "final"} == {fingerprint}
    checkpoint = load_file(tmp_path / "run" / "checkpoints" / "step-2" / "model" / "model.safetensors")
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}  # what training updated
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.bfloat16}
    assert np.array_equal(BiEncoder.from_pretrained(final).encode(TEXTS, batch_size=1),
                          sentence_transformer(final).encode(TEXTS, batch_size=1))


def test_bfloat16_dtype_trains_the_bfloat16_weights(families, pairs, tmp_path):
    folder = families["bert"]["float32"]
    final = train(recipe(folder, tmp_path / "run", pairs, dtype="bfloat16"))
    assert all(np.isfinite(losses(tmp_path / "run"))) and len(losses(tmp_path / "run")) == 2
    step = tmp_path / "run" / "checkpoints" / "step-2"
    assert {t.dtype for t in load_file(step / "model" / "model.safetensors").values()} == {torch.bfloat16}
    moments = torch.load(step / "optimizer.pt", weights_only=True)["state"]
    assert {s["exp_avg"].dtype for s in moments.values()} == {torch.bfloat16}
    start = BiEncoder.from_pretrained(folder, dtype="bfloat16").encoder.state_dict()
    after = load_file(final / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    assert any(not torch.equal(after[k], start[k]) for k in after)


def test_float16_weights_are_not_trained_directly(families, pairs, tmp_path):
    with pytest.raises(ConfigError, match="^model.dtype: float16"):
        recipe(families["bert"]["float32"], tmp_path, pairs, dtype="float16")


def test_mpnet_gradient_checkpointing_is_refused_by_key_and_class(families, pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"^model.gradient_checkpointing: MPNetModel .* does not support"):
        build_model(recipe(families["mpnet"]["float32"], tmp_path, pairs, gradient_checkpointing=True))


def test_gradient_checkpointing_trains_the_same_weights(families, pairs, tmp_path):
    folder = families["qwen3"]["float32"]
    assert build_model(recipe(folder, tmp_path, pairs, gradient_checkpointing=True)).encoder.is_activation_checkpointing
    plain = train(recipe(folder, tmp_path / "plain", pairs))
    checkpointed = train(recipe(folder, tmp_path / "checkpointed", pairs, gradient_checkpointing=True))
    a, b = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_attention_kernels(families):
    assert BiEncoder.from_pretrained(families["mpnet"]["float32"]).encoder.config._attn_implementation == "eager"
    assert BiEncoder.from_pretrained(families["qwen3"]["float32"]).encoder.config._attn_implementation == "sdpa"
    eager = BiEncoder.from_pretrained(families["qwen3"]["float32"], attn_implementation="eager")
    assert eager.encoder.config._attn_implementation == "eager"
    assert np.abs(eager.encode(TEXTS, batch_size=1)
                  - BiEncoder.from_pretrained(families["qwen3"]["float32"]).encode(TEXTS, batch_size=1)).max() < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_flash_attn_is_one_clear_error(families, pairs, tmp_path):
    with pytest.raises(ConfigError, match="^model.attn_implementation: .*flash-attn package, which is not installed"):
        recipe(families["bert"]["float32"], tmp_path, pairs, attn_implementation="flash_attention_2")
    with pytest.raises(ModelLoadError, match="flash-attn package"):
        BiEncoder.from_pretrained(families["bert"]["float32"], attn_implementation="flash_attention_2")


def test_t5_loads_the_encoder_alone_and_dropout_reaches_it(families):
    model = BiEncoder.from_pretrained(families["t5"]["float32"], dropout=0.3)
    assert type(model.encoder).__name__ == "T5EncoderModel" and model.encoder.config.dropout_rate == 0.3
    assert {m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}


def test_cpu_computes_of_a_bfloat16_checkpoint_run_its_float32_upcast(families):
    folder = families["bert"]["bfloat16"]
    half, upcast = BiEncoder.from_pretrained(folder), BiEncoder.from_pretrained(folder, dtype="float32")
    assert np.array_equal(half.encode(TEXTS, compute="int8"), upcast.encode(TEXTS, compute="int8"))
    assert np.abs(half.encode(TEXTS, compute="onnx") - upcast.encode(TEXTS)).max() < 1e-5


def test_model_card_snippet_of_a_gtr_layout_loads_the_t5_encoder(families, tmp_path):
    model = BiEncoder.from_pretrained(families["t5"]["float32"])
    model.head = torch.nn.Sequential()  # GTR: mean pooling, normalised, no Dense
    model.save_pretrained(tmp_path / "gtr")
    card = (tmp_path / "gtr" / "README.md").read_text()
    snippet = card.split("\ntransformers:\n\n```python\n")[1].split("```")[0]
    assert "T5EncoderModel.from_pretrained" in snippet
    scope = {}
    exec(snippet.replace("path/to/this/model", str(tmp_path / "gtr")), scope)
    expected = model.encode(["a question"])
    assert np.abs(scope["emb"].numpy() - expected).max() < 1e-5
