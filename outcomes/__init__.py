"""Online outcomes of recommendations: does a model version work on live traffic?

* :mod:`outcomes.served_log`: every answer (Recommend, RecommendBatch, SimilarItems, ...)
  gets a short ``recommendation_id``; what was served (customer, variant, model version,
  method, items and ranks) is written off the hot path to a served-recommendation log.
* :mod:`outcomes.attribution`: impressions, clicks, carts and purchases are attributed to
  the answer that led to them (its id first, else a recommended item of the same customer
  within a window; last touch; each event at most once).
* :mod:`outcomes.metrics`: per variant and model version: CTR, add-to-cart rate,
  conversion, revenue per 1,000 recommendations with confidence intervals, and the
  difference between variants with its interval.
* :mod:`outcomes.report`: ``online_report(...)`` (JSON + HTML); ``ecomrec report online``.

docs/outcomes.md describes the rule and the metrics. Nothing here imports ``serving``.
"""
