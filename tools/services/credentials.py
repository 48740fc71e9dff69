"""Generate the stack's secrets on its first start; the compose `secrets` service runs it.

    python tools/services/credentials.py /secrets /secrets-root/<compose project> /pgdata

The secrets live in the stack's `secrets` volume, beside the database they unlock, so a second
clone of the repository (or one whose ./.secrets was deleted) starts the same stack. Each `up`
copies them to ./.secrets/<compose project>/ (never tracked), where host tools read them:
  api-auth-string      user:password of Prefect's API (the server checks it): workers, the gateway's
                       authority, CLI, tests, benchmark; never a flow container
  flow-run-key         the key of the flow containers' credentials, one per run: the workers mint
                       them, the gateway's authority checks them (worker/pipeline_worker/authority.py)
  cache-key            the key that signs the step cache's entries and each run's output.json:
                       only main-flow containers get it, never a step's (main_flow/cache.py)
  postgres-password    the Prefect server's database password
  registry-password    the registry user's password; registry-htpasswd holds its bcrypt hash
A stack made before the volume existed has them only in ./.secrets/<project>/: they are adopted.
"""

import os
import secrets
import shutil
import sys
from pathlib import Path

import bcrypt

API_USER, REGISTRY_USER = "admin", "pipeline"
NAMES = ("api-auth-string", "flow-run-key", "cache-key", "postgres-password", "registry-password", "registry-htpasswd")
KEYS = ("flow-run-key", "cache-key")  # added after the first stacks: made where missing


def generate(directory: Path) -> dict[str, str]:
    """The secrets missing from `directory`, by file name."""
    new = {}
    if not (directory / "api-auth-string").exists():
        new["api-auth-string"] = f"{API_USER}:{secrets.token_urlsafe(24)}"
    for name in KEYS:
        if not (directory / name).exists():
            new[name] = secrets.token_hex(32)
    if not (directory / "postgres-password").exists():
        new["postgres-password"] = secrets.token_urlsafe(24)
    if not all((directory / name).exists() for name in ("registry-password", "registry-htpasswd")):
        password = secrets.token_urlsafe(24)  # the password and its hash only ever change together
        new["registry-password"] = password
        new["registry-htpasswd"] = f"{REGISTRY_USER}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}"
    return new


def main(volume: Path, mirror: Path, pgdata: Path) -> None:
    if not (volume / "postgres-password").exists():
        if all((mirror / name).is_file() for name in NAMES if name not in KEYS):  # older stacks lack them
            for name in NAMES:
                if (mirror / name).is_file():
                    shutil.copyfile(mirror / name, volume / name)
            print(f"adopted the secrets in ./.secrets/{mirror.name}/")
        elif (pgdata / "PG_VERSION").exists():
            # Postgres sets its password once, when it creates the database: a new one cannot open it.
            sys.exit(
                f"the stack's database (volume {mirror.name}_postgres-data) exists but its secrets are gone "
                f"(volume {mirror.name}_secrets and ./.secrets/{mirror.name}/): restore ./.secrets/{mirror.name}/ "
                "from the clone that first started the stack, or delete the stack's volumes to start anew "
                "(make clean)"
            )
    for name, value in generate(volume).items():
        (volume / name).write_text(value + "\n")
        print(f"generated {name}")
    owner = mirror.parent.stat()
    mirror.mkdir(mode=0o700, exist_ok=True)
    for name in NAMES:
        (volume / name).chmod(0o600)
        shutil.copyfile(volume / name, mirror / name)
    for path in [mirror, *mirror.iterdir()]:
        path.chmod(0o700 if path.is_dir() else 0o600)
        # The host user owns the copies; the stack's containers run as root and read the volume.
        os.chown(path, owner.st_uid, owner.st_gid)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
