"""Data preparation and reading: the embedded synthetic world, COCO-format datasets, the downstream task files
(`task_files`) and the VQA answer rules (`vqa_answers`)."""
