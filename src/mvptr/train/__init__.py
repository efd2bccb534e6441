"""Pre-training: which objectives each stage trains, the resumable training loop, checkpoints and distributed
set-up, for every method (the model and its objectives come from `mvptr.models` and `mvptr.objectives`).

Modules: `stages` (stage -> objectives, derived from the objective modules), `optim` (AdamW groups, warmup +
decay), `checkpoint` (resumable training state), `distributed` (ranks from submitit or the environment), `loop`
(`train_stage`), `commands` (`mvptr pretrain ...`). What a stage's submitit job runs is `mvptr.jobs`.
"""
