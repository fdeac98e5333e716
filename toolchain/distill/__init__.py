"""Knowledge distillation: data, losses, the training loop and held-out evaluation."""
