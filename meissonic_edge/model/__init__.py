"""The PyTorch reference: the transformer, loading a model directory, its consistency checks, the random
presets and the reference pipeline. May import the runtime (sampler, config, tokenizer) and the leaf modules."""
