"""Downstream rules: one `evaluate_<task>` rule per task (retrieval, vqa, ve, rec, nlvr2) fine-tunes a (method,
ablation)'s stage-two weights on the task, with the same protocol and budget for every method, and evaluates it
(`mvptr evaluate run`, through submitit), writing the task's metrics JSON and logging them to MLflow. The
`no_pretraining` ablation (no training steps) gives the same fine-tuning from a randomly initialised model.
`evaluate_grounding` (the synthetic world only: it reads the gold scenes) measures the pre-trained weights'
zero-shot phrase-to-region grounding per concept kind (`mvptr evaluate grounding`, in-process, no fine-tuning).
"""

for task in EVAL_TASKS:

    rule:
        name:
            f"evaluate_{task}"
        input:
            dataset="resources/datasets/{dataset}",
            concepts="results/{dataset}/concepts/concepts.json",
            vocab="results/{dataset}/concepts/concept_vocab.json",
            regions="results/{dataset}/regions",
            weights="results/{dataset}/{method}/{ablation}/seed{seed}/pretrain_stage2/model.safetensors",
            task_concepts=(
                ["results/{dataset}/concepts/task_concepts.json"]
                if task in TEXT_TASKS
                else []
            ),
        output:
            f"results/{{dataset}}/{{method}}/{{ablation}}/seed{{seed}}/evaluate/{task}.json",
        log:
            f"results/logs/evaluate_{task}/{{dataset}}/{{method}}/{{ablation}}/seed{{seed}}.log",
        benchmark:
            f"results/benchmarks/rules/evaluate_{task}/{{dataset}}/{{method}}/{{ablation}}/seed{{seed}}.tsv"
        # Runs on the head job under the SLURM profile: its submitit trainer is the step's only allocation.
        localrule: True
        conda:
            "../../environment.yml"
        # The fine-tuning job's torch threads on this machine (launch.cpus_per_task).
        threads: trainer_threads(f"evaluate_{task}")
        resources:
            **trainer_resources(f"evaluate_{task}"),
            launch=LAUNCH_ARGS,
        params:
            task=task,
            job_dir=f"results/logs/evaluate_{task}/{{dataset}}/{{method}}/{{ablation}}/seed{{seed}}.submitit",
            config=step_args("evaluate"),
            # The file of the task texts' scene graphs, for the tasks with texts (not retrieval): the flag and path.
            task_concepts=lambda wildcards, input: [
                word
                for path in input.task_concepts
                for word in ("--task-concepts", path)
            ],
        shell:
            "MVPTR_RULE=evaluate_{params.task:q} mvptr evaluate run --task {params.task:q} "
            "--dataset {input.dataset:q} --concepts {input.concepts:q} --vocab {input.vocab:q} "
            "--regions {input.regions:q} --weights {input.weights:q} --job-dir {params.job_dir:q} "
            "{params.task_concepts:q} --out {output:q} {params.config} {resources.launch} "
            # Snakemake evaluates this expression again when the job runs, after the loop: `task` is then the
            # last task, so the rule's own name comes in through {params.task}.
            + trainer_args("evaluate_{params.task:q}") + " > {log:q} 2>&1"


rule evaluate_grounding:
    input:
        dataset="resources/datasets/{dataset}",
        concepts="results/{dataset}/concepts/concepts.json",
        vocab="results/{dataset}/concepts/concept_vocab.json",
        regions="results/{dataset}/regions",
        weights="results/{dataset}/{method}/{ablation}/seed{seed}/pretrain_stage2/model.safetensors",
    output:
        "results/{dataset}/{method}/{ablation}/seed{seed}/evaluate/grounding.json",
    log:
        "results/logs/evaluate_grounding/{dataset}/{method}/{ablation}/seed{seed}.log",
    benchmark:
        "results/benchmarks/rules/evaluate_grounding/{dataset}/{method}/{ablation}/seed{seed}.tsv"
    conda:
        "../../environment.yml"
    # Zero-shot (no training), in-process: seconds on the demo world.
    threads: 1
    params:
        # What the pre-trained weights depend on: a downstream setting does not rerun it.
        config=step_args("stage2"),
    shell:
        "MVPTR_RULE=evaluate_grounding OMP_NUM_THREADS={threads} mvptr evaluate grounding "
        "--dataset {input.dataset:q} --concepts {input.concepts:q} --vocab {input.vocab:q} "
        "--regions {input.regions:q} --weights {input.weights:q} --out {output:q} {params.config} > {log:q} 2>&1"
