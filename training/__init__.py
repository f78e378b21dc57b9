"""Training: splits, full-ranking evaluation, retriever baselines, two-tower training."""
