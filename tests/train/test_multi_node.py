"""Training across machines: two `accelerate launch` runs with configs/accelerate_multi_node.yaml (machine ranks 0 and
1, one process each, gloo on CPU, 127.0.0.1), each with caches of its own as on separate machines, give the losses
and weights of one process with the same global batch."""
import subprocess
import sys

import torch

from tests.helpers import free_port, max_diff, recipe_args, records, run_train, start_process, weights

OVERRIDES = ("train.lr=2e-4", "train.max_steps=3", "train.save_steps=null", "model.dropout=0.0")


def launch_machine(rank: int, port: int, out, tiny, tmp_path) -> subprocess.Popen:
    """Machine `rank` of 2 of the smoke recipe on the tiny BERT; its token and datasets caches are its own."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate_multi_node.yaml",
           "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--mixed_precision", "no",
           "-m", "twinfold.train", *recipe_args(out, *OVERRIDES, tiny=tiny)]
    return start_process(cmd, TWINFOLD_NUM_THREADS="1", TWINFOLD_CACHE=str(tmp_path / f"machine-{rank}" / "twinfold"),
                         HF_DATASETS_CACHE=str(tmp_path / f"machine-{rank}" / "datasets"))


def test_two_machines_give_the_losses_and_weights_of_one_process(tmp_path, tiny_bert_path):
    port = free_port()
    two = tmp_path / "two-machines"
    machines = [launch_machine(rank, port, two, tiny_bert_path, tmp_path) for rank in (0, 1)]
    errors = [m.communicate(timeout=600)[1] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(e[-3000:] for e in errors)
    rng_states = torch.load(two / "checkpoints" / "step-3" / "rng.pt", weights_only=False)
    assert len(rng_states) == 2  # the final checkpoint gathered both processes: they formed one group
    # each machine tokenized into its own cache: nothing was shared but the network
    for rank in (0, 1):
        assert len(list((tmp_path / f"machine-{rank}" / "twinfold" / "tokens").iterdir())) == 1

    one = run_train(tmp_path, "one", *OVERRIDES, tiny=tiny_bert_path)
    losses = [[r["loss"] for r in records(o)] for o in (one, two)]
    assert len(losses[0]) == 3
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5)
    start, w1, w2 = weights(tiny_bert_path), weights(one / "final"), weights(two / "final")
    assert max_diff(w1, start) > 2e-4  # training moved the weights (Adam: about lr per step)
    assert max_diff(w1, w2) < 1e-5
