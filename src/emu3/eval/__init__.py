"""Exact evaluators for the shapes world: an object detector by colour segmentation (`detect`) and
the generation, understanding, video-extension and tokenizer benchmarks (`bench`)."""
