"""Optional experiment tracking (`log.with`, through accelerate's trackers): every metrics row reaches the tracker
as well as the CSV; a tracker whose package is missing is a one-line error before any work."""

import importlib.util

import pytest
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.config import resolve_config
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.runs import prepare_run_dir
from prefalign.shapes.labels import make_preference_dataset
from prefalign.train import dpo
from prefalign.train.common import MetricsLog


class RecordingTracker(GeneralTracker):
    name, requires_logging_directory, main_process_only = "recording", False, True

    def __init__(self) -> None:
        super().__init__()
        self.settings: dict = {}
        self.logged: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.settings = values

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, values))


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.usefixtures("single_thread")
def test_metrics_rows_reach_the_tracker_and_the_csv(tmp_path):
    pairs = make_preference_dataset(tmp_path / "pairs", 8, seed=3).path
    model = save_tiny_pipeline(tmp_path / "pipe", "pixel")
    config = resolve_config(dpo.DEFAULTS, None, [f"model={model}", f"data.source={pairs}", "train.steps=2",
                                                 "train.batch_size=2", "train.log_every=1", "eval.every=0"],
                            out=str(tmp_path / "run"), device="cpu")
    run_dir, tracker = prepare_run_dir(config), RecordingTracker()
    config["log"]["with"] = tracker  # from Python any accelerate tracker; from the CLI tensorboard or wandb
    dpo.train(config, run_dir, log=lambda _: None)
    assert tracker.settings["train.steps"] == 2 and tracker.settings["data.source"] == pairs
    rows = MetricsLog(tmp_path / "run" / "metrics.csv").rows
    assert [step for step, _ in tracker.logged] == [r["step"] for r in rows] == [1, 2]
    assert tracker.logged[-1][1]["metrics/loss"] == pytest.approx(rows[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line(name, tmp_path):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    result = CliRunner().invoke(app, ["align", f"log.with={name}", "train.steps=1", "--device", "cpu",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: log.with={name} needs the {name} package: pip install {name}, or "
                                     "drop log.with")
