"""Run on 1 process, or on 2 under `accelerate launch`: check losses.distributed, then train a tiny bi-encoder.

    python dist_check.py MODEL_DIR PAIRS_JSONL OUT_DIR [--mini-batch-sizes 0,3]

Used by test_two_processes.py (one launch per mode keeps the test fast on a small CPU):
- with 2 processes, the helpers are checked against hand-written values, and the quantization terms against
  one process (an AssertionError fails the launch); OUT_DIR/helpers-rank{r}.ok is written;
- then 3 training steps on a global batch of 8 pairs, once per mini-batch size (0: uncached), each from the
  same start; with N processes, process r takes rows [r*8/N, (r+1)*8/N). The loss covers every gathered
  path: Matryoshka(symmetric InfoNCE with a learnable temperature, and its term on the documents' sign bits),
  hard negatives, and false-negative masking across processes (positive 5, on process 1, repeats positive 1,
  on process 0). Dropout is 0.
  Writes OUT_DIR/infonce/mini{M}/losses.json (mean loss over processes, per step) and rank{r}.safetensors beside it;
- the same steps with distillation from teacher scores, Matryoshka(MarginMSE and its term on the documents' sign
  bits), into OUT_DIR/margin_mse/mini{M}/ (int8 codes are left out here: embeddings of 4 and of 8 rows differ by
  float rounding, enough to move a value across an int8 bucket; check_quantized_terms covers their ranges).
"""
import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from twinfold.losses import (
    Distillation,
    InfoNCE,
    Matryoshka,
    Quantized,
    cached_backward,
    chunked,
    text_keys,
    uncached_backward,
)
from twinfold.losses.distributed import (
    average_gradient,
    gather_no_grad,
    gather_with_grad,
    rank,
    rank_offset,
    world_size,
)
from twinfold.models import BiEncoder

GLOBAL_BATCH, STEPS, LR = 8, 3, 0.1
LOSSES = {"infonce": lambda: Matryoshka(Quantized(InfoNCE(learnable=True, symmetric=True), binary=0.5), [128, 32]),
          "margin_mse": lambda: Matryoshka(Quantized(Distillation("margin_mse", 0.05, 0.05), binary=0.5), [128, 32])}
KIND = {"anchor": "query", "positive": "document", "negative": "document"}


def check_helpers():
    """gather_with_grad / gather_no_grad / average_gradient / rank_offset on 2 processes, by hand."""
    r = rank()
    assert world_size() == 2 and rank_offset(3) == 3 * r

    # Each process holds 3 rows; the gathered [6, 2] is rank 0's rows then rank 1's.
    x = (torch.arange(6.0).reshape(3, 2) + 100 * r).requires_grad_()
    gathered = gather_with_grad(x)
    assert torch.equal(gathered, torch.cat([torch.arange(6.0).reshape(3, 2) + 100 * s for s in range(2)]))
    # Process s weights the gathered rows by (s + 1) * w: x's gradient is the sum over processes, its rows.
    w = torch.arange(12.0).reshape(6, 2)
    (gathered * (r + 1) * w).sum().backward()
    assert torch.equal(x.grad, 3 * w[3 * r:3 * r + 3])

    assert torch.equal(gather_no_grad(torch.tensor([10, 20]) + r), torch.tensor([10, 20, 11, 21]))

    tau = torch.tensor(2.0, requires_grad=True)
    (average_gradient(tau) * (r + 1)).backward()  # local gradients 1 and 2 -> 1.5 on both processes
    assert tau.grad.item() == 1.5
    check_quantized_terms()


def check_quantized_terms():
    """Quantized InfoNCE (and MarginMSE) on each process's half of a batch = on the whole batch in one process: the
    int8 ranges come from every process's documents. Gradients: the local rows get twice the whole-batch mean's
    (the loss is each process's mean; gathered rows sum the gradients of both, MarginMSE's rows are local)."""
    g = torch.Generator().manual_seed(0)
    whole = {role: torch.randn(8, 16, generator=g, dtype=torch.float64) for role in ("anchor", "positive", "negative")}
    whole["positive"][1, 0] = 40.0  # one process's document sets the int8 range of dimension 0 for both
    scores = torch.randn(8, 2, generator=g, dtype=torch.float64)
    for inner, alone_inner in ((InfoNCE(), InfoNCE(gather=False)),
                               (Distillation("margin_mse", 0.1, 0.1),) * 2):
        mine = {role: e[4 * rank():4 * rank() + 4].clone().requires_grad_() for role, e in whole.items()}
        terms = {"binary": 1.0, "int8": 1.0, "alignment": 1.0}
        loss = Quantized(inner, **terms)(mine, {"scores": scores[4 * rank():4 * rank() + 4]})
        loss.backward()
        alone = {role: e.clone().requires_grad_() for role, e in whole.items()}
        expected = Quantized(alone_inner, **terms, gather=False)(alone, {"scores": scores})
        expected.backward()
        assert abs(gather_no_grad(loss.detach().reshape(1)).mean().item() - expected.item()) < 1e-12
        for role, e in mine.items():
            assert torch.allclose(e.grad, 2 * alone[role].grad[4 * rank():4 * rank() + 4], rtol=0, atol=1e-12), role


def load_pairs(path: Path) -> dict[str, list[str]]:
    with open(path) as f:
        rows = [json.loads(next(f)) for _ in range(16)]
    positives = [r["positive"][:200] for r in rows]
    positives[5] = positives[1]
    return {"anchor": [r["anchor"] for r in rows], "positive": positives,
            "negative": [positives[(i + 8) % 16] for i in range(16)]}


TEACHER_SCORES = torch.linspace(-1.0, 1.0, 32).reshape(16, 2)  # each row's positive and negative


def train(accelerator: Accelerator, args, mini_batch_size: int, name: str):
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(args.model_dir, dropout=0.0).train()
    loss_fn = LOSSES[name]()
    optimizer = torch.optim.SGD([p for m in (model, loss_fn) for p in m.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    tokenize = accelerator.unwrap_model(model).tokenize

    def embed(texts, role):
        return model(**{k: v.to(accelerator.device) for k, v in tokenize(texts, KIND[role]).items()})

    data = load_pairs(Path(args.pairs))
    local = GLOBAL_BATCH // accelerator.num_processes
    losses = []
    for step in range(STEPS):
        start = (step * GLOBAL_BATCH) % 16 + accelerator.process_index * local
        texts = {role: rows[start:start + local] for role, rows in data.items()}
        keys = {**{role: text_keys(texts[role]) for role in ("positive", "negative")},
                "scores": TEACHER_SCORES[start:start + local]}
        optimizer.zero_grad()
        if mini_batch_size:
            loss = cached_backward(embed, chunked(texts, mini_batch_size), loss_fn, keys=keys,
                                   backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model))
        else:
            loss = uncached_backward(embed, chunked(texts), loss_fn, keys=keys, backward=accelerator.backward)
        optimizer.step()
        losses.append(accelerator.reduce(loss, "mean").item())

    out = args.out_dir / name / f"mini{mini_batch_size}"
    out.mkdir(parents=True, exist_ok=True)
    weights = {f"encoder.{k}": v for k, v in accelerator.unwrap_model(model).encoder.state_dict().items()}
    if name == "infonce":
        weights["loss.log_temperature"] = loss_fn.inner.inner.log_temperature.detach()
    save_file({k: v.contiguous() for k, v in weights.items()}, out / f"rank{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        (out / "losses.json").write_text(json.dumps(losses))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("pairs")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mini-batch-sizes", default="0,3")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # on CPU, only cpu=True gives DDP over gloo
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.num_processes > 1:
        check_helpers()
        (args.out_dir / f"helpers-rank{accelerator.process_index}.ok").touch()
    for name in LOSSES:
        for mini_batch_size in map(int, args.mini_batch_sizes.split(",")):
            train(accelerator, args, mini_batch_size, name)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
