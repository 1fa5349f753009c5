"""`amoskys pki ...`: the fleet's CA, CSRs, certificates, signing keys, checks and revocation."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from amoskys import keys, pki
from amoskys.commands import Subparsers
from amoskys.config import MAX_DAYS
from amoskys.errors import IdentityError
from amoskys.keyfile import IDENTITY_RULE, read_identity_file

DAYS_HELP = f"validity in days, 1 to {MAX_DAYS}"


def serial_number(text: str) -> int:
    """A serial as written: decimal or 0x-prefixed hex (argparse names this function in its error)."""
    return int(text, 0)


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("pki", help="certificates and signing keys")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    init = actions.add_parser("init-ca", help="create a CA (ca.key 0600 + ca.crt) in a directory")
    init.add_argument(
        "--dir",
        type=Path,
        required=True,
        help="CA directory (created 0700; an existing one must not be group/world-writable)",
    )
    init.add_argument("--cn", default="AMOSKYS CA", help="CA common name (1-64 printable characters)")
    init.add_argument("--days", type=int, default=3650, help=DAYS_HELP)
    init.set_defaults(func=run_init_ca)

    csr = actions.add_parser("csr", help="generate a TLS key (0600) and its CSR where the key will live")
    csr.add_argument("--cn", required=True, help=f"common name: the host or agent id ({IDENTITY_RULE})")
    csr.add_argument("--key", type=Path, required=True, help="private key path (must not exist)")
    csr.add_argument("--out", type=Path, required=True, help="CSR path")
    csr.add_argument("--san", action="append", default=[], help="subject alt name (DNS or IP); repeatable")
    csr.set_defaults(func=run_csr)

    sign = actions.add_parser("sign", help="sign a CSR with the CA")
    sign.add_argument("--ca-dir", type=Path, required=True)
    sign.add_argument("--csr", type=Path, required=True)
    sign.add_argument("--out", type=Path, required=True, help="certificate path")
    sign.add_argument("--usage", choices=["server", "client", "both"], default="client")
    sign.add_argument("--san", action="append", default=[], help="extra subject alt name; repeatable")
    sign.add_argument("--days", type=int, default=365, help=DAYS_HELP)
    sign.set_defaults(func=run_sign)

    issue = actions.add_parser("issue", help="key + CSR + signed cert in one step (tests and the lab)")
    issue.add_argument("--ca-dir", type=Path, required=True)
    issue.add_argument("--cn", required=True, help=f"common name: the host or agent id ({IDENTITY_RULE})")
    issue.add_argument("--dir", type=Path, required=True, help="writes CN.key (0600) and CN.crt here")
    issue.add_argument("--usage", choices=["server", "client", "both"], default="client")
    issue.add_argument("--san", action="append", default=[])
    issue.add_argument("--days", type=int, default=365, help=DAYS_HELP)
    issue.set_defaults(func=run_issue)

    keygen = actions.add_parser("keygen", help="generate an Ed25519 envelope-signing key pair")
    keygen.add_argument("--out", type=Path, required=True, help="private key path (0600); public: OUT.pub")
    keygen.set_defaults(func=run_keygen)

    pub = actions.add_parser("pubkey", help="print the public half of a signing key (trust map form)")
    pub.add_argument("key", type=Path)
    pub.set_defaults(func=run_pubkey)

    check = actions.add_parser(
        "check",
        help="exit 1 if a cert does not chain to the CA, mismatches its key, or expires soon; one line per cert",
    )
    check.add_argument("--cert", type=Path, action="append", required=True, help="repeatable")
    check.add_argument("--ca", type=Path, required=True, help="CA certificate")
    check.add_argument(
        "--key", type=Path, action="append", default=[],
        help="also check the private key (permissions and match): none, or one per --cert, in the same order",
    )  # fmt: skip
    check.add_argument("--days", type=int, default=30, help="fail when fewer days are left")
    check.set_defaults(func=run_check)

    revoke = actions.add_parser("revoke", help="add certificates to the CA's revocation list")
    revoke.add_argument("--ca-dir", type=Path, required=True)
    revoke.add_argument("--crl", type=Path, required=True, help="CRL path (created when missing)")
    revoke.add_argument("--cert", type=Path, action="append", default=[], help="cert to revoke; repeatable")
    revoke.add_argument("--serial", type=serial_number, action="append", default=[], help="e.g. 0x1f3a; repeatable")
    revoke.set_defaults(func=run_revoke)


def run_init_ca(args: argparse.Namespace) -> int:
    ca = pki.init_ca(args.dir, args.cn, args.days)
    print(f"CA created: {args.dir / pki.CA_CERT} (expires {ca.cert.not_valid_after_utc:%Y-%m-%d})")
    return 0


def run_csr(args: argparse.Namespace) -> int:
    pki.create_csr(args.key, args.out, args.cn, args.san)
    print(f"key: {args.key} (0600), CSR: {args.out}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    pki.check_days(args.days)
    ca = pki.load_ca(args.ca_dir)
    cert = pki.sign_csr(ca, read_identity_file(args.csr, "CSR"), args.usage, args.san, args.days)
    keys.write_public_file(args.out, cert.public_bytes(serialization.Encoding.PEM))
    print(
        f"certificate: {args.out} CN={pki.common_name(cert)} serial={cert.serial_number:#x} "
        f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    )
    return 0


def run_issue(args: argparse.Namespace) -> int:
    pki.check_days(args.days)
    ca = pki.load_ca(args.ca_dir)
    key_path, cert_path = pki.issue(ca, args.dir, args.cn, args.usage, args.san, args.days)
    print(f"key: {key_path} (0600), certificate: {cert_path}")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    key = keys.generate_signing_key()
    pub_path = args.out.with_name(args.out.name + ".pub")
    keys.write_key_and_public(args.out, key, pub_path, (keys.public_key_text(key.public_key()) + "\n").encode())
    print(f"signing key: {args.out} (0600), public key: {pub_path}")
    return 0


def run_pubkey(args: argparse.Namespace) -> int:
    print(keys.public_key_text(keys.load_signing_key(args.key).public_key()))
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Every --cert (with its --key) checked, one OK/FAIL line each: one process for a host's identities.
    A certificate that cannot be read is bad input (an error, nothing checked), as with one --cert."""
    pki.check_days(args.days, minimum=0)
    if args.key and len(args.key) != len(args.cert):
        raise IdentityError(f"--key: give none or one per --cert ({len(args.cert)}), got {len(args.key)}")
    certs = [pki.load_certificate(path) for path in args.cert]
    ca_cert = pki.load_certificate(args.ca)
    failed = 0
    for cert, cert_path, key_path in zip(certs, args.cert, args.key or [None] * len(certs), strict=True):
        try:
            if key_path:
                pki.load_tls_identity(cert_path, key_path, args.ca)
            left = pki.check_certificate(cert, ca_cert, cert_path, args.days)
        except IdentityError as exc:
            print(f"FAIL {exc}" if str(exc).startswith(f"{cert_path}:") else f"FAIL {cert_path}: {exc}")
            failed = 1
            continue
        print(
            f"OK {cert_path}: CN={pki.common_name(cert)} expires {cert.not_valid_after_utc:%Y-%m-%d} "
            f"({left.days} days left)"
        )
    return failed


def run_revoke(args: argparse.Namespace) -> int:
    ca = pki.load_ca(args.ca_dir)
    serials = list(args.serial) + [pki.load_certificate(p).serial_number for p in args.cert]
    if not serials:
        raise IdentityError("nothing to revoke: give --cert or --serial")
    total = pki.revoke(ca, args.crl, serials)
    print(f"revocation list {args.crl}: {total} revoked")
    return 0
