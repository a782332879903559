"""Static checks of the scale-out files: compose.replicas.yaml over each chain's file (as Compose resolves them with
`docker-compose config`), the balancer's HAProxy configuration and error pages, and bench/replicas.py's command
line. The replicas must be the chain's `serve` in all but the host port; the balancer must check what serve
answers. The real run (2 replicas, load, one killed) is .ci/containers.sh's scale-out phase."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
BALANCER = ROOT / "docker" / "balancer"
CFG = (BALANCER / "haproxy.cfg").read_text()
# each chain's file, and the variables compose.replicas.yaml's header says go with it
CHAINS = {
    "compose.cpu.yaml": {},
    "compose.yaml": {"AEGIS_REPLICA_IMAGE": "aegis-serve:latest", "AEGIS_DATA_VOLUME": "aegis-data"},
}


def compose_config(*files: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    if not tool:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    args = [tool] + [a for f in files for a in ("-f", f)] + ["config"]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
    )


def merged(chain: str) -> dict:
    proc = compose_config(chain, "compose.replicas.yaml", env=CHAINS[chain])
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(params=sorted(CHAINS), scope="module")
def config(request) -> dict:
    return merged(request.param)


def test_replica_is_serve_without_a_host_port(config):
    serve, replica = config["services"]["serve"], config["services"]["replica"]
    assert "ports" not in replica  # scaled replicas cannot share one host port; only the balancer publishes
    for key in ("volumes", "healthcheck", "init"):
        assert replica[key] == serve[key], key
    # the chain's CPU serve image (compose.yaml's serve is the CUDA one; its chat runs the CPU image)
    cpu_images = {s["image"] for s in config["services"].values() if s.get("build", {}).get("target") == "serve"}
    assert replica["build"]["target"] == "serve" and replica["image"] in cpu_images, (replica["image"], cpu_images)
    assert "deploy" not in replica
    # serve's variables reach the replicas as they reach serve (AEGIS_MODEL besides: pinning a fleet to one GGUF)
    assert set(serve["environment"]) <= set(replica["environment"])
    assert replica["environment"]["AEGIS_PORT"] == serve["environment"]["AEGIS_PORT"]
    assert replica["restart"] == "unless-stopped"
    assert replica["depends_on"] == serve["depends_on"]


def test_replica_command_is_what_serve_accepts():
    # the entrypoint hands `command:` to python -m serve; 0 means serve's own default for both
    from serve.config import read

    command = merged("compose.cpu.yaml")["services"]["replica"]["command"]
    args = read(["--model", "x.gguf", *command], check=False)
    assert (args.threads, args.parallel) == (0, 0)


def test_other_services_are_untouched(config):
    chain = yaml.safe_load(
        compose_config("compose.cpu.yaml" if "aegis-cpu-data" in config["volumes"] else "compose.yaml").stdout
    )
    cpu = yaml.safe_load(compose_config("compose.cpu.yaml").stdout)["services"]["serve"]
    if config["services"]["replica"]["image"] == cpu["image"]:  # the default chain: built exactly as its serve
        assert config["services"]["replica"]["build"] == cpu["build"]

    def normal(service: dict) -> dict:  # Compose does not keep the order of merged volume lists
        return {**service, "volumes": sorted(service.get("volumes", []))}

    for name, service in chain["services"].items():
        assert normal(config["services"][name]) == normal(service), name
    assert set(config["volumes"]) == set(chain["volumes"])


def test_balancer_publishes_the_api_port_and_finds_the_replicas_by_name(config):
    balancer, serve = config["services"]["balancer"], config["services"]["serve"]
    # "HOST_IP:PUBLISHED:TARGET/tcp" as docker-compose 1.29 resolves them: the API where serve had it
    assert serve["ports"][0].endswith(":8000/tcp") and serve["ports"][0] in balancer["ports"]
    assert any(p.endswith(":8404/tcp") for p in balancer["ports"])
    env = balancer["environment"]
    assert env["AEGIS_REPLICA_SERVICE"] in config["services"]  # the DNS name is the replicas' service
    assert env["AEGIS_REPLICA_PORT"] == config["services"]["replica"]["environment"]["AEGIS_PORT"]
    assert Path(balancer["build"]["context"]) == BALANCER
    assert "replica" in balancer["depends_on"]


def test_a_missing_chain_variable_fails_clearly():
    # compose.replicas.yaml over compose.yaml without AEGIS_DATA_VOLUME: Compose names the undeclared volume
    proc = compose_config("compose.yaml", "compose.replicas.yaml")
    assert proc.returncode != 0 and "aegis-cpu-data" in proc.stderr, proc.stderr


def test_scaled_replica_count_is_chosen_at_up_time():
    # nothing in the file fixes a replica count or a container name (either would make --scale fail)
    replica = merged("compose.cpu.yaml")["services"]["replica"]
    assert not {"container_name", "scale", "deploy"} & set(replica)


# ---- HAProxy -------------------------------------------------------------------------------------------------------


def directives(section: str) -> list[str]:
    """The lines of one section of haproxy.cfg (e.g. 'backend replicas'), comments dropped."""
    m = re.search(rf"^{re.escape(section)}\n(.*?)(?=^\S|\Z)", CFG, re.M | re.S)
    assert m, f"no '{section}' in haproxy.cfg"
    return [ln.split("#", 1)[0].strip() for ln in m.group(1).splitlines() if ln.split("#", 1)[0].strip()]


def test_health_checks_ask_serve_for_readiness():
    backend = directives("backend replicas")
    assert "option httpchk" in backend and "http-check send meth GET uri /ready" in backend
    assert "http-check expect status 200" in backend
    default_server = next(d for d in backend if d.startswith("default-server"))
    assert " check " in default_server + " " and "resolvers compose" in default_server
    # a refused connection takes a replica out at once; sessions are never cut (that would kill redispatches)
    assert "observe layer4" in default_server and "on-error mark-down" in default_server
    assert "shutdown-sessions" not in default_server
    src = (ROOT / "serve" / "app.py").read_text()
    assert re.search(r'@get\("/ready"', src), "serve has no /ready route"


def test_retries_only_where_nothing_reached_the_client():
    defaults = directives("defaults")
    retry_on = next(d for d in defaults if d.startswith("retry-on")).split()[1:]
    # never response-timeout or a generic 5xx: a slow generation must not run twice
    assert set(retry_on) == {"conn-failure", "empty-response", "503"}
    assert "option redispatch 1" in defaults
    assert "option http-no-delay" in defaults and "option http-buffer-request" in defaults
    assert not any(d.startswith(("compression", "filter", "option http-buffer-response")) for d in defaults)
    # the idle timeouts outlast serve's own request timeout, so serve's 504 comes first
    from serve.config import Settings

    serve_timeout = Settings().timeout
    for side in ("client", "server"):
        value = next(d for d in defaults if d.startswith(f"timeout {side} ")).split()[-1]
        assert value.endswith("s") and float(value[:-1]) > serve_timeout, (side, value)


def test_error_pages_are_in_the_api_shape():
    used = re.findall(r"errorfile (\d+) /etc/aegis-balancer/errors/(\S+)", CFG)
    assert {code for code, _ in used} >= {"502", "503", "504"}
    dockerfile = (BALANCER / "Dockerfile").read_text()
    assert "COPY errors/ /etc/aegis-balancer/errors/" in dockerfile
    for code, name in used:
        raw = (BALANCER / "errors" / name).read_bytes()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {code} "), lines[0]
        headers = dict(ln.split(": ", 1) for ln in lines[1:])
        assert int(headers["Content-Length"]) == len(body), name
        assert headers["Content-Type"] == "application/json"
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name


def test_the_configuration_is_valid_haproxy(tmp_path):
    haproxy = shutil.which("haproxy")
    if not haproxy:
        pytest.skip("haproxy is not installed (the balancer image's build runs `haproxy -c` on it)")
    cfg = CFG.replace("/etc/aegis-balancer/", f"{BALANCER}/")
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    proc = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- the bench's command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "one"], "--replicas 'one'"),
        (["--replicas", "0,2"], "must be positive"),
        (["--clients", "0"], "must be positive"),
        (["--chain", "compose.gpu.yaml"], "invalid choice"),
    ],
)
def test_bench_refuses_bad_input(args, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replicas.py"), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
