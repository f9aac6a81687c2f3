"""supervisord's XML-RPC interface over its unix socket, with timeouts.

supervisor's own transport has no timeout, and a hung supervisord would then hold a worker thread
forever; this one gives every call a deadline. Credentials, if `[unix_http_server]` sets them,
go in the socket URL's user part and reach the server as HTTP basic auth.
"""
from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from dataclasses import dataclass


class SupervisorUnavailable(Exception):
    """The socket is missing, refuses, or does not answer in time."""


class SupervisorError(Exception):
    """supervisord refused the request (a fault such as NOT_RUNNING or SPAWN_ERROR)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float):
        super().__init__()
        self.socket_path = path
        self.timeout = timeout

    def make_connection(self, host):
        if self._connection[1] is None:
            self._connection = (host, _UnixConnection(self.socket_path, self.timeout))
        return self._connection[1]


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    group: str
    statename: str
    pid: int
    start: int
    now: int
    description: str = ""
    spawnerr: str = ""
    exitstatus: int = 0

    @property
    def full_name(self) -> str:
        """The name supervisorctl and startProcess take: `group:name` inside a group."""
        return self.name if self.group == self.name else f"{self.group}:{self.name}"

    @property
    def uptime(self) -> float | None:
        if self.statename != "RUNNING" or not self.start:
            return None
        return max(self.now - self.start, 0)

    @classmethod
    def from_rpc(cls, info: dict) -> "ProcessInfo":
        return cls(info["name"], info["group"], info["statename"], int(info.get("pid") or 0),
                   int(info.get("start") or 0), int(info.get("now") or 0), info.get("description") or "",
                   info.get("spawnerr") or "", int(info.get("exitstatus") or 0))


class SupervisorClient:
    def __init__(self, socket_path: str, timeout: float = 3.0, action_timeout: float = 30.0,
                 username: str | None = None, password: str | None = None):
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.action_timeout = action_timeout
        auth = f"{username}:{password}@" if username else ""
        self._url = f"http://{auth}localhost/RPC2"

    def _proxy(self, timeout: float) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(self._url, transport=_UnixTransport(self.socket_path, timeout),
                                         allow_none=True)

    def _call(self, method: str, *args, timeout: float | None = None):
        proxy = self._proxy(self.timeout if timeout is None else timeout)
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            raise SupervisorError(fault.faultString) from None
        except (OSError, xmlrpc.client.ProtocolError, http.client.HTTPException) as exc:
            raise SupervisorUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            proxy("close")()

    def processes(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_rpc(p) for p in self._call("getAllProcessInfo")]

    def state(self) -> str:
        return self._call("getState")["statename"]

    def start(self, name: str) -> None:
        self._call("startProcess", name, True, timeout=self.action_timeout)

    def stop(self, name: str) -> None:
        self._call("stopProcess", name, True, timeout=self.action_timeout)

    def restart(self, name: str) -> None:
        try:
            self.stop(name)
        except SupervisorError as exc:
            if "NOT_RUNNING" not in str(exc):
                raise
        self.start(name)
