"""Write the agents' files that differ, in one run: each beside its target, its owner and mode set, an agent
config checked by `amoskys config check`, then renamed over the target. The files come as JSON on standard
input (path, content, mode, group, config: the component it is checked as, e.g. agent-flow), never on a command line (the snmp config holds communities and
keys). Prints "wrote PATH" for each; exits non-zero at the first refused or failed file."""

import grp
import json
import os
import subprocess
import sys


def write(item: dict, check: list) -> None:
    path = item["path"]
    temporary = f"{os.path.dirname(path)}/.{os.path.basename(path)}.new"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(item["content"])
        os.chown(temporary, 0, grp.getgrnam(item["group"]).gr_gid)
        os.chmod(temporary, int(item["mode"], 8))
        if item.get("config"):
            command = [*check, "--component", item["config"], temporary]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                sys.exit(f"{path}: refused by amoskys config check: {result.stderr.strip() or result.stdout.strip()}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    print(f"wrote {path}")


def main() -> None:
    check = [sys.argv[1], "config", "check", "--quiet"]
    for item in json.load(sys.stdin):
        write(item, check)


main()
