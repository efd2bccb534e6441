"""Pre-training: objectives per stage, the resumable training loop, checkpoints, distributed set-up and the
submitit job that runs a stage.

Modules: `objectives` (stage -> tasks, the step module), `optim` (AdamW groups, warmup + decay), `checkpoint`
(resumable training state), `distributed` (ranks from submitit or the environment, batch order), `loop`
(`train_stage`), `job` (what the submitit job of a stage runs), `commands` (`mvptr pretrain ...`).
"""
