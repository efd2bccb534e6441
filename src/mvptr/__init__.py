"""mvptr: a reproducible workflow for multi-level vision-language pre-training (MVPTR, SIMLA, SemVLP).

The library imports without Snakemake, DVC or MLflow being configured; the `mvptr` command (mvptr.cli)
runs one workflow step per subcommand.
"""

__version__ = "0.1.0"
