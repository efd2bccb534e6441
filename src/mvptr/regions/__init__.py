"""Regions of images: boxes, the backbone that featurises them, the region store and its builders.

Modules: `boxes` (gold / detector boxes), `backbone` (the small CNN trained on object crops), `store`
(the HDF5 region store), `extract` (the extract_region_features step), `vinvl` (import of VinVL TSV
features), `commands` (`mvptr regions ...`). Import them directly: this package imports nothing heavy.
"""
