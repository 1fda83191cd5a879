"""The Serve ingress's parts that are not routes: who is calling (auth), what
they may spend (limits), which devices are admitted, one socket bridged to one
session (connection), and the ingress's own metrics. `serve_app.py` holds the
routes and hands off to these."""
