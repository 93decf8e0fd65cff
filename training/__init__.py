"""Training, evaluation and export of the shipped CIFAR-10 model."""
