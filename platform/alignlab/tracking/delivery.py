"""The background thread that delivers a run's tracking records, so an MLflow outage never stops training.

`submit` only appends to a bounded in-memory buffer (a full buffer spills to the spool file), so the
training loop never waits on the network. The thread sends what arrives in order; when a send fails with an
outage (`store.is_outage`) it spools that and everything after it, then checks the store with growing pauses
(0.5 s doubling to 10 s; a cheap GET /health for an HTTP server) and, once it answers, replays the spool and
prints one warning with the outage's length. `flush` and `close` wait a bounded time; a `close` that times
out moves whatever is still queued or in flight to the spool, so nothing is lost when the process ends.
Senders still open at interpreter exit are closed by an atexit hook (a pipeline's train step leaves its run
open for the evaluate step).
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from alignlab.redaction import redact
from alignlab.tracking.spool import Delivery, Spool, resolve_pending_run_id

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
PROBE_TIMEOUT_S = 2.0


def warn(message: str) -> None:
    """One line on stderr (credentials redacted): tracking problems are worth a line, never a traceback."""
    print(f"[alignlab] warning: {redact(message)}", file=sys.stderr, flush=True)


def short_error(err: BaseException | None) -> str:
    text = " ".join(str(err).split()) if err is not None else "no answer"
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass
class _Waiter:
    deadline: float
    close: bool
    event: threading.Event = field(default_factory=threading.Event)
    delivered: bool = False


class BackgroundSender:
    """Delivers one tracker's records in order from a daemon thread; spools them while the store is down."""

    def __init__(self, delivery: Delivery, spool: Spool, *, queue_size: int = 10_000,
                 notify: Callable[[str], None] = warn, exit_timeout_s: float = 10.0):
        self.delivery, self.spool, self.notify = delivery, spool, notify
        self.queue_size, self.exit_timeout_s = queue_size, exit_timeout_s  # exit_timeout_s: at interpreter exit
        self._cond = threading.Condition()  # guards _buffer, _in_flight, _closing
        self._buffer: deque = deque()
        self._in_flight: list[dict] = []
        self._closing = self._stopped = False
        self._waiters: list[_Waiter] = []
        self._offline_since: float | None = None  # monotonic time of the first failed send
        self._spooled = spool.pending()  # records left by an earlier process are replayed first
        self._backoff, self._last_probe = MIN_BACKOFF_S, 0.0
        self.delivery.on_created = self._created
        self._thread = threading.Thread(target=self._run, name="alignlab-tracking", daemon=True)
        self._thread.start()
        _open_senders.add(self)

    # ---- caller side --------------------------------------------------------------------------------

    def submit(self, record: dict) -> None:
        """Queue one record; never blocks on the store."""
        with self._cond:
            if self._closing or len(self._buffer) >= self.queue_size:
                self.spool.append([self.delivery.with_ids([record])[0]])
                self._spooled = True
            else:
                self._buffer.append(record)
            self._cond.notify()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until everything submitted so far is delivered; False if not (yet)."""
        return self._wait(timeout, close=False)

    def close(self, timeout: float) -> bool:
        """Deliver everything (waiting up to `timeout` s for a store that is down) and stop the thread. What
        is not delivered by then is in the spool; returns whether everything was delivered."""
        if self._closing:
            return not self.spool.pending()
        delivered = self._wait(timeout, close=True)
        with self._cond:
            self._closing = True
            leftover = [item for item in self._buffer if isinstance(item, dict)] + self._in_flight
            self._buffer.clear()
            self._in_flight = []
            self.spool.append(self.delivery.with_ids(leftover))
            self._cond.notify()
        _open_senders.discard(self)
        return delivered and not leftover and not self.spool.pending()

    @property
    def outage_seconds(self) -> float | None:
        since = self._offline_since
        return None if since is None else time.monotonic() - since

    def _wait(self, timeout: float, close: bool) -> bool:
        if not self._thread.is_alive():
            return False
        waiter = _Waiter(time.monotonic() + timeout, close)
        with self._cond:
            self._buffer.append(waiter)
            self._cond.notify()
        waiter.event.wait(timeout + 1.0)  # the thread answers at the deadline; +1 s covers a slow round
        return waiter.event.is_set() and waiter.delivered

    # ---- the thread ---------------------------------------------------------------------------------

    def _online(self) -> bool:
        return self._offline_since is None and not self._spooled

    def _run(self) -> None:
        try:
            while self._round():
                pass
        except Exception as err:  # noqa: BLE001 - a bug here must not lose records or kill training
            self.notify(f"tracking thread stopped ({short_error(err)}); records are kept in {self.spool.path}")
            with self._cond:
                self._closing = True
                self.spool.append(self.delivery.with_ids(
                    [i for i in self._buffer if isinstance(i, dict)] + self._in_flight))
                self._buffer.clear()
                self._in_flight = []
            for waiter in self._waiters:
                waiter.event.set()

    def _round(self) -> bool:
        """Take what arrived, deliver or spool it, try to recover, answer flushes. False: stop."""
        with self._cond:
            if not self._buffer and not self._closing:
                self._cond.wait(timeout=None if self._online() and not self._waiters else self._pause())
            if self._closing:
                return False
            items = list(self._buffer)
            self._buffer.clear()
            records = [item for item in items if isinstance(item, dict)]
            self._waiters += [item for item in items if isinstance(item, _Waiter)]
            self._in_flight = records
        if records and self._online():
            self._deliver(records)
        elif records:
            self._to_spool(records)
        if not self._online():
            self._recover()
        return self._answer_waiters()

    def _pause(self) -> float:
        interval = MIN_BACKOFF_S if self._waiters else self._backoff
        return max(0.05, self._last_probe + interval - time.monotonic())

    def _deliver(self, records: list[dict]) -> None:
        started = time.monotonic()
        done = self.delivery.send(records, self._reject)
        if done < len(records):  # an outage: keep the rest, try again later
            self._offline_since = started
            self._backoff, self._last_probe = MIN_BACKOFF_S, started
            self._to_spool(records[done:])
        else:
            with self._cond:
                self._in_flight = []

    def _to_spool(self, records: list[dict]) -> None:
        with self._cond:
            if self._closing:  # close() already moved the in-flight records to the spool
                return
            self.spool.append(self.delivery.with_ids(records))
            self._spooled = True
            self._in_flight = []

    def _recover(self) -> None:
        now = time.monotonic()
        if now - self._last_probe < (MIN_BACKOFF_S if self._waiters else self._backoff):
            return
        self._last_probe = now
        if not self._probe():
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            return
        taken, records = self.spool.take()
        done = self.delivery.send(records, self._reject)
        self.spool.finish(taken, self.delivery.with_ids(records[done:]))
        if done < len(records):
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            self._offline_since = self._offline_since or now
            return
        with self._cond:
            self._spooled = self.spool.pending()  # records spilled meanwhile: the next round sends them
        if self._offline_since is not None:
            self.notify(f"MLflow at {self.delivery.uri} was unreachable for {now - self._offline_since:.1f} s "
                        f"({short_error(self.delivery.last_error)}); training went on and the {len(records)} "
                        f"tracking records kept in {self.spool.path} meanwhile are now delivered")
        elif records:
            self.notify(f"delivered {len(records)} tracking records left in {self.spool.path} by an earlier run")
        self._offline_since, self._backoff = None, MIN_BACKOFF_S

    def _probe(self) -> bool:
        """Whether the store answers: GET /health of an HTTP server (not subject to the client's retry
        budget); other stores are simply tried again."""
        parts = urlsplit(self.delivery.uri)
        if parts.scheme not in ("http", "https"):
            return True
        host = parts.netloc.rpartition("@")[2]  # /health needs no credentials
        url = urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
                return True
        except urllib.error.HTTPError as err:  # it answered; 502-504 come from a proxy in front of a dead server
            return err.code not in (502, 503, 504)
        except (OSError, ValueError):
            return False

    def _reject(self, group: list[dict], err: BaseException) -> None:
        self.notify(f"MLflow at {self.delivery.uri} refused {len(group)} {group[0]['op']} record(s) of run "
                    f"{self.delivery.run_id(group[0]['run'])}: {short_error(err)}; dropped")

    def _answer_waiters(self) -> bool:
        now, done, keep_running = time.monotonic(), self._online(), True
        for waiter in list(self._waiters):
            if done or now >= waiter.deadline:
                waiter.delivered = done
                waiter.event.set()
                self._waiters.remove(waiter)
                keep_running = keep_running and not waiter.close
        return keep_running

    def _created(self, ref: str, run_id: str) -> None:
        resolve_pending_run_id(self.spool.folder, ref, run_id)


_open_senders: "weakref.WeakSet[BackgroundSender]" = weakref.WeakSet()


@atexit.register
def _close_open_senders() -> None:
    """At interpreter exit: deliver (bounded) or spool what open trackers still hold."""
    for sender in list(_open_senders):
        if not sender.close(timeout=sender.exit_timeout_s):
            sender.notify(f"tracking records not delivered to MLflow at {sender.delivery.uri} are kept in "
                          f"{sender.spool.path}; send them with: alignlab tracking replay {sender.spool.folder}")
