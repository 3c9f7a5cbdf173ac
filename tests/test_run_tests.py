"""run_tests.sh's parallel run: the scheduling that conftest.py gives pytest-xdist."""
import importlib.util

from paper_lib.config import PROJECT_ROOT


def test_the_notebooks_share_one_worker_and_each_test_file_has_its_own():
    spec = importlib.util.spec_from_file_location("root_conftest", PROJECT_ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    scope = root_conftest.FilesWithNotebooksTogether._split_scope
    notebooks = {scope(None, f"notebooks/{n}.ipynb::Cell {c}") for n in ("01_data", "06_restore") for c in (0, 3)}
    assert notebooks == {"notebooks"}  # each reads what the one before it wrote: one worker, in order
    assert scope(None, "tests/test_smol.py::test_sft_two_steps") == scope(None, "tests/test_smol.py::test_one_restore")
    assert scope(None, "tests/test_smol.py::test_one_restore") != scope(None, "tests/test_sft.py::test_x[a-b]")
