"""The trainer's parts that pretrain.py composes: config, checkpoints, training state and resume, the evaluation
loop, the LR schedule and metric logging."""
