"""Training: splits, full-ranking evaluation, baselines, tower training, segment models."""
