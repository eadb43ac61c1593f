"""A TCP path to a PostgreSQL server that can go silent: every packet
dropped, both ways, with no refusal and no reset, as when a database host
vanishes in a failover or the network between splits. A client learns of it
only through its own timeouts.

The path is a veth pair into a network namespace of its own, and a forwarder
listening on the namespace's end that relays each connection to the server.
Taking the namespace's end down drops whatever is sent over the pair;
bringing it up again lets the same connections talk on. It needs root (or
CAP_NET_ADMIN) and iproute2's ``ip``: :func:`silent_link` skips the test
without them.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

CLONE_NEWNET = 0x40000000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def remove_abandoned_namespaces() -> None:
    """Delete the namespaces (and so the pairs) of test processes that were
    killed before they could."""
    for path in glob.glob("/run/netns/kp-silent-*"):
        pid = path.rsplit("-", 1)[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            remove(os.path.basename(path), f"kps{pid}o")


def remove(namespace: str, outside: str) -> None:
    # The pair first: a namespace outlives its deletion while sockets in it
    # still wind down, and the pair with it.
    subprocess.run(["ip", "link", "delete", outside], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=10)


class SilentLink:
    """``host:port`` reaches ``upstream`` until :meth:`silence`, and again
    after :meth:`restore`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        pid = os.getpid()
        self.namespace = f"kp-silent-{pid}"
        self.outside, self.inside = f"kps{pid}o", f"kps{pid}i"
        # A /30 of 10/8 of this process's own, so that test runs side by side
        # do not share addresses.
        base = (10 << 24) | ((pid * 4) & 0xFFFFFC)
        self.outside_address = socket.inet_ntoa((base + 1).to_bytes(4, "big"))
        self.host = socket.inet_ntoa((base + 2).to_bytes(4, "big"))
        self.port = 0
        self.listener: socket.socket | None = None
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    def open(self) -> None:
        remove_abandoned_namespaces()
        ip("netns", "add", self.namespace)
        ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside, "netns", self.namespace)
        ip("addr", "add", f"{self.outside_address}/30", "dev", self.outside)
        ip("link", "set", self.outside, "up")
        ip("-n", self.namespace, "addr", "add", f"{self.host}/30", "dev", self.inside)
        ip("-n", self.namespace, "link", "set", self.inside, "up")
        self.listener = self.listen_inside()
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def listen_inside(self) -> socket.socket:
        """A listening socket in the namespace. A thread of its own enters it
        (``setns`` moves only the calling thread); the socket stays there
        after the thread ends, and everything else here stays outside."""
        made: list[socket.socket | BaseException] = []

        def enter_and_listen() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/run/netns/{self.namespace}") as namespace:
                    if libc.setns(namespace.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                made.append(socket.create_server((self.host, 0)))
            except BaseException as error:  # handed to the caller's thread
                made.append(error)

        thread = threading.Thread(target=enter_and_listen)
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self.relay, args=(source, target), daemon=True).start()

    @staticmethod
    def relay(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def silence(self) -> None:
        ip("-n", self.namespace, "link", "set", self.inside, "down")

    def restore(self) -> None:
        ip("-n", self.namespace, "link", "set", self.inside, "up")

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        with self.lock:
            for sock in self.sockets:
                # shutdown first: a relay thread blocked reading it keeps a
                # socket merely closed open, and PostgreSQL's session with it.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        remove(self.namespace, self.outside)


@contextlib.contextmanager
def silent_link(upstream: tuple[str, int]) -> Iterator[SilentLink]:
    """A :class:`SilentLink` to ``upstream`` for the ``with`` block; the test
    skipped where this machine cannot make one (not root, no ``ip``, no
    network namespaces)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("a silent link needs root and iproute2's ip")
    link = SilentLink(upstream)
    try:
        try:
            link.open()
        except subprocess.CalledProcessError as error:
            pytest.skip(f"no network namespace or veth pair here: {error.stderr.decode().strip()}")
        yield link
    finally:
        link.close()
