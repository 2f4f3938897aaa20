"""Arguments, the training loop, checkpointing and logging of pretrain_gpt.py."""
