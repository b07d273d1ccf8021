"""Config resolution: defaults <- YAML <- key=value overrides <- explicit flags, saved with the run."""

import pytest
import yaml

from prefalign.config import get_dotted, resolve_config, save_config
from prefalign.errors import PrefalignError
from prefalign.io import atomic_write_text
from prefalign.runs import prepare_run_dir, resolve_device

DEFAULTS = {"seed": 0, "train": {"lr": 1e-4, "steps": 10}, "reward": "aesthetic"}


def test_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 0.001\n  steps: 20\nreward: hpsv2\n")
    config = resolve_config(DEFAULTS, cfg_file, ["train.steps=30", "train.betas=[0.9, 0.99]"], seed=7, out=None)
    assert config == {
        "seed": 7,
        "train": {"lr": 0.001, "steps": 30, "betas": [0.9, 0.99]},
        "reward": "hpsv2",
    }
    assert DEFAULTS["train"]["steps"] == 10, "defaults must not be mutated"
    assert get_dotted(config, "train.lr") == 0.001 and get_dotted(config, "train.nope", 5) == 5


def test_values_parse_as_yaml():
    config = resolve_config({}, None, ["a=1e-4", "b=true", "c=hello world", "d=", "e.f=null"])
    assert config == {"a": 1e-4, "b": True, "c": "hello world", "d": "", "e": {"f": None}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["novalue"], "key=value"), (["=3"], "empty key"), (["seed.x=1"], "is a value, not a section")],
)
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(PrefalignError, match=message):
        resolve_config(DEFAULTS, None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(PrefalignError, match="does not exist"):
        resolve_config(DEFAULTS, tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(PrefalignError, match=r"line \d+ is not valid YAML"):
        resolve_config(DEFAULTS, broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(PrefalignError, match="mapping"):
        resolve_config(DEFAULTS, listy)


def test_resolved_config_is_saved_with_the_run(tmp_path):
    config = resolve_config(DEFAULTS, None, ["train.lr=0.5"], out=str(tmp_path / "run"))
    run_dir = prepare_run_dir(config)
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config
    save_config({"path": tmp_path}, tmp_path)  # Paths are written as strings
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"path": str(tmp_path)}


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(PrefalignError, match="not a torch device"):
        resolve_device("tpu9")
