"""Starts the real token-service (dev mode) once for the session, on free ports in a
temporary directory, the way scripts/walkthrough.sh does.

The binary is $TOKEN_SERVICE_BIN, else target/debug/token-service at the repository root
(build it with `cargo build -p token-service`). A missing binary FAILS the tests that need
it: CI builds it first, and a skipped client test would hide a broken client.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from jobtoken.v1 import admin_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
#: Short tokens, so the tests see several renewals in a few seconds.
ACCESS_TOKEN_TTL = "2s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    target: str
    data_dir: Path
    binary: Path
    module_key: str
    admin_key: str

    def user_token(self, user: str = "alice", tenant: str = "diku", permissions=("inventory.read", "inventory.write")) -> str:
        """A user's access token from the service's dev issuer (`token-service dev-token`)."""
        out = subprocess.run(
            [str(self.binary), "dev-token", "--user", user, "--tenant", tenant, "--permissions", ",".join(permissions)],
            env={**os.environ, "JOBTOKEN_DATA_DIR": str(self.data_dir)},
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip()

    def admin(self):
        """An AdminService stub and the metadata carrying the admin key."""
        channel = grpc.insecure_channel(self.target)
        return admin_pb2_grpc.AdminServiceStub(channel), (("x-admin-key", self.admin_key),)


def service_binary() -> Path:
    binary = Path(os.environ.get("TOKEN_SERVICE_BIN", REPO / "target" / "debug" / "token-service"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not os.access(binary, os.X_OK):
        pytest.fail(
            f"{binary} is not an executable: run `cargo build -p token-service` or set TOKEN_SERVICE_BIN",
            pytrace=False,
        )
    return binary


class Running:
    """One token-service process in dev mode; ``restart()`` keeps its data and ports."""

    def __init__(self, work: Path):
        self.work = work
        self.binary = service_binary()
        self.data_dir = work / "data"
        self.grpc_addr = f"127.0.0.1:{_free_port()}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("JOBTOKEN_")}
        self.env.update(
            JOBTOKEN_GRPC_LISTEN=self.grpc_addr,
            JOBTOKEN_HTTP_LISTEN=f"127.0.0.1:{_free_port()}",
            JOBTOKEN_DATA_DIR=str(self.data_dir),
            JOBTOKEN_ACCESS_TOKEN_TTL=ACCESS_TOKEN_TTL,
        )
        self.log_path = work / "server.log"
        self.process = None
        self.start()
        self.service = Service(
            target=self.grpc_addr,
            data_dir=self.data_dir,
            binary=self.binary,
            module_key=(self.data_dir / "dev-module.key").read_text().strip(),
            admin_key=(self.data_dir / "dev-admin.key").read_text().strip(),
        )

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "serve"], cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"token-service exited during start-up:\n{self.log_path.read_text()[-3000:]}", pytrace=False)
            if (self.data_dir / "dev-admin.key").exists():
                with grpc.insecure_channel(self.grpc_addr) as channel:
                    try:
                        grpc.channel_ready_future(channel).result(timeout=0.2)
                        return
                    except grpc.FutureTimeoutError:
                        pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"token-service did not come up on {self.grpc_addr}:\n{self.log_path.read_text()[-3000:]}",
                    pytrace=False,
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Service:
    """The service shared by most tests."""
    running = Running(tmp_path_factory.mktemp("jobtoken-service"))
    try:
        yield running.service
    finally:
        running.stop()


@pytest.fixture
def own_service(tmp_path_factory) -> Running:
    """A service of the test's own, which it may stop and restart."""
    running = Running(tmp_path_factory.mktemp("jobtoken-own-service"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def job_id() -> str:
    return f"py-{uuid.uuid4()}"
