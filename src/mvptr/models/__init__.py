"""Model definitions, one readable file per method, built from transformers' BERT modules.

Why: each method (MVPTR first; SIMLA and SemVLP later) keeps everything its forward pass needs in one file, so
that a reader can follow it top to bottom, while attention, embeddings and prediction heads are reused from
`transformers.models.bert` (with SDPA attention) instead of being written again. The losses that train
these models live in `mvptr.tasks`, one file per objective.

Use:
    from mvptr.models.mvptr import MVPTRConfig, MVPTRModel, load_pretrained_bert
    model = MVPTRModel(MVPTRConfig.from_config(cfg, vocab_size=vocab["embedding_rows"], region_feature_dim=128))
"""
