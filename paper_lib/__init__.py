"""paper_lib: the library behind the notebooks that reproduce "RL Is Neither a Panacea Nor a Mirage".

Modules: config (presets), cards (the GeneralPoints game), data, models, artifacts (run-dir paths and
manifests), plots (figures with provenance). See DESIGN in the README for the data flow.
"""
__version__ = "0.1.0"
