"""The HTTP bridge process: serves :mod:`.httpapp` with waitress, a production WSGI server.

Started by the supervisor when ``-http_port`` is given, once the ventilator and the sink
are up (it needs their ports) and before the workers are ready, so that
``/health/ready`` can say "not yet" while models load. Waitress runs
``-http_max_connect`` threads, each borrowing one client of the pool for a call.
"""

from __future__ import annotations

import threading
from typing import Any

from .config import ServerConfig
from .httpapp import Backend, create_app
from .process import Endpoints, Role

__all__ = ["HTTPBridge"]

#: Seconds waitress's threads get to finish their requests when the bridge stops.
STOP_WAIT_S = 2.0


class HTTPBridge(Role):
    name = "http"
    color = "yellow"

    def __init__(self, config: ServerConfig, endpoints: Endpoints, port: int, port_out: int,
                 worker_class: str) -> None:
        super().__init__(config, endpoints)
        self.port = port
        self.port_out = port_out
        self.worker_class = worker_class

    def boot(self) -> dict[str, Any]:
        from waitress.server import create_server

        from .httpblueprints import all_blueprints

        host = "127.0.0.1" if self.config.bind in ("0.0.0.0", "::", "*") else self.config.bind
        self.backend = Backend(self.config, self.port, self.port_out, host, self.worker_class,
                               client_options=self._client_options())
        app = create_app(self.backend, token=self.config.http_token,
                         cors=self.config.cors if self.config.cors else None,
                         blueprints=all_blueprints())
        self.server = create_server(app, host=self.config.bind, port=self.config.http_port or 0,
                                    threads=self.config.http_max_connect,
                                    connection_limit=max(100, 4 * self.config.http_max_connect),
                                    ident="wkr-serving", clear_untrusted_proxy_headers=True)
        http_port = self.server.effective_port
        self.logger.info("HTTP bridge on %s:%s (%d threads)", self.config.bind, http_port,
                         self.config.http_max_connect)
        return {"http_port": http_port}

    def _client_options(self) -> dict[str, Any]:
        if not self.config.curve_secret_key:
            return {}
        from wkr_serving.client.keys import load_key_pair

        public, _ = load_key_pair(self.config.curve_secret_key)
        return {"server_public_key": public}

    def serve(self) -> None:
        thread = threading.Thread(target=self.server.run, name="waitress", daemon=True)
        thread.start()
        while True:
            name, _ = self.read_control()
            if name == "stop":
                return

    def shutdown(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:  # threads first: a finishing task still wakes the loop
            server.task_dispatcher.shutdown(timeout=STOP_WAIT_S)
            server.close()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
