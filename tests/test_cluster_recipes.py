"""The cluster recipes agree with the code they drive: the sweep's flags exist in
``sweeps/run.py``'s parser and pass the same cluster checks as ``sweeps/tools/submit.py``, the
``ray start`` options exist in the installed Ray, and shared paths are really shared.
Nothing here needs Kubernetes or Slurm."""

import re
import shlex
import subprocess
import warnings
from pathlib import Path

import pytest
import ray
import yaml

from sweeps.cli import build_parser
from sweeps.tools import submit

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay-rayjob.yaml"
SBATCH = ROOT / "cluster" / "slurm" / "sweep.sbatch"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def _ray_start_options() -> set[str]:
    with warnings.catch_warnings():  # importing Ray's CLI imports Serve, which warns about pydantic
        warnings.simplefilter("ignore")
        from ray.scripts.scripts import start
    return {opt for param in start.params for opt in param.opts}


RAY_START_OPTIONS = _ray_start_options()


# ---- KubeRay -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest() -> dict:
    docs = {d["kind"]: d for d in yaml.safe_load_all(KUBERAY.read_text())}
    assert set(docs) == {"PersistentVolumeClaim", "RayJob"}
    return docs


def _groups(rayjob: dict) -> list[dict]:
    """The pod specs of the head group and every worker group."""
    spec = rayjob["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _entrypoint_args(rayjob: dict) -> list[str]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "sweeps/run.py"]
    return argv[2:]


def test_rayjob_entrypoint_is_a_valid_cluster_sweep(manifest):
    args = _entrypoint_args(manifest["RayJob"])
    # run.py's own parser (a typo fails here) and the checks submit.py applies before a job.
    parsed = submit.check_run_args(args)
    assert parsed.storage.startswith("/") or "://" in parsed.storage
    assert vars(parsed) == vars(build_parser().parse_args(args))


def test_rayjob_storage_and_data_are_on_the_shared_volume_of_every_pod(manifest):
    parsed = build_parser().parse_args(_entrypoint_args(manifest["RayJob"]))
    pvc = manifest["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group in _groups(manifest["RayJob"]):
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            shared = [m["mountPath"] for m in container["volumeMounts"]
                      if claims.get(m["name"]) == pvc["metadata"]["name"]]
            assert shared, f"{container['name']} does not mount {pvc['metadata']['name']}"
            for path in (parsed.storage, parsed.data):
                assert any(path.startswith(m.rstrip("/") + "/") for m in shared), (container["name"], path)


def test_rayjob_runtime_env_ships_the_images_project(manifest):
    env = yaml.safe_load(manifest["RayJob"]["spec"]["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert env["working_dir"] == workdir
    # The decoded-image cache is node-local: a volume of its own in every pod, not the PVC.
    cache = env["env_vars"]["FTSWEEP_CACHE"]
    for group in _groups(manifest["RayJob"]):
        pod = group["template"]["spec"]
        local = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            assert any(cache.startswith(m["mountPath"].rstrip("/") + "/")
                       for m in container["volumeMounts"] if m["name"] in local), container["name"]


def test_rayjob_turns_token_auth_on_and_matches_the_installed_ray(manifest):
    cluster = manifest["RayJob"]["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == ray.__version__
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")
    for group in _groups(manifest["RayJob"]):
        for key in group["rayStartParams"]:
            assert f"--{key}" in RAY_START_OPTIONS, key


def test_rayjob_trials_fit_on_a_worker(manifest):
    """A trial asking for more CPUs than any worker pod has would wait forever."""
    parsed = build_parser().parse_args(_entrypoint_args(manifest["RayJob"]))
    for group in manifest["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert parsed.cpus_per_trial <= float(container["resources"]["limits"]["cpu"])


def test_dockerfile_copies_every_package_pyproject_installs():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {src for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY")
              for src in line.split()[1:-1] if not src.startswith("--")}
    packages = {pattern.removesuffix("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied == {"pyproject.toml", project["project"]["readme"], *packages}


# ---- Slurm ---------------------------------------------------------------------------------

def _commands(script: str) -> list[str]:
    """The script's lines with continuations joined, comments left out."""
    lines = script.replace("\\\n", " ").splitlines()
    return [line for line in lines if not line.lstrip().startswith("#")]


def test_sbatch_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_sweep_args_are_a_valid_cluster_sweep(tmp_path):
    """Bash itself expands the settings block, with Slurm's variables as a job would see them."""
    script = SBATCH.read_text()
    settings = re.search(r"^# ---- settings -+\n(.*?)^# -{20,}", script, re.M | re.S).group(1)
    (tmp_path / "settings.sh").write_text(settings)
    proc = subprocess.run(
        ["bash", "-c", 'set -eu; source "$1"; printf "%s\\n" "${SWEEP_ARGS[@]}"', "_",
         str(tmp_path / "settings.sh")],
        env={"PATH": "/usr/bin:/bin", "USER": "alice", "SLURM_SUBMIT_DIR": "/home/alice/ftsweep",
             "SLURM_JOB_ID": "4242"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()
    parsed = submit.check_run_args(args)
    assert parsed.storage == "/shared/alice/ftsweep/sweeps" and parsed.name == "flowers-4242"


def test_sbatch_submits_exactly_the_checked_args_with_submits_own_flags():
    (line,) = [s for s in _commands(SBATCH.read_text()) if "sweeps/tools/submit.py" in s]
    argv = shlex.split(line.split("||")[0])
    own, run_args = submit.split_argv(argv[argv.index("sweeps/tools/submit.py") + 1:])
    assert run_args == ["${SWEEP_ARGS[@]}"]
    opts = submit.build_parser().parse_args(own)
    assert opts.address.startswith("http://") and opts.wait
    assert {e.partition("=")[0] for e in opts.env} == {"FTSWEEP_CACHE", "TORCH_HOME"}


def test_sbatch_starts_every_ray_node_with_srun_and_token_auth():
    lines = _commands(SBATCH.read_text())
    starts = [i for i, s in enumerate(lines) if "ray start" in s]
    assert len(starts) == 2  # the head, then one worker per remaining node
    auth = next(i for i, s in enumerate(lines) if s.strip() == "export RAY_AUTH_MODE=token")
    token = next(i for i, s in enumerate(lines) if s.strip().startswith("export RAY_AUTH_TOKEN_PATH="))
    assert auth < starts[0] and token < starts[0]
    for i in starts:
        words = shlex.split(lines[i].replace("&", " "))
        assert words[0] == "srun", lines[i]
        ray_args = words[words.index("start") + 1:]
        for word in ray_args:
            if word.startswith("--"):
                assert word.split("=")[0] in RAY_START_OPTIONS, word
        assert "--block" in ray_args  # the step lives as long as the node
