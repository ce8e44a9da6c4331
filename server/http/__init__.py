"""The HTTP bridge: an event-driven HTTP front over the server's ZeroMQ ports.

- :mod:`.bridge`: the bridge process (a supervised role) and its HTTP server;
- :mod:`.front`: the ASGI front every request enters (limits, auth, CORS, the hot path);
- :mod:`.auth`: the bearer token and CORS policy, in one place;
- :mod:`.app`: the Flask application of the other routes, and the backend (client);
- :mod:`.state`: the directory the bridge's processes share;
- :mod:`.jobs`, :mod:`.metrics`, :mod:`.dashboard`, :mod:`.v2` (routes over the
  :mod:`.v2codec` codec): route groups; ``static/``: the dashboard's files.
"""
