"""The recording proxy's cached TLS contexts follow the CA, not the CA folder's path."""

from __future__ import annotations

import shutil
from pathlib import Path

from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.legs import _server_context
from popproxy.tls.ca import CertificateAuthority


def test_a_recreated_ca_folder_gets_a_fresh_context(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    contexts = []
    for _ in range(2):  # pytester runs share one basetemp, wiped and refilled each run
        shutil.rmtree(ca_dir, ignore_errors=True)
        config = ProxyConfig(upstream=("127.0.0.1", 110), listen=("127.0.0.1", 0))
        config.ca = CertificateAuthority.load_or_create(ca_dir)
        contexts.append(_server_context(config, "127.0.0.1:1"))
    assert contexts[0] is not contexts[1]
