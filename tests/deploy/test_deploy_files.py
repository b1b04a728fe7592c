"""No Docker engine runs here, so prove what can be proved about the deployment files: they parse, they agree
with each other and with the server's settings, promtool accepts the Prometheus config, every metric the
dashboard queries exists on a live server, and the Dockerfile's install + entrypoint steps serve a request."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest
import yaml

from server.settings import Settings
from tests.redis_server import free_port
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def test_compose_stack_is_consistent():
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert set(services) >= {"api", "redis", "prometheus", "grafana", "nginx"}
    api, redis = services["api"], services["redis"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    # secure by default: compose refuses to start without keys and a Redis password (${VAR:?message})
    assert api["environment"]["TITANS_STORE"].startswith("redis://:${REDIS_PASSWORD:?")
    assert api["environment"]["TITANS_STORE"].endswith("}@redis:6379/0")
    assert api["environment"]["TITANS_API_KEYS"].startswith("${TITANS_API_KEYS:?")
    assert "--requirepass ${REDIS_PASSWORD:?" in " ".join(redis["command"])
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    port = int(api["environment"]["TITANS_PORT"])
    assert port == Settings().port and str(port) in api["ports"][0]
    assert "/health" in " ".join(api["healthcheck"]["test"])
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in command
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    volume, mount = redis["volumes"][0].split(":")
    assert mount == "/data" and volume in compose["volumes"]
    for service in services.values():  # every file a service mounts is in the repo
        for entry in service.get("volumes", []):
            source = entry.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    assert services["nginx"]["profiles"] == ["replicas"]


def test_prometheus_config_scrapes_the_api_and_promtool_accepts_it():
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    assert config["global"]["scrape_interval"] == "5s"
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0] == {"names": ["api"], "type": "A", "port": Settings().port}
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: bin/test installs Debian's prometheus package"
    check = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_is_provisioned_with_the_scrape_interval():
    source = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["jsonData"]["timeInterval"] == "5s"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/titans.yml")["providers"][0]
    compose = load_yaml(ROOT / "docker-compose.yml")
    assert any(v.endswith(":" + provider["options"]["path"] + ":ro") for v in compose["services"]["grafana"]["volumes"])


def dashboard_metrics() -> set[str]:
    dash = json.loads((DEPLOY / "grafana/dashboards/titans.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("first token", "inter-token", "end-to-end", "tokens per second", "running", "active sessions",
                  "snapshot bytes", "store latency", "conflicts", "surprise"):
        assert topic in titles, topic
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {name for e in exprs for name in re.findall(r"\b(titans_\w+)", e)}


def test_every_metric_the_dashboard_queries_exists_on_a_live_server(model_dir, tmp_path):
    names = dashboard_metrics()
    assert len(names) >= 12
    with ServerProcess(model_dir, f"sqlite:///{tmp_path}/s.db") as srv, httpx.Client(base_url=srv.url) as c:
        sid = c.post("/v1/sessions").json()["id"]
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "session_id": sid, "return_surprise": True})
        exposed = c.get("/metrics").text
    missing = sorted(n for n in names if n not in exposed)
    assert not missing, missing


def test_kubernetes_manifests():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s/titans.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deploy = kinds[("Deployment", "titans-api")]
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deploy["spec"]["replicas"] > 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["ports"][0]["containerPort"] == Settings().port
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert not [n for k, n in kinds if k == "Secret"]  # no secret ships with a default value
    env = {e["name"]: e for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert env["TITANS_API_KEYS_FILE"]["value"].startswith(mount["mountPath"] + "/")
    assert next(v for v in pod["spec"]["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == \
        "titans-api-keys"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "titans-redis"
    service = kinds[("Service", "titans-api")]
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    redis = kinds[("StatefulSet", "titans-redis")]
    assert redis["spec"]["volumeClaimTemplates"] and "--appendonly" in redis["spec"]["template"]["spec"][
        "containers"][0]["args"]
    store = next(e["value"] for e in container["env"] if e["name"] == "TITANS_STORE")
    assert store == f"redis://:$(REDIS_PASSWORD)@{kinds[('Service', 'titans-redis')]['metadata']['name']}:6379/0"
    assert "$(REDIS_PASSWORD)" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    gpu = load_yaml(DEPLOY / "k8s/titans-gpu.yaml")
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in gpu["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = Settings(device=env["TITANS_DEVICE"], weights=env["TITANS_WEIGHTS"],
                        decode_graphs=env["TITANS_DECODE_GRAPHS"])  # values the server accepts
    assert (settings.device, settings.weights, settings.decode_graphs) == ("cuda", "bf16", "off")


def test_nginx_routes_sessions_by_header_and_streams():
    conf = (DEPLOY / "nginx/nginx.conf").read_text()
    assert "hash $http_x_session_id consistent" in conf and "proxy_buffering off" in conf
    assert f"server api:{Settings().port}" in conf


def dockerfile() -> tuple[list[tuple[str, str]], dict[str, str]]:
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    steps = [tuple(line.split(None, 1)) for line in lines if line.strip() and not line.startswith("#")]
    env: dict[str, str] = {}
    for op, arg in steps:
        if op == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(arg)))
    return steps, env


def test_dockerfile_structure():
    steps, env = dockerfile()
    ops = dict(steps[::-1])  # last of each
    assert json.loads(ops["ENTRYPOINT"]) == ["titans", "serve"]
    assert ops["USER"] != "root"
    assert "/health" in ops["HEALTHCHECK"]
    copied = [arg.split() for op, arg in steps if op == "COPY" and not arg.startswith("--from")]
    model_copy = next(a for a in copied if a[0].startswith("models/"))
    assert env["TITANS_MODEL"] == model_copy[1] and (ROOT / model_copy[0] / "config.json").exists()
    assert env["TITANS_HOST"] == "0.0.0.0" and int(env["TITANS_PORT"]) == Settings().port
    assert any("TORCH_INDEX" in arg for op, arg in steps if op == "ARG")  # the CUDA variant is a build argument


@pytest.mark.slow
def test_dockerfile_install_and_entrypoint_serve_a_request(tmp_path):
    """Replay the build stage's COPY and pip steps in a fresh venv (torch and the other wheels come from this
    environment instead of the network), then run its ENTRYPOINT with its ENV and complete a request."""
    steps, env = dockerfile()
    build = steps[:[i for i, (op, _) in enumerate(steps) if op == "FROM"][1]]
    src = tmp_path / "src"
    src.mkdir()
    for op, arg in build:
        if op == "COPY":
            *sources, dest = arg.split()
            for source in sources:
                target = src / source if dest in ("./", ".") else src / dest
                (shutil.copytree if (ROOT / source).is_dir() else shutil.copy)(ROOT / source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # wheels already installed here
    pip_steps = [arg for op, arg in build if op == "RUN" and "pip install" in arg and "torch==" not in arg]
    assert pip_steps == ["pip install --no-cache-dir ."]
    subprocess.run([str(venv / "bin/python"), "-m", *shlex.split(pip_steps[0])], cwd=src,
                   check=True, capture_output=True)
    port = free_port()
    model_src = next(arg.split()[0] for op, arg in steps if op == "COPY" and arg.startswith("models/"))
    run_env = {**env, "PATH": f"{venv}/bin", "TITANS_MODEL": str(ROOT / model_src), "TITANS_PORT": str(port),
               "TITANS_STORE": f"sqlite:///{tmp_path}/sessions.db", "HOME": str(tmp_path)}
    entry = json.loads(dict(steps[::-1])["ENTRYPOINT"])
    with ServerProcess(None, None, command=[str(venv / "bin" / entry[0]), *entry[1:]], port=port, env=run_env,
                       clean_env=True) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "def ", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_setup_installs_once_and_quietly():
    # bin/serve runs bin/setup first: with nothing changed it must not run pip again (a second install took 17 s
    # before `titans serve --help` answered)
    first = subprocess.run(["bash", "bin/setup"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    log = ROOT / ".venv/setup.log"
    before = log.stat().st_mtime_ns if log.exists() else None
    again = subprocess.run(["bash", "bin/setup"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == again.stderr == "", again
    assert (log.stat().st_mtime_ns if log.exists() else None) == before
