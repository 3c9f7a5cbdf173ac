"""Run one notebook for run_all.sh, or only check a preset's config (--check), and end a failure in one
line: the notebook's own error (e.g. the offline hub's message), not papermill's chained traceback,
which stays in the executed copy.

    python scripts/run_notebook.py --check PRESET
    python scripts/run_notebook.py PRESET SOURCE.ipynb EXECUTED.ipynb ROOT
"""
import sys


def main(argv: list[str]) -> int:
    from paper_lib import config

    preset = argv[1] if argv[0] == "--check" else argv[0]
    try:
        config.load(preset)
    except config.ConfigError as err:
        print(f"run_all: config error: {err}", file=sys.stderr)
        return 2
    if argv[0] == "--check":
        return 0
    import logging

    import papermill

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as papermill's CLI: cell output streams
    from papermill.exceptions import PapermillExecutionError

    _, source, executed, root = argv
    try:
        papermill.execute_notebook(source, executed, parameters={"preset": preset}, kernel_name="python3",
                                   log_output=True, progress_bar=False, cwd=root)
    except PapermillExecutionError as err:
        last = (str(err.evalue).strip().splitlines() or [""])[-1]
        print(f"run_all: {err.ename}: {last} (cell {err.exec_count})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
