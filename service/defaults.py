"""The embedded default: a synthetic line and a `tiny` model trained on it, cached on disk.

The demo and `lineinspect serve` without `--model` use it, so a fresh machine with no GPU and
no downloads has a working inspector (and a language part that writes reports) after one short
training run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lineinspect.errors import LineInspectError
from lineinspect.vision.model_io import CONFIG

DEFAULT_SURFACE = "metal"
DEFAULT_TRAIN_IMAGES = 200
DEFAULT_TIME_BUDGET_S = 150.0  # the defect model
DEFAULT_LANGUAGE_BUDGET_S = 90.0  # its language part (the three stages together)


def home() -> Path:
    """$LINEINSPECT_HOME, else ~/.cache/lineinspect."""
    return Path(os.environ.get("LINEINSPECT_HOME", Path.home() / ".cache" / "lineinspect"))


def default_data_dir() -> Path:
    return home() / "data" / f"demo-{DEFAULT_SURFACE}"


def default_model_dir() -> Path:
    return home() / "models" / "default-tiny"


def ensure_default_data() -> Path:
    from lineinspect.training.synth import write_synthetic_dataset

    data = default_data_dir()
    if not (data / "train" / "good").is_dir():
        write_synthetic_dataset(data, n=DEFAULT_TRAIN_IMAGES, seed=0, surface=DEFAULT_SURFACE, size=256)
    return data


def ensure_default_model(time_budget: float = DEFAULT_TIME_BUDGET_S,
                         language_budget: float = DEFAULT_LANGUAGE_BUDGET_S) -> Path:
    """Return the cached default model directory, training what is missing of it first: the
    defect model, then (with a positive `language_budget`) its language part."""
    from lineinspect.moe_lm.report_model import has_language
    from lineinspect.training.datasets import open_dataset

    model = default_model_dir()
    if (model / CONFIG).is_file() and (language_budget <= 0 or has_language(model)):
        return model
    data = open_dataset(ensure_default_data())
    if not (model / CONFIG).is_file():
        from lineinspect.training.train_defect import TrainConfig, Trainer

        resume = (model / "checkpoint").is_dir()
        Trainer(TrainConfig(preset="tiny", time_budget=time_budget, seed=0), data, model, resume=resume).run()
    if language_budget > 0:
        from lineinspect.training.train_language import LanguageTrainConfig, train_language

        train_language(model, data, LanguageTrainConfig(time_budget=language_budget, seed=0))
    return model


def ensure_default_model_in_child(time_budget: float = DEFAULT_TIME_BUDGET_S,
                                  language_budget: float = DEFAULT_LANGUAGE_BUDGET_S) -> Path:
    """`ensure_default_model` in a child process. Training's CPU threads end with the child, so a
    server started afterwards in this process runs the only OpenMP team (`vision.cpu_threads`)."""
    code = ("import sys; from lineinspect.service.defaults import ensure_default_model; "
            "ensure_default_model(float(sys.argv[1]), float(sys.argv[2]))")
    done = subprocess.run([sys.executable, "-c", code, str(time_budget), str(language_budget)], check=False)
    if done.returncode != 0:
        raise LineInspectError(f"training the default model failed (exit status {done.returncode}); "
                               "its messages are above")
    return default_model_dir()
