"""TLS between worker and pool with a CA made by the test: trusted, untrusted, and no plaintext."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers.harness import python_task, start_pool, start_worker, wait_for
from hivemind_worker.engine.events import EngineState, TaskFinished
from hivemind_worker.engine.pool_client import NodePoolClient
from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [pytest.mark.usefixtures("memory_keyring"), pytest.mark.timeout(90)]


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate valid for 127.0.0.1, used as the pool's own certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def tls_token(address: str, ca: Path) -> str:
    client = TaskQueueClient(address, root_certificates=ca.read_bytes())
    try:
        return (await client.login("alice", "correct horse battery staple")).token
    finally:
        await client.close()


async def test_worker_runs_tasks_over_tls_with_the_pools_ca(tmp_path: Path) -> None:
    cert, key = make_ca(tmp_path, "pool")
    pool = await start_pool(tmp_path / "pool.db", tls_cert=cert, tls_key=key)
    token = await tls_token(pool.address, cert)
    worker = await start_worker(tmp_path / "node-a", pool.address, token=token, ca_file=str(cert))
    queue = TaskQueueClient(pool.address, root_certificates=cert.read_bytes())
    try:
        await queue.login("alice", "correct horse battery staple")
        task_id = await queue.submit(python_task("print('over TLS')"))
        info = (await queue.wait_done([task_id], timeout=60))[task_id]
        assert info.status == pb.TASK_STATUS_SUCCEEDED
        assert b"over TLS" in info.log_tail
        assert any(isinstance(e, TaskFinished) for e in worker.events)
    finally:
        await queue.close()
        await worker.stop()
        await pool.stop()


async def test_a_pool_signed_by_another_ca_is_refused_with_a_clear_message(
    tmp_path: Path,
) -> None:
    cert, key = make_ca(tmp_path, "pool")
    stranger, _ = make_ca(tmp_path, "stranger")
    pool = await start_pool(tmp_path / "pool.db", tls_cert=cert, tls_key=key)
    token = await tls_token(pool.address, cert)
    worker = await start_worker(
        tmp_path / "node-a", pool.address, token=token, ca_file=str(stranger)
    )
    try:
        await wait_for(
            lambda: (
                worker.engine.state is EngineState.CONNECTING
                and "secure connection" in worker.engine.state_message
            ),
            what="a TLS refusal",
        )
        assert "not trusted" in worker.engine.state_message
        assert pool.stats.get_assigned_calls.get("node-a", 0) == 0  # nothing got through
    finally:
        await worker.stop()
        await pool.stop()


async def test_plaintext_is_never_used_off_loopback_without_insecure() -> None:
    # Constructing a client opens no connection, so no traffic leaves this machine here.
    assert NodePoolClient("pool.example.org:50051").tls
    assert NodePoolClient("192.0.2.10:50051").tls
    assert not NodePoolClient("192.0.2.10:50051", insecure=True).tls
    assert not NodePoolClient("127.0.0.1:50051").tls
    assert not NodePoolClient("[::1]:50051").tls
