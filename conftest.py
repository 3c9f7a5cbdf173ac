"""pytest-xdist's scheduling for tests/ and the notebooks under nbval (`./run_tests.sh` runs a worker per
core, up to 4): a test file goes whole to one worker, so a module's fixture (the smol model's GGUF
conversion) is built once and test_multiprocess's two-process launches never share accelerate's port; all
the notebooks go, in order, to one worker, since each reads what the one before it wrote under runs/tiny/.

(`--dist loadgroup` would say this with markers, but xdist 3.8 writes its group into `item._nodeid`, which
pytest 9.2 no longer reads.)
"""
import pytest

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # without xdist the tests run in one process and nothing here applies
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class FilesWithNotebooksTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "notebooks" if path.endswith(".ipynb") else path

    @pytest.hookimpl(optionalhook=True)  # also under `-p no:xdist`, where xdist's hooks are not declared
    def pytest_xdist_make_scheduler(config, log):
        # every mode that shares the tests out; "each" runs all of them on every worker: xdist's own
        return None if config.getoption("dist") == "each" else FilesWithNotebooksTogether(config, log)


# nbval waits a hard-coded 5 s for each of a cell's output messages once the cell has run; on a 2-core
# machine whose other worker is busy with a multi-process test, 06_restore's sweep cell has missed that
# (run_tests.sh, 2026-12-06). The cell's own limit (--nbval-cell-timeout) is unchanged.
NOTEBOOK_OUTPUT_TIMEOUT_S = 120


def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's notebook cells
            item.output_timeout = NOTEBOOK_OUTPUT_TIMEOUT_S
