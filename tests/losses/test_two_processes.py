"""Two real processes (gloo on CPU) give what one process gives with their batches concatenated."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port, like_a_new_process, run_process, weights
from tests.losses import dist_check

BIN = Path(sys.executable).parent
MINI_BATCH_SIZES = (0, 3)  # 0: uncached


@pytest.fixture(scope="module")
def trained(tiny_bert_path, data_dir, tmp_path_factory):
    """Output folders of 3 training steps: 2 processes x 4 pairs, and 1 process x 8 pairs."""
    out = tmp_path_factory.mktemp("dist-train")
    args = [str(tiny_bert_path), str(data_dir / "scifact-train-pairs" / "train.jsonl")]
    sizes = ["--mini-batch-sizes", ",".join(map(str, MINI_BATCH_SIZES))]
    run_process([BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                 dist_check.__file__, *args, str(out / "two"), *sizes], check=True)
    with like_a_new_process():
        torch.set_num_threads(1)  # as each of the two processes (OMP_NUM_THREADS=1)
        dist_check.main([*args, str(out / "one"), *sizes])
    return out, tiny_bert_path


def test_distributed_helpers_on_two_processes(trained):
    out, _ = trained  # dist_check.py asserts hand-written gathers, gradient sums and averages on each process
    assert sorted(p.name for p in (out / "two").glob("helpers-rank*.ok")) == ["helpers-rank0.ok", "helpers-rank1.ok"]


@pytest.mark.parametrize("loss", dist_check.LOSSES)
@pytest.mark.parametrize("mini_batch_size", MINI_BATCH_SIZES, ids=["uncached", "cached"])
def test_two_processes_equal_one_process(trained, mini_batch_size, loss):
    out, start = trained
    one, two = (out / run / loss / f"mini{mini_batch_size}" for run in ("one", "two"))
    losses_one, losses_two = (json.loads((d / "losses.json").read_text()) for d in (one, two))
    assert len(losses_one) == 3 and losses_two == pytest.approx(losses_one, abs=1e-5)

    weights_one = load_file(one / "rank0.safetensors")
    ranks = [load_file(two / f"rank{r}.safetensors") for r in range(2)]
    initial = weights(start)
    moved = max((weights_one[f"encoder.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-2  # the steps did change the weights
    for name, w in weights_one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the two processes"
        assert (ranks[0][name] - w).abs().max().item() <= 1e-5, name
