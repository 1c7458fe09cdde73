"""Training internals behind the `train` stage (lnull/train.py): data plan, model wrapping, checkpoints,
the Accelerate loop and the multi-process launcher."""
