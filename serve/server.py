"""The HTTP server process: uvicorn, with what it lacks to run unattended behind a balancer.

Connections (Protocol, uvicorn's h11 protocol): uvicorn closes idle kept-alive connections but has no deadline for a
request's headers, so a client that connects and sends nothing, or half a request, holds a connection and a file
for ever; and its only bound on connections (limit_concurrency) answers in plain text. Both belong at this level:
the app is not called before the headers are complete. A body's deadline lives in the app (app.body_guard), where
the answer can still be the API's JSON 408; here a body is only cut when the app never read it.

Shutdown (Server): uvicorn's first SIGTERM stops listening at once (a balancer sees refused connections, not a replica
leaving) and, timeout_graceful_shutdown later, cancels what still runs, which a client sees as a plain-text 500 or a
stream cut without [DONE]. Here the first SIGTERM or Ctrl-C starts a drain instead: /ready and new requests answer
503 at once while the requests in flight get --shutdown-grace seconds (and the server at least --shutdown-delay, for a
balancer's checks to see it leave); those still running then are cancelled and end in the API's shape
(request_path.cut_off); only then does uvicorn's own shutdown run, with nothing left to wait for. A second signal
stops at once.
"""

from __future__ import annotations

import functools
import json
import logging
import resource
import time
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import Settings
from .errors import APIError

log = logging.getLogger("serve")

BODY_SLACK = 1.0  # the protocol cuts an unread body this long after app.body_guard would have answered 408
CUT_WAIT = 2.0  # seconds the requests cancelled at the end of the grace period get to send their ending
BACKSTOP = 3  # uvicorn's own timeout_graceful_shutdown: after the drain nothing should be left for it
FILES_BESIDES_CONNECTIONS = 256  # the model, logs, pipes, the listening socket and what libraries open


def _raw(err: APIError) -> bytes:
    """A whole response written straight to the socket, which is then closed: h11 has no request to answer."""
    body = json.dumps(err.body()).encode()
    head = (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each thing the connection waits for from the client (the headers,
    from connecting or from the first byte of a later request; the rest of a body) and a bound on open connections.
    Whatever it closes is counted in aegis_connections_dropped_total by reason."""

    def __init__(self, *args, settings: Settings, metrics, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings, self.metrics = settings, metrics
        self._phase: str | None = None  # "headers" | "body" | None: what the deadline below is for
        self._deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.metrics.open_connections.inc()
        bound = self.settings.max_connections
        if len(self.connections) > bound:
            _over_limit.log(
                logging.WARNING,
                "%d connections are open (--max-connections): new ones are answered "
                "503 and closed (aegis_connections_dropped_total counts them)",
                bound,
            )
            self._drop(
                "over_limit",
                APIError(503, f"the server has {bound} connections open; retry later", code="too_many_connections"),
            )
            return
        self._watch()

    def connection_lost(self, exc) -> None:
        self.metrics.open_connections.dec()
        self._arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _watch(self) -> None:
        """Arms the deadline of what the connection now waits for from the client, keeping one already running."""
        state = self.conn.their_state
        if self.transport.is_closing():
            phase = None
        elif state is h11.SEND_BODY:
            phase = "body"
        elif state is h11.IDLE and (self.cycle is None or self.conn.trailing_data[0]):
            # a new connection, or the start of a later request; a kept-alive idle one is uvicorn's to close
            phase = "headers"
        else:
            phase = None
        if phase != self._phase:
            self._arm(phase)

    def _arm(self, phase: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase, self._deadline = phase, None
        if phase is not None:
            wait = self.settings.header_timeout if phase == "headers" else self.settings.body_timeout + BODY_SLACK
            self._deadline = self.loop.call_later(wait, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        peer = self.client[0] if self.client else "?"
        if phase == "headers":
            partial = bool(self.conn.trailing_data[0])
            # a connection opened ahead of need and never used is routine; half a request is worth a line
            _late.log(
                logging.INFO if partial else logging.DEBUG,
                "closed a connection from %s: no complete request headers within %g s (--header-timeout)",
                peer,
                self.settings.header_timeout,
            )
            self._drop(
                "header_timeout",
                APIError(408, f"the request headers did not arrive within {self.settings.header_timeout:g} s")
                if partial
                else None,
            )
        else:
            _late.log(
                logging.INFO,
                "closed a connection from %s: a request body the server did not read was still "
                "arriving after %g s (--body-timeout)",
                peer,
                self.settings.body_timeout,
            )
            self._drop("body_timeout", None)

    def _drop(self, reason: str, err: APIError | None) -> None:
        self.metrics.dropped.labels(reason).inc()
        if err is not None:
            self.transport.write(_raw(err))
        self.transport.close()


class _Throttled:
    """One log line per `every` seconds at most: a flood of connections must not flood the log too (the metrics
    count every one)."""

    def __init__(self, every: float):
        self.every, self.last = every, float("-inf")

    def log(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        if log.isEnabledFor(level) and now - self.last >= self.every:
            self.last = now
            log.log(level, msg, *args)


_over_limit, _late = _Throttled(10.0), _Throttled(10.0)


class Server(uvicorn.Server):
    """uvicorn's server with a drain between the first signal and its own shutdown (see the module's text)."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service  # app.Service: its `draining` turns /ready and new requests into 503
        self.drain_started: float | None = None
        self.cut_at: float | None = None
        self.announced = False

    def handle_exit(self, sig, frame) -> None:
        # a signal handler: it only sets flags (no logging, no locks); the drain runs in on_tick, on the event loop.
        # The signal is not recorded for uvicorn to raise again after the shutdown: a drained server exits with 0.
        if self.drain_started is None and not self.should_exit:
            self.drain_started = time.monotonic()
            self.service.draining = True
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            self._drain()
        return await super().on_tick(counter)

    def _drain(self) -> None:
        settings, now = self.service.settings, time.monotonic()
        grace, elapsed = settings.shutdown_grace, now - self.drain_started
        running = [t for t in self.server_state.tasks if not t.done()]
        if not self.announced:
            self.announced = True
            log.info(
                "stopping: /ready and new requests answer 503; %d request(s) in flight get up to %g s to finish "
                "(--shutdown-grace; a second signal stops at once)",
                len(running),
                grace,
            )
        if not running and elapsed >= settings.shutdown_delay:
            log.info("no request in flight: stopping")
            self.should_exit = True
        elif running and self.cut_at is None and elapsed >= grace:
            log.warning("the grace period (%g s) is over: ending the %d request(s) still running", grace, len(running))
            self.cut_at = now
            for task in running:
                task.cancel()
        elif running and self.cut_at is not None and now - self.cut_at >= CUT_WAIT:
            log.warning("%d request(s) did not end %g s after being cancelled; stopping anyway", len(running), CUT_WAIT)
            self.should_exit = True


def _files_for(connections: int) -> None:
    """Raises the soft limit on open files to what `connections` need, where the hard limit allows; warns if not."""
    need = connections + FILES_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            log.warning(
                "--max-connections %d needs about %d open files; this process may open %d: lower "
                "--max-connections or raise the limit (ulimit -n)",
                connections,
                need,
                target,
            )


def make(app, settings: Settings) -> Server:
    """The server for `app` (create_app's) with the settings' limits."""
    _files_for(settings.max_connections)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=BACKSTOP,
        http=functools.partial(Protocol, settings=settings, metrics=app.state.service.metrics),
    )
    return Server(config, app.state.service)
