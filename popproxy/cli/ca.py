"""``popproxy ca``: where popproxy's CA is, and how to make clients trust it."""

from __future__ import annotations

import argparse
from pathlib import Path

from popproxy.tls.ca import CertificateAuthority, default_ca_dir

HOWTO = """\
popproxy's CA certificate: {path}

popproxy makes a certificate for each server name on the fly, signed by this CA. A client
sees the decrypted session only if it trusts the CA:

  curl        curl --cacert {path} pop3s://localhost:1995/
  fetchmail   sslcertck sslcertfile {path} (in .fetchmailrc; add sslcommonname NAME)
  getmail6    ca_certs = {path}   (in the [retriever] section)
  Python      ssl.create_default_context(cafile="{path}")
  Thunderbird Settings → Privacy & Security → Manage Certificates → Authorities → Import
  Debian      cp {path} /usr/local/share/ca-certificates/popproxy.crt && update-ca-certificates

Only trust it on machines you control: whoever holds its key ({key}) can impersonate any
server to those clients. Remove the folder to start again with a new CA."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ca",
        help="show popproxy's CA and how to trust it",
        description="Create popproxy's CA if needed and explain how to trust it.",
    )
    p.add_argument(
        "--path", action="store_true", help="print only the path of the CA certificate (PEM)"
    )
    p.add_argument(
        "--ca-dir", metavar="DIR", help="the CA folder (default $POPPROXY_CA_DIR or ~/.popproxy)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    ca_dir = Path(args.ca_dir) if args.ca_dir else default_ca_dir()
    ca = CertificateAuthority.load_or_create(ca_dir)
    if args.path:
        print(ca.cert_path)
    else:
        print(HOWTO.format(path=ca.cert_path, key=ca_dir / "ca-key.pem"))
    return 0
