"""`relay check-config FILE`: prints the resolved configuration (exit 0) or names the bad
key (exit 2)."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

GOOD = """
[[listener]]
address = "127.0.0.1:18080"

[admin]
address = "127.0.0.1:19090"

[timeouts]
handshake = "5s"
idle = "2m"

[limits]
max_connections = 1000
max_head_bytes = "8KiB"

[[pool]]
name = "chat"
origins = ["127.0.0.1:9000", "127.0.0.1:9001"]
balance = "least-connections"

[[pool]]
name = "api"
origins = ["127.0.0.1:9100"]

[[route]]
host = "*.example.com"
path = "/chat"
pool = "chat"

[[route]]
name = "everything-else"
pool = "api"
"""


def check_config(relay_bin, path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(relay_bin), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
    )


def resolved(stdout: str) -> dict:
    return tomllib.loads(stdout)


def test_good_file_prints_resolved_config_and_exits_0(relay_bin, tmp_path):
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    r = check_config(relay_bin, f)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first == f"# {f}: valid; resolved configuration follows"
    c = resolved(r.stdout)
    # What the file said...
    assert c["listener"][0]["address"] == "127.0.0.1:18080"
    assert c["timeouts"]["handshake"] == "5s"
    assert c["timeouts"]["idle"] == "2m"
    assert c["limits"]["max_connections"] == 1000
    assert c["limits"]["max_head_bytes"] == 8192  # "8KiB" resolved to bytes
    assert c["pool"][0]["origins"] == ["127.0.0.1:9000", "127.0.0.1:9001"]
    assert c["pool"][0]["balance"] == "least-connections"
    assert [(r["host"], r["path"], r["pool"]) for r in c["route"]] == [
        ("*.example.com", "/chat", "chat"),
        ("*", "/", "api"),
    ]
    assert c["route"][1]["name"] == "everything-else"
    # ...and the defaults it did not say, filled in.
    assert c["data_path"] == "copy"
    assert c["listener"][0]["backlog"] == 4096
    assert c["timeouts"]["origin_connect"] == "5s"
    assert c["timeouts"]["origin_handshake"] == "10s"
    assert c["timeouts"]["half_closed"] == "30s"
    assert c["timeouts"]["drain"] == "30s"
    assert c["pool"][1]["balance"] == "round-robin"
    assert c["route"][0]["name"] == "route0"
    assert r.stderr == ""


def test_resolved_output_is_itself_a_valid_config(relay_bin, tmp_path):
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    first = check_config(relay_bin, f)
    assert first.returncode == 0, first.stderr
    again = tmp_path / "resolved.toml"
    again.write_text(first.stdout)
    second = check_config(relay_bin, again)
    assert second.returncode == 0, second.stderr
    # Resolving is idempotent: the same configuration both times.
    assert resolved(second.stdout) == resolved(first.stdout)


BAD = [
    (
        "unknown pool",
        GOOD.replace('pool = "chat"', 'pool = "nope"'),
        ["route[0].pool", 'no pool named "nope"', '"chat"', '"api"'],
    ),
    (
        "bad duration",
        GOOD.replace('idle = "2m"', 'idle = "two minutes"'),
        ["timeouts.idle"],
    ),
    (
        "bad listener address",
        GOOD.replace('address = "127.0.0.1:18080"', 'address = "localhost"'),
        ["listener[0].address"],
    ),
    (
        "bad host pattern",
        GOOD.replace('host = "*.example.com"', 'host = "exa mple.com"'),
        ["route[0].host"],
    ),
    (
        "unknown key",
        GOOD.replace("max_connections = 1000", "max_conections = 1000"),
        ["max_conections"],
    ),
]


@pytest.mark.parametrize("text,needles", [(t, n) for _, t, n in BAD], ids=[b[0] for b in BAD])
def test_bad_file_exits_2_naming_the_key(relay_bin, tmp_path, text, needles):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = check_config(relay_bin, f)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith(f"relay: {f}: "), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_unknown_pool_message_names_route_0_pool(relay_bin, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace('pool = "chat"', 'pool = "nope"'))
    r = check_config(relay_bin, f)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f'relay: {f}: route[0].pool: no pool named "nope" (pools: "chat", "api")'
    )


def test_missing_file_exits_2(relay_bin, tmp_path):
    r = check_config(relay_bin, tmp_path / "absent.toml")
    assert r.returncode == 2
    assert "cannot read" in r.stderr and "absent.toml" in r.stderr


def test_running_with_a_bad_config_exits_2_without_starting(relay_bin, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace('pool = "chat"', 'pool = "nope"'))
    r = subprocess.run(
        [str(relay_bin), "--config", str(f)], capture_output=True, text=True, timeout=10
    )
    assert r.returncode == 2
    assert "route[0].pool" in r.stderr
    assert "relay ready" not in r.stderr
