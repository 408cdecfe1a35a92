"""LoRA adapters: the layers adapted per model family, merged and adapter exports that peft, sentence-transformers
and twinfold load to the same embeddings, base names resolved like any model name, safetensors only."""
import json

import pytest
import torch

from twinfold.models import BiEncoder
from twinfold.models.export import main as export_main
from twinfold.models.loading import ModelLoadError
from twinfold.models.lora import TARGETS, LoraSettings, add_lora, has_lora, target_layers

TEXTS = ["a claim about cells", "proteins fold in water", "short"]


@pytest.fixture(scope="module")
def tiny_qwen3_path(tmp_path_factory, minilm_path):
    """A 2-layer, hidden-64 random Qwen3 decoder (grouped-query attention) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    path = tmp_path_factory.mktemp("tiny-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    Qwen3Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def with_lora(path, r=4, base_name=None) -> BiEncoder:
    """The model at `path` with a new adapter whose B matrices are random (a fresh adapter adds zero)."""
    model = BiEncoder.from_pretrained(path)
    model.encoder = add_lora(model.encoder, LoraSettings(r=r, alpha=8), base_name or str(path))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def test_the_attention_projections_of_each_family_are_adapted_and_counted_as_peft_does(tiny_bert_path,
                                                                                       tiny_qwen3_path):
    bert = with_lora(tiny_bert_path, r=16)
    assert bert.encoder.peft_config["default"].target_modules == {
        f"encoder.layer.{i}.attention.{n}" for i in (0, 1)
        for n in ("self.query", "self.key", "self.value", "output.dense")}  # no pooler, no FFN
    trainable = sum(p.numel() for p in bert.parameters() if p.requires_grad)
    # per layer 4 projections 128 -> 128: r x (in + out) = 16 x 256 each
    assert trainable == 2 * 4 * 16 * 256 == bert.encoder.get_nb_trainable_parameters()[0]
    qwen = with_lora(tiny_qwen3_path, r=4)
    assert qwen.encoder.peft_config["default"].target_modules == {
        f"layers.{i}.self_attn.{n}_proj" for i in (0, 1) for n in ("q", "k", "v", "o")}
    # q and o: 64 -> 64; k and v: 64 -> 2 heads x 16 = 32
    trainable = sum(p.numel() for p in qwen.parameters() if p.requires_grad)
    assert trainable == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32)) == qwen.encoder.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("model_type", sorted(TARGETS))
def test_each_familys_defaults_name_its_attention_projections(model_type):
    from transformers import AutoConfig, AutoModel

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                 intermediate_size=64, vocab_size=128, pad_token_id=0, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **sizes))
    adapted = target_layers(encoder)
    fused = len(TARGETS[model_type]) == 2  # query, key and value in one layer
    assert len(adapted) == len(TARGETS[model_type]) and all(".0." in name for name in adapted)  # one layer's
    assert all(".attn" in name or ".attention." in name or "self_attn" in name for name in adapted), adapted
    assert fused == any("qkv" in name.lower() for name in adapted)


def test_target_modules_that_match_nothing_name_the_setting_and_the_layers_there_are(tiny_bert_path):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    with pytest.raises(ValueError, match=r"^target_modules: \['q_proj'\] match none of the model's linear layers; "
                                         r"set it to some of theirs \(names end in: dense, key, query, value\)$"):
        target_layers(model.encoder, ["q_proj"])
    assert target_layers(model.encoder, ["intermediate.dense"]) == [f"encoder.layer.{i}.intermediate.dense"
                                                                     for i in (0, 1)]


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_merged_and_adapter_exports_embed_as_the_training_forward(family, tiny_bert_path, tiny_qwen3_path, tmp_path):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    base = tiny_bert_path if family == "bert" else tiny_qwen3_path
    model = with_lora(base)
    unmerged = model.encode(TEXTS)
    model.save_pretrained(tmp_path / "merged")
    model.save_pretrained(tmp_path / "adapter", adapter=True)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    merged = BiEncoder.from_pretrained(tmp_path / "merged")
    assert not has_lora(merged.encoder)
    assert abs(merged.encode(TEXTS) - unmerged).max() < 1e-5
    assert (merged.encode(TEXTS, compute="int8") == model.encode(TEXTS, compute="int8")).all()  # of merged weights
    assert abs(SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(TEXTS) - unmerged).max() < 1e-5

    loaded = BiEncoder.from_pretrained(tmp_path / "adapter")
    assert has_lora(loaded.encoder) and not any(p.requires_grad for p in loaded.parameters())
    assert (loaded.encode(TEXTS) == unmerged).all()
    assert loaded.fingerprint() == model.fingerprint() == json.loads(
        (tmp_path / "adapter" / "twinfold.json").read_text())["fingerprint"]
    assert merged.fingerprint() == json.loads((tmp_path / "merged" / "twinfold.json").read_text())["fingerprint"]
    assert abs(SentenceTransformer(str(tmp_path / "adapter"), device="cpu").encode(TEXTS) - unmerged).max() < 1e-6
    # peft itself, over the base as transformers loads it: the same token states
    features = model.tokenize(TEXTS)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModel.from_pretrained(base), tmp_path / "adapter").eval()(**features)
        ours = model.encoder.eval()(**features)
    assert torch.equal(theirs.last_hidden_state, ours.last_hidden_state)


def test_the_export_command_writes_an_adapter_or_merges_it(tiny_bert_path, tmp_path, capsys):
    with_lora(tiny_bert_path).save_pretrained(tmp_path / "adapter", adapter=True)
    assert export_main([str(tmp_path / "adapter"), str(tmp_path / "again"), "--adapter"]) == 0
    assert export_main([str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "again" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()
    expected = BiEncoder.from_pretrained(tmp_path / "adapter").encode(TEXTS)
    assert (BiEncoder.from_pretrained(tmp_path / "again").encode(TEXTS) == expected).all()
    assert abs(BiEncoder.from_pretrained(tmp_path / "merged").encode(TEXTS) - expected).max() < 1e-5
    assert export_main([str(tmp_path / "merged"), str(tmp_path / "none"), "--adapter"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the model has no LoRA adapter to export; export it without --adapter")


def test_an_adapter_base_resolves_like_any_model_name(minilm_path, tmp_path):
    name = "sentence-transformers/all-MiniLM-L6-v2"  # the installed package's folder, not the hub
    model = with_lora(minilm_path, base_name=name)
    model.save_pretrained(tmp_path / "adapter", adapter=True)
    loaded = BiEncoder.from_pretrained(tmp_path / "adapter")
    assert (loaded.encode(TEXTS) == model.encode(TEXTS)).all()


def test_adapter_weights_load_from_safetensors_only_unless_pickle_is_allowed(tiny_bert_path, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "adapter"
    model = with_lora(tiny_bert_path)
    model.save_pretrained(folder, adapter=True)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has only pickle adapter weights"):
        BiEncoder.from_pretrained(folder)
    assert (BiEncoder.from_pretrained(folder, allow_pickle=True).encode(TEXTS) == model.encode(TEXTS)).all()
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no adapter weights"):
        BiEncoder.from_pretrained(folder)
