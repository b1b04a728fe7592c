"""A real redis-server on a free port, in its own directory, that a test can stop, kill and restart."""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, request = directory / "server.crt", directory / "server.key", directory / "server.csr"
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
                  "-subj", "/CN=titans-test-ca"],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"],
                 ["x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                  "-days", "2", "-extfile", extensions]):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


class RedisServer:
    def __init__(self, directory: Path, appendonly: bool = False, password: str | None = None,
                 options: tuple[str, ...] = (), port: int | None = None, user: str | None = None,
                 tls: bool = False):
        """options: more redis-server arguments, e.g. ("--maxmemory", "4mb"). user: an ACL user (with password)
        the clients log in as, the default user turned off. tls: TLS only, with a certificate from a CA of
        its own (clients verify it: the URL names the CA file)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (bin/test installs it with apt-get)")
        self.binary, self.directory, self.appendonly = binary, Path(directory), appendonly
        self.password, self.options, self.user, self.tls = password, options, user, tls
        self.directory.mkdir(parents=True, exist_ok=True)
        self.certificates = make_certificates(self.directory) if tls else None
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        login = f"{self.user or ''}:{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{login}127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificates[0]}"
        return f"redis://{login}127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as raw:
            if self.tls:
                context = ssl.create_default_context(cafile=str(self.certificates[0]))
                connection = context.wrap_socket(raw, server_hostname="127.0.0.1")
            else:
                connection = raw
            login = f"AUTH {self.user + ' ' if self.user else ''}{self.password}\r\n" if self.password else ""
            connection.sendall(login.encode() + b"PING\r\n")
            answer = b""
            while not answer.endswith(b"\r\n") or (login and answer.count(b"\r\n") < 2):
                piece = connection.recv(64)
                if not piece:
                    break
                answer += piece
            return answer.endswith(b"+PONG\r\n")

    def start(self) -> RedisServer:
        args = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        if self.tls:
            ca, cert, key = self.certificates
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.user:
            args += ["--user", "default", "off", "--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all"]
        elif self.password:
            args += ["--requirepass", self.password]
        args += list(self.options)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self._ping():
                    return self
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        """SIGTERM: Redis flushes the AOF and exits."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def free_bus_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and exists too (an ephemeral port may be above
    55535, and redis-server then refuses to start)."""
    rng = random.Random()
    while True:
        port = rng.randint(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


class RedisClusterServers:
    """A real Redis Cluster of `masters` redis-servers (no replicas) on free ports, made with redis-cli."""

    def __init__(self, directory: Path, masters: int = 3):
        self.nodes = [RedisServer(Path(directory) / f"node{i}", port=free_bus_port(), options=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"))
            for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis-cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every node agrees the cluster is up
            states = [subprocess.run(["redis-cli", "-p", str(n.port), "cluster", "info"], capture_output=True,
                                     text=True, timeout=10).stdout for n in self.nodes]
            if all("cluster_state:ok" in s for s in states):
                return self
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ok within 30 s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
