"""What the training loop reads: a run's batches, whether planned over token caches or read as streams."""
import logging
from typing import Iterator

from twinfold.models import BiEncoder
from twinfold.models.runtime import default_token_budget, loader_settings
from twinfold.models.tokens import TextTokenizer
from twinfold.train.config import Config, ConfigError
from twinfold.train.data.batches import StepBatches, step_loader, stream_loader
from twinfold.train.data.pairs import PairDataset, TokenizedPairs, cache_root, tokenize_pairs
from twinfold.train.data.plan import BatchPlan, RowKeys
from twinfold.train.data.streams import StreamSource, StreamSteps

log = logging.getLogger("twinfold")


def dataset_tokenizers(cfg: Config, model: BiEncoder) -> list[TextTokenizer]:
    """Each training dataset's tokenizer: the model's, with the dataset's query prompt for its anchors when it names
    one; an unknown prompt name (of a dataset or of eval) is a ConfigError, raised before any work."""
    try:
        model.prompt_text(cfg.eval.query_prompt_name)
    except ValueError as e:
        raise ConfigError(f"eval.query_prompt_name: {e}") from None
    tokenizers = []
    for i, d in enumerate(cfg.data.train):
        try:
            prompt = model.prompt_text(d.query_prompt_name, d.query_prompt)
        except ValueError as e:
            raise ConfigError(f"data.train[{i}].query_prompt_name: {e}") from None
        tokenizers.append(model.text_tokenizer.with_prompt("query", prompt))
    return tokenizers


class TrainingBatches:
    """A run's training batches, whether its datasets are tokenized once and planned (`BatchPlan`) or read as
    streams (then every dataset is): `loader` continues from where a run stands."""

    def __init__(self, cfg, model, datasets: list[PairDataset | StreamSource], accelerator,
                 tokenizers: list[TextTokenizer]):
        t = cfg.train
        self.cfg, self.model, self.accelerator, self.tokenizers = cfg, model, accelerator, tokenizers
        self.streamed = any(isinstance(ds, StreamSource) for ds in datasets)
        self.sources = [ds if isinstance(ds, StreamSource) else StreamSource.of(ds) for ds in datasets] \
            if self.streamed else None
        if not self.streamed:
            # the main process tokenizes first, then each machine's first process (its cache may be on its own disk)
            with accelerator.main_process_first(), accelerator.local_main_process_first():
                self.tokenized = [tokenize_pairs(ds, tokenizer, cache_root(cfg.data.cache_dir))
                                  for ds, tokenizer in zip(datasets, tokenizers)]
            if accelerator.is_main_process:
                report_truncation(self.tokenized, model.max_length)
            self.plan = BatchPlan([RowKeys.of(ds) for ds in self.tokenized], t.batch_size, t.seed, cfg.data.mixing)

    def batches_in(self, epochs: int) -> int | None:
        """Global batches in `epochs` epochs (None for streams: they have no known length)."""
        return None if self.streamed else self.plan.batches_in(epochs)

    def loader(self, epoch: int, index: int, position: dict | None) -> Iterator[dict]:
        """This process's assembled slices of global batches, from batch `index` of `epoch` (planned data) or
        from the stream `position` (streamed data; None: the start)."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        budget = cfg.train.chunk_tokens or default_token_budget(device)
        if self.streamed:
            t = cfg.train
            steps = StreamSteps(self.sources, self.tokenizers, model.padder, budget, cfg.loss.mini_batch_size,
                                rank, world, t.batch_size, t.seed, cfg.data.mixing, cfg.data.shuffle_buffer, position)
            return iter(stream_loader(steps, loader_settings(device)))
        batches = StepBatches(self.tokenized, rank, world, model.padder, budget, cfg.loss.mini_batch_size)
        return iter(step_loader(batches, self.plan, epoch, index, loader_settings(device)))


def report_truncation(datasets: list[TokenizedPairs], max_length: int) -> None:
    """Say once how many training texts exceed `max_length` tokens (they are truncated, not dropped)."""
    for ds in datasets:
        if any(ds.truncated.values()):
            negatives = sum(n for role, n in ds.truncated.items() if role.startswith("negative"))
            counts = [f"{ds.truncated['anchor']} of {len(ds)} anchors",
                      f"{ds.truncated['positive']} of {len(ds)} positives"]
            counts += [f"{negatives} of {len(ds) * ds.num_negatives} negatives"] if ds.num_negatives else []
            log.warning("%s: %s exceed max_length %d tokens and are truncated", ds.name, " and ".join(counts),
                        max_length)
