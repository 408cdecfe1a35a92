"""Training: config, data, the loop, checkpoints, evaluation and reports.

`from twinfold.train import train, load_config`: `train(load_config("configs/smoke.yaml", ["train.lr=3e-5"]))`
runs a recipe and returns its exported model folder. Both load on first use, so `python -m twinfold.train --help`
stays fast.
"""

__all__ = ["load_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from twinfold.train.loop import train

        return train
    if name == "load_config":
        from twinfold.train.config import load_config

        return load_config
    raise AttributeError(f"module 'twinfold.train' has no attribute {name!r}")
