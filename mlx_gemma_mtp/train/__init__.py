"""`gemma-mtp train-drafter`: drafter training by self-distillation."""
