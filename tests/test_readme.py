"""The README's private-swarm command lines, run as written on this machine: only what names another machine
(its address, its port, its identity file, the multiaddr it printed) is replaced."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from petal_client.api.process import ApiProcess
from petald.local_swarm import NodeProcess, wait_until

pytestmark = pytest.mark.real_model
README = Path(__file__).resolve().parents[1] / "README.md"
ENTRY_POINTS = {
    "petald": "petald.cli",
    "petal-generate": "petal_client.generate_cli",
    "petal-api": "petal_client.api.cli",
}


def readme_commands(section: str, block: int = 0) -> list[list[str]]:
    """The commands of the `block`-th bash block of a README section, each as an argv (continuations joined)."""
    text = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```bash\n(.*?)```", text, re.S)[block]
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


def private_swarm_commands() -> list[list[str]]:
    return readme_commands("A private swarm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_this_machine(argv: list[str], first_addr: str | None, identity: Path) -> list[str]:
    """`argv` with another machine's specifics made this machine's; the program run as a module of this venv."""
    out = []
    for arg in argv:
        if arg == "0.0.0.0" or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", arg):
            arg = "127.0.0.1"  # both the listening and the public address: these machines are one
        elif arg == "~/.petal/id.key":
            arg = str(identity)
        elif arg == "..." or arg.startswith("/ip4/203.0.113.7/"):
            arg = first_addr
        out.append(arg)
    if out[:2] == ["petald", "start"]:
        out += ["--port", str(free_port())]  # two "machines" on one: not both on the default port
    if out[0] == "petal-api":
        out[out.index("--port") + 1] = "0"  # any free port (it prints the one it took)
    return [sys.executable, "-m", ENTRY_POINTS[out[0]], *out[1:]]


def test_the_private_swarm_commands_of_the_readme_work_as_written(smollm2, petal_test_home, tmp_path):
    commands = private_swarm_commands()
    assert [argv[:2] for argv in commands] == [
        ["petald", "start"],
        ["petald", "start"],
        ["petald", "status"],
        ["petal-generate", "--initial-peers"],
        ["petal-generate", "--initial-peers"],
    ]
    env = {**os.environ, "PETAL_HOME": str(petal_test_home)}
    nodes: list[NodeProcess] = []
    try:
        first = NodeProcess(on_this_machine(commands[0], None, tmp_path / "a.key")[3:], tmp_path / "a.log", env)
        nodes.append(first)
        addr = first.addr
        second = NodeProcess(on_this_machine(commands[1], addr, tmp_path / "b.key")[3:], tmp_path / "b.log", env)
        nodes.append(second)
        first.wait_serving(180)
        second.wait_serving(180)

        def run(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
            command = on_this_machine(argv, addr, tmp_path / "unused.key")
            return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=300)

        status = wait_until(
            lambda: (result := run(commands[2])).returncode == 0 and "served by no one" not in result.stdout and result,
            60,
            what="petald status shows every block served",
        )
        assert "smollm2-135m: 30 blocks, 2 servers" in status.stdout, status.stdout
        answer = run(commands[3])
        assert answer.returncode == 0, answer.stderr
        assert any(word in answer.stdout.lower() for word in ("salt", "sea", "ocean")), answer.stdout
        chat = run(commands[4], stdin="Name a colour.\n")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.startswith("you> ") and len(chat.stdout.split()) > 3, chat.stdout

        # the API section's petal-api line, pointed at this swarm
        (api_command,) = readme_commands("OpenAI-compatible API and web chat", block=1)
        argv = on_this_machine(api_command, addr, tmp_path / "unused.key")
        with ApiProcess(argv[3:], tmp_path / "api.log", env) as api:
            url = api.wait_url()
            key = api_command[api_command.index("--api-key") + 1]
            client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            reply = client.chat.completions.create(
                model="smollm2-135m", messages=messages, temperature=0, max_tokens=16
            )
            assert "Paris" in reply.choices[0].message.content, reply
        for node in nodes:
            node.process.send_signal(signal.SIGTERM)
        for node in nodes:
            assert node.process.wait(60) == 0, node.output()
    finally:
        for node in nodes:
            node.kill()
