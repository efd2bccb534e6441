"""mvptr: a reproducible workflow for multi-level vision-language pre-training (MVPTR, SIMLA, SemVLP).

The library imports without Snakemake, DVC or MLflow being configured; the `mvptr` command (mvptr.cli)
runs one workflow step per subcommand.
"""

from mvptr.regions.torchvision_compat import install_import_hook

__version__ = "0.1.0"

# Before anything (transformers included) imports torchvision: see mvptr.regions.torchvision_compat.
install_import_hook()
