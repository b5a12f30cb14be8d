"""Bad input found by fuzzing launch/train.py's and launch/preflight.py's inputs (flags, recipe keys, DeepSpeed
JSON, a Hugging Face config's rope_scaling): each is refused at start-up with an error naming the setting and
what is valid, instead of being read as something else or failing later with a traceback."""
import contextlib
import io
import json
import re
import sys

import pytest

from launch_utils import ROOT
from relora_ds.config_values import coerce_value
from relora_ds.ds_config import complete_ds_config, load_ds_config
from relora_ds.model_config import LlamaConfig
from relora_ds.train_args import build_launch_parser, config_from_args
from relora_ds.train_config import TrainConfig

sys.path.insert(0, str(ROOT / "launch"))

BASE = ["--model", "debug", "--rank", "8", "--cycle-length", "10", "--warmup-steps", "2", "--restart-warmup-steps",
        "2", "--total-steps", "100", "--micro-batch-size", "2", "--global-batch-size", "4"]
SMALL = dict(model="debug", rank=8, cycle_length=10, warmup_steps=2, restart_warmup_steps=2, total_steps=100,
             micro_batch_size=2, global_batch_size=4)


def _config(*argv):
    base = BASE[2:] if {"--hf-model", "--warm-start-from"} & set(argv) else BASE  # no --model beside them
    return config_from_args(build_launch_parser().parse_args([*base, *argv]))


@pytest.mark.parametrize("flag", ["--hf-model", "--warm-start-from", "--data-dir", "--output-dir", "--wandb-project",
                                  "--compile-backend", "--resume-from"])
def test_an_empty_value_is_refused_not_read_as_unset_or_the_cwd(flag):
    """`--data-dir "$DIR"` with DIR unset: '' trained on the built-in corpus in preflight's reading and on the
    current directory in the trainer's (Path('')); --hf-model '' trained from scratch, --output-dir '' wrote
    (and with --overwrite deleted) the run in the current directory."""
    name = flag[2:].replace("-", "_")
    with pytest.raises(ValueError, match=rf"^{name}='' is empty: give a value, or "):
        _config(flag, "")
    with pytest.raises(ValueError, match=rf"^{name}='  ' is empty"):
        _config(flag, "  ")


def test_an_empty_value_in_a_recipe_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_dir: ''\n")
    with pytest.raises(ValueError, match=r"^data_dir='' is empty: give a value, or give none \(--data-dir none\)"):
        _config("--config", str(recipe))


def test_a_whole_number_in_exponent_notation_is_read_exactly():
    """"1e30" was float(1e30) = 10**30 + 19884624838656: the run's total_steps (and errors) named a number
    the user never wrote."""
    assert coerce_value("total_steps", "1e30", int) == 10**30
    assert coerce_value("total_steps", "1.5e3", int) == 1500
    assert _config("--total-steps", "none", "--token-budget", "1e22").token_budget == 10**22
    with pytest.raises(ValueError, match=r"^total_steps='1e400' must be a whole number$"):  # not "inf"
        coerce_value("total_steps", "1e400", int)
    with pytest.raises(ValueError, match=r"^total_steps='2.5' must be a whole number$"):
        coerce_value("total_steps", "2.5", int)


def test_a_vocab_size_sentencepiece_cannot_read_is_refused():
    """Above 2**31 - 1 SentencePiece cannot parse vocab_size (the trainer's error named neither the setting nor
    the limit) and preflight's model check failed with torch's TypeError (1e30: 'Overflow when unpacking long')."""
    TrainConfig(**SMALL, vocab_size=2**31 - 1)
    with pytest.raises(ValueError, match=r"^vocab_size=2147483648 is too large: .* at most 2\*\*31 - 1 = 2147483647"):
        TrainConfig(**SMALL, vocab_size=2**31)
    TrainConfig(**SMALL, vocab_size=2**40, data_dir="prepared")  # a prepared dir's tokenizer decides: not refused


def test_preflight_names_a_huge_vocab_size_instead_of_a_traceback(tmp_path):
    import preflight

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        preflight.main(["--world-size", "1", *BASE, "--vocab-size", "1e30", "--output-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert f"error: vocab_size={10**30} is too large" in err.getvalue()


def test_preflight_refuses_an_infinite_gpu_memory():
    """--gpu-memory-gb inf said the run "exceeds --gpu-memory-gb inf (nan GB usable ...)"."""
    import preflight

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        preflight.main(["--world-size", "1", *BASE, "--gpu-memory-gb", "inf"])
    assert exit_.value.code == 2
    assert "error: --gpu-memory-gb must be a positive finite number, got inf" in err.getvalue()


def test_a_data_prefetch_beyond_the_thread_limit_is_refused():
    """data_prefetch=1e8 passed preflight and stopped the first step with "RuntimeError: can't start new
    thread" (one reader thread per micro-batch read ahead)."""
    assert TrainConfig(**SMALL, data_prefetch=256).data_prefetch == 256
    with pytest.raises(ValueError, match=r"^data_prefetch=257 is too many: .* give at most 256"):
        TrainConfig(**SMALL, data_prefetch=257)


@pytest.mark.parametrize("switch, ways", [("--export", "--export or --no-export"),
                                          ("--no-resume", "--resume or --no-resume")])
def test_a_value_after_a_switch_is_explained(switch, ways, capsys):
    with pytest.raises(SystemExit):
        build_launch_parser().parse_args([*BASE, switch, "false"])
    assert f"unrecognized arguments: false (false: {switch} is a switch and takes no value ({ways}))" in \
        capsys.readouterr().err


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "linear", "factor": "4"}, r"\['factor'\] must be positive numbers"),
    ({"rope_type": "linear", "factor": True}, r"\['factor'\] must be positive numbers"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": "1", "high_freq_factor": 4,
      "original_max_position_embeddings": 8192}, r"must be positive numbers"),
    ({"rope_type": ["linear"], "factor": 4}, r"rope_type=\['linear'\] must be a name; valid rope types: 'default'"),
])
def test_rope_scaling_values_that_are_not_numbers_are_named(scaling, message):
    """A config.json's "factor": "4" failed with TypeError (math.isfinite of a string), a list rope_type with
    'unhashable type'."""
    with pytest.raises(ValueError, match=message):
        LlamaConfig(rope_scaling=scaling)


@pytest.mark.parametrize("extra, message", [
    ({"steps_per_print": 0}, r"steps_per_print=0 must be a positive whole number"),  # ZeroDivisionError at step 1
    ({"steps_per_print": "10"}, r"steps_per_print='10' must be a positive whole number"),  # TypeError at step 1
    ({"checkpoint": {"tag_validation": "bogus"}}, r"checkpoint.tag_validation='bogus' is not valid; valid values: "
                                                  r"'WARN', 'IGNORE', 'FAIL'"),  # DeepSpeedConfigError traceback
    ({"checkpoint": {"tag_validation": 5}}, r"checkpoint.tag_validation=5 is not valid"),
    ({"communication_data_type": "int8"}, r"'communication_data_type' must name a dtype \(\"fp32\", \"fp16\" or "
                                          r"\"bf16\"\), not 'int8'"),  # refused by the engine, after preflight
    ({"seq_parallel_communication_data_type": "x"}, r"'seq_parallel_communication_data_type' must name a dtype"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": "cpu"}},
     r"zero_optimization.offload_optimizer='cpu' must be an object, e.g. \{\"device\": \"cpu\"\}"),  # AttributeError
    ({"zero_optimization": {"stage": 3, "offload_param": "nvme"}}, r"zero_optimization.offload_param='nvme' must be"),
    ({"wall_clock_breakdown": "yes"}, r"wall_clock_breakdown='yes' must be true or false"),  # TypeError at start
    ({"prescale_gradients": "false"}, r"prescale_gradients='false' must be true or false"),  # read as true
    ({"bf16": {"enabled": None}}, r"^--deepspeed x.json: 1 validation error for DeepSpeedBF16Config\nenabled"),
])
def test_deepspeed_values_refused_before_the_engine_starts(extra, message):
    ds = {"zero_optimization": {"stage": 1}, **extra}
    with pytest.raises(ValueError) as error:
        complete_ds_config(ds, TrainConfig(**SMALL), world_size=2, source="--deepspeed x.json")
    assert error.value.args[0].startswith("--deepspeed x.json: "), error.value.args[0]
    assert re.search(message, error.value.args[0]), error.value.args[0]


def test_deepspeed_parse_of_the_completed_config_names_the_file_and_passes_the_shipped_configs():
    """Whatever DeepSpeed's own config parser refuses is a ValueError naming the file (here its ValueError for
    gradient_allreduce_op='sum' at ZeRO-3), and every shipped config passes it."""
    ds = {"zero_optimization": {"stage": 3}, "gradient_allreduce_op": "sum"}
    with pytest.raises(ValueError, match=r"^--deepspeed y.json: DeepSpeed refuses this config: .*gradient_allreduce"):
        complete_ds_config(ds, TrainConfig(**SMALL), world_size=2, source="--deepspeed y.json")
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        done = complete_ds_config(load_ds_config(path), TrainConfig(**SMALL), world_size=2)
        assert done["train_batch_size"] == 4, path
        assert json.loads(json.dumps(done)) == done
