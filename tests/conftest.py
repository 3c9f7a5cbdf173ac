"""Every test writes under its own tmp dir: nothing lands in the repo's runs/ or figures/."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPER_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PAPER_FIGURES_DIR", str(tmp_path / "figures"))
    yield tmp_path
