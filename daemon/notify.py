"""The systemd service-manager protocol (sd-daemon), spoken without libsystemd.

Three small pieces, all driven by environment variables systemd sets for the main process:

- sd_notify: datagrams of newline-separated `KEY=VALUE` lines (READY=1, STATUS=…, WATCHDOG=1,
  RELOADING=1, STOPPING=1, …) sent to the AF_UNIX socket named by `NOTIFY_SOCKET`, a filesystem
  path or, with a leading "@", a name in the abstract namespace.
- The watchdog: `WATCHDOG_USEC` (and `WATCHDOG_PID`, when set, naming the process meant to ping).
- Socket activation: `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; the sockets start at fd 3.

Notification is best effort by design: a daemon must keep serving when the service manager is
gone (run by hand, systemd re-executing, a test), so send errors are logged, never raised.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["Notifier", "watchdog_interval", "listen_fds", "LISTEN_FDS_START"]

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: systemd passes activated sockets from fd 3 on
# A blocking send can stall only if PID 1 stops draining its (8 MiB) notify queue; a bounded wait
# keeps a wedged service manager from wedging the supervisor loop with it.
_SEND_TIMEOUT_S = 1.0
_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
_UINT = re.compile(r"[0-9]{1,20}")
_FOLD_NEWLINES = str.maketrans("\r\n", "  ")
_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends sd_notify messages; every method is a cheap no-op when not run by systemd.

    Safe to share between threads: one lock serialises socket creation and sends.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address)
        self._watchdog_usec = watchdog_usec
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *,
                 unset: bool = False) -> Notifier:
        """Build from NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID.

        `unset=True` removes those variables afterwards (as sd_notify's unset_environment does)
        so child processes do not inherit them: with NotifyAccess=main systemd would drop their
        messages and log a warning for each one.
        """
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"), watchdog_usec=_watchdog_usec(env, os.getpid()))
        if unset:
            for name in _NOTIFY_VARS:
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout), or None when no watchdog."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) finished: systemd marks the unit active."""
        return self._send_with_status({"READY": 1}, status)

    def status(self, text: str) -> bool:
        """One line of free text shown by `systemctl status`."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping; send it every `watchdog_interval()` seconds while healthy."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (draining): systemd shows "deactivating" and stops expecting pings."""
        return self._send_with_status({"STOPPING": 1}, status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload began; finish it with `ready()`.

        MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) tell this reload from an older
        one; older versions and Type=notify ignore the extra field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send_with_status({"RELOADING": 1, "MONOTONIC_USEC": usec}, status)

    def extend_timeout(self, usec: int) -> bool:
        """Ask for `usec` more microseconds before the start/stop timeout fires (long loads)."""
        if isinstance(usec, bool) or not isinstance(usec, int) or usec <= 0:
            raise ValueError(f"extend_timeout needs a positive integer of microseconds: {usec!r}")
        return self.send(EXTEND_TIMEOUT_USEC=usec)

    def send(self, **fields: object) -> bool:
        """Send one datagram of `KEY=VALUE` lines; True when systemd got it.

        Keys are upper-cased; values are str()-ed with newlines folded into spaces, so free
        text (a STATUS from an exception message) can never inject a second field.
        """
        if not fields:
            raise ValueError("send() needs at least one field")
        lines = []
        for key, value in fields.items():
            key = key.upper()
            if not _KEY.fullmatch(key):
                raise ValueError(f"invalid sd_notify field name {key!r}")
            text = "1" if value is True else "0" if value is False else str(value)
            lines.append(f"{key}={text.translate(_FOLD_NEWLINES)}")
        if self._address is None:
            return False
        return self._sendto(self._address, "\n".join(lines).encode())

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send_with_status(self, fields: dict[str, object], status: str | None) -> bool:
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def _sendto(self, address: str, data: bytes) -> bool:
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.settimeout(_SEND_TIMEOUT_S)
                self._sock.sendto(data, address)
            except OSError as exc:
                self._drop_socket()
                # Warn on the first failure only: the watchdog pings every few seconds and a
                # gone service manager would otherwise flood the log.
                level = logging.DEBUG if self._failing else logging.WARNING
                log.log(level, "sd_notify to %s failed: %s", _printable(address), exc)
                self._failing = True
                return False
            if self._failing:
                log.info("sd_notify to %s works again", _printable(address))
                self._failing = False
            return True

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None, *,
                      pid: int | None = None) -> float | None:
    """Half of WATCHDOG_USEC in seconds, as sd_watchdog_enabled advises, or None.

    None when the variable is unset, not a positive integer, or WATCHDOG_PID names another
    process (the watchdog belongs to the main process, not to children that inherited the
    environment).
    """
    env = os.environ if environ is None else environ
    usec = _watchdog_usec(env, os.getpid() if pid is None else pid)
    return None if usec is None else usec / 2_000_000


def listen_fds(environ: MutableMapping[str, str] | None = None, *, pid: int | None = None,
               unset: bool = True) -> dict[str, list[int]]:
    """Sockets passed by socket activation, by FileDescriptorName= (default "unknown").

    Empty unless LISTEN_PID names this process. The fds are marked close-on-exec (as
    sd_listen_fds does); pass them on to workers explicitly (`pass_fds`). `unset` removes the
    variables so children do not believe the sockets are theirs.
    """
    env = os.environ if environ is None else environ
    own_pid = os.getpid() if pid is None else pid
    listen_pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES")
    if unset:
        for name in _LISTEN_VARS:
            env.pop(name, None)
    if not (_UINT.fullmatch(listen_pid) and _UINT.fullmatch(count)) or int(listen_pid) != own_pid:
        return {}
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names is not None else []
    if len(labels) != len(fds):
        labels = ["unknown"] * len(fds)
    found: dict[str, list[int]] = {}
    for fd, label in zip(fds, labels):
        os.set_inheritable(fd, False)
        found.setdefault(label, []).append(fd)
    return found


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    raw = env.get("WATCHDOG_USEC", "")
    if not _UINT.fullmatch(raw) or not 0 < int(raw) < 2**64 - 1:  # 2**64-1 is USEC_INFINITY
        if raw:
            log.warning("ignoring WATCHDOG_USEC=%r: not a positive integer", raw)
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and (not _UINT.fullmatch(owner) or int(owner) != pid):
        return None
    return int(raw)


def _socket_address(address: str | None) -> str | None:
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]  # abstract namespace: the name starts with a NUL byte
    if address.startswith("/"):
        return address
    # e.g. "vsock:…" (systemd ≥ 254 in VMs): not spoken here, so say so once and stay quiet.
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path or @name; sd_notify disabled", address)
    return None


def _printable(address: str | None) -> str:
    return "" if address is None else "@" + address[1:] if address.startswith("\0") else address
