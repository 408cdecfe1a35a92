"""train.batches and models.tokens: chunks by a token budget, the assembled step input, the loader that feeds it."""
import json

import torch

from tests.builders import assemble_texts
from twinfold.models import BiEncoder
from twinfold.models.tokens import Padder, length_chunks
from twinfold.train.config import DatasetConfig
from twinfold.train.data.batches import StepBatches, assemble, step_loader
from twinfold.train.data.pairs import load_pairs, tokenize_pairs
from twinfold.train.data.plan import BatchPlan, RowKeys


def test_length_chunks_by_hand():
    # budget 20 tokens: 10+9 fit 2 texts (2 x 10 = 20), then 8, 8 (2 x 8 = 16; a third 8 would be 24)...
    assert length_chunks([10, 9, 8, 8, 8, 3, 3, 3, 3, 3, 3, 3], 20) == [2, 2, 2, 6]
    assert length_chunks([10, 9, 8, 8, 8, 3, 3, 3, 3, 3, 3, 3], 20, max_texts=4) == [2, 2, 2, 4, 2]
    assert length_chunks([50, 4], 20) == [1, 1]  # longer than the budget: alone
    assert length_chunks([], 20) == []
    assert sum(length_chunks([7] * 100, 64)) == 100


def test_padder_pads_right_or_left_with_zero_token_types():
    pad = Padder(pad_id=0)
    out = pad([[5, 6, 7], [8]])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    left = Padder(pad_id=1, left=True, token_type_ids=False)([[5, 6, 7], [8]])
    assert left["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]] and "token_type_ids" not in left


def test_padder_rounds_widths_up_to_its_multiple_within_max_width():
    pad = Padder(pad_id=0, multiple=4, max_width=6)
    assert [pad.width(n) for n in (1, 4, 5, 6, 7)] == [4, 4, 6, 6, 7]  # 5 -> 8 is capped at 6; 7 stays 7
    out = pad([[5, 6, 7, 8, 9], [8]])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [8, 0, 0, 0, 0, 0]]
    assert out["attention_mask"].sum(1).tolist() == [5, 1]
    assert Padder(pad_id=0, multiple=16)([[1, 2, 3]])["input_ids"].shape == (1, 16)


def test_assemble_budgets_rounded_widths():
    ids = [[1] * 5, [1] * 5, [1] * 3, [1] * 3]
    step = assemble({"anchor": (ids, [1, 2, 3, 4])}, Padder(0, multiple=4), token_budget=16)
    assert [c["input_ids"].shape for c in step["chunks"]["anchor"]] == [(2, 8), (2, 4)]  # 2 x 8 = 16, then 2 x 4


def test_assemble_sorts_chunks_and_remembers_batch_order():
    ids = [[1, 2], [1, 2, 3, 4, 5], [1], [1, 2, 3], [1, 2, 3, 4, 5]]
    step = assemble({"anchor": (ids, [10, 11, 12, 13, 14])}, Padder(0), token_budget=10)
    order = step["order"]["anchor"].tolist()
    assert order == [1, 4, 3, 0, 2]  # longest first, ties in batch order
    chunks = step["chunks"]["anchor"]
    assert [c["input_ids"].shape for c in chunks] == [(2, 5), (3, 3)]  # 2 x 5 <= 10; then 3 x 3
    rows = [r[m.bool()].tolist() for c in chunks for r, m in zip(c["input_ids"], c["attention_mask"])]
    assert rows == [ids[i] for i in order]  # the k-th sorted text is batch position order[k]
    assert step["keys"]["anchor"].tolist() == [10, 11, 12, 13, 14]  # keys stay in batch order


def test_loader_with_worker_processes_gives_what_the_inline_loader_gives(tmp_path, tiny_bert_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": f"claim {i} " + "x " * (i % 5), "positive": f"doc {i} " + "y " * i,
                                        "negative": f"other {i % 3}"}) + "\n" for i in range(20)))
    model = BiEncoder.from_pretrained(tiny_bert_path, max_length=16)
    tokens = tokenize_pairs(load_pairs(DatasetConfig(path=str(path))), model.text_tokenizer, tmp_path / "cache")
    plan = BatchPlan([RowKeys.of(tokens)], batch_size=8, seed=0)
    batches = StepBatches([tokens], rank=1, world=2, padder=model.padder, token_budget=24, max_texts=None)
    inline = step_loader(batches, plan, epoch=0, index=2, settings={"num_workers": 0})
    workers = step_loader(batches, plan, epoch=0, index=2, settings={"num_workers": 2, "prefetch_factor": 2})
    rng = torch.get_rng_state()
    for a, b, _ in zip(inline, workers, range(4)):  # from batch 2 of epoch 0 into epoch 1
        assert (a["epoch"], a["index"]) == (b["epoch"], b["index"])
        assert all(torch.equal(x["input_ids"], y["input_ids"])
                   for role in a["chunks"] for x, y in zip(a["chunks"][role], b["chunks"][role]))
        assert all(torch.equal(a[k][role], b[k][role]) for k in ("order", "keys") for role in a[k])
    assert [(a["epoch"], a["index"]) for a, _ in zip(step_loader(batches, plan, 0, 2, {}), range(4))] == \
        [(0, 2), (1, 0), (1, 1), (1, 2)]  # 20 rows: 3 batches of 8 per epoch (the last filled up)
    assert torch.equal(torch.get_rng_state(), rng)  # loaders never draw from the global RNG (exact resume)
    rows = plan.epoch(0)[2].shard(1, 2)
    texts = {role: [json.loads(line)[role] for line in path.read_text().splitlines()] for role in
             ("anchor", "positive", "negative")}
    expected = assemble_texts(model, {role: [texts[role][i] for i in rows] for role in texts}, token_budget=24)
    got = next(iter(step_loader(batches, plan, 0, 2, {})))
    assert all(torch.equal(x["input_ids"], y["input_ids"])
               for role in expected["chunks"] for x, y in zip(expected["chunks"][role], got["chunks"][role]))

