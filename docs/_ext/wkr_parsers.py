"""Parsers the CLI reference shows that no command builds on its own."""

from __future__ import annotations

import argparse


def queueworker_parser() -> argparse.ArgumentParser:
    """The options ``wkr_serving.client.QueueWorker`` adds to ``wkr-decentral-start``."""
    from wkr_serving.client import QueueWorker

    parser = argparse.ArgumentParser(
        prog="wkr-decentral-start wkr_serving.client.QueueWorker", add_help=False,
        usage="wkr-decentral-start wkr_serving.client.QueueWorker <pool options> "
        "[QueueWorker options]",
        description="The built-in unit that serves a Redis-Stream job queue at least once "
        "(see JobQueue) adds these options to those of wkr-decentral-start.")
    QueueWorker.add_arguments(parser)
    return parser
