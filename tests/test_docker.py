"""The container, end to end: build the real Dockerfile, train the demo inside it, stop it, resume it.

Run:  bash docker/ci-engine.sh && OMP_NUM_THREADS=1 pytest -m docker tests/test_docker.py
Needs a Docker engine with BuildKit and the local base image that docker/ci-engine.sh makes
(no registry is reachable here, so the Dockerfile's BASE_IMAGE is overridden with a
debootstrap'd Debian); skipped when either is missing. torch comes from the local CPU wheel
that `pip download` finds, through the Dockerfile's docker/wheels/ path. Builds use
--network host (pip needs PyPI), containers --network none (training must need no network).
Measured on 2 busy cores: cold (empty build cache; pip fetches ~1.3 GB) 2.5 min, of which the
build is 1.5 min; warm (the engine keeps the build cache) 1 min. docker/ci-engine.sh adds
~100 s once per machine (apt + debootstrap), ~1 s after.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("APPLIANCE_BASE_IMAGE", "sana-appliance-base:bookworm")
IMAGE = "sana-appliance:test"
# Written into the CA bundle handed to the build as a secret (PEM parsers skip text
# between certificates). If it ever shows up in the image, a secret leaked into a layer.
CA_MARKER = b"sana-appliance-test-planted-ca-marker"
CA_BUNDLE = Path(os.environ.get("APPLIANCE_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt"))
# Run-time secret: must never reach the workspace, the logs or the image.
PLANTED_TOKEN = "hf_planted" + secrets.token_hex(12)
DEMO_OUT = Path("output/demo")  # the demo preset's output_dir, relative to the workspace
RUN_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _docker_cli() -> str | None:
    """The 20.10 CLI from docker.io has BuildKit built in; newer CLIs need the buildx plugin."""
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker")


DOCKER = _docker_cli()


def docker(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def engine() -> str:
    if DOCKER is None:
        pytest.skip("no docker CLI (run docker/ci-engine.sh)")
    try:
        info = subprocess.run([DOCKER, "info"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no Docker engine answers `docker info` (run docker/ci-engine.sh)")
    if info.returncode != 0:
        pytest.skip("no Docker engine answers `docker info` (run docker/ci-engine.sh)")
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} missing (docker/ci-engine.sh builds it)")
    return DOCKER


def _stage_context(dest: Path) -> None:
    """What git would ship (tracked + untracked-but-not-ignored files): local clutter stays out."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()
    for rel in filter(None, listing.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _torch_wheel(python_version: str, dest: Path) -> tuple[str, Path]:
    """The torch wheel this checkout tests with, for the base image's Python, via plain pip."""
    version = metadata.version("torch").split("+")[0]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "-d", str(dest),
         "--python-version", python_version, "--platform", "manylinux_2_28_x86_64", "--only-binary=:all:"],
        capture_output=True, text=True, timeout=900,
    )
    wheels = sorted(dest.glob("torch-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.fail(f"pip download torch=={version} for Python {python_version} failed:\n{proc.stderr[-2000:]}")
    return version, wheels[0]


@pytest.fixture(scope="module")
def image(engine: str, tmp_path_factory) -> str:
    """Build the real Dockerfile once per session; the engine keeps the layer cache between runs."""
    work = tmp_path_factory.mktemp("docker-build")
    py = docker("run", "--rm", "--network", "none", BASE_IMAGE, "python3", "-c",
                "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
    context = work / "context"
    _stage_context(context)
    torch_version, wheel = _torch_wheel(py, work / "wheels")
    os.link(wheel, context / "docker" / "wheels" / wheel.name)
    ca = work / "ca.pem"
    ca.write_bytes((CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else b"") + b"\n# " + CA_MARKER + b"\n")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    previous = docker("image", "inspect", "-f", "{{.Id}}", IMAGE, check=False).stdout.strip()
    started = time.monotonic()
    proc = docker(
        "build", "--network", "host", "--progress", "plain", "--secret", f"id=ca,src={ca}",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_VERSION={torch_version}",
        "--build-arg", "VERSION=0.0.0+test", "--build-arg", f"GIT_SHA={sha or 'unknown'}",
        "-t", IMAGE, str(context),
        timeout=1800, check=False, env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    print(f"docker build took {time.monotonic() - started:.0f} s")
    if proc.returncode != 0:
        pytest.fail(f"docker build failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    # The image this build replaced would linger untagged (~2 GB per code change); its layers
    # stay in the build cache, so removing it costs the next build nothing.
    current = docker("image", "inspect", "-f", "{{.Id}}", IMAGE).stdout.strip()
    if previous and previous != current:
        docker("rmi", previous, check=False)
    return IMAGE


def _workspace(path: Path, owner: int | None) -> Path:
    """A host folder to mount at /workspace, owned by `owner` (when we may chown)."""
    path.mkdir(parents=True)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, owner, owner)
    return path


def _run_args(ws: Path, env: dict[str, str], user: str | None = None) -> list[str]:
    args = ["--network", "none", "-v", f"{ws}:/workspace"]
    if user:
        args += ["--user", user]
    for key, value in {**RUN_ENV, **env}.items():
        args += ["-e", f"{key}={value}"]
    return args


def _owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


def _checkpoints(out: Path) -> dict[int, Path]:
    found = {}
    for path in (out / "checkpoints").glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "COMPLETE").is_file():
            found[int(match.group(1))] = path
    return found


@pytest.fixture(scope="module")
def demo_run(image: str, tmp_path_factory) -> dict:
    """The demo as on RunPod/Vast: started as root on a workspace that belongs to root (when the host
    lets us make one; else to us), no --user, shortened, no network."""
    ws = _workspace(tmp_path_factory.mktemp("demo") / "workspace", owner=None)
    expected = (1000, 1000) if _owner(ws)[0] == 0 else _owner(ws)
    env = {"SANA_MAX_TRAIN_STEPS": "30", "SANA_CHECKPOINTING_STEPS": "15", "SANA_VALIDATION_STEPS": "15",
           "HF_TOKEN": PLANTED_TOKEN}
    started = time.monotonic()
    proc = docker("run", "--rm", *_run_args(ws, env), image, timeout=900, check=False)
    print(f"demo run took {time.monotonic() - started:.0f} s")
    return {"ws": ws, "owner": expected, "proc": proc}


def test_demo_trains_offline_and_writes_outputs_owned_by_the_unprivileged_user(demo_run):
    proc, ws = demo_run["proc"], demo_run["ws"]
    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    out = ws / DEMO_OUT
    assert _checkpoints(out), f"no checkpoint with a COMPLETE marker in {out / 'checkpoints'}"
    assert list((out / "validation").glob("*.png")), "no validation images"
    assert (out / "final" / "model_index.json").is_file(), "final/ is not a diffusers pipeline folder"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)
    json.loads((out / "run.json").read_text())
    wrong = [p for p in [ws, *ws.rglob("*")] if _owner(p) != demo_run["owner"]]
    assert not wrong, f"not owned by {demo_run['owner']}: {wrong[:5]}"
    writable = [p for p in ws.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o002]
    assert not writable, f"world-writable outputs: {writable[:5]}"


def test_runtime_token_reaches_neither_workspace_nor_logs(demo_run):
    token = PLANTED_TOKEN.encode()
    proc = demo_run["proc"]
    assert PLANTED_TOKEN not in proc.stdout + proc.stderr
    leaked = [p for p in demo_run["ws"].rglob("*") if p.is_file() and token in p.read_bytes()]
    assert not leaked, f"HF_TOKEN written to {leaked}"


def _process_uids(container: str) -> dict[str, int]:
    """Real uid of every process in the container, by command name, read from the host's /proc."""
    pid = docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
    uids, todo = {}, [pid]
    while todo:
        pid = todo.pop()
        status = Path(f"/proc/{pid}/status").read_text()
        name = re.search(r"^Name:\s*(\S+)", status, re.M).group(1)
        uids[name] = int(re.search(r"^Uid:\s*(\d+)", status, re.M).group(1))
        for task in Path(f"/proc/{pid}/task").iterdir():
            todo += (task / "children").read_text().split()
    return uids


def test_docker_stop_saves_a_checkpoint_and_the_next_start_resumes(image, tmp_path_factory):
    # A host user's folder (uid unknown to the image): the trainer must run as that uid.
    owner = 4321 if os.geteuid() == 0 else os.getuid()
    ws = _workspace(tmp_path_factory.mktemp("resume") / "workspace", owner=owner)
    out = ws / DEMO_OUT
    # No periodic checkpoint before the stop: the one we find must come from SIGTERM.
    env = {"SANA_MAX_TRAIN_STEPS": "100000", "SANA_CHECKPOINTING_STEPS": "100000", "SANA_VALIDATION_STEPS": "100000"}
    name = f"sana-test-{secrets.token_hex(4)}"
    docker("run", "-d", "--name", name, *_run_args(ws, env), image)
    try:
        deadline = time.monotonic() + 600
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
            state = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", f"container ended early:\n{docker('logs', name).stderr[-4000:]}"
            assert time.monotonic() < deadline, "no 5 training steps within 10 minutes"
            time.sleep(1)
        uids = _process_uids(name)
        assert uids.get("tini") is not None, f"PID 1 is not tini: {uids}"
        trainers = {n: u for n, u in uids.items() if n.startswith("python")}
        assert trainers and set(trainers.values()) == {owner}, f"trainer must run as {owner}: {uids}"
        started = time.monotonic()
        docker("stop", "-t", "120", name, timeout=180)
        stop_s = time.monotonic() - started
        exit_code = int(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip())
        logs = docker("logs", name)
        assert exit_code == 143, f"exit {exit_code} after docker stop (want 143):\n{logs.stderr[-4000:]}"
        print(f"docker stop took {stop_s:.1f} s")
    finally:
        docker("rm", "-f", name, check=False)
    saved = _checkpoints(out)
    assert saved, f"no valid checkpoint after SIGTERM in {out / 'checkpoints'}"
    step = max(saved)
    assert step >= 5

    # The second start goes through --user, the documented way for hosts that prefer it.
    resume_env = {**env, "SANA_MAX_TRAIN_STEPS": str(step + 3)}
    proc = docker("run", "--rm", *_run_args(ws, resume_env, user=f"{owner}:{owner}"), image, timeout=900, check=False)
    assert proc.returncode == 0, f"resumed run exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert f"resumed from checkpoint-{step}" in proc.stdout + proc.stderr
    assert (out / "final" / "model_index.json").is_file()
    wrong = [p for p in [ws, *ws.rglob("*")] if _owner(p) != (owner, owner)]
    assert not wrong, f"not owned by {owner}: {wrong[:5]}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make workspaces owned by other users")
def test_start_shim_never_leaves_the_trainer_as_root(image, tmp_path_factory):
    """Which uid trains, per way of starting: the cases RunPod/Vast, bind mount and --user produce."""
    shim = ("--entrypoint", "/usr/local/bin/sana-entrypoint")
    cloud = _workspace(tmp_path_factory.mktemp("shim") / "cloud", owner=0)
    out = docker("run", "--rm", "--network", "none", "-v", f"{cloud}:/workspace", *shim, image, "id", "-u").stdout
    assert out.strip() == "1000" and _owner(cloud) == (1000, 1000)
    host = _workspace(tmp_path_factory.mktemp("shim") / "host", owner=4321)
    out = docker("run", "--rm", "--network", "none", "-v", f"{host}:/workspace", *shim, image,
                 "sh", "-c", 'id -u; echo "$HOME"; touch "$HOME/ok"').stdout.split()
    assert out == ["4321", "/tmp/home-4321"]
    out = docker("run", "--rm", "--network", "none", "--user", "555:555", *shim, image, "id", "-u").stdout
    assert out.strip() == "555"


def test_image_code_is_read_only_for_the_trainer_and_pid1_is_tini(image):
    config = json.loads(docker("inspect", image).stdout)[0]["Config"]
    writable = docker("run", "--rm", "--network", "none", "--user", "1000:1000", "--entrypoint", "find", image,
                      "/opt/venv", "/app", "/usr", "/etc", "-writable", "-print", "-quit", check=False).stdout.strip()
    assert not writable, f"the trainer can change installed files: {writable}"
    assert config["Entrypoint"][:3] == ["/usr/bin/tini", "--", "/usr/local/bin/sana-entrypoint"]
    assert config["StopSignal"] == "SIGTERM"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["WORKSPACE"] == "/workspace" and "HF_HOME" not in env
    assert config["Labels"]["org.opencontainers.image.version"] == "0.0.0+test"


def test_env_contract_and_exit_codes_pass_through_tini(image):
    resolved = json.loads(docker("run", "--rm", "--network", "none", image, "config", "--json").stdout)
    assert resolved["workspace"] == "/workspace"
    assert resolved["hf_home"] == "/workspace/cache/huggingface"
    bad = docker("run", "--rm", "--network", "none", "-e", "SANA_LEARNING_RATE=-1", image, "config", check=False)
    assert bad.returncode == 2, f"a config error must exit 2, got {bad.returncode}: {bad.stderr[-2000:]}"
    assert "learning_rate" in bad.stderr


def test_no_secret_in_image_metadata_or_layers(image):
    text = docker("history", "--no-trunc", image).stdout + docker("inspect", image).stdout
    for needle in (PLANTED_TOKEN, CA_MARKER.decode(), "BEGIN CERTIFICATE"):
        assert needle not in text, f"{needle!r} found in docker history/inspect"
    env = json.loads(docker("inspect", image).stdout)[0]["Config"]["Env"]
    leaked = [e for e in env if e.split("=")[0] in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "HF_TOKEN")]
    assert not leaked, f"build-time settings persisted in the image: {leaked}"
    # Every byte of every layer: the build secret must never have been copied into one.
    save = subprocess.Popen([DOCKER, "save", image], stdout=subprocess.PIPE)
    tail, found = b"", False
    assert save.stdout is not None
    while chunk := save.stdout.read(16 << 20):
        window = tail + chunk
        if CA_MARKER in window or PLANTED_TOKEN.encode() in window:
            found = True
        tail = window[-64:]
    assert save.wait(timeout=300) == 0
    assert not found, "a planted secret is inside an image layer"
