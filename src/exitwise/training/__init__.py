"""Fine-tuning recipes that make a checkpoint exit-friendly (see :mod:`exitwise.training.finetune`)."""
