#!/usr/bin/env python3
"""Fails when a package of the locked dependency graph needs a newer Rust than the
workspace's `rust-version`.

    cargo metadata --format-version 1 --locked --all-features | python3 scripts/msrv-deps.py

Only one toolchain is installed where CI runs, so the MSRV is not checked by building
with the older compiler. Two checks stand in for that build: clippy's
`incompatible_msrv` lint, which reads `rust-version` and flags a use of a standard
library API stabilised after it, and this script, which reads the `rust-version` that
every dependency in Cargo.lock declares (`rust_version` in `cargo metadata`) and fails
when one is newer than the workspace's. Neither sees a language feature newer than the
MSRV in our own code; the version the workspace declares is the oldest the locked
dependencies allow, so a build on it stays one `rustup` away.
"""

import json
import sys


def parse(version):
    """'1.89' or '1.89.0' as a comparable tuple (1, 89, 0)."""
    parts = [int(p) for p in version.split("-")[0].split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    metadata = json.load(sys.stdin)
    members = set(metadata["workspace_members"])
    packages = metadata["packages"]
    declared = {p["rust_version"] for p in packages if p["id"] in members}
    if None in declared or len(declared) != 1:
        print(f"workspace members declare rust-version {sorted(map(str, declared))}: "
              "expected one, inherited from [workspace.package]", file=sys.stderr)
        return 1
    msrv = declared.pop()
    newer = sorted(
        (p["name"], p["version"], p["rust_version"])
        for p in packages
        if p["id"] not in members
        and p["rust_version"] is not None
        and parse(p["rust_version"]) > parse(msrv)
    )
    for name, version, needs in newer:
        print(f"{name} {version} needs Rust {needs}, newer than the workspace's "
              f"rust-version {msrv}", file=sys.stderr)
    if newer:
        print("raise rust-version in Cargo.toml, or lock older versions "
              "(cargo update -p <name> --precise <version>)", file=sys.stderr)
        return 1
    checked = sum(1 for p in packages if p["id"] not in members)
    print(f"rust-version {msrv}: the {checked} locked dependencies all build with it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
