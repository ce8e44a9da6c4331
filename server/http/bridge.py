"""The HTTP bridge process: serves :mod:`.httpapp` with gunicorn, a production WSGI server.

Started by the supervisor when ``-http_port`` is given, once the ventilator and the sink
are up (it needs their ports) and before the workers are ready, so that
``/health/ready`` can say "not yet" while models load.

This process binds the listening socket itself (so ``-http_port 0`` can report the port
it got) and then becomes a gunicorn arbiter that runs ``-http_workers`` processes of
``gthread`` workers. The ``-http_max_connect`` threads are shared out among them; each
process has its own pool of Python clients of that size, created after the fork. When
the supervisor says stop, the arbiter stops its workers gracefully (requests in flight
finish) and this process exits. Group signals (Ctrl-C, a SIGTERM to the whole tree) are
left to the supervisor, which orchestrates the stop.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
from typing import Any

from wkr_serving.client.process import die_with_parent

from ..config import ServerConfig
from ..process import Endpoints, Role

__all__ = ["HTTPBridge"]

#: Seconds gunicorn's workers get to finish their requests when the bridge stops.
STOP_WAIT_S = 2
#: Client connections a bridge process holds per thread (keep-alive ones included);
#: more wait in the listen queue until one closes.
CONNECTIONS_PER_THREAD = 4
#: Pending connections the kernel queues on the listening socket.
BACKLOG = 2048


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
        import gunicorn  # noqa: F401  (fail here, at boot, if it is missing)

        bind = self.config.bind
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((bind.strip("[]"), self.config.http_port or 0))
        self.listener.listen(BACKLOG)
        self.listener.set_inheritable(True)
        http_port = self.listener.getsockname()[1]
        self.logger.info("HTTP bridge on %s:%d (%d process(es), %d connections to the server)",
                         bind, http_port, self.config.http_workers,
                         self.config.http_max_connect)
        return {"http_port": http_port}

    def serve(self) -> None:
        # One directory shared by the bridge's processes (the jobs store, the HTTP
        # metrics of every process), removed when the bridge stops.
        from .state import STATE_DIR_ENV

        state = tempfile.mkdtemp(prefix="wkr-http-")
        os.environ[STATE_DIR_ENV] = state
        app = _application_class()(self)
        watcher = threading.Thread(target=self._watch_control, name="control", daemon=True)
        watcher.start()
        try:
            with contextlib.suppress(SystemExit):  # the arbiter's way of ending
                app.run()
        finally:
            shutil.rmtree(state, ignore_errors=True)

    def _watch_control(self) -> None:
        """Turn the supervisor's stop into the arbiter's graceful stop (a SIGTERM to this
        process, which gunicorn handles in its main loop)."""
        while True:
            name, _ = self.read_control()
            if name == "stop":
                os.kill(os.getpid(), signal.SIGTERM)
                return

    # -- what runs inside gunicorn ---------------------------------------------------------

    def wsgi_app(self) -> Any:
        """Build the application in a worker process, after the fork."""
        from .app import Backend, EncodeFastPath, all_blueprints, create_app

        host = "127.0.0.1" if self.config.bind in ("0.0.0.0", "::", "*") else self.config.bind
        threads = self.threads_per_worker()
        backend = Backend(self.config, self.port, self.port_out, host, self.worker_class,
                          client_options=self._client_options(), pool_size=threads)
        cors = self.config.cors or None
        app = create_app(backend, token=self.config.http_token, cors=cors,
                         blueprints=all_blueprints())
        return EncodeFastPath(app, backend, self.config.http_token, cors)

    def threads_per_worker(self) -> int:
        return max(1, math.ceil(self.config.http_max_connect / self.config.http_workers))

    def _client_options(self) -> dict[str, Any]:
        if not self.config.curve_secret_key:
            return {}
        from wkr_serving.client.keys import load_key_pair

        public, _ = load_key_pair(self.config.curve_secret_key)
        return {"server_public_key": public}


def _ignore_group_signals(_arbiter: Any) -> None:
    """A Ctrl-C or SIGTERM sent to the whole process tree is the supervisor's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_started(_arbiter: Any, _worker: Any) -> None:
    die_with_parent()  # a worker process never outlives the bridge
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _application_class() -> type:
    """gunicorn's application class for the bridge (gunicorn is imported only here)."""
    from gunicorn.app.base import BaseApplication

    class Application(BaseApplication):
        def __init__(self, bridge: HTTPBridge) -> None:
            self.bridge = bridge
            super().__init__()

        def load_config(self) -> None:
            bridge = self.bridge
            settings = {
                "bind": [f"fd://{bridge.listener.fileno()}"],
                "workers": bridge.config.http_workers,
                "worker_class": "gthread",
                "threads": bridge.threads_per_worker(),
                # A process takes no more connections than this, so that the kernel's
                # accept race cannot pile most clients onto one process (seen: one
                # process at 100% CPU with 60 of 64 connections, the other idle).
                "worker_connections": CONNECTIONS_PER_THREAD * bridge.threads_per_worker(),
                "graceful_timeout": STOP_WAIT_S,
                "timeout": 0,  # requests have their own deadlines; no worker watchdog
                "keepalive": 5,
                "proc_name": "wkr-serving-http",
                "loglevel": "debug" if bridge.config.verbose else "warning",
                "accesslog": None,
                "when_ready": _ignore_group_signals,
                "post_fork": _worker_started,
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return self.bridge.wsgi_app()

    return Application
