"""launch/train.py's command line (relora_ds/train_args.py): a YAML recipe plus CLI flags, read into a
TrainConfig; what cannot be read is an error naming the file, the key or the flag."""
import argparse
import re

import pytest

from relora_ds.ds_config import load_ds_config
from relora_ds.train_args import build_launch_parser, build_parser, config_from_args
from relora_ds.train_config import ConfigWarning, TrainConfig

BASE = dict(cycle_length=10, restart_warmup_steps=2, total_steps=100, micro_batch_size=2, global_batch_size=8)


def test_yaml_recipe_with_cli_overrides_and_unknown_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 50\nlr: 0.01\n")
    parser = build_parser(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--config", str(recipe), "--lr", "0.02", "--target-modules", "q_proj"]))
    assert (cfg.lr, cfg.total_steps, cfg.target_modules) == (0.02, 50, ["q_proj"])
    recipe.write_text("cycle_lenght: 10\ntotal_steps: 50\n")
    with pytest.raises(ValueError, match=r"unknown keys \['cycle_lenght'\]"):
        config_from_args(parser.parse_args(["--config", str(recipe)]))


def test_all_linear_targets_from_the_command_line_and_a_recipe(tmp_path):
    """target_modules all-linear (PEFT's spelling, which the no-match error suggests) from --target-modules
    (a one-element list) or a recipe's string: the trainer's start-up check and wrap take every linear layer but
    the output layer, here the seven default kinds (it was a suffix matching nothing, or a type error)."""
    import relora_ds
    from relora_ds.startup import check_model_and_data

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: debug\nrank: 4\ncycle_length: 10\nrestart_warmup_steps: 2\nwarmup_steps: 5\ntotal_steps: 50\n"
                      "target_modules: all-linear\n")
    parser = build_parser(argparse.ArgumentParser())
    for argv in (["--config", str(recipe)], ["--config", str(recipe), "--target-modules", "All-Linear"]):
        cfg = config_from_args(parser.parse_args(argv))
        assert cfg.target_modules == "all-linear", argv
        check_model_and_data(cfg, None, 64)
        model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=64))
        names = [n for n, _ in relora_ds.relora_layers(relora_ds.wrap(model, rank=2, target_modules=cfg.target_modules))]
        assert len(names) == 7 * 2 and not any("lm_head" in n for n in names), names
    default = TrainConfig(**BASE).target_modules
    assert config_from_args(parser.parse_args(["--config", str(recipe), "--target-modules", *default])
                            ).target_modules == default
    # all-linear among names (a repeated --target-modules collects both uses): refused, not a name matching nothing
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj', 'all-linear'\]: all-linear selects every "
                                         r"linear layer but the output layer and stands alone"):
        config_from_args(build_launch_parser().parse_args(["--config", str(recipe), "--target-modules", "q_proj",
                                                           "--target-modules", "all-linear"]))


def test_a_recipes_regex_targets_select_as_peft_does(tmp_path):
    """A recipe's string target_modules is a regular expression the full module name must match (PEFT's
    meaning; the no-match error suggests one, and it was a type error): the start-up check passes it and wrap
    takes the q and v projections of each layer; an invalid pattern is an error naming it; the command line's
    --target-modules stays a list of names (overriding the recipe's pattern)."""
    import relora_ds
    from relora_ds.startup import check_model_and_data

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: debug\nrank: 4\ncycle_length: 10\nrestart_warmup_steps: 2\nwarmup_steps: 5\n"
                      "total_steps: 50\ntarget_modules: '.*(q|v)_proj'\n")
    parser = build_parser(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--config", str(recipe)]))
    assert cfg.target_modules == ".*(q|v)_proj"
    check_model_and_data(cfg, None, 64)
    model = relora_ds.LlamaForCausalLM(relora_ds.LlamaConfig.preset("debug", vocab_size=64))
    names = [n for n, _ in relora_ds.relora_layers(relora_ds.wrap(model, rank=2, target_modules=cfg.target_modules))]
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"], names
    assert config_from_args(parser.parse_args(["--config", str(recipe), "--target-modules", "o_proj"])
                            ).target_modules == ["o_proj"]
    recipe.write_text(recipe.read_text().replace(".*(q|v)_proj", "q_proj"))  # a name as a string: a pattern
    with pytest.raises(ValueError, match=r"matched no linear layer.*for every 'q_proj' layer pass \['q_proj'\]"):
        check_model_and_data(config_from_args(parser.parse_args(["--config", str(recipe)])), None, 64)
    recipe.write_text(recipe.read_text().replace("q_proj", ".*(q|v_proj"))
    with pytest.raises(ValueError, match=r"target_modules='\.\*\(q\|v_proj' is not a valid regular expression "
                                         r"\(missing \)"):
        config_from_args(parser.parse_args(["--config", str(recipe)]))


def test_yaml_recipe_choices_are_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 50\nprune_method: l1\n")
    parser = build_parser(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="prune_method='l1' is not valid"):
        config_from_args(parser.parse_args(["--config", str(recipe)]))


def test_recipe_values_are_typed(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string: numbers come through as numbers; a quoted "no" is not
    a bool and 2.5 sequences is not a micro-batch (errors naming the field, not tracebacks or silent truths)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 100\nlr: 1e-3\nadam_eps: 1e-8\n")
    cfg = config_from_args(build_parser().parse_args(["--config", str(recipe)]))
    assert (cfg.lr, cfg.adam_eps) == (1e-3, 1e-8) and isinstance(cfg.lr, float)
    # Whole numbers stay exact past 2**53 (they went through float: 9007199254740993 became ...992 on the command
    # line and was refused as not whole in a recipe)
    recipe.write_text("cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 100\nseed: '9007199254740993'\n")
    assert config_from_args(build_parser().parse_args(["--config", str(recipe)])).seed == 9007199254740993
    assert config_from_args(build_parser().parse_args(["--config", str(recipe), "--seed", "9007199254740995"])
                            ).seed == 9007199254740995
    assert config_from_args(build_parser().parse_args(["--config", str(recipe), "--seed", "1e3"])).seed == 1000
    for line, match in (('resume: "no"', r"resume='no' must be true or false"),
                        ("micro_batch_size: 2.5", "micro_batch_size=2.5 must be a whole number"),
                        ("mode: null", "mode=None: a value is required"),
                        ("target_modules: [q_proj, 3]", r"target_modules=\['q_proj', 3\] must be a list of strings")):
        recipe.write_text(f"cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 100\n{line}\n")
        with pytest.raises(ValueError, match=match):
            config_from_args(build_parser().parse_args(["--config", str(recipe)]))


def test_cli_none_clears_a_recipe_value(tmp_path):
    """The paper recipes set total_steps; `--token-budget 2e9 --total-steps none` trains by tokens instead."""
    from launch_utils import ROOT

    args = ["--config", str(ROOT / "launch/configs/paper_60m.yaml"), "--total-steps", "none", "--token-budget", "2e9"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.total_steps is None and cfg.token_budget == 2_000_000_000
    with pytest.raises(ValueError, match="exactly one of total_steps and token_budget"):
        config_from_args(build_parser().parse_args(args[:2] + ["--token-budget", "2e9"]))
    # Fields with a fixed set of values take 'none' too, and a bad value is still an error naming them.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 100\nquantize: int8\nkernels: torch\n")
    cfg = config_from_args(build_parser().parse_args(["--config", str(recipe), "--quantize", "none", "--kernels", "none"]))
    assert cfg.quantize is None and cfg.kernels is None
    with pytest.raises(ValueError, match="quantize='int4' is not valid; valid values: 'int8'"):
        config_from_args(build_parser().parse_args(["--config", str(recipe), "--quantize", "int4"]))
    for bad in (["--total-steps", "inf"], ["--lr", "nan"]):
        with pytest.raises(SystemExit):  # argparse: "... must be a finite number"
            build_parser().parse_args(bad)


def test_errors_name_the_flag_that_fixes_them(tmp_path):
    """Each refusal says how to get a valid run: the flag to drop a recipe's value, the setting to change,
    the recipe key probably meant; a CLI prefix is not taken for a flag."""
    with pytest.raises(ValueError, match=r"warm_start_steps=100 only makes sense with mode=relora or lora: .*"
                                         r"\(--warm-start-steps 0\)"):
        TrainConfig(**{**BASE, "mode": "full", "cycle_length": None, "warm_start_steps": 100})
    with pytest.raises(ValueError, match=r"--total-steps none drops a recipe's total_steps"):
        TrainConfig(**BASE, token_budget=1000)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cycle_lenght: 10\ntotal_steps: 50\nwarmup_step: 3\nzzz: 1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['cycle_lenght', 'warmup_step', 'zzz'\] \('cycle_lenght': "
                                         r"did you mean 'cycle_length'\?; 'warmup_step': did you mean 'warmup_steps'\?\)"):
        config_from_args(build_parser().parse_args(["--config", str(recipe)]))
    with pytest.raises(SystemExit):
        build_launch_parser().parse_args(["--total-step", "30"])
    from relora_ds.startup import build_schedule
    cfg = TrainConfig(**{**BASE, "warm_start_steps": 4, "warmup_steps": 6, "cycle_length": 10})
    with pytest.raises(ValueError, match=r"^warm_start_steps=4 must be 0 or at least warmup_steps=6: the first warmup"):
        build_schedule(cfg, 100)
    with pytest.warns(UserWarning, match=r"rank=8 is ignored: mode='full' has no LoRA layers"):
        TrainConfig(**{**BASE, "mode": "full", "cycle_length": None, "rank": 8})


def test_a_bool_is_never_a_number(tmp_path):
    """YAML 1.1 reads `yes`/`on` as true: `micro_batch_size: yes` must not train with micro-batches of 1."""
    with pytest.raises(ValueError, match="micro_batch_size=True must be a whole number"):
        TrainConfig(**{**BASE, "micro_batch_size": True})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 100\nlr: on\n")
    with pytest.raises(ValueError, match="lr=True must be a finite number"):
        config_from_args(build_parser().parse_args(["--config", str(recipe)]))


def test_a_recipe_that_is_not_yaml_or_not_a_mapping_is_named(tmp_path):
    parser = build_parser(argparse.ArgumentParser())
    recipe = tmp_path / "r.yaml"
    for text, match in (("lr: 0.01\n\tcycle_length: 10\n", r"(?s)r.yaml: not valid YAML: .*in \".*r.yaml\", line 2"),
                        ("just a string\n", r"r.yaml: a recipe is a mapping of keys to values .*not a str"),
                        ("- lr\n- rank\n", r"r.yaml: a recipe is a mapping .*not a list"),
                        # YAML 1.1's `on` is True; keys 1 and 'foo' could not even be sorted (TypeError tracebacks)
                        ("on: 3\n", r"r.yaml: keys must be setting names, got \[True\] \(YAML reads on, off"),
                        ("1: 2\nfoo: 3\n", r"r.yaml: keys must be setting names, got \[1\]")):
        recipe.write_text(text)
        with pytest.raises(ValueError, match=match):
            config_from_args(parser.parse_args(["--config", str(recipe)]))
    recipe.write_bytes("lr: 0.01  # caf\u00e9\n".encode("latin-1"))  # an editor's Latin-1
    with pytest.raises(ValueError, match=r"r.yaml: not UTF-8 text .*save the recipe as UTF-8"):
        config_from_args(parser.parse_args(["--config", str(recipe)]))


def test_no_resume_with_resume_from_is_a_contradiction(tmp_path):
    parser = build_parser(argparse.ArgumentParser())
    with pytest.raises(ValueError, match=r"--no-resume contradicts resume_from='step_10'"):
        config_from_args(parser.parse_args(["--resume-from", "step_10", "--no-resume", "--cycle-length", "10",
                                              "--total-steps", "100"]))
    recipe = tmp_path / "r.yaml"  # the same in a recipe (resume_from used to win silently)
    recipe.write_text("cycle_length: 10\nwarmup_steps: 5\ntotal_steps: 100\nresume: false\nresume_from: step_10\n")
    with pytest.raises(ValueError, match=r"the recipe's resume: false contradicts resume_from='step_10'"):
        config_from_args(parser.parse_args(["--config", str(recipe)]))
    assert config_from_args(parser.parse_args(["--config", str(recipe), "--resume"])).resume_from == "step_10"
    cfg = config_from_args(parser.parse_args(["--resume-from", "step_10", "--resume", "--cycle-length", "10",
                                              "--warmup-steps", "5", "--total-steps", "100"]))
    assert cfg.resume and cfg.resume_from == "step_10"


def test_model_preset_with_a_hugging_face_start_is_a_contradiction():
    parser = build_parser(argparse.ArgumentParser())
    for flag in ("--hf-model", "--warm-start-from"):
        with pytest.raises(ValueError, match=rf"--model 60m contradicts {flag[2:].replace('-', '_')}='/x/hf', whose "
                                             r"config.json decides the model"):
            config_from_args(parser.parse_args(["--model", "60m", flag, "/x/hf", "--total-steps", "100",
                                                "--cycle-length", "10", "--warmup-steps", "5"]))
        # `--model none` clears a recipe's preset (the help says so), which a Hugging Face start then replaces
        cfg = config_from_args(parser.parse_args(["--model", "none", flag, "/x/hf", "--total-steps", "100",
                                                  "--cycle-length", "10", "--warmup-steps", "5"]))
        assert cfg.model is None and getattr(cfg, flag[2:].replace("-", "_")) == "/x/hf"


def test_a_hugging_face_start_records_no_preset(tmp_path):
    """With hf_model or warm_start_from the directory's config.json is the model: the config records model=None
    (the effective configuration, run_info.jsonl and checkpoints said "tiny", the default), a recipe's preset
    beside a CLI --hf-model is named as ignored, and model=None without such a directory is an error."""
    parser = build_parser(argparse.ArgumentParser())
    base = ["--total-steps", "100", "--cycle-length", "10", "--warmup-steps", "5"]
    assert config_from_args(parser.parse_args(["--hf-model", "/x/hf", *base])).model is None
    assert config_from_args(parser.parse_args(["--warm-start-from", "/x/hf", *base])).model is None
    assert config_from_args(parser.parse_args(base)).model == "tiny"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: 130m\n")
    with pytest.warns(ConfigWarning, match=r"model='130m' is ignored: hf_model='/x/hf' decides the model"):
        cfg = config_from_args(parser.parse_args(["--config", str(recipe), "--hf-model", "/x/hf", *base]))
    assert cfg.model is None and TrainConfig(**cfg.to_dict()).model is None  # a saved config reads back
    with pytest.raises(ValueError, match=r"model=None needs hf_model or warm_start_from .* debug, tiny, 60m"):
        TrainConfig(model=None, total_steps=100, cycle_length=10)


def test_a_key_given_twice_in_a_recipe_or_deepspeed_json_is_named(tmp_path):
    """YAML and JSON readers keep the last of two equal keys silently: `lr: 0.5` appended to a recipe, or a
    second zero_optimization block, won without a word (a review's find)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.001\nrank: 8\nlr: 0.5\n")
    with pytest.raises(ValueError, match=r"(?s)--config .*r.yaml: not valid YAML: .*found the key 'lr' twice.*line 3"):
        config_from_args(argparse.Namespace(config=str(recipe)))
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}, "zero_optimization": {"stage": 3}}')
    with pytest.raises(ValueError, match=r"ds.json: key 'zero_optimization' appears twice in one object"):
        load_ds_config(ds)
    ds.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "stage": 3}}')
    with pytest.raises(ValueError, match=r"key 'stage' appears twice"):
        load_ds_config(ds)


def test_a_local_rank_argument_the_trainer_would_ignore_is_an_error(monkeypatch):
    """--local_rank was parsed and never read (the trainer reads LOCAL_RANK): under plain python `--local_rank 3`
    ran as local rank 0 without a word (a review's find). The deepspeed launcher passes both, equal."""
    from relora_ds.train_args import check_local_rank_arg

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    check_local_rank_arg(-1)  # not given
    with pytest.raises(ValueError, match=r"--local_rank 3 but LOCAL_RANK=unset: .*CUDA_VISIBLE_DEVICES"):
        check_local_rank_arg(3)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"--local_rank 3 but LOCAL_RANK=0"):
        check_local_rank_arg(3)
    monkeypatch.setenv("LOCAL_RANK", "3")
    check_local_rank_arg(3)


def test_a_misspelled_flag_is_named_with_the_flag_meant(capsys):
    """The recipe's key spelled as a flag (underscores) and a typo get a hint, as a recipe's YAML typo does;
    a flag like nothing gets none (found by a user-journey review: "unrecognized arguments" alone)."""
    from relora_ds.train_args import build_launch_parser

    parser = build_launch_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--totl-steps", "10", "--total_steps=5", "--quux", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.rstrip().endswith("error: unrecognized arguments: --totl-steps 10 --total_steps=5 --quux 1 "
                                 "(--totl-steps: did you mean --total-steps?; --total_steps: did you mean "
                                 "--total-steps?)"), err


def test_cli_null_clears_a_recipe_value_as_none_does(tmp_path):
    """Mutation a trial ran that no test saw: YAML's spelling, `null`, clears an optional field from the
    command line as `none` does (the recipe's own `cycle_length: null` is None)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mode: lora\ncycle_length: 10\ntotal_steps: 50\nwarmup_steps: 5\n")
    for word in ("null", "NULL", "none"):
        cfg = config_from_args(build_parser().parse_args(["--config", str(recipe), "--cycle-length", word]))
        assert cfg.cycle_length is None, word


@pytest.mark.parametrize("line, shown", [("seed: 017", "017 reads as 15 in YAML 1.1 (octal)"),
                                         ("seed: -0_17", "-0_17 reads as -15 in YAML 1.1 (octal)"),
                                         ("total_steps: 1:30", "1:30 reads as 90 in YAML 1.1 (base 60)"),
                                         ("lr: 1:30.5", "1:30.5 reads as 90.5 in YAML 1.1 (base 60)")])
def test_a_number_yaml_reads_as_another_is_refused(tmp_path, line, shown):
    """PyYAML (YAML 1.1) reads `seed: 017` as 15 and `1:30` as 90: a recipe trained with another seed or length
    than it shows. Such a number is named with what it would read as; what shows as it reads stays accepted (a
    0 alone, 019, hex, a quoted "017")."""
    import yaml

    assert yaml.safe_load(line) != yaml.safe_load(line.replace(" ", ' "') + '"')  # the oracle: YAML's own reading
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{line}\ncycle_length: 10\n" + ("total_steps: 100\n" if "total" not in line else ""))
    with pytest.raises(ValueError, match=rf"(?s)r.yaml: not valid YAML: {re.escape(shown)}.*line 1"):
        config_from_args(argparse.Namespace(config=str(recipe)))
    for fine, seed in (("seed: 0", 0), ("seed: 019", 19), ("seed: 0x11", 17), ('seed: "017"', 17)):
        recipe.write_text(f"{fine}\ncycle_length: 10\ntotal_steps: 100\nwarmup_steps: 5\n")
        assert config_from_args(argparse.Namespace(config=str(recipe))).seed == seed
