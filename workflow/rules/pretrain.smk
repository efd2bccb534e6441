"""Pre-training rules: stage one (keyed by the hash of the keys that affect it, shared by the ablations of a
method that do not change it) and stage two (per method and ablation). Each submits its stage through submitit
(`launch.*` config, set by the profile) and
resumes from its checkpoint directory, a `params:` entry that Snakemake never deletes.
"""


rule pretrain_stage1:
    input:
        dataset="resources/datasets/{dataset}",
        concepts="results/{dataset}/concepts/concepts.json",
        vocab="results/{dataset}/concepts/concept_vocab.json",
        regions="results/{dataset}/regions",
    output:
        model="results/{dataset}/pretrain/stage1-{stage1}/model.safetensors",
        metrics="results/{dataset}/pretrain/stage1-{stage1}/metrics.json",
        curves=report(
            "results/{dataset}/pretrain/stage1-{stage1}/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Loss curves",
        ),
    log:
        "results/logs/pretrain_stage1/{dataset}/stage1-{stage1}.log",
    benchmark:
        "results/benchmarks/rules/pretrain_stage1/{dataset}/stage1-{stage1}.tsv"
    # The stages are the longest jobs and everything waits on them: started first whenever they can be.
    priority: 10
    # Runs on the head job under the SLURM profile: its submitit trainer is the step's only allocation.
    localrule: True
    conda:
        "../../environment.yml"
    # The trainer's torch threads on this machine (launch.cpus_per_task): jobs share the cores without thrashing.
    threads: trainer_threads("pretrain_stage1")
    resources:
        **trainer_resources("pretrain_stage1"),
        # How the trainer is launched (launch.* and cadence overrides): a resource, not a param, so that a
        # profile switch (local -> SLURM) does not rerun trained stages.
        launch=LAUNCH_ARGS,
    params:
        ckpt_dir="results/{dataset}/checkpoints/stage1-{stage1}",
        job_dir="results/logs/pretrain_stage1/{dataset}/stage1-{stage1}.submitit",
        out="results/{dataset}/pretrain/stage1-{stage1}",
        config=stage1_args,
    shell:
        "MVPTR_RULE=pretrain_stage1 mvptr pretrain stage --stage 1 --dataset {input.dataset:q} "
        "--concepts {input.concepts:q} --vocab {input.vocab:q} --regions {input.regions:q} "
        "--ckpt-dir {params.ckpt_dir:q} --job-dir {params.job_dir:q} --out {params.out:q} {params.config} {resources.launch} "
        + trainer_args("pretrain_stage1")
        + " > {log:q} 2>&1"


rule pretrain_stage2:
    input:
        dataset="resources/datasets/{dataset}",
        concepts="results/{dataset}/concepts/concepts.json",
        vocab="results/{dataset}/concepts/concept_vocab.json",
        regions="results/{dataset}/regions",
        stage1=lambda wildcards: f"{stage1_dir(wildcard_run(wildcards))}/model.safetensors",
    output:
        model="results/{dataset}/{method}/{ablation}/seed{seed}/pretrain_stage2/model.safetensors",
        metrics="results/{dataset}/{method}/{ablation}/seed{seed}/pretrain_stage2/metrics.json",
        curves=report(
            "results/{dataset}/{method}/{ablation}/seed{seed}/pretrain_stage2/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Loss curves",
        ),
    log:
        "results/logs/pretrain_stage2/{dataset}/{method}/{ablation}/seed{seed}.log",
    benchmark:
        "results/benchmarks/rules/pretrain_stage2/{dataset}/{method}/{ablation}/seed{seed}.tsv"
    priority: 10
    # Runs on the head job under the SLURM profile: its submitit trainer is the step's only allocation.
    localrule: True
    conda:
        "../../environment.yml"
    threads: trainer_threads("pretrain_stage2")
    resources:
        **trainer_resources("pretrain_stage2"),
        launch=LAUNCH_ARGS,
    params:
        ckpt_dir="results/{dataset}/checkpoints/{method}/{ablation}/seed{seed}/stage2",
        job_dir="results/logs/pretrain_stage2/{dataset}/{method}/{ablation}/seed{seed}.submitit",
        out="results/{dataset}/{method}/{ablation}/seed{seed}/pretrain_stage2",
        config=step_args("stage2"),
    shell:
        "MVPTR_RULE=pretrain_stage2 mvptr pretrain stage --stage 2 --dataset {input.dataset:q} "
        "--concepts {input.concepts:q} --vocab {input.vocab:q} --regions {input.regions:q} "
        "--init-weights {input.stage1:q} --ckpt-dir {params.ckpt_dir:q} --job-dir {params.job_dir:q} "
        "--out {params.out:q} {params.config} {resources.launch} "
        + trainer_args("pretrain_stage2")
        + " > {log:q} 2>&1"
