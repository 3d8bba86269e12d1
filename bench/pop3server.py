"""A fast scripted POP3 server for benchmarks: one thread per connection, prebuilt replies."""

from __future__ import annotations

import argparse
import contextlib
import resource
import signal
import socket
import sys
import threading
from dataclasses import dataclass

BLOCK_TARGET = 1 << 20  # the body is streamed as repeats of a block of about this size
STUFF_EVERY = 64  # every this many lines one starts with a stuffed dot ("..")


def raise_nofile() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_line(index: int, length: int) -> bytes:
    """One body line of exactly ``length`` bytes including CRLF (min 3)."""
    length = max(length, 3)
    head = b".." if index % STUFF_EVERY == STUFF_EVERY - 1 else b""
    fill = b"%d " % index + b"abcdefghijklmnopqrstuvwxyz0123456789" * (length // 36 + 1)
    return (head + fill)[: length - 2] + b"\r\n"


@dataclass(frozen=True)
class Message:
    """A dot-stuffed message body streamed as ``repeats`` x ``block`` + ``tail``."""

    block: bytes
    repeats: int
    tail: bytes

    @property
    def size(self) -> int:
        return len(self.block) * self.repeats + len(self.tail)

    @classmethod
    def build(cls, size: int, line: int) -> Message:
        line = max(line, 3)
        lines_total = max(1, size // line)
        per_block = max(1, min(lines_total, BLOCK_TARGET // line))
        block = b"".join(make_line(i, line) for i in range(per_block))
        repeats, rest = divmod(lines_total, per_block)
        tail = b"".join(make_line(i, line) for i in range(rest))
        return cls(block, repeats, tail)

    def send(self, sock: socket.socket, status: bytes) -> None:
        """Send the status line, the body and the terminator."""
        if not self.repeats:
            sock.sendall(status + self.tail + b".\r\n")
            return
        sock.sendall(status + self.block)
        block = memoryview(self.block)
        for _ in range(self.repeats - 1):
            sock.sendall(block)
        sock.sendall(self.tail + b".\r\n")


class Session:
    """One client connection, answered line by line."""

    def __init__(self, sock: socket.socket, message: Message) -> None:
        self.sock = sock
        self.message = message
        size = message.size
        self.simple: dict[bytes, bytes] = {
            b"USER": b"+OK\r\n",
            b"PASS": b"+OK logged in\r\n",
            b"NOOP": b"+OK\r\n",
            b"RSET": b"+OK\r\n",
            b"STAT": b"+OK 1 %d\r\n" % size,
            b"CAPA": b"+OK Capability list follows\r\nUSER\r\nUIDL\r\n.\r\n",
        }
        self.multi: dict[bytes, tuple[bytes, bytes]] = {
            b"LIST": (b"+OK 1 messages\r\n1 %d\r\n.\r\n" % size, b"+OK 1 %d\r\n" % size),
            b"UIDL": (b"+OK\r\n1 bench-msg-1\r\n.\r\n", b"+OK 1 bench-msg-1\r\n"),
        }

    def run(self) -> None:
        sock = self.sock
        with contextlib.suppress(OSError), sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"+OK bench POP3 server ready\r\n")
            buf = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not self.answer(line.rstrip(b"\r")):
                        return

    def answer(self, line: bytes) -> bool:
        """Answer one command line; False once the session should end."""
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        sock = self.sock
        if verb in self.simple:
            sock.sendall(self.simple[verb])
        elif verb in self.multi:
            listing, single = self.multi[verb]
            if not arg:
                sock.sendall(listing)
            elif arg.strip() == b"1":
                sock.sendall(single)
            else:
                sock.sendall(b"-ERR no such message\r\n")
        elif verb == b"RETR":
            if arg.strip() == b"1":
                self.message.send(sock, b"+OK %d octets\r\n" % self.message.size)
            else:
                sock.sendall(b"-ERR no such message\r\n")
        elif verb == b"QUIT":
            sock.sendall(b"+OK bye\r\n")
            return False
        else:
            sock.sendall(b"-ERR unknown command\r\n")
        return True


def serve(port: int, message: Message) -> None:
    """Accept forever on 127.0.0.1:port; print the listening line once ready."""
    raise_nofile()
    threading.stack_size(256 * 1024)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=Session(conn, message).run, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pop3server", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--retr-size", type=int, default=10 * 1024, help="body bytes of RETR 1")
    parser.add_argument("--line", type=int, default=1024, help="line length incl. CRLF")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    message = Message.build(args.retr_size, args.line)
    try:
        serve(args.port, message)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
