"""The pipeline's stages, in the order `puzzlenas run` runs them (and the report lists them).

A module of its own so that the pipeline, which runs the stages, and the report, which only
reads their records (stages/<stage>.json), both name them without importing each other.
"""

STAGES = ["data", "bld", "score", "costs", "search", "realize", "gkd", "baselines", "eval", "report"]
