"""The token lands in a real Secret Service (gnome-keyring on a private D-Bus), not in a file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOOLS = ("dbus-run-session", "gnome-keyring-daemon", "secret-tool")

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from hivemind_worker.credentials import CredentialStore
    from hivemind_worker.paths import default_paths

    paths = default_paths(Path(sys.argv[1]))
    paths.ensure()
    store = CredentialStore(paths, allow_plaintext_fallback=False)
    if sys.argv[2] == "set":
        store.set_token("127.0.0.1:50051", "alice", "token-from-test")
        print("backend:", store.backend_name)
    else:
        print("token:", store.get_token("127.0.0.1:50051", "alice"))
    """
)


def test_token_round_trips_through_gnome_keyring(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install {missing} (gnome-keyring, dbus, libsecret-tools)")
        pytest.skip(f"needs {missing}")
    script = tmp_path / "store.py"
    script.write_text(SCRIPT)
    home = tmp_path / "home"
    # Set in one process, read in another and with secret-tool: the secret lives in the
    # daemon, not in this process or a file.
    shell = (
        'printf "test-password" | gnome-keyring-daemon --unlock --components=secrets >/dev/null'
        f' && "{sys.executable}" "{script}" "{home}" set'
        f' && "{sys.executable}" "{script}" "{home}" get'
        " && printf 'lookup: ' && secret-tool lookup service hivemind-worker"
        " username alice@127.0.0.1:50051 && echo"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "PYTHON_KEYRING"))}
    env["HOME"] = str(tmp_path)  # gnome-keyring keeps its collection under HOME
    done = subprocess.run(
        ["dbus-run-session", "--", "sh", "-c", shell],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "backend: SecretService Keyring" in lines
    assert "token: token-from-test" in lines
    assert "lookup: token-from-test" in lines
    assert not list(home.rglob("credentials.cfg"))  # no plaintext fallback was used
