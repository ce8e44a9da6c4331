"""Unit tests of the supervisor's pure helpers (server/supervisor.py): how a role's exit
status reads in the log and in the errors sent to clients."""

from __future__ import annotations

import signal

from wkr_serving.server.supervisor import describe_exit


def test_describe_exit():
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert describe_exit(-200) == "was killed by signal 200"
