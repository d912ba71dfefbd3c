"""Training: the LoRA trainer, verification against random subsets, pruning."""
