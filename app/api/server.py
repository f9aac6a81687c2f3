"""pipeline-apid's gunicorn process class: a request takes a thread only once it has fully arrived.

gunicorn's threaded process class (gthread) hands a connection to a thread as soon as its first byte is in and
the thread then reads the headers and body from the socket, as slowly as the client sends
them: 12 clients sending one header line every 2 s held 8 of 8 threads, and the daemons'
claims and heartbeats waited behind them until their leases expired.

`BufferingProcess` (what each gunicorn process runs) reads every request in its event loop (non-blocking, any number of
connections at once) until headers and body are complete, within REQUEST_TIMEOUT seconds of
its first byte (408 and closed otherwise), with headers up to MAX_HEAD bytes (431) and a body
up to MAX_BODY (413, answered before a thread is involved). Only then is the whole request
handed to a thread, whose parser reads it from memory: no thread ever waits on a client's
request. Responses are written by the thread with a send timeout (a client that does not
read is cut off after REQUEST_TIMEOUT).

Threads come in two lanes, so greedy readers cannot starve the daemons either: listings and
metrics (`is_listing`) run on READ_THREADS threads (1 by default), each resting after a
listing twice as long as it took, everything else (claims, transitions, heartbeats, single files,
health) on gunicorn's `threads`. Kept-alive connections wait in the event loop, not in a
thread; so do requests still arriving. Long-poll claims (`is_waiting`: a `wait=` in the query)
have a third lane of WAIT_THREADS, where they may sleep until work is ready without taking a
thread from the other two.
"""
from __future__ import annotations

import errno
import os
import queue
import selectors
import socket
import sys
import threading
import time
from datetime import datetime
from typing import Callable

from gunicorn import http
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser
from gunicorn.workers import base


SWITCH_INTERVAL = 0.0005
LISTING_REST = 2.0      # a listing thread rests this many times as long as the listing took
LISTING_REST_MAX = 2.0
TRUSTED_PEERS = 4096    # peer addresses whose FORWARDED_ALLOW_IPS answer a process keeps
NOTIFY_EVERY = 1.0      # seconds between the loop's "alive" signs to the arbiter (its timeout: 30 s)


class Lane:
    """A fixed set of threads taking calls from one queue. What ThreadPoolExecutor does for
    a request, minus its Future, its per-submit bookkeeping and locks: the hand-over from
    the event loop is one `put`."""

    def __init__(self, threads: int, name: str):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{n}", daemon=True) for n in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, fn, *args) -> None:
        self.calls.put((fn, args))

    def _run(self) -> None:
        while True:
            call = self.calls.get()
            if call is None:
                return
            fn, args = call
            fn(*args)

    def shutdown(self) -> None:
        """Each thread ends after the calls already queued (it does not wait for them)."""
        for _ in self.threads:
            self.calls.put(None)


class RequestTooLarge(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


def request_size(buf: bytearray, max_head: int, max_body: int) -> int | None:
    """Bytes of the first complete HTTP/1.x request in `buf`, None while more must arrive.
    Raises RequestTooLarge past the limits. A request this cannot make sense of is declared
    complete as it stands: gunicorn's parser then answers it 400 (and reads nothing more)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0 or end > max_head:
        if len(buf) > max_head:
            raise RequestTooLarge(431, "Request Header Fields Too Large", f"request headers above {max_head} bytes")
        return None
    start = end + 4
    length, chunked = 0, False
    for line in bytes(buf[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return start
            if length < 0:
                return start
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    if chunked:
        return _chunked_size(buf, start, max_body)
    if length > max_body:
        raise RequestTooLarge(413, "Payload Too Large", f"request body is larger than {max_body} bytes")
    return start + length if len(buf) >= start + length else None


def _chunked_size(buf: bytearray, pos: int, max_body: int) -> int | None:
    total = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return len(buf) if len(buf) - pos > 1024 else None  # a chunk-size line that never ends
        try:
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip() or b"x", 16)
        except ValueError:
            return eol + 2
        pos = eol + 2
        if size == 0:
            while True:  # trailers, up to the empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return len(buf) if len(buf) - pos > 8192 else None
                if eol == pos:
                    return pos + 2
                pos = eol + 2
        total += size
        if total > max_body:
            raise RequestTooLarge(413, "Payload Too Large", f"request body is larger than {max_body} bytes")
        if len(buf) < pos + size + 2:
            return None
        pos += size + 2


def request_target(buf: bytearray) -> tuple[str, str]:
    """(method, path) of the request line at the start of `buf` (empty strings if unreadable)."""
    method, path, _query = request_line(buf)
    return method, path


def request_line(buf: bytearray) -> tuple[str, str, str]:
    """(method, path, query string) of the request line at the start of `buf`."""
    line = bytes(buf[:buf.find(b"\r\n")]).split(b" ")
    if len(line) < 2:
        return "", "", ""
    path, _, query = line[1].partition(b"?")
    return line[0].decode("latin-1"), path.decode("latin-1"), query.decode("latin-1")


class SettledConfig:
    """gunicorn's settings read once, for the per-request code (parser, WSGI environ, response,
    hooks). `Config.__getattr__` looks a setting up by name and calls its `get()` on every read,
    about 25 reads a request; a process's settings never change after it started (a reload
    replaces the process), so they are plain attributes here. Anything else is the real
    config's (its computed properties, such as `env` and `sendfile`, are read through to it)."""

    def __init__(self, cfg):
        self.__dict__.update({name: setting.get() for name, setting in cfg.settings.items()})
        self.is_ssl = cfg.is_ssl
        self.forwarded_allow_networks = cfg.forwarded_allow_networks
        self.proxy_allow_networks = cfg.proxy_allow_networks
        self.trusted_peers: dict[str, bool] = {}
        self._cfg = cfg

    def __getattr__(self, name):
        return getattr(self.__dict__["_cfg"], name)


class SettledRequest(http.Request):
    """gunicorn's HTTP/1 request, deciding once per peer address whether it may set forwarding
    and scheme headers (FORWARDED_ALLOW_IPS): gunicorn parses the address with `ipaddress` and
    tries every allowed network on each request. Same answers, kept in the process's
    `SettledConfig.trusted_peers` (at most TRUSTED_PEERS addresses)."""

    def _peer_is_trusted_proxy(self):
        peer = self.peer_addr
        if not isinstance(peer, tuple):
            return super()._peer_is_trusted_proxy()
        known = self.cfg.trusted_peers
        trusted = known.get(peer[0])
        if trusted is None:
            if len(known) >= TRUSTED_PEERS:
                known.clear()
            trusted = known[peer[0]] = super()._peer_is_trusted_proxy()
        return trusted


class SettledParser(RequestParser):
    mesg_class = SettledRequest


class Conn:
    """A client connection as the event loop sees it."""

    __slots__ = ("sock", "fd", "client", "server", "buf", "deadline", "busy")

    def __init__(self, sock: socket.socket, client, server):
        self.sock, self.fd, self.client, self.server = sock, sock.fileno(), client, server
        self.buf = bytearray()
        self.deadline = 0.0
        self.busy = False


class BufferingProcess(base.Worker):
    """See the module docstring. Class attributes are set by `configure` before gunicorn
    forks its processes."""

    REQUEST_TIMEOUT = 10.0
    MAX_HEAD = 32 * 1024
    MAX_BODY = 64 * 1024
    READ_THREADS = 1
    WAIT_THREADS = 16
    is_listing: Callable[[str, str], bool] = staticmethod(lambda method, path: False)
    is_waiting: Callable[[str, str, str], bool] = staticmethod(lambda method, path, query: False)
    on_stop: Callable[[], None] = staticmethod(lambda: None)

    @classmethod
    def configure(cls, request_timeout: float, max_body: int, read_threads: int,
                  is_listing: Callable[[str, str], bool], wait_threads: int = 16,
                  is_waiting: Callable[[str, str, str], bool] | None = None,
                  on_stop: Callable[[], None] | None = None) -> None:
        """`on_stop`: called by the event loop (not the signal handler) once the process is
        stopping, to end long waits so their connections can be answered and closed."""
        cls.REQUEST_TIMEOUT = request_timeout
        cls.MAX_BODY = max_body
        cls.READ_THREADS = read_threads
        cls.is_listing = staticmethod(is_listing)
        cls.WAIT_THREADS = wait_threads
        if is_waiting is not None:
            cls.is_waiting = staticmethod(is_waiting)
        if on_stop is not None:
            cls.on_stop = staticmethod(on_stop)

    # -- setup --------------------------------------------------------------------------------

    def init_process(self):
        # A daemon's request waits on the database several times; each time its answer is in,
        # its thread must get the interpreter back from a listing thread converting rows, which
        # by default yields it only every 5 ms.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.work_pool = Lane(self.cfg.threads, "request")
        self.read_pool = Lane(self.READ_THREADS, "listing")
        self.wait_pool = Lane(self.WAIT_THREADS, "waiting")
        self.next_expiry = 0.0   # no idle connection's deadline comes before this
        self.next_notify = 0.0
        self.selector = selectors.DefaultSelector()
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        self.conns: dict[int, Conn] = {}
        self.accepting = False
        self.settled = SettledConfig(self.cfg)
        super().init_process()

    def handle_exit(self, sig, frame):
        """SIGTERM: a flag and a byte on the wakeup pipe, nothing more."""
        self.alive = False
        try:
            os.write(self.wake_write, b"!")
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            os.write(self.wake_write, b".")
        except BlockingIOError:
            pass

    # -- the event loop -----------------------------------------------------------------------

    def run(self):
        self.selector.register(self.wake_read, selectors.EVENT_READ, None)
        for listener in self.sockets:
            listener.setblocking(False)
        self._accept(True)
        while self.alive:
            now = time.monotonic()
            if now >= self.next_notify:
                self.next_notify = now + NOTIFY_EVERY
                self.notify()
                if not self.is_parent_alive():
                    break
            self._accept(len(self.conns) < self.settled.worker_connections)
            self._poll(max(0.0, min(self.next_expiry, self.next_notify) - now))
            if time.monotonic() >= self.next_expiry:
                self._expire()
        self._accept(False)
        try:
            self.on_stop()
        except Exception:  # noqa: BLE001 - stopping goes on whatever the hook did
            self.log.exception("on_stop hook failed")
        for conn in [c for c in self.conns.values() if not c.busy]:
            self._close(conn)          # idle or still sending: the client retries elsewhere
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while any(c.busy for c in self.conns.values()) and time.monotonic() < deadline:
            self.notify()
            self._poll(0.5)
        for conn in list(self.conns.values()):
            self._close(conn)
        self.work_pool.shutdown()
        self.read_pool.shutdown()
        self.wait_pool.shutdown()

    def is_parent_alive(self) -> bool:
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            return False
        return True

    def _accept(self, enabled: bool) -> None:
        if enabled == self.accepting:
            return
        for listener in self.sockets:
            if enabled:
                self.selector.register(listener, selectors.EVENT_READ, "listener")
            else:
                self.selector.unregister(listener)
        self.accepting = enabled

    def _deadline(self, conn: Conn, seconds: float) -> None:
        conn.deadline = time.monotonic() + seconds
        if conn.deadline < self.next_expiry:
            self.next_expiry = conn.deadline

    def _poll(self, timeout: float) -> None:
        try:
            events = self.selector.select(timeout)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
            return
        for key, _ in events:
            if key.data is None:
                self._finish()
            elif key.data == "listener":
                self._accept_one(key.fileobj)
            else:
                self._readable(key.data)

    def _accept_one(self, listener) -> None:
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        sock.setblocking(False)
        conn = Conn(sock, client, listener.getsockname())
        self._deadline(conn, self.REQUEST_TIMEOUT)
        self.conns[conn.fd] = conn
        self.selector.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if not conn.buf:
            self._deadline(conn, self.REQUEST_TIMEOUT)  # a request begins (again)
        conn.buf += data
        self._dispatch(conn)

    def _dispatch(self, conn: Conn) -> None:
        """Hand the first request in the buffer to a thread once it is whole."""
        try:
            size = request_size(conn.buf, self.MAX_HEAD, self.MAX_BODY)
        except RequestTooLarge as exc:
            self._refuse(conn, exc.status, exc.reason, str(exc))
            return
        if size is None:
            return
        request, conn.buf = bytes(conn.buf[:size]), conn.buf[size:]
        method, path, query = request_line(bytearray(request[:2048]))
        listing = self.is_listing(method, path)
        self.selector.unregister(conn.sock)
        conn.busy = True
        if not listing and self.is_waiting(method, path, query):
            self.wait_pool.submit(self._serve, conn, request, False)
            return
        (self.read_pool if listing else self.work_pool).submit(self._serve, conn, request, listing)

    def _finish(self) -> None:
        """Connections whose thread is done: back to the loop (kept alive) or closed."""
        try:
            os.read(self.wake_read, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                conn, keep = self.finished.get_nowait()
            except queue.Empty:
                return
            conn.busy = False
            if not keep or not self.alive:
                self._close(conn)
                continue
            try:
                conn.sock.setblocking(False)
            except OSError:
                self._close(conn)
                continue
            self._deadline(conn, self.REQUEST_TIMEOUT if conn.buf else self.settled.keepalive)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            if conn.buf:
                self._dispatch(conn)   # the client sent its next request already

    def _expire(self) -> None:
        """Close idle connections past their deadline; note when the next one falls due
        (checked within a second of it at most)."""
        now = time.monotonic()
        idle = [c for c in self.conns.values() if not c.busy]
        self.next_expiry = min([now + 1.0, *(c.deadline for c in idle if c.deadline > now)])
        for conn in [c for c in idle if c.deadline <= now]:
            if conn.buf:
                self._refuse(conn, 408, "Request Timeout",
                             f"the request did not arrive whole within {self.REQUEST_TIMEOUT:g}s")
            else:
                self._close(conn)

    def _refuse(self, conn: Conn, status: int, reason: str, message: str) -> None:
        body = f'{{"error": "{message}"}}'.encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            conn.sock.send(head + body)   # best effort, never blocking
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if self.conns.pop(conn.fd, None) is None and conn.sock.fileno() < 0:
            return  # closed already
        if not conn.busy:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- in a thread --------------------------------------------------------------------------

    def _serve(self, conn: Conn, request: bytes, listing: bool) -> None:
        keep = False
        began = time.monotonic()
        try:
            conn.sock.settimeout(self.REQUEST_TIMEOUT)   # for writing the answer
            keep = self._handle(conn, request)
        except BaseException:  # noqa: BLE001 - the loop must hear about every connection
            keep = False
            self.log.exception("Error handling request")
        finally:
            if not (keep and self._rearm(conn)):
                self.finished.put((conn, keep))
                self._wake()
        if listing:
            # A listing thread rests twice as long as it worked: however many listings queue
            # up, they take at most a third of one thread (and of one database connection).
            time.sleep(min((time.monotonic() - began) * LISTING_REST, LISTING_REST_MAX))

    def _rearm(self, conn: Conn) -> bool:
        """Put a kept-alive connection back in the event loop's watch from this thread (epoll
        takes registrations from any thread), sparing the loop a wake-up per request: whether
        that was done. Not when the client already sent its next request or the process
        stops: the loop's `_finish` sees to those."""
        if conn.buf or not self.alive:
            return False
        try:
            conn.sock.setblocking(False)
            self._deadline(conn, self.settled.keepalive)
            conn.busy = False
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            return True
        except (KeyError, ValueError, OSError):
            conn.busy = True   # closed meanwhile (the process stopping): the loop closes it
            return False

    def _handle(self, conn: Conn, request: bytes) -> bool:
        """One request, read from memory; whether the connection may serve another."""
        req = None
        try:
            req = next(SettledParser(self.settled, [request], conn.client))
            return self._respond(conn, req)
        except http.errors.NoMoreData:
            return False
        except StopIteration:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, None):
                self.log.exception("Socket error processing request.")
            return False
        except Exception as exc:  # a request gunicorn's parser refused, or the app failed
            self.handle_error(req, conn.sock, conn.client, exc)
            return False

    def _respond(self, conn: Conn, req) -> bool:
        environ, resp = {}, None
        started = datetime.now()
        try:
            self.settled.pre_request(self, req)
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.settled)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Restarting this process after the current request (max_requests).")
                self.alive = False
                self._wake()
            if not self.alive or not self.settled.keepalive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                for item in respiter:
                    resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except (Exception, SystemExit):
            if resp is not None and resp.headers_sent:
                self.log.exception("Error handling request")
                raise StopIteration() from None
            raise
        finally:
            try:
                self.settled.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")

