"""Consistency checks for the deployment files (docker/, deploy/).

Nothing here needs a network, a Docker engine or a Kubernetes cluster. The
tests catch the drift that otherwise only shows up on a cluster:

* the image, the launcher config and the KubeRay manifests must run the Ray
  (and torch/torchvision) that constraints.txt pins, and every pin there must
  lie inside the range that pyproject.toml declares;
* every `python -m edrop_ray ...` command we ship must be accepted by the CLI
  parser and name a config that exists;
* token authentication stays on, and the launcher keeps the dashboard on
  localhost.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CLUSTER_YAML = ROOT / "deploy" / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
RAYCLUSTER_YAML = ROOT / "deploy" / "kuberay" / "raycluster.yaml"
DEPLOY_README = ROOT / "deploy" / "README.md"

KUBERAY_MANIFESTS = {"RayJob": RAYJOB_YAML, "RayCluster": RAYCLUSTER_YAML}
ALL_MANIFESTS = (CLUSTER_YAML, RAYJOB_YAML, RAYCLUSTER_YAML)

CLI_PREFIX = ["python", "-m", "edrop_ray"]
GPU_RESOURCE = "nvidia.com/gpu"

# --------------------------------------------------------------------------- helpers


def _canonical(name: str) -> str:
    # PEP 503 normalisation, so "torch_pruning" and "torch-pruning" compare equal.
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraint_pins(text: str) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a pip constraints file."""
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        # pip rejects extras in a constraints file ("Constraints cannot have extras").
        assert not requirement.extras, f"constraints.txt:{number}: no extras allowed: {line!r}"
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"constraints.txt:{number}: expected an exact pin name==version, got {line!r}"
        )
        name = _canonical(requirement.name)
        assert name not in found, f"constraints.txt:{number}: {name} pinned twice"
        found[name] = specs[0].version
    return found


def _installed_closure(names: set[str]) -> set[str]:
    """Canonical names of every installed distribution that ``names`` require, transitively
    (their unconditional requirements, as importlib.metadata reads them)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for raw in requires:
            requirement = Requirement(raw)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            name = _canonical(requirement.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def _load_yaml(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.relative_to(ROOT)}: expected one YAML document"
    assert isinstance(docs[0], dict), f"{path.relative_to(ROOT)}: top level must be a mapping"
    return docs[0]


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending)
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def _dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args: dict[str, str] = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip("\"'")
    return args


def _expand(text: str, variables: dict[str, str]) -> str:
    """Substitute ${VAR} and $VAR the way Docker does for ARG values with defaults."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def _image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    assert ":" in name, f"image {image!r} has no explicit tag; pin one"
    return name.rsplit(":", 1)[1]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _cluster_spec(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]


def _pod_containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _option_value(argv: list[str], option: str) -> str | None:
    for i, token in enumerate(argv):
        if token == option and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(option + "="):
            return token.split("=", 1)[1]
    return None


def _check_cli_command(command: str, where: str) -> None:
    """The command must start `python -m edrop_ray`, parse, and name an existing config."""
    argv = shlex.split(command, comments=True)
    assert argv[:3] == CLI_PREFIX, f"{where}: {command!r} does not start with 'python -m edrop_ray'"
    cli = importlib.import_module("edrop_ray.cli")
    parser = cli.build_parser()
    try:
        parser.parse_args(argv[3:])
    except SystemExit as exc:  # argparse reports bad arguments by exiting
        pytest.fail(f"{where}: the edrop_ray CLI rejects {command!r} (exit code {exc.code})")
    config = _option_value(argv, "--config")
    if config is not None:
        assert (ROOT / config).is_file(), f"{where}: --config {config} does not exist in the repo"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return _constraint_pins(CONSTRAINTS.read_text())


@pytest.fixture(scope="module")
def ray_pin(pins: dict[str, str]) -> str:
    assert "ray" in pins, "constraints.txt must pin ray exactly (ray==X)"
    return pins["ray"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    return _load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module", params=sorted(KUBERAY_MANIFESTS))
def kuberay(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    kind = request.param
    return kind, _load_yaml(KUBERAY_MANIFESTS[kind])


# --------------------------------------------------------------------------- pins


def test_constraints_pin_the_deployed_stack(pins: dict[str, str]) -> None:
    for name in ("ray", "torch", "torchvision"):
        assert name in pins, f"constraints.txt must pin {name} with '=='"


def test_constraints_pin_every_dependency_inside_the_declared_range(
    pyproject: dict[str, Any], pins: dict[str, str]
) -> None:
    project = pyproject["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = project.get("optional-dependencies", {})
    optional = [Requirement(r) for name in ("dev", "timm") for r in extras.get(name, [])]
    # `make` installs the runtime dependencies, the dev tools and timm with these pins.
    unpinned = sorted(r.name for r in runtime + optional if _canonical(r.name) not in pins)
    assert not unpinned, f"constraints.txt has no pin for {unpinned}: make would take any"
    for requirement in runtime + optional:
        name = _canonical(requirement.name)
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's "
            f"{requirement.name}{requirement.specifier}"
        )
    declared = {_canonical(r.name) for r in runtime + optional}
    # The other pins are what an extra brings (timm's hub client): each must be a dependency,
    # direct or not, of a package pyproject asks for, as the installed metadata says.
    strays = sorted(set(pins) - declared - _installed_closure(declared))
    assert not strays, f"constraints.txt pins {strays}, which pyproject.toml does not ask for"


def test_timm_extra_is_declared_and_in_dev(pyproject: dict[str, Any]) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    timm = [Requirement(r) for r in extras["timm"]]
    assert [r.name for r in timm] == ["timm"]
    dev = {Requirement(r).name: Requirement(r).specifier for r in extras["dev"]}
    assert dev.get("timm") == timm[0].specifier, "[dev] must install timm too (tests/test_timm.py)"


def test_pyproject_declares_ranges_not_pins(pyproject: dict[str, Any]) -> None:
    # Exact pins belong in constraints.txt: in pyproject.toml they make
    # `pip install edrop-ray` downgrade (or refuse) a user's torch.
    for raw in pyproject["project"]["dependencies"]:
        requirement = Requirement(raw)
        exact = [s for s in requirement.specifier if s.operator in {"==", "==="}]
        assert not exact, f"pyproject.toml pins {raw!r}; declare a range, pin in constraints.txt"
        assert any(s.operator == "<" for s in requirement.specifier), (
            f"pyproject.toml: {raw!r} needs an upper bound (the next untested major/minor)"
        )


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_is_the_pinned_ray(
    dockerfile: list[tuple[str, str]], ray_pin: str
) -> None:
    args = _dockerfile_args(dockerfile)
    assert args.get("RAY_VERSION") == ray_pin, "ARG RAY_VERSION must equal the ray pin"
    froms = [_expand(rest, args).split()[0] for instr, rest in dockerfile if instr == "FROM"]
    assert froms, "Dockerfile has no FROM"
    repo, _, tag = froms[-1].partition(":")
    assert repo == "rayproject/ray", f"final stage must build on rayproject/ray, got {repo}"
    assert tag == ray_pin or tag.startswith(ray_pin + "-"), (
        f"base image tag {tag!r} is not Ray {ray_pin}"
    )


def test_dockerfile_torch_pins_match_constraints(
    dockerfile: list[tuple[str, str]], pins: dict[str, str]
) -> None:
    args = _dockerfile_args(dockerfile)
    runs = " ".join(_expand(rest, args) for instr, rest in dockerfile if instr == "RUN")
    for name in ("torch", "torchvision"):
        found = re.findall(rf"(?<![\w.-]){re.escape(name)}==([^\s\"']+)", runs)
        assert found, f"Dockerfile does not install {name}==<version>"
        assert set(found) == {pins[name]}, f"Dockerfile {name} {found} != constraints {pins[name]}"


def test_dockerfile_installs_the_package_with_the_constraints(
    dockerfile: list[tuple[str, str]],
) -> None:
    copied: set[str] = set()
    for instr, rest in dockerfile:
        if instr == "COPY":
            sources = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
            copied.update(s.rstrip("/") for s in sources)
    assert CONSTRAINTS.name in copied, "Dockerfile does not COPY constraints.txt"
    installs = [
        shlex.split(rest)
        for instr, rest in dockerfile
        if instr == "RUN" and re.search(r"\bpip install\b.*(?:/app|\s\.)(?:\s|$)", rest)
    ]
    assert installs, "Dockerfile does not `pip install` the package"
    for argv in installs:
        assert CONSTRAINTS.name in {
            _option_value(argv, "-c"),
            _option_value(argv, "--constraint"),
        }, f"the package install {' '.join(argv)!r} does not use -c constraints.txt"
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    if ignore.is_file():
        assert f"!{CONSTRAINTS.name}" in ignore.read_text().split(), (
            f"{ignore.relative_to(ROOT)} keeps constraints.txt out of the build context"
        )


def test_dockerfile_copies_what_the_package_build_needs(
    dockerfile: list[tuple[str, str]], pyproject: dict[str, Any]
) -> None:
    copied: set[str] = set()
    for instr, rest in dockerfile:
        if instr == "COPY":
            sources = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
            copied.update(s.rstrip("/") for s in sources)
    needed = {"pyproject.toml", "constraints.txt", "edrop_ray", "configs"}
    # Files the build backend reads from pyproject metadata must be in the image
    # too, or `pip install /app` fails.
    project = pyproject["project"]
    readme = project.get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    elif isinstance(readme, dict) and "file" in readme:
        needed.add(readme["file"])
    license_ = project.get("license")
    if isinstance(license_, dict) and "file" in license_:
        needed.add(license_["file"])
    assert needed <= copied, f"Dockerfile does not COPY {sorted(needed - copied)}"
    missing = sorted(n for n in needed if not (ROOT / n).exists())
    assert not missing, f"the image build needs {missing}, which the repo does not have"


def test_dockerfile_keeps_auth_on(dockerfile: list[tuple[str, str]]) -> None:
    for instr, rest in dockerfile:
        if instr in {"ENV", "ARG", "RUN"}:
            assert not re.search(r"RAY_AUTH_MODE[\s=]+[\"']?disabled", rest), (
                f"Dockerfile {instr} disables Ray token auth"
            )


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("path", ALL_MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_manifest_disables_token_auth(path: Path) -> None:
    doc = _load_yaml(path)
    for node in _walk(doc):
        if isinstance(node, dict):
            if node.get("name") == "RAY_AUTH_MODE":
                assert str(node.get("value", "")).lower() != "disabled", f"{path}: auth disabled"
            auth_options = node.get("authOptions")
            if isinstance(auth_options, dict):
                assert auth_options.get("mode") != "disabled", f"{path}: authOptions disabled"
        elif isinstance(node, str):
            assert not re.search(r"RAY_AUTH_MODE[\s=]+[\"']?disabled", node), (
                f"{path}: {node!r} disables Ray token auth"
            )


# --------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_matches_rays_launcher_schema(cluster_config: dict[str, Any]) -> None:
    # Validate against the schema shipped inside the pinned ray package. find_spec
    # locates it without importing ray.
    jsonschema = importlib.import_module("jsonschema")
    spec = importlib.util.find_spec("ray")
    assert spec is not None, "ray is not installed"
    assert spec.submodule_search_locations, "ray is not a package"
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler"
    schema = json.loads((schema_path / "ray-schema.json").read_text())
    jsonschema.validate(cluster_config, schema)


def test_cluster_yaml_image_is_the_pinned_ray(cluster_config: dict[str, Any], ray_pin: str) -> None:
    docker = cluster_config["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images, "cluster.yaml must run the edrop_ray image (docker.image)"
    for image in images:
        assert "rayproject/" not in image, "use the edrop_ray image, not a bare Ray image"
        assert _image_tag(image).endswith(f"ray{ray_pin}"), (
            f"cluster.yaml image {image!r} is not tagged for Ray {ray_pin}"
        )


def test_cluster_yaml_head_dashboard_is_localhost(cluster_config: dict[str, Any]) -> None:
    commands = cluster_config["head_start_ray_commands"]
    assert commands[0].strip() == "ray stop", "stop a stale Ray before starting the head"
    head = [c for c in commands if "ray start" in c and "--head" in c]
    assert len(head) == 1, "exactly one `ray start --head` command expected"
    hosts = re.findall(r"--dashboard-host[=\s]+(\S+)", head[0])
    assert hosts == ["127.0.0.1"], f"head must bind the dashboard to 127.0.0.1, got {hosts}"
    assert "--port=6379" in head[0]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in cluster_config[key]:
            assert not re.search(r"--dashboard-host[=\s]+0\.0\.0\.0", command), key


def test_cluster_yaml_workers_join_the_head(cluster_config: dict[str, Any]) -> None:
    starts = [c for c in cluster_config["worker_start_ray_commands"] if "ray start" in c]
    assert starts, "no `ray start` in worker_start_ray_commands"
    assert all("--address=$RAY_HEAD_IP:6379" in c for c in starts)


def test_cluster_yaml_token_auth_reaches_every_node(cluster_config: dict[str, Any]) -> None:
    docker = cluster_config["docker"]
    run_options = " ".join(docker.get("run_options", []) + docker.get("worker_run_options", []))
    assert re.search(r"RAY_AUTH_MODE=token\b", run_options), (
        "set RAY_AUTH_MODE=token in docker.run_options so every Ray process uses token auth"
    )
    assert any(
        remote.endswith(".ray/auth_token") for remote in cluster_config.get("file_mounts", {})
    ), "mount the locally generated ~/.ray/auth_token onto every node"


def test_cluster_yaml_node_types(cluster_config: dict[str, Any]) -> None:
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0, "head node type must be CPU-only"
    workers = {n: t for n, t in types.items() if n != cluster_config["head_node_type"]}
    gpu_workers = {n: t for n, t in workers.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_workers, "at least one worker type must advertise a GPU"
    for name, node_type in gpu_workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["max_workers"] <= cluster_config["max_workers"], name


# --------------------------------------------------------------------------- KubeRay


def test_kuberay_api_and_kind(kuberay: tuple[str, dict[str, Any]]) -> None:
    kind, doc = kuberay
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind


def test_kuberay_ray_version_is_the_pin(kuberay: tuple[str, dict[str, Any]], ray_pin: str) -> None:
    kind, doc = kuberay
    version = _cluster_spec(kind, doc).get("rayVersion")
    # Quoted on purpose: an unquoted 2.60 would load as the float 2.6.
    assert isinstance(version, str), f"{kind}: rayVersion must be a quoted string"
    assert version == ray_pin, f"{kind}: rayVersion {version} != ray pin {ray_pin}"


def test_kuberay_token_auth_is_on(kuberay: tuple[str, dict[str, Any]]) -> None:
    kind, doc = kuberay
    assert _cluster_spec(kind, doc).get("authOptions", {}).get("mode") == "token", (
        f"{kind}: set authOptions.mode: token"
    )


def test_kuberay_images_match_cluster_yaml(
    kuberay: tuple[str, dict[str, Any]], cluster_config: dict[str, Any], ray_pin: str
) -> None:
    kind, doc = kuberay
    spec = _cluster_spec(kind, doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in _pod_containers(g)}
    # One image everywhere: Ray refuses nodes with a different Ray/Python version.
    assert images == {cluster_config["docker"]["image"]}, f"{kind}: images {images}"
    for image in images:
        assert _image_tag(image).endswith(f"ray{ray_pin}"), f"{kind}: {image} not for Ray {ray_pin}"


def test_kuberay_ray_start_params_are_strings(kuberay: tuple[str, dict[str, Any]]) -> None:
    # The CRD types rayStartParams as map[string]string: a bare number or bool
    # is rejected by the API server.
    kind, doc = kuberay
    spec = _cluster_spec(kind, doc)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        params = group["rayStartParams"]
        assert isinstance(params, dict)
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not bad, f"{kind}: non-string rayStartParams {bad}"


def test_kuberay_gpu_worker_group(kuberay: tuple[str, dict[str, Any]]) -> None:
    kind, doc = kuberay
    spec = _cluster_spec(kind, doc)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "gpu-workers" in groups, f"{kind}: worker group 'gpu-workers' missing"
    group = groups["gpu-workers"]
    assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    gpus = [
        int(c.get("resources", {}).get("limits", {}).get(GPU_RESOURCE, 0))
        for c in _pod_containers(group)
    ]
    assert max(gpus) >= 1, f"{kind}: gpu-workers must request {GPU_RESOURCE} in limits"
    head_limits = [
        c.get("resources", {}).get("limits", {}) for c in _pod_containers(spec["headGroupSpec"])
    ]
    assert all(GPU_RESOURCE not in limits for limits in head_limits), f"{kind}: head takes a GPU"


def test_rayjob_cleans_up_after_itself() -> None:
    spec = _load_yaml(RAYJOB_YAML)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int)
    assert ttl >= 0


def test_rayjob_entrypoint_parses_with_the_cli() -> None:
    entrypoint = _load_yaml(RAYJOB_YAML)["spec"]["entrypoint"]
    _check_cli_command(entrypoint, "rayjob.yaml entrypoint")


def test_readme_job_commands_parse_with_the_cli() -> None:
    # Only fenced code blocks hold commands; prose may mention the CLI loosely.
    commands = []
    in_fence = False
    for line in DEPLOY_README.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        start = line.find("python -m edrop_ray")
        if in_fence and start != -1:
            commands.append(line[start:])
    assert commands, "deploy/README.md shows no `python -m edrop_ray` command in a code block"
    for command in commands:
        _check_cli_command(command, "deploy/README.md")
