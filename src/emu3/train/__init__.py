"""Training: typed stage presets (`config`), DPO (`loss`), data/FSDP2 parallelism applied from outside
the model (`parallelize`), atomic distributed checkpoints and export (`state`), the loop (`trainer`)."""
