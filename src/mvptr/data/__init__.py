"""Data preparation and reading: the embedded synthetic world and COCO-format datasets."""
