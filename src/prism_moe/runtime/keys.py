"""CurveZMQ keys for the cluster: one keypair per server, every server trusts the cluster's public keys.

Layout written by `make_cluster_keys(out_dir, names)`::

    out_dir/public/<name>.key            public certificate of each server (ship the whole folder to all)
    out_dir/private/<name>.key_secret    secret certificate (mode 0600; ship only to server <name>)
    out_dir/admin.key                    the admin credential of the control routes (mode 0600; give it to the
                                         servers and the coordinator, never to users; see runtime/auth.py)

A server's expert service runs as a CURVE server with its own keypair and accepts a client only if the
client's public key is in `public/` (ZAP authenticator); a client uses its own keypair and pins the
target's public key from `public/<peer>.key`. A key not in `public/` gets no connection at all, so its
calls time out (`PeerUnavailable`). Security is optional: pass no identity for plaintext local dev.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from prism_moe.fileio import atomic_write_bytes, atomic_write_text

PUBLIC_DIR = "public"
PRIVATE_DIR = "private"
ADMIN_KEY_FILE = "admin.key"
ADMIN_KEY_PREFIX = "prism-admin-"
_ADMIN_RE = re.compile(r"^prism-admin-[A-Za-z0-9_-]{43}$")  # prefix + secrets.token_urlsafe(32)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeyFileError(ValueError):
    """Missing, malformed or inconsistent key files."""


def _check_name(name: str) -> str:
    # names become file names: no separators, no leading dot
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise KeyFileError(f"server name {name!r} cannot name a key file; use letters, digits, '_', '.', '-'")
    return name


@dataclass(frozen=True)
class CurveIdentity:
    """One server's keypair (z85 bytes) plus the folder of the cluster's public keys."""

    name: str
    public_key: bytes
    secret_key: bytes
    public_dir: Path

    def peer_key(self, peer: str) -> bytes:
        """The public key of server `peer` (z85), read from `public_dir/<peer>.key`."""
        path = self.public_dir / f"{_check_name(peer)}.key"
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise KeyFileError(f"no public key for peer {peer!r}: {e}") from None
        if len(public) != 40:
            raise KeyFileError(f"{path} is torn or corrupt (a public key has 40 z85 characters)")
        return public

    def apply_server(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server with this keypair (before bind)."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def apply_client(self, sock: zmq.Socket, peer: str, server_key: bytes | None = None) -> None:
        """Make `sock` a CURVE client of `peer` with this keypair (before connect)."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = server_key if server_key is not None else self.peer_key(peer)


def make_cluster_keys(
    out_dir: str | os.PathLike[str], server_names: Iterable[str], *, overwrite: bool = False
) -> dict[str, Path]:
    """Write one keypair per server under `out_dir`; return {name: secret certificate path}.

    Refuses to replace existing keys unless `overwrite` (new keys lock out servers still using the old
    ones). Include every process that calls a peer (e.g. the coordinator) in `server_names`.
    """
    names = [_check_name(n) for n in server_names]
    if not names:
        raise KeyFileError("no server names given")
    if len(set(names)) != len(names):
        raise KeyFileError(f"duplicate server names: {names}")
    out = Path(out_dir)
    pub, priv = out / PUBLIC_DIR, out / PRIVATE_DIR
    existing = [p for n in names for p in (pub / f"{n}.key", priv / f"{n}.key_secret") if p.exists()]
    if existing and not overwrite:
        raise KeyFileError(f"keys already exist ({existing[0]}); pass overwrite=True (`prism keys --overwrite`) "
                           f"to replace them")
    pub.mkdir(parents=True, exist_ok=True)
    priv.mkdir(parents=True, exist_ok=True)
    os.chmod(priv, 0o700)
    result: dict[str, Path] = {}
    # create_certificates writes both files side by side; generate in a private temp dir, then write each
    # file atomically (a crash never leaves a torn key behind)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        os.chmod(tmp, 0o700)
        for n in names:
            public_file, secret_file = zmq.auth.create_certificates(tmp, n)
            atomic_write_bytes(pub / f"{n}.key", Path(public_file).read_bytes())
            atomic_write_bytes(priv / f"{n}.key_secret", Path(secret_file).read_bytes(), mode=0o600)
            result[n] = priv / f"{n}.key_secret"
    return result


def make_admin_key(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a new admin credential to `path` (mode 0600) and return the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} already exists; pass overwrite=True (`prism keys --overwrite`) to replace it "
                           f"(servers and the coordinator must then all be given the new one)")
    return atomic_write_text(path, ADMIN_KEY_PREFIX + secrets.token_urlsafe(32) + "\n", mode=0o600)


def read_admin_key(path: str | os.PathLike[str]) -> str:
    """The admin credential in `path` (written by `make_admin_key`); a torn or foreign file is refused."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the admin key file {path}: {e}") from None
    if not _ADMIN_RE.match(text):
        raise KeyFileError(f"{path} is not a prism-moe admin key (torn or foreign file: it must be one line "
                           f"'{ADMIN_KEY_PREFIX}' + 43 characters); make one with `prism keys --cluster C.yaml "
                           f"--out DIR` (DIR/{ADMIN_KEY_FILE})")
    return text


def load_identity(keys_dir: str | os.PathLike[str], name: str) -> CurveIdentity:
    """Load server `name`'s keypair from `keys_dir/private` and check it matches `keys_dir/public`."""
    keys = Path(keys_dir)
    secret_file = keys / PRIVATE_DIR / f"{_check_name(name)}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"cannot load the secret key of {name!r}: {e}") from None
    if secret is None:
        raise KeyFileError(f"{secret_file} holds no secret key")
    if len(public) != 40 or len(secret) != 40 or not _derives(secret, public):  # a torn or edited file
        raise KeyFileError(f"{secret_file} is torn or corrupt: its secret key does not give its public key; "
                           f"make new keys with `prism keys --overwrite`")
    ident = CurveIdentity(name=name, public_key=public, secret_key=secret, public_dir=keys / PUBLIC_DIR)
    if ident.peer_key(name) != public:
        raise KeyFileError(f"{secret_file} does not match {ident.public_dir / (name + '.key')}")
    return ident


def _derives(secret: bytes, public: bytes) -> bool:
    try:
        return zmq.curve_public(secret) == public
    except (ValueError, zmq.ZMQError):
        return False


def start_authenticator(context: zmq.Context, public_dir: str | os.PathLike[str]) -> ThreadAuthenticator:
    """Start a ZAP authenticator (a thread of its own) on `context` accepting only CURVE clients whose key
    is in `public_dir`. Start it before any CURVE server socket of that context binds (without a ZAP
    handler libzmq would accept any key). One per context.
    """
    certs = zmq.auth.load_certificates(public_dir)  # raises OSError for a missing folder
    if not certs:
        raise KeyFileError(f"no public keys (*.key) in {public_dir}: every client would be refused")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(public_dir))
    return auth
