"""Hub model-card templates (package data), rendered by `trainers.model_card`."""
