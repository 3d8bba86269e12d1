"""Every file popproxy creates: exclusive, 0600, never through a symlink, never clobbered."""

from __future__ import annotations

import errno
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from popproxy import fsutil
from popproxy.capture.reader import CaptureReader
from popproxy.capture.writer import create_capture_file
from popproxy.cli.main import main
from popproxy.inspect.eml import export_eml
from popproxy.tls import contexts
from popproxy.tls.ca import CA_CERT_NAME, CA_KEY_NAME, CAError, CertificateAuthority
from tests.test_export import HEADER, fixture_capture, fixture_steps, load, make_capture

SECRET = b"the victim's file\n"
FILE_EXPORTS = ("text", "html", "pcap")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file an attacker would like popproxy to overwrite (or create) through a symlink."""
    path = tmp_path / "victim"
    path.write_bytes(SECRET)
    return path


@pytest.fixture(autouse=True)
def loose_umask() -> Iterator[None]:
    """A umask that would make files world-readable: modes must not depend on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def untouched(victim: Path) -> bool:
    return victim.read_bytes() == SECRET


# --------------------------------------------------------------------- the helper


def test_create_refuses_a_symlink_even_a_dangling_one(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "live").symlink_to(victim)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("live", "dangling"):
        with pytest.raises(fsutil.Exists):
            fsutil.create(tmp_path / name)
    assert untouched(victim) and not (tmp_path / "nowhere").exists()
    fd = fsutil.create(tmp_path / "new")
    os.close(fd)
    assert mode(tmp_path / "new") == 0o600


def test_capture_file_is_created_exclusively_0600(tmp_path: Path, victim: Path) -> None:
    planted = tmp_path / "20260101T000000.000000Z-00001.popcap"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        create_capture_file(planted)
    assert untouched(victim)
    fresh = tmp_path / "20260101T000000.000001Z-00001.popcap"
    os.close(create_capture_file(fresh))
    assert mode(fresh) == 0o600


def test_output_file_publishes_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), fsutil.output_file(target) as f:
        f.write(b"half")
        raise RuntimeError("the export failed")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file
    with fsutil.output_file(target) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole" and mode(target) == 0o600
    with pytest.raises(fsutil.Exists), fsutil.output_file(target) as f:
        f.write(b"again")
    assert target.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_move_file_across_file_systems_replaces_a_symlink_not_its_target(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "new.popcap", tmp_path / "fixture.popcap"
    src.write_bytes(b"capture")
    dst.symlink_to(victim)
    real_replace = os.replace
    calls = []

    def cross_device(a: object, b: object, **kw: object) -> None:
        calls.append(a)
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", cross_device)
    fsutil.move_file(src, dst)
    assert len(calls) == 2 and not src.exists()
    assert not dst.is_symlink() and dst.read_bytes() == b"capture" and mode(dst) == 0o600
    assert untouched(victim)


# ------------------------------------------------------------------------ exports


def export(cap: Path, *args: str) -> int:
    return main(["export", str(cap), *args])


@pytest.mark.parametrize("kind", FILE_EXPORTS)
def test_file_export_refuses_a_planted_symlink(
    tmp_path: Path, victim: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    target = tmp_path / f"out.{kind}"
    target.symlink_to(victim)
    assert export(cap, f"--{kind}", str(target)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; nothing was overwritten" in err[0] and "--force" in err[0]
    assert untouched(victim) and target.is_symlink()
    # --force replaces the name (the symlink itself), never what it points to.
    assert export(cap, f"--{kind}", str(target), "--force") == 0
    assert untouched(victim) and not target.is_symlink() and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("kind", FILE_EXPORTS)
def test_file_export_never_overwrites_silently(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    target = tmp_path / f"out.{kind}"
    target.write_bytes(b"earlier work")
    assert export(cap, f"--{kind}", str(target)) == 2
    assert target.read_bytes() == b"earlier work"
    assert str(target) in capsys.readouterr().err
    assert export(cap, f"--{kind}", str(target), "--force") == 0
    assert target.read_bytes() != b"earlier work" and mode(target) == 0o600


def test_streams_refuse_planted_symlinks(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    out = tmp_path / "raw"
    out.mkdir()
    (out / "server.bin").symlink_to(victim)
    assert export(cap, "--streams", str(out)) == 2
    assert "server.bin exists" in capsys.readouterr().err
    assert untouched(victim) and sorted(p.name for p in out.iterdir()) == ["server.bin"]
    assert export(cap, "--streams", str(out), "--force") == 0
    assert untouched(victim)
    for name in ("client.bin", "server.bin"):
        assert not (out / name).is_symlink() and mode(out / name) == 0o600
    assert (out / "server.bin").read_bytes().startswith(b"+OK")


def eml_names(cap: Path, tmp_path: Path) -> list[str]:
    scratch = tmp_path / f"scratch-{cap.stem}"
    with CaptureReader(cap) as reader:
        return [p.name for p in export_eml(reader, scratch).written]


def test_eml_refuses_planted_symlinks_at_final_names(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    names = eml_names(cap, tmp_path)
    out = tmp_path / "mail"
    out.mkdir()
    (out / names[1]).symlink_to(victim)
    assert export(cap, "--eml", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names[1] in err[0]
    assert untouched(victim)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp left behind
    assert export(cap, "--eml", str(out), "--force") == 0
    assert untouched(victim)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for p in out.iterdir():
        assert not p.is_symlink() and mode(p) == 0o600


def test_eml_temp_names_cannot_be_planted(tmp_path: Path, victim: Path) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    out = tmp_path / "mail"
    out.mkdir()
    # Every name the old exporter used for its temp files (pid and sequence number).
    for seq in range(1, 40):
        (out / f".popproxy-{os.getpid()}-{seq}.eml.tmp").symlink_to(victim)
    assert export(cap, "--eml", str(out)) == 0
    assert untouched(victim)
    assert len([p for p in out.iterdir() if not p.is_symlink()]) == 4


def test_two_captures_from_the_same_second_export_side_by_side(tmp_path: Path) -> None:
    steps = fixture_steps(load("poplib_userpass"))
    # The names popproxy gives two sessions started in the same second.
    a = make_capture(tmp_path / "20240101T100000.120000Z-00001.popcap", steps)
    b = make_capture(tmp_path / "20240101T100000.870000Z-00002.popcap", steps)
    out = tmp_path / "mail"
    assert export(a, "--eml", str(out)) == 0
    assert export(b, "--eml", str(out)) == 0
    files = sorted(out.iterdir())
    assert len(files) == 8  # four messages from each, none replaced
    assert HEADER["t0"] == 1704103200.0  # both sessions started in that second
    assert sum(p.name.startswith(f"{a.stem}-") for p in files) == 4
    assert sum(p.name.startswith(f"{b.stem}-") for p in files) == 4
    assert all(mode(p) == 0o600 for p in files)
    # The same capture again: refused, not duplicated and not overwritten.
    assert export(a, "--eml", str(out)) == 2
    assert len(list(out.iterdir())) == 8


def test_every_export_is_0600(tmp_path: Path) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--eml", str(out / "mail"), "--streams", str(out / "raw")]
    for kind in FILE_EXPORTS:
        args += [f"--{kind}", str(out / f"t.{kind}")]
    assert export(cap, *args) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 4 + 2 + 3
    assert {mode(p) for p in files} == {0o600}
    assert mode(out / "mail") == 0o700 and mode(out / "raw") == 0o700


# ------------------------------------------------------------------------ key log


@pytest.fixture
def keylog_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    contexts._keylog_ready.cache_clear()
    yield
    contexts._keylog_ready.cache_clear()
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)


def keylog_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    contexts._apply_keylog(ctx)
    return ctx


def test_keylog_is_created_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keylog_env: None
) -> None:
    path = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(path))
    assert keylog_context().keylog_filename == str(path)
    assert mode(path) == 0o600


def test_keylog_existing_file_is_tightened_and_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keylog_env: None
) -> None:
    path = tmp_path / "keys.log"
    path.write_bytes(b"CLIENT_RANDOM earlier\n")
    path.chmod(0o644)
    monkeypatch.setenv("SSLKEYLOGFILE", str(path))
    assert keylog_context().keylog_filename == str(path)
    assert mode(path) == 0o600 and path.read_bytes() == b"CLIENT_RANDOM earlier\n"


def test_keylog_through_a_symlink_is_refused_once(
    tmp_path: Path,
    victim: Path,
    monkeypatch: pytest.MonkeyPatch,
    keylog_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for target in (victim, tmp_path / "not-yet"):
        contexts._keylog_ready.cache_clear()
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        monkeypatch.setenv("SSLKEYLOGFILE", str(link))
        assert keylog_context().keylog_filename is None
        assert keylog_context().keylog_filename is None
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "symlink" in err[0] and "not logged" in err[0]
    assert untouched(victim) and not (tmp_path / "not-yet").exists()


# ---------------------------------------------------------------------------- CA


def test_ca_files_modes(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.load_or_create(ca_dir)
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / CA_KEY_NAME) == 0o600 and mode(ca_dir / CA_CERT_NAME) == 0o644
    assert mode(ca_dir / ".lock") == 0o600
    assert not [p for p in ca_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", [CA_KEY_NAME, CA_CERT_NAME, ".lock"])
def test_ca_never_writes_through_a_planted_symlink(tmp_path: Path, victim: Path, name: str) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir(mode=0o700)
    (ca_dir / name).symlink_to(tmp_path / "planted")  # dangling: would be created through
    with pytest.raises(CAError):
        CertificateAuthority.load_or_create(ca_dir)
    assert not (tmp_path / "planted").exists()
    (ca_dir / name).unlink()
    (ca_dir / name).symlink_to(victim)
    with pytest.raises(CAError):
        CertificateAuthority.load_or_create(ca_dir)
    assert untouched(victim)
