"""paper_lib: the library behind the notebooks that reproduce "RL Is Neither a Panacea Nor a Mirage".

One idea per module, each listed in the README's Layout section. The notebooks' stages pass nothing in
memory: runs/<preset>/ holds what one writes and the next reads (artifacts names every path).
"""
__version__ = "0.1.0"


def _show_progress_notes_in_notebooks() -> None:
    """In a Jupyter kernel (JupyterLab, papermill) with no logging set up, print paper_lib's INFO lines, such
    as "… is up to date (manifest matches)", under the cell: without them a skipped stage looks like one that
    did nothing. Scripts and the stage CLIs configure logging themselves; a handler set up here first is kept."""
    import logging
    import sys

    if "ipykernel" not in sys.modules or logging.getLogger().handlers:
        return
    log = logging.getLogger(__name__)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)  # stderr would paint every note red in JupyterLab
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


_show_progress_notes_in_notebooks()
