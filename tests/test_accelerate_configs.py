"""The accelerate config files in configs/, read by accelerate's own loader and launcher: each says what
docs/distributed.md says, and agrees with the GPU recipe (mixed precision, gradient clipping, accumulation)."""
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

from twinfold.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def recipe(data_dir, tmp_path_factory):
    """configs/scifact_gpu.yaml, the recipe these files launch."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TWINFOLD_DATA", str(data_dir))
        return load_config(CONFIGS / "scifact_gpu.yaml", [f"train.output_dir={tmp_path_factory.mktemp('run')}"])


def launch_args(name: str, *flags: str):
    """The arguments `accelerate launch --config_file configs/NAME ... -m twinfold.train` ends up with."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *flags, "-m", "twinfold.train",
                                               "x.yaml"])
    _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", ["accelerate_multi_gpu.yaml", "accelerate_multi_node.yaml", "accelerate_fsdp.yaml",
                                  "accelerate_deepspeed_zero2.yaml", "accelerate_deepspeed_zero3.yaml"])
def test_every_config_loads_and_uses_the_recipes_mixed_precision(name, recipe):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.mixed_precision == recipe.train.mixed_precision == "bf16"
    assert not config.use_cpu and config.num_processes % config.num_machines == 0


def test_multi_node_config_runs_one_share_of_the_processes_per_machine():
    config = load_config_from_file(str(CONFIGS / "accelerate_multi_node.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 0)
    assert config.rdzv_backend == "static" and config.main_process_ip is None  # the address: on the command line
    args = launch_args("accelerate_multi_node.yaml", "--machine_rank", "1", "--main_process_ip", "10.0.0.1")
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.0.0.1:29500")  # machine 0's address


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_fsdp_config_fully_shards_each_layer_of_the_model_found_from_the_model(minilm_path, tmp_path, monkeypatch,
                                                                             family):
    config = load_config_from_file(str(CONFIGS / "accelerate_fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    env = prepare_multi_gpu_env(launch_args("accelerate_fsdp.yaml"))
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"  # every process starts from the main process's weights
    env["FSDP_SYNC_MODULE_STATES"] = "false"  # (the plugin looks up a GPU for it; this machine has none)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # as accelerate builds it in each process, from the launcher's env
    assert plugin.sharding_strategy.name == "FULL_SHARD" and plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.use_orig_params and plugin.cpu_offload.offload_params is False

    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    from twinfold.models import BiEncoder

    if family == "bert":
        path, layer = minilm_path, BertLayer  # all-MiniLM-L6-v2: 6 BERT layers
    else:
        path, layer = tmp_path, Qwen3DecoderLayer
        Qwen3Model(Qwen3Config(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(path)
        AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    model = BiEncoder.from_pretrained(path)
    plugin.set_auto_wrap_policy(model)  # accelerate resolves the class names in the model, as in prepare()
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    # the classes the model names (BERT: its layers and its embeddings)
    assert layer in wrapped and {c.__name__ for c in wrapped} == set(model.encoder._no_split_modules)
    assert sum(isinstance(m, layer) for m in model.modules()) == model.encoder.config.num_hidden_layers


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_set_the_zero_stage_and_the_recipes_clipping_and_accumulation(stage, recipe):
    config = load_config_from_file(str(CONFIGS / f"accelerate_deepspeed_zero{stage}.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED
    args = launch_args(f"accelerate_deepspeed_zero{stage}.yaml")
    assert args.use_deepspeed and args.zero_stage == stage and args.mixed_precision == "bf16"
    assert args.gradient_clipping == recipe.train.max_grad_norm
    assert args.gradient_accumulation_steps == recipe.train.grad_accum
    assert args.offload_optimizer_device == args.offload_param_device == "none"
    if stage == 3:
        assert args.zero3_save_16bit_model is True  # whole weights gathered for checkpoints and the export
