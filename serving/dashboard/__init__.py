"""The dashboard: a small read-only web app for the shop's marketers and analysts.

``ecomrec dashboard --target HOST:PORT --config serve.toml`` (docs/dashboard.md) serves the
online metrics and A/B results of ``ecomrec report online`` (its JSON), the segments and
their movement between two score snapshots, the churn-warning list and a customer lookup
(profile and recommendations with reasons, asked of the running gRPC service). It signs
in with the service's own API keys and never writes anything.

Layout: ``config.py`` (``DashboardConfig``), ``data.py`` (files -> plain dicts, no web
types), ``plots.py`` (server-rendered PNG charts), ``auth.py`` (keys and sessions),
``app.py`` (the Starlette application), ``cli.py`` (the command), ``templates/``.
"""
