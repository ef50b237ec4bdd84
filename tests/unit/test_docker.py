"""docker/ without a docker engine: the compose file validates against the compose specification, the Dockerfile
passes hadolint, everything the stack references (paths, ports, images, service names, flags) exists and agrees with
the code. tests/integration/test_docker_entrypoint.py runs the entrypoint's join hand-off with real peers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coordinator.cli import DESCRIPTION, GROUPS
from coordinator.config import CoordinatorConfig
from monitoring import build
from peer.cli import build_parser, parse_config
from peer.config import PeerConfig
from serve.cli import DESCRIPTION as SERVE_DESCRIPTION
from serve.cli import GROUPS as SERVE_GROUPS
from serve.config import ServeConfig

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]
FAKE_JOIN = "/ip4/127.0.0.1/tcp/31337/p2p/QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC"


def parse(config_cls, argv: list[str], environ: dict):
    """bertswarm's own CLI parsing (flags, BERTSWARM_* variables, validation) of the peer, coordinator or server."""
    if config_cls is PeerConfig:
        return parse_config(argv, environ=environ)
    if config_cls is ServeConfig:
        parser = build_parser(ServeConfig, "bertswarm-serve", SERVE_DESCRIPTION, SERVE_GROUPS)
        return parse_config(argv, environ=environ, parser=parser, config_cls=ServeConfig)
    parser = build_parser(CoordinatorConfig, "bertswarm-coordinator", DESCRIPTION, GROUPS)
    return parse_config(argv, environ=environ, parser=parser, config_cls=CoordinatorConfig)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def dockerfile_stages() -> dict[str, list[str]]:
    """{target: CMD argv} of docker/Dockerfile."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    stages, current = {}, None
    for line in text.splitlines():
        if match := re.match(r"FROM \S+ AS (\S+)", line):
            current = match.group(1)
            stages[current] = []
        elif line.startswith("CMD ") and current:
            stages[current] = json.loads(line[4:])
    return stages


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is missing: make setup installs it with the dev extras"
    return found


def test_compose_files_validate_against_the_compose_specification():
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             *map(str, COMPOSE_FILES)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_path_the_stack_references_exists():
    services = compose()["services"]
    for name, service in services.items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / service["build"]["dockerfile"]).is_file(), name
            assert service["build"]["target"] in dockerfile_stages(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in compose()["volumes"], f"{name}: undeclared volume {source}"
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"]
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded from the build context by .dockerignore"


def test_external_images_are_pinned_and_ours_are_built_here():
    for name, service in compose()["services"].items():
        image = interpolate(service["image"])
        if "build" in service:
            assert image.startswith(f"bertswarm-{service['build']['target']}:"), name
        else:
            assert re.fullmatch(r"[a-z/_-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin {image} to a release"


def test_ports_and_names_agree_across_compose_prometheus_grafana_and_the_code():
    services = compose()["services"]
    stages = dockerfile_stages()
    peer_cfg, _ = parse(PeerConfig, stages["peer"][1:], {"BERTSWARM_JOIN": FAKE_JOIN})
    coordinator_cfg, _ = parse(CoordinatorConfig, stages["coordinator"][1:], {"BERTSWARM_JOIN": FAKE_JOIN})
    prometheus = yaml.safe_load((build.HERE / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (coordinator_target,) = jobs["bertswarm-coordinator"]["static_configs"][0]["targets"]
    assert coordinator_target == f"coordinator:{coordinator_cfg.http_port}"
    (peer_sd,) = jobs["bertswarm-peer"]["dns_sd_configs"]
    assert peer_sd["port"] == peer_cfg.metrics_port
    assert set(peer_sd["names"]) == {"bootstrap", "peer"} <= set(services)
    assert peer_cfg.metrics_host == coordinator_cfg.http_host == "0.0.0.0"  # reachable from the prometheus container
    assert [interpolate(p) for p in services["coordinator"]["ports"]] == [f"127.0.0.1:{coordinator_cfg.http_port}:"
                                                                          f"{coordinator_cfg.http_port}"]  # fmt: skip
    listen_port = peer_cfg.listen[0].rsplit("/", 1)[1]
    assert [interpolate(p) for p in services["bootstrap"]["ports"]] == [f"127.0.0.1:{listen_port}:{listen_port}"]
    for name in ("prometheus", "grafana"):  # published on loopback only unless the user changes it
        assert all(interpolate(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name
    web = next(a for a in services["prometheus"]["command"] if a.startswith("--web.listen-address="))
    datasource = yaml.safe_load((build.HERE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == f"http://prometheus:{web.rsplit(':', 1)[1]}"
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load((build.HERE / "grafana/provisioning/dashboards/bertswarm.yml").read_text())
    dashboards_in_container = provider["providers"][0]["options"]["path"]
    source = next(s for s, t in mounts.items() if t == dashboards_in_container)
    assert (DOCKER / source).resolve() == build.DASHBOARD_DIR
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == dashboards_in_container
    assert (build.DASHBOARD_DIR / Path(home).name).is_file()
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_the_server_serves_the_coordinator_s_checkpoints_and_is_scraped_and_health_checked():
    services = compose()["services"]
    coordinator_cfg, _ = parse(CoordinatorConfig, dockerfile_stages()["coordinator"][1:], {"BERTSWARM_JOIN": FAKE_JOIN})
    serve = services["serve"]
    assert serve["command"][0] == "bertswarm-serve"
    cfg, explicit = parse(ServeConfig, serve["command"][1:], {})
    assert {"checkpoints", "host", "port"} <= explicit
    assert cfg.checkpoints == f"http://coordinator:{coordinator_cfg.http_port}/checkpoints"  # inside the network
    assert cfg.host == "0.0.0.0" and "coordinator" in serve["depends_on"]
    assert [interpolate(p) for p in serve["ports"]] == [f"127.0.0.1:{cfg.port}:{cfg.port}"]  # loopback on the host
    assert (serve["image"], serve["build"]) == (services["coordinator"]["image"], services["coordinator"]["build"])
    probe = " ".join(serve["healthcheck"]["test"])
    assert f"http://127.0.0.1:{cfg.port}/healthz" in probe and serve["healthcheck"]["test"][:2] == ["CMD", "python"]
    seconds = {"s": 1, "m": 60}
    grace = serve["stop_grace_period"]
    assert int(grace[:-1]) * seconds[grace[-1]] > cfg.shutdown_seconds  # in-flight requests finish on `down`
    prometheus = yaml.safe_load((build.HERE / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (serve_sd,) = jobs["bertswarm-serve"]["dns_sd_configs"]
    assert serve_sd["names"] == ["serve"] and serve_sd["port"] == cfg.port


def test_the_containers_command_lines_parse_with_bertswarm_s_own_parsers(tmp_path):
    """A renamed flag or variable in the stack fails here, not in a user's container."""
    services, stages = compose()["services"], dockerfile_stages()
    for name, target, config_cls in (("bootstrap", "peer", PeerConfig), ("peer", "peer", PeerConfig),
                                     ("coordinator", "coordinator", CoordinatorConfig)):  # fmt: skip
        env = {k: interpolate(str(v)) for k, v in services[name]["environment"].items()}
        for key, value in env.items():
            if value.startswith("/swarm/"):  # the shared volume, here a temporary directory
                env[key] = str(tmp_path / Path(value).name)
        if "BERTSWARM_JOIN_FILE" in env:  # what the entrypoint exports once the bootstrap peer wrote the file
            env["BERTSWARM_JOIN"] = FAKE_JOIN
        unknown = {k for k in env if k.startswith("BERTSWARM_")} - {
            "BERTSWARM_JOIN_FILE",
            *(f"BERTSWARM_{f.upper()}" for f in config_cls.__dataclass_fields__),
        }
        assert not unknown, f"{name}: variables bertswarm ignores: {unknown}"
        cfg, explicit = parse(config_cls, stages[target][1:], env)
        assert cfg.join == ([] if name == "bootstrap" else [FAKE_JOIN])
        assert "state_dir" in explicit


def test_the_image_s_pip_install_gets_everything_from_the_build_context(tmp_path):
    """``pip install .`` in the image sees only what .dockerignore lets through: build that wheel here and check it
    holds both packages, the shipped vocab and both commands."""
    import shutil as sh
    import zipfile

    context = tmp_path / "context"
    context.mkdir()
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if line.startswith("!"):
            source = ROOT / line[1:].rstrip("/")
            target = context / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                sh.copytree(source, target, ignore=sh.ignore_patterns("__pycache__"))
            else:
                sh.copy2(source, target)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("bertswarm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "peer/cli.py",
        "peer/trainer.py",
        "peer/assets/vocab.txt",
        "coordinator/cli.py",
        "peer/hooks.py",
        "peer/run/manifest.py",
        "peer/data/batches.py",
        "peer/store/state.py",
        "peer/swarm/optim.py",
    ):
        assert module in names, module
    assert not [n for n in names if n.startswith("peer/testing/")], "the test hooks must stay out of the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "bertswarm-peer = peer.cli:main" in text and "bertswarm-coordinator = coordinator.cli:main" in text
