"""Config schemas: every command refuses unknown keys, wrong types and out-of-range values in one line (exit 2,
nothing written), documents every key, prints it with --show-config, and the YAML files in configs/ validate."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefalign import schemas
from prefalign.bench.harness import BENCH_DEFAULTS, GENERATE_DEFAULTS
from prefalign.cli import LABELS_DEFAULTS, TRAIN_CLIP_DEFAULTS, app
from prefalign.config import leaf_keys, validate_config
from prefalign.console import one_line
from prefalign.demo import DEMO_DEFAULTS
from prefalign.errors import PrefalignError
from prefalign.rewards.score import SCORE_DEFAULTS
from prefalign.train import dipp, dpo, grpo, refl, reward, spo
from prefalign.train.pretrain import PRETRAIN_DEFAULTS

RUNNER = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# command line, (defaults, schema), a misspelt key and the key it should suggest, an integer key that must be >= 1
COMMANDS = {
    "align_dpo": (["align", "--method", "dpo"], (dpo.DEFAULTS, schemas.DPO), "train.lrr", "train.lr",
                  "train.steps"),
    "align_spo": (["align", "--method", "spo"], (spo.DEFAULTS, schemas.SPO), "train.stepz", "train.steps",
                  "train.steps"),
    "align_dipp": (["align", "--method", "dipp"], (dipp.DEFAULTS, schemas.DIPP), "train.step", "train.steps",
                   "train.checkpoint_every"),
    "align_refl": (["align", "--method", "refl"], (refl.DEFAULTS, schemas.REFL), "train.stepz", "train.steps",
                   "train.steps"),
    "align_grpo": (["align", "--method", "grpo"], (grpo.DEFAULTS, schemas.GRPO), "train.step", "train.steps",
                   "train.steps"),
    "train_reward": (["train-reward"], (reward.DEFAULTS, schemas.TRAIN_REWARD), "train.stepz", "train.steps",
                     "train.checkpoint_every"),
    "bench": (["bench", "shapes-val"], (BENCH_DEFAULTS, schemas.BENCH), "batch_sise", "batch_size", "batch_size"),
    "generate": (["generate"], (GENERATE_DEFAULTS, schemas.GENERATE), "num_promts", "num_prompts", "batch_size"),
    "score": (["score"], (SCORE_DEFAULTS, schemas.SCORE), "reward", "rewards", "batch_size"),
    "demo": (["demo"], (DEMO_DEFAULTS, schemas.DEMO), "num_promts", "num_prompts", "num_prompts"),
    "shapes_pretrain": (["shapes", "pretrain"], (PRETRAIN_DEFAULTS, schemas.PRETRAIN), "train.stepz", "train.steps",
                        "train.batch_size"),
    "shapes_labels": (["shapes", "labels"], (LABELS_DEFAULTS, schemas.LABELS), "n_pair", "n_pairs", "n_pairs"),
    "shapes_train_clip": (["shapes", "train-clip"], (TRAIN_CLIP_DEFAULTS, schemas.TRAIN_CLIP), "step", "steps",
                          "steps"),
}


def _error_line(args: list[str]) -> str:
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("problem", ["unknown", "wrong_type", "zero", "negative"])
def test_bad_values_are_one_line_errors_and_write_nothing(name, problem, tmp_path):
    args, _, typo, suggestion, count_key = COMMANDS[name]
    override, expected = {
        "unknown": (f"{typo}=3", f"config key '{typo}' is not a setting of"),
        "wrong_type": (f"{count_key}=abc", f"config key '{count_key}' expects an integer, got 'abc'"),
        "zero": (f"{count_key}=0", f"config key '{count_key}' must be >= 1, got 0"),
        "negative": (f"{count_key}=-5", f"config key '{count_key}' must be >= 1, got -5"),
    }[problem]
    out = tmp_path / "run"
    line = _error_line([*args, override, "--out", str(out)])
    assert expected in line
    if problem == "unknown":
        assert f"did you mean '{suggestion}'?" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["align", "train.lr=-1e-4"], "'train.lr' must be > 0, got -0.0001"),
        (["align", "train.mixed_precision=fp8"], "train.mixed_precision 'fp8' unknown; use one of no, fp16, bf16"),
        (["align", "train=3"], "'train' is a section, not a value; set its keys, e.g. 'train.steps=...'"),
        (["align", "--method", "spo", "train.rounds=3"], "did you mean 'train.steps'?"),
        (["bench", "shapes-val", "nosuch.key=3"], "config key 'nosuch' is not a setting of bench"),
        (["demo", "sampler.guidance=high"], "'sampler.guidance' expects a number, got 'high'"),
        (["train-reward", "model.time_conditioned=3"], "'model.time_conditioned' expects true or false, got 3"),
    ],
)
def test_validation_messages(args, message):
    assert message in _error_line(args)


def test_values_are_normalised_where_unambiguous():
    config = {"train": {"lr": 1, "steps": 3.0, "mixed_precision": False}, "eval": {"rewards": "shapes-oracle"}}
    validate_config(config, dpo.DEFAULTS, schemas.DPO)
    assert config == {"train": {"lr": 1.0, "steps": 3, "mixed_precision": "no"},
                      "eval": {"rewards": ["shapes-oracle"]}}
    with pytest.raises(PrefalignError, match=r"'policy\.lora_rank' must be >= 1, got 0"):
        validate_config({"policy": {"lora_rank": 0}}, dpo.DEFAULTS, schemas.DPO)
    validate_config({"arch": {"anything": {"goes": 1}}}, PRETRAIN_DEFAULTS, schemas.PRETRAIN)  # free-form


@pytest.mark.parametrize("name", COMMANDS)
def test_every_key_is_documented(name):
    defaults, schema = COMMANDS[name][1]
    undocumented = [k for k in leaf_keys(defaults) if not (schema.get(k) and schema[k].doc)
                    and not any(k.startswith(f"{f}.") and schema[f].free for f in schema)]
    assert not undocumented, f"{name}: add a Field in prefalign/schemas.py for {undocumented}"
    stale = [k for k in schema if k not in set(leaf_keys(defaults)) and not schema[k].free]
    assert not stale, f"{name}: schema documents keys the defaults no longer have: {stale}"


def test_show_config_prints_documented_yaml_and_runs_nothing(tmp_path):
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["align", "--method", "dpo", "train.lr=1e-3", "--out", str(out), "--show-config"])
    assert result.exit_code == 0, result.output
    assert "  lr: 0.001  # peak learning rate" in result.output
    assert yaml.safe_load(result.output)["train"]["lr"] == 1e-3 and not out.exists()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    name = next(n for n in sorted(COMMANDS, key=len, reverse=True) if path.stem.startswith(n))
    args = COMMANDS[name][0]
    result = RUNNER.invoke(app, [*args, "--config", str(path), "--show-config"])
    assert result.exit_code == 0, result.output


def test_help_shows_an_example_per_command():
    for args, *_ in COMMANDS.values():
        result = RUNNER.invoke(app, [*args[:2 if args[0] == "shapes" else 1], "--help"])
        assert result.exit_code == 0 and "Example: prefalign" in result.output and "--show-config" in result.output


def test_long_error_lines_are_capped():
    line = _error_line(["align", "x" * 10_000 + "=1"])
    assert len(line) < 450 and " ... " in line and line.endswith("(--show-config lists them)")
    assert one_line("a\nb") == "a b"
