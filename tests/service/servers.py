"""Where the server binaries of the fault tests are: ``redis-server`` and PostgreSQL's ``initdb``
and ``pg_ctl`` (standard library only, so ``scripts/ensure-services.sh`` can ask it before the
test dependencies matter).

    python tests/service/servers.py            # what was found, or why not; exit 1 if anything is missing
    python tests/service/servers.py --apt      # the Debian packages that would provide what is missing

Search order:
  redis-server  $TRAINYARD_TEST_REDIS_SERVER (a path), else PATH.
  PostgreSQL    $TRAINYARD_TEST_PG_BIN (a directory), else the directory of ``initdb`` on PATH,
                else ``pg_config --bindir``, else the usual install places: Debian/Ubuntu
                /usr/lib/postgresql/<v>/bin, RHEL/PGDG /usr/pgsql-<v>/bin, Homebrew's keg-only
                /opt/homebrew/opt/postgresql@<v>/bin and /usr/local/opt/postgresql@<v>/bin, and
                /usr/local/pgsql/bin (a source build); the newest version first.
As root, ``initdb`` must run as another user: the ``postgres`` user must exist."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PG_PLACES = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql*/bin",
    "/usr/local/opt/postgresql*/bin",
    "/usr/local/pgsql/bin",
)
PG_TOOLS = ("initdb", "pg_ctl")
APT_PACKAGES = {"redis": "redis-server", "postgres": "postgresql"}


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _has_pg_tools(directory: Path) -> bool:
    return all(_executable(directory / tool) for tool in PG_TOOLS)


def _version_key(path: str) -> tuple[int, ...]:
    """Newest first for '/usr/lib/postgresql/9.6/bin' vs '.../15/bin' (numbers, not text)."""
    return tuple(int(n) for n in re.findall(r"\d+", path))


def redis_server() -> Path | None:
    explicit = os.environ.get("TRAINYARD_TEST_REDIS_SERVER")
    if explicit:
        return Path(explicit) if _executable(Path(explicit)) else None
    found = shutil.which("redis-server")
    return Path(found) if found else None


def pg_bin() -> Path | None:
    """A directory holding PostgreSQL's initdb and pg_ctl."""
    explicit = os.environ.get("TRAINYARD_TEST_PG_BIN")
    if explicit:
        return Path(explicit) if _has_pg_tools(Path(explicit)) else None
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    for pattern in PG_PLACES:
        candidates += [Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True)]
    return next((c for c in candidates if _has_pg_tools(c)), None)


def _postgres_user_missing() -> bool:
    if os.geteuid() != 0:
        return False
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return True
    return False


def missing() -> dict[str, str]:
    """What is missing, by server ('redis', 'postgres'), with why."""
    out: dict[str, str] = {}
    if redis_server() is None:
        out["redis"] = "redis-server not found (looked at $TRAINYARD_TEST_REDIS_SERVER and PATH)"
    if pg_bin() is None:
        out["postgres"] = (
            f"PostgreSQL server binaries ({', '.join(PG_TOOLS)}) not found (looked at $TRAINYARD_TEST_PG_BIN, PATH, "
            f"pg_config --bindir, {', '.join(PG_PLACES)})"
        )
    elif _postgres_user_missing():
        out["postgres"] = "running as root and there is no 'postgres' user to run initdb as"
    return out


def missing_servers() -> str | None:
    """Why private servers cannot be started here (None if they can)."""
    gaps = missing()
    if not gaps:
        return None
    return "; ".join(gaps.values()) + " (CI installs them: scripts/ensure-services.sh with CI=true)"


def main(argv: list[str]) -> int:
    gaps = missing()
    if "--apt" in argv:
        print(" ".join(APT_PACKAGES[name] for name in gaps))
        return 0
    print(f"redis-server: {redis_server() or gaps.get('redis')}")
    print(f"postgresql:   {pg_bin() if 'postgres' not in gaps else gaps['postgres']}")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
