"""HTTPS with TLS_CERT_FILE/TLS_KEY_FILE: a certificate made at test time, minimum versions enforced, HSTS, and an
operator's probe of a real `serve`."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from llm_proxy.app import create_app
from llm_proxy.ops.cli import main
from llm_proxy.ops.command_errors import UsageError
from llm_proxy.ops.tls import build_ssl_context
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO, free_port, make_settings, serve_env

# Runs `llm-proxy serve` with a terminal as its controlling tty, as an operator's shell would:
# that is where OpenSSL asks for a passphrase when nobody gave it one.
WITH_A_TERMINAL = ("import os, sys; os.setsid(); os.close(os.open(sys.argv[1], os.O_RDWR)); "
                   "os.execv(sys.executable, [sys.executable, '-m', 'llm_proxy', 'serve'])")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-proxy test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
async def https_gateway(tmp_path: Path, certificate: tuple[Path, Path]) -> AsyncIterator[Callable[..., Any]]:
    """Start the gateway over HTTPS with the CLI's own SSL context; return (server, settings)."""
    servers: list[TestServer] = []

    async def start(**overrides: str) -> TestServer:
        cert_file, key_file = certificate
        settings = make_settings(tmp_path, TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(key_file), **overrides)
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server(ssl=build_ssl_context(settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def client_context(cert_file: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that trusts the test certificate and speaks exactly one TLS version."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: that is the point
        if version < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 refuses TLS < 1.2 at its default security level; lower it so that the
            # server, not our own client, is what refuses the handshake.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = version
        context.maximum_version = version
    return context


async def handshake(server: TestServer, context: ssl.SSLContext) -> str:
    """Open a TLS connection and return the negotiated protocol version."""
    assert server.port is not None
    _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context,
                                              server_hostname="localhost")
    try:
        version = writer.get_extra_info("ssl_object").version()
    finally:
        writer.close()
        await writer.wait_closed()
    return str(version)


async def refused(server: TestServer, context: ssl.SSLContext) -> None:
    # ssl.SSLError when either side rejects the version; a reset when the server just hangs up.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await handshake(server, context)


async def test_tls_1_1_is_refused_and_1_2_accepted(https_gateway: Callable[..., Any],
                                                   certificate: tuple[Path, Path]) -> None:
    server = await https_gateway()
    cert_file, _ = certificate
    await refused(server, client_context(cert_file, ssl.TLSVersion.TLSv1_1))
    assert await handshake(server, client_context(cert_file, ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    assert await handshake(server, client_context(cert_file, ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"

    async with aiohttp.ClientSession() as session, session.get(
            server.make_url("/health"), ssl=ssl.create_default_context(cafile=cert_file)) as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"


async def test_tls_min_version_1_3_refuses_1_2(https_gateway: Callable[..., Any],
                                               certificate: tuple[Path, Path]) -> None:
    server = await https_gateway(TLS_MIN_VERSION="1.3")
    cert_file, _ = certificate
    await refused(server, client_context(cert_file, ssl.TLSVersion.TLSv1_2))
    assert await handshake(server, client_context(cert_file, ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"


async def test_https_responses_carry_hsts(https_gateway: Callable[..., Any], certificate: tuple[Path, Path]) -> None:
    cert_file, _ = certificate
    for number, (overrides, expected) in enumerate((({}, "max-age=31536000"), ({"HSTS_MAX_AGE": "600"}, "max-age=600"),
                                                    ({"HSTS_MAX_AGE": "0"}, None))):
        server = await https_gateway(DATABASE_PATH=str(cert_file.parent / f"gateway-{number}.db"), **overrides)
        async with aiohttp.ClientSession() as session, session.get(
                server.make_url("/health"), ssl=ssl.create_default_context(cafile=cert_file)) as response:
            header = response.headers.get("Strict-Transport-Security")
        if expected is None:
            assert header is None
        else:
            assert header is not None and expected in [part.strip() for part in header.split(";")], header


def test_plain_http_without_certificate_files(tmp_path: Path) -> None:
    assert build_ssl_context(make_settings(tmp_path)) is None


def test_unreadable_certificate_is_a_config_error(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert_file, _ = certificate
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("not a key")
    with pytest.raises(UsageError, match=r"TLS_CERT_FILE/TLS_KEY_FILE: cannot load"):
        build_ssl_context(make_settings(tmp_path, TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(not_a_key)))
    with pytest.raises(UsageError, match=r"TLS_KEY_FILE: no file at"):
        build_ssl_context(make_settings(tmp_path, TLS_CERT_FILE=str(cert_file),
                                        TLS_KEY_FILE=str(tmp_path / "missing.pem")))


async def test_cli_talks_to_an_https_gateway(https_gateway: Callable[..., Any], certificate: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    server = await https_gateway()
    cert_file, _ = certificate
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
    url = str(server.make_url("")).rstrip("/")

    trusted = await asyncio.to_thread(main, ["project", "list", "--json", "--url", url, "--cafile", str(cert_file)])
    assert trusted == 0 and orjson.loads(capsys.readouterr().out) == {"data": []}
    untrusted = await asyncio.to_thread(main, ["project", "list", "--url", url])
    err = capsys.readouterr().err
    assert untrusted == 1 and err.startswith("llm-proxy: the certificate of") and err.count("\n") == 1


def test_a_passphrase_protected_key_is_refused_without_asking(tmp_path: Path,
                                                             certificate: tuple[Path, Path]) -> None:
    cert_file, key_file = certificate
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"correct horse battery")))
    with pytest.raises(UsageError, match=r"TLS_KEY_FILE: .* is encrypted with a passphrase, which is not supported"):
        build_ssl_context(make_settings(tmp_path, TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(encrypted)))


@pytest.mark.system
async def test_serve_with_an_encrypted_key_fails_at_once_even_on_a_terminal(tmp_path: Path,
                                                                          certificate: tuple[Path, Path]) -> None:
    cert_file, key_file = certificate
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"correct horse battery")))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
           "LISTEN_ADDR": f"127.0.0.1:{port}", "DATABASE_PATH": str(tmp_path / "gateway.db"),
           "AUDIT_LOG_FILE": str(tmp_path / "audit.log"), "TLS_CERT_FILE": str(cert_file),
           "TLS_KEY_FILE": str(encrypted)}
    controller, terminal = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WITH_A_TERMINAL, os.ttyname(terminal), cwd=tmp_path, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(process.communicate(), timeout=20)
        except TimeoutError:
            process.kill()  # it sat at OpenSSL's prompt
            await process.communicate()
            os.set_blocking(controller, False)
            pytest.fail(f"serve waited on the terminal: {os.read(controller, 4096)!r}")
    finally:
        os.close(terminal)
        os.close(controller)
    assert process.returncode == 2, err
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-proxy: configuration error: TLS_KEY_FILE: "), lines
    assert "not supported" in lines[0]


@pytest.mark.system
async def test_serve_https_for_real_with_hsts_and_min_version(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """From the third review (the operator's side)."""
    import ssl

    cert_file, key_file = certificate
    port = free_port()
    env = serve_env(tmp_path, TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(key_file), TLS_MIN_VERSION="1.3",
                    HSTS_MAX_AGE="600", LISTEN_ADDR=f"127.0.0.1:{port}", LOG_FILE=str(tmp_path / "app.log"))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        context = ssl.create_default_context(cafile=str(cert_file))
        old = ssl.create_default_context(cafile=str(cert_file))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        headers = None
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"https://127.0.0.1:{port}/health", ssl=context) as response:
                        headers = response.headers
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            assert headers is not None
            assert headers.get("Strict-Transport-Security") == "max-age=600"
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"https://127.0.0.1:{port}/health", ssl=old):
                    pass
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/health"):
                    pass
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), timeout=15)
    assert process.returncode == 0
