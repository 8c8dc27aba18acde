"""The service's loggers: children of Serve's logger, so their records take the component's format and file,
and written out as they are made.

Serve buffers each component's records before writing them (with RAY_SERVE_THROUGHPUT_OPTIMIZED, up to 1,000)
and writes early only at ERROR: a WARNING such as "a setting could not be applied" would wait for a thousand
access-log lines, or be lost with the process. The service's own records are rare (none per call), so each
one flushes Serve's handlers.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

SERVE_LOGGER = "ray.serve"  # Serve's documented logger; it does not propagate to the root logger


class ServiceLogger(logging.LoggerAdapter):
    """A logger whose every record is written at once (and reports its caller's line, not this module's)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        self.logger.log(level, msg, *args, **kwargs)
        for handler in logging.getLogger(SERVE_LOGGER).handlers:
            handler.flush()


def service_logger(module: str) -> ServiceLogger:
    """The logger for `module` (its `__name__`), beneath Serve's."""
    return ServiceLogger(logging.getLogger(f"{SERVE_LOGGER}.{module}"))
