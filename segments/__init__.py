"""Customer analytics and marketing: RFM, churn / high-value labels and models, BG/NBD,
behavioural segments from user-tower embeddings, campaign audiences, reports and
analyst exports.

Imports ``towers`` (data, user tower) and ``training`` (splits, tower training) only;
``serving`` may import this package, never the other way round.
"""
