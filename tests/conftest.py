"""Every test writes under its own tmp dir: nothing lands in the repo's runs/ or figures/."""
import os
from typing import NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PAPER_FIGURES_DIR", str(tmp_path / "figures"))
    yield tmp_path


class TinyBase(NamedTuple):
    runs: object  # the runs dir it was built in (a Path)
    path: object  # the base model's HF directory


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The tiny preset's base model (random Qwen2 + the project's tokenizer), built once per session in
    its own runs dir; tests copy it rather than change it."""
    from paper_lib import config, models

    runs = tmp_path_factory.mktemp("base_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAPER_RUNS_DIR", str(runs))
        return TinyBase(runs, models.base_model_path(config.load("tiny")))
