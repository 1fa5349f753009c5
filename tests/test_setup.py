"""scripts/setup-host.sh installs every external tool the tests, benchmarks and scripts run.

The tools are found in the code itself: the commands passed to subprocess / asyncio subprocesses and
`shutil.which` in Python, and the commands of the shell scripts (and Molecule's `command:` tasks). Each
must be listed in the script's package table, or come from a Debian package marked Essential (always
installed). A new tool without an install line fails here.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup-host.sh"
PYTHON_DIRS = ("tests", "benchmarks", "scripts", "molecule")
SUBPROCESS_CALLS = {
    "subprocess": {"run", "Popen", "call", "check_call", "check_output"},
    "asyncio": {"create_subprocess_exec"},
    "shutil": {"which"},
}  # testinfra's host.run() in molecule/ runs inside the machines (their rootfs): not the host's tools
BIN_DIRS = ("/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/")
SHELL_WORDS = {  # keywords and builtins: not tools
    "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac", "in", "function",
    "time", "!", "{", "}", "[[", "]]", "[", "]", "exec", "local", "export", "readonly", "declare", "echo", "printf",
    "read", "cd", "set", "shift", "exit", "return", "test", "true", "false", "wait", "kill", "trap", "source", ".",
    "eval", "break", "continue", "unset", "type", "hash", "umask", ":", "mapfile", "let", "shopt",
}  # fmt: skip


class Package(NamedTuple):
    name: str
    scope: str
    provides: tuple[str, ...]


def package_table() -> list[Package]:
    listing = subprocess.run([str(SETUP), "--list"], capture_output=True, text=True, check=True).stdout
    rows = [[cell.strip() for cell in line.split("|")] for line in listing.splitlines() if line.strip()]
    return [Package(name, scope, tuple(provides.split())) for name, scope, provides, _why in rows]


# ---- tools named in Python code -----------------------------------------------------------------


def _assignments(tree: ast.AST) -> dict[str, list[ast.expr]]:
    """Every `name = <list or tuple>` in a module, any scope (commands are often built first, run later)."""
    found: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List | ast.Tuple):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found.setdefault(target.id, []).append(node.value)
    return found


def _command_heads(node: ast.expr, names: dict[str, list[ast.expr]], depth: int = 0) -> Iterator[str]:
    """The executables a command expression runs: its first word, and the command `ip netns exec` wraps."""
    if depth > 3:
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.Name | ast.Starred):
        inner = node.value if isinstance(node, ast.Starred) else node
        if isinstance(inner, ast.Name):
            for value in names.get(inner.id, []):
                yield from _command_heads(value, names, depth + 1)
    elif isinstance(node, ast.List | ast.Tuple) and node.elts:
        words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
        yield from _command_heads(node.elts[0], names, depth + 1)
        if words[:3] == ["ip", "netns", "exec"] and len(node.elts) > 4:
            yield from _command_heads(node.elts[4], names, depth + 1)


def python_tools(source: str) -> set[str]:
    tree = ast.parse(source)
    names = _assignments(tree)
    tools: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute)):
            continue
        module = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        if node.func.attr in SUBPROCESS_CALLS.get(module, set()):
            tools.update(_command_heads(node.args[0], names))
    tools = {t.rsplit("/", 1)[1] if t.startswith(BIN_DIRS) else t for t in tools}
    return {t for t in tools if t and "/" not in t and not t.startswith("-")}


# ---- tools named in shell scripts ---------------------------------------------------------------

_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)")
_SPLIT = re.compile(r"\$\(|&&|\|\||[;|`{}]|(?:^|(?<=\s))[()](?=\s|$)")  # ( ) alone: a subshell
_CASE_PATTERN = re.compile(r"^\s*[\w|*\"'.-]+\)\s|\bcase\b.*?\bin\b[^)]*\)")
_QUOTED = re.compile(r"'[^']*'|\"[^\"$]*(?:\$(?!\()[^\"$]*)*\"")  # single-quoted; double-quoted without $(


def _shell_lines(text: str) -> Iterator[str]:
    """Lines of code: heredoc bodies, comments and case patterns left out."""
    ending = ""
    for line in text.splitlines():
        if ending:
            ending = "" if line.strip() == ending else ending
            continue
        if heredoc := _HEREDOC.search(line):
            ending = heredoc.group(1)
        code = _QUOTED.sub(" Q ", re.sub(r"(^|\s)#.*$", "", line))
        yield _CASE_PATTERN.sub(" ", code)


def shell_tools(text: str) -> set[str]:
    functions = set(re.findall(r"^\s*([\w-]+)\(\)\s*\{", text, re.MULTILINE))
    tools: set[str] = set()
    for line in _shell_lines(text):
        for segment in _SPLIT.split(line):
            words = segment.split()
            while words and (words[0] in SHELL_WORDS or re.match(r"^\w+=", words[0])):
                if words[0] in ("for", "case", "[", "[[", "local", "export", "readonly", "declare"):  # the rest is
                    # a word list, a condition or variable names (`local start found`)
                    words = []
                    break
                words = words[1:]
            if words[:2] == ["command", "-v"] and len(words) > 2:
                words = words[2:]
            if words and re.fullmatch(r"[a-z][\w.+-]*", words[0]) and words[0] not in functions:
                tools.add(words[0])
    return tools - SHELL_WORDS


def yaml_command_tools(text: str) -> set[str]:
    """Molecule's create/destroy run host commands through ansible.builtin.command."""
    commands = re.findall(r"ansible\.builtin\.(?:command|shell):[ \t]*(?:>-?\s*)?\"?([^\n\"]+)", text)
    argvs = re.findall(r"^\s*argv:\s*\[\s*\"?([^\",\]]+)", text, re.MULTILINE)  # the argv: [cmd, ...] form
    return {c.split()[0] for c in commands + argvs if c.split() and not c.startswith("{{")}


def tools_in_repository() -> dict[str, set[str]]:
    """Each tool and the files that run it."""
    found: dict[str, set[str]] = {}

    def note(tools: set[str], path: Path) -> None:
        for tool in tools:
            found.setdefault(tool, set()).add(str(path.relative_to(ROOT)))

    for directory in PYTHON_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            note(python_tools(path.read_text()), path)
    for path in [*sorted((ROOT / "scripts").rglob("*.sh")), ROOT / ".ci" / "run"]:
        note(shell_tools(path.read_text()), path)
    for path in sorted((ROOT / "molecule").rglob("*.yml")):
        note(yaml_command_tools(path.read_text()), path)
    return found


# ---- where a tool comes from on this machine ----------------------------------------------------


# Other names the code tries when the listed one is missing (Ubuntu's name for Debian's chromium).
ALTERNATIVE_NAMES = {"chromium-browser": "chromium"}
# Tools from the deployment venv the Makefile builds (requirements-deploy.txt), not from Debian.
DEPLOY_VENV_TOOLS = {"ansible-playbook": "ansible-core", "molecule": "molecule", "ansible-lint": "ansible-lint"}


def _owner(path: str) -> str | None:
    result = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True, check=False)
    owner = result.stdout.split(":")[0]
    return owner if result.returncode == 0 and " " not in owner else None  # not "diversion by ..."


def always_installed_package_of(tool: str) -> str | None:
    """The Debian package shipping `tool` if it is in every Debian system (Essential, or Priority: required,
    which debootstrap's minbase installs), else None."""
    found = shutil.which(tool)
    names = {tool, Path(found).resolve().name} if found else {tool}  # sh -> dash, awk -> mawk
    for name in names:
        for directory in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
            package = _owner(f"{directory}/{name}")
            if package:
                fields = subprocess.run(["dpkg-query", "-W", "-f=${Essential}|${Priority}", package],
                                        capture_output=True, text=True, check=False).stdout  # fmt: skip
                essential, _, priority = fields.partition("|")
                return package if essential == "yes" or priority == "required" else None
    return None


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")


@needs_dpkg
def test_every_tool_the_code_runs_is_installed_by_setup_host() -> None:
    listed = {tool for package in package_table() for tool in package.provides}
    found = tools_in_repository()
    assert {"ip", "ping", "snmpd", "systemd-analyze", "debootstrap", "nft", "ssh-keygen"} <= set(found)
    listed |= {other for other, name in ALTERNATIVE_NAMES.items() if name in listed}
    requirements = (ROOT / "requirements-deploy.txt").read_text()
    listed |= {tool for tool, dist in DEPLOY_VENV_TOOLS.items() if re.search(rf"^{dist}\b", requirements, re.M)}
    unlisted = {tool: sorted(paths) for tool, paths in found.items() if tool not in listed}
    not_installed = {tool: paths for tool, paths in unlisted.items() if always_installed_package_of(tool) is None}
    assert not not_installed, f"tools run here but not installed by scripts/setup-host.sh: {not_installed}"


@needs_dpkg
def test_the_table_says_truly_what_each_installed_package_provides() -> None:
    """For each package installed on this machine, what the table says it provides is in its file list."""
    for package in package_table():
        listing = subprocess.run(["dpkg-query", "-L", package.name], capture_output=True, text=True, check=False)
        if listing.returncode != 0:
            continue  # not installed here: nothing to compare with
        files = listing.stdout.splitlines()
        for item in package.provides:
            if item.startswith("/"):
                assert any(f == item or f.startswith(item + "/") for f in files), (package.name, item)
            else:
                assert any(Path(f).name == item for f in files), (package.name, item)


def test_the_scanner_finds_a_new_tool() -> None:
    """A tool added to a test, a benchmark or a script is noticed (and would fail the test above)."""
    source = """
import asyncio, shutil, subprocess
sniff = ["tcpdump", "-i", "any"]
subprocess.run(sniff, check=True)
subprocess.Popen(["ip", "netns", "exec", ns, "tshark", "-q"])
asyncio.create_subprocess_exec("fping", "-c", "1")
shutil.which("iperf3")
subprocess.run([sys.executable, "-c", "pass"])
subprocess.Popen(["/usr/sbin/arpwatch", "-d"])
host.run("ss -tln")
"""
    assert python_tools(source) == {"tcpdump", "ip", "tshark", "fping", "iperf3", "arpwatch"}
    script = """#!/bin/bash
# comment: ignored tool
up() { conntrack -L | grep -q x && arping -c1 "$ip"; }
cat <<EOF
notatool here
EOF
case "$1" in
  start|stop) up ;;
esac
for h in systemd unified; do X=1 socat - TCP:1; done
command -v ethtool >/dev/null
echo "not a tool; (nor this)" 'nor | this'
dir="$(dirname "$0")"
case "$st" in running|degraded) sleep 1;; esac
"""
    assert shell_tools(script) == {"conntrack", "grep", "arping", "cat", "socat", "ethtool", "dirname", "sleep"}
    assert yaml_command_tools('ansible.builtin.command: "{{ s }}/x.sh"\nansible.builtin.command: "mtr -r"') == {"mtr"}
    argv_form = (
        'ansible.builtin.command:\n  argv: ["{{ amoskys }}", pki]\nansible.builtin.command:\n  argv: [ethtool, -k]'
    )
    assert yaml_command_tools(argv_form) == {"ethtool"}


def test_setup_host_refuses_an_unknown_target() -> None:
    result = subprocess.run([str(SETUP), "--for", "everything"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage" in result.stderr
