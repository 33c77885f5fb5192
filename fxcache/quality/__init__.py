"""Quality evidence: reference models trained on MNIST digits, samplers, metrics and the evaluation harness."""
