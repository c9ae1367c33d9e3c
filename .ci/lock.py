"""The lock behind every install (`make test`, `make demo`, CI): requirements.lock, fully pinned and hashed.

    python .ci/lock.py compile [--upgrade]   # `make lock` / `make lock-upgrade`: regenerate it with uv
    python .ci/lock.py check                 # `make venv`: refuse a lock older than its inputs, or a wrong Python
    python .ci/lock.py verify VENV_PYTHON    # `make venv`: the venv holds exactly the locked versions
    python .ci/lock.py digest                # the inputs' digest (the lock's last line)

Inputs: the four pyproject.toml files (dependencies and the extras `make test` installs), constraints.txt,
requirements-extra.txt and requirements-nodeps.txt. The lock's last line records a digest of them, so a lock
that was not regenerated after an input changed is caught before anything is installed. See docs/install.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYTHON = "3.11"  # the torch CPU wheel pinned in constraints.txt is a cp311 manylinux_2_28 x86_64 build
PLATFORM = "x86_64-manylinux_2_28"
# the projects in this tree, installed editable with --no-deps; everything they need comes from the lock
LOCAL = {
    ".": "gist-memory",
    "integrations/llama-index-llms-gist-memory": "llama-index-llms-gist-memory",
    "integrations/llama-index-retrievers-gist-memory": "llama-index-retrievers-gist-memory",
    "integrations/langchain-gist-memory": "langchain-gist-memory",
}
EXTRAS = {".": "llama-index,langchain,dev", "integrations/langchain-gist-memory": "test"}
REQUIREMENTS = ["constraints.txt", "requirements-extra.txt", "requirements-nodeps.txt"]
# the resolver's input; setuptools is the build backend of the editable installs (--no-build-isolation)
LOCK_INPUT = (
    "-c constraints.txt\n"
    + "".join(f"-e {path}{'[' + EXTRAS[path] + ']' if path in EXTRAS else ''}\n" for path in LOCAL)
    + "-r requirements-extra.txt\nsetuptools\n"
)
DIGEST_PREFIX = "# inputs sha256="


def digest() -> str:
    import tomllib

    h = hashlib.sha256(LOCK_INPUT.encode())
    for path in LOCAL:
        project = tomllib.loads((ROOT / path / "pyproject.toml").read_text())["project"]
        keep = {k: project.get(k) for k in ("name", "requires-python", "dependencies", "optional-dependencies")}
        h.update(json.dumps(keep, sort_keys=True).encode())
    for name in REQUIREMENTS:
        h.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return h.hexdigest()


def _uv() -> str:
    uv = os.environ.get("UV", "uv")
    try:
        subprocess.run([uv, "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"uv not found ({uv!r}); `make lock` installs the pinned one, or set UV=/path/to/uv")
    return uv


def compile_lock(upgrade: bool) -> None:
    uv = _uv()
    common = ["--generate-hashes", "--python-version", PYTHON, "--python-platform", PLATFORM,
              # like pip here: every index and find-links location counts, the best version wins
              "--index-strategy", "unsafe-best-match", "--custom-compile-command", "make lock", "--quiet"]
    # where torch's CPU wheel is found: pip's find-links here (/opt/wheels), or e.g.
    # LOCK_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu on a machine without it
    for link in os.environ.get("LOCK_FIND_LINKS", os.environ.get("PIP_FIND_LINKS", "")).split():
        common += ["--find-links", link]
    for url in os.environ.get("LOCK_EXTRA_INDEX_URL", "").split():
        common += ["--extra-index-url", url]
    with tempfile.TemporaryDirectory() as tmp:
        main, nodeps = Path(tmp) / "main.txt", Path(tmp) / "nodeps.txt"
        if LOCK.exists():  # keep every pin that still fits (uv prefers versions already in the output file)
            main.write_bytes(LOCK.read_bytes())
            nodeps.write_bytes(LOCK.read_bytes())
        up = ["--upgrade"] if upgrade else []
        no_emit = [arg for name in LOCAL.values() for arg in ("--no-emit-package", name)]
        subprocess.run([uv, "pip", "compile", "-", *common, *up, *no_emit, "-o", str(main)],
                       input=LOCK_INPUT, text=True, cwd=ROOT, check=True)
        subprocess.run([uv, "pip", "compile", "requirements-nodeps.txt", "--no-deps", "--no-header", *common, *up,
                        "-o", str(nodeps)], cwd=ROOT, check=True)
        text = main.read_text().rstrip("\n") + "\n\n"
        text += "# --- installed like everything above with --no-deps; their declared dependencies are not wanted ---\n"
        text += "".join(line for line in nodeps.read_text().splitlines(True) if not line.startswith(DIGEST_PREFIX))
        text = text.rstrip("\n") + f"\n{DIGEST_PREFIX}{digest()}\n"
    LOCK.write_text(text)
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(locked())} packages")


def locked() -> dict[str, str]:
    """{normalised name: version} of every package in the lock."""
    out = {}
    for line in LOCK.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split(" ")[0].split("==")
            out[_norm(name)] = version
    return out


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def check() -> None:
    """Run by the interpreter that creates the venv."""
    if "{}.{}".format(*sys.version_info[:2]) != PYTHON:
        sys.exit(f"requirements.lock is for Python {PYTHON} (torch's CPU wheel); this is {sys.version.split()[0]}: "
                 f"make PY=python{PYTHON} ...")
    if not LOCK.exists():
        sys.exit("requirements.lock is missing: run `make lock`")
    recorded = [line[len(DIGEST_PREFIX):] for line in LOCK.read_text().splitlines() if line.startswith(DIGEST_PREFIX)]
    if recorded != [digest()]:
        sys.exit("requirements.lock is older than pyproject.toml / requirements-*.txt / constraints.txt: "
                 "run `make lock` and commit the result (docs/install.md)")


def verify(python: str) -> None:
    """Every locked package installed at its locked version (the lock is complete: uv resolved it)."""
    script = ("import json, importlib.metadata as m; print(json.dumps({d.metadata['Name']: d.version "
              "for d in m.distributions()}))")
    got = json.loads(subprocess.run([python, "-c", script], capture_output=True, text=True, check=True).stdout)
    have = {_norm(k): v for k, v in got.items()}
    want = locked()
    wrong = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
    if wrong:
        sys.exit("venv differs from requirements.lock: " + ", ".join(f"{k} {h} (locked {v})" for k, (v, h) in wrong.items()))
    extra = sorted(set(have) - set(want) - {_norm(n) for n in LOCAL.values()} - {"pip"})
    if extra:  # left from earlier installs (a fresh venv has none): harmless to the tests, but not locked
        print("note: installed but not in requirements.lock:", " ".join(extra))


def main(argv: list[str]) -> None:
    cmd = argv[0] if argv else ""
    if cmd == "compile":
        compile_lock(upgrade="--upgrade" in argv)
    elif cmd == "check":
        check()
    elif cmd == "digest":
        print(digest())
    elif cmd == "verify" and len(argv) == 2:
        verify(argv[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
