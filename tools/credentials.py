"""Generate the stack's secrets on its first start; the compose `secrets` service runs it.

    python tools/credentials.py /secrets-root/<compose project>

Files, each readable by its owner only, in ./.secrets/<compose project>/ (never tracked):
  api-auth-string      user:password of Prefect's API: server, workers, CLI, tests, benchmark
  postgres-password    the Prefect server's database password
  registry-password    the registry user's password; registry-htpasswd holds its bcrypt hash
Existing files are kept, so secrets survive restarts and `down`; to rotate them, stop the stack,
delete the directory and start it again. The files belong to the owner of ./.secrets (the user
who cloned the repository), so host tools can read them without root.
"""

import os
import secrets
import sys
from pathlib import Path

import bcrypt

API_USER, REGISTRY_USER = "admin", "pipeline"


def generate(directory: Path) -> dict[str, str]:
    """The secrets missing from `directory`, by file name."""
    new = {}
    if not (directory / "api-auth-string").exists():
        new["api-auth-string"] = f"{API_USER}:{secrets.token_urlsafe(24)}"
    if not (directory / "postgres-password").exists():
        new["postgres-password"] = secrets.token_urlsafe(24)
    if not all((directory / name).exists() for name in ("registry-password", "registry-htpasswd")):
        password = secrets.token_urlsafe(24)  # the password and its hash only ever change together
        new["registry-password"] = password
        new["registry-htpasswd"] = f"{REGISTRY_USER}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}"
    return new


def main(directory: Path) -> None:
    owner = directory.parent.stat()
    directory.mkdir(mode=0o700, exist_ok=True)
    for name, value in generate(directory).items():
        (directory / name).write_text(value + "\n")
        print(f"generated {name}")
    for path in [directory, *directory.iterdir()]:
        path.chmod(0o700 if path.is_dir() else 0o600)
        # The host user owns them; the stack's containers run as root and read them anyway.
        os.chown(path, owner.st_uid, owner.st_gid)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
