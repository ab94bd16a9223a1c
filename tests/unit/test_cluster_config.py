"""The Ray cluster-launcher configs (cluster.yaml for AWS, configs/clusters/gcp.yaml) pass Ray's
own schema and offline preparation plus raytrain's rules; broken copies of them fail with the
failing key in the message. Nothing here starts Ray or contacts a cloud."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler

from raytrain.cli import main
from raytrain.cluster import (
    load_cluster_yaml,
    local_autoscaling_config,
    placeholders,
    schema_errors,
    validate_cluster_config,
)

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "cluster.yaml"
GCP = ROOT / "configs" / "clusters" / "gcp.yaml"
FILES = [AWS, GCP]
IDS = ["aws", "gcp"]


def ray_schema() -> dict[str, Any]:
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json", encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")}


# --- the real files -------------------------------------------------------------------------


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_matches_the_schema_shipped_in_the_ray_wheel(path: Path) -> None:
    jsonschema.validate(load_cluster_yaml(path), ray_schema())


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_ray_offline_preparation_accepts_it(path: Path) -> None:
    raw = load_cluster_yaml(path)
    prepared = validate_cluster_config(path)
    # Ray's prepare_config ran: setup commands merged, per-type bounds filled, defaults merged.
    common = raw["setup_commands"]
    assert prepared["head_setup_commands"][: len(common)] == common
    assert prepared["worker_setup_commands"][: len(common)] == common
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert prepared["head_node_type"] == "head"
    assert "cluster_synced_files" in prepared and "auth" in prepared
    # and the prepared form still passes the schema (Ray validates it again before `ray up`)
    jsonschema.validate(prepared, ray_schema())


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_node_roles_cpu_head_and_gpu_workers_from_zero(path: Path) -> None:
    cfg = load_cluster_yaml(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must take no training work"
    gpus = gpu_types(cfg)
    counts = sorted(t["resources"]["GPU"] for t in gpus.values())
    assert counts[0] == 1 and counts[-1] > 1, f"want a 1-GPU and a multi-GPU type, got {counts}"
    for name, t in gpus.items():
        assert type(t["resources"]["GPU"]) is int, name
        assert t["min_workers"] == 0, name
        assert 0 < t["max_workers"] <= cfg["max_workers"], name
    assert cfg["idle_timeout_minutes"] > 0
    assert sum(t.get("min_workers", 0) for t in cfg["available_node_types"].values()) == 0


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_docker_image_is_the_installed_ray_version_python311_gpu(path: Path) -> None:
    image = load_cluster_yaml(path)["docker"]["image"]
    repo, tag = image.rsplit(":", 1)
    assert repo == "rayproject/ray"
    assert tag == f"{ray.__version__}-py311-gpu"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_project_is_mounted_and_installed_with_constraints(path: Path) -> None:
    cfg = load_cluster_yaml(path)
    assert cfg["file_mounts"] == {"~/raytrain": "."}
    assert any("-c constraints.txt -e ." in c and "~/raytrain" in c for c in cfg["setup_commands"])
    assert {"/.venv", "/runs", "/data", "/.git", "/mlruns"} <= set(cfg["rsync_exclude"])
    # unanchored "data" would also drop the raytrain/data package from the mount
    assert "data" not in cfg["rsync_exclude"]


def test_aws_and_gcp_variants_agree() -> None:
    aws, gcp = load_cluster_yaml(AWS), load_cluster_yaml(GCP)
    assert aws["provider"]["type"] == "aws" and aws["provider"]["region"]
    assert gcp["provider"]["type"] == "gcp"
    assert "provider.project_id" in placeholders(gcp), "the GCP project must be marked to edit"
    for key in ("docker", "setup_commands", "file_mounts", "rsync_exclude", "head_node_type"):
        assert aws[key] == gcp[key], key
    assert {n: t["resources"].get("GPU", 0) for n, t in aws["available_node_types"].items()} == \
           {n: t["resources"].get("GPU", 0) for n, t in gcp["available_node_types"].items()}
    for t in gpu_types(gcp).values():
        (acc,) = t["node_config"]["guestAccelerators"]
        assert acc["acceleratorCount"] == t["resources"]["GPU"]


# --- broken copies of the real files must fail ----------------------------------------------

Edit = Callable[[dict[str, Any]], None]


def broken(path: Path, edit: Edit) -> dict[str, Any]:
    cfg = copy.deepcopy(load_cluster_yaml(path))
    edit(cfg)
    return cfg


def _misspell_node_config(c: dict[str, Any]) -> None:
    t = c["available_node_types"]["gpu_1x"]
    t["node_confg"] = t.pop("node_config")


def _extra_max_worker(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_4x"]["max_worker"] = 3


def _half_gpu(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5


SCHEMA_BREAKS: list[tuple[str, Edit, list[str]]] = [
    ("misspelt node_config", _misspell_node_config,
     ["available_node_types.gpu_1x", "'node_confg' was unexpected", "'node_config' is a required property"]),
    ("extra max_worker key", _extra_max_worker, ["available_node_types.gpu_4x", "'max_worker' was unexpected"]),
    ("fractional GPU", _half_gpu, ["available_node_types.gpu_1x.resources.GPU", "0.5 is not of type 'integer'"]),
]


def assert_rejected(cfg: dict[str, Any], path: Path, reason: str, what: str, expected: list[str]) -> None:
    """validate_cluster_config refuses `cfg` with `<file>: <reason>` and every text of `expected`."""
    with pytest.raises(ValueError) as err:
        validate_cluster_config(cfg, name=path.name)
    msg = str(err.value)
    assert msg.startswith(f"{path.name}: {reason}"), msg
    for text in expected:
        assert text in msg, f"{what}: {text!r} not in {msg}"


@pytest.mark.parametrize("path", FILES, ids=IDS)
@pytest.mark.parametrize(("what", "edit", "expected"), SCHEMA_BREAKS, ids=[b[0] for b in SCHEMA_BREAKS])
def test_schema_rejects_broken_copy(path: Path, what: str, edit: Edit, expected: list[str]) -> None:
    cfg = broken(path, edit)
    with pytest.raises(jsonschema.ValidationError):  # Ray's schema itself, no raytrain logic
        jsonschema.validate(cfg, ray_schema())
    assert_rejected(cfg, path, "does not match Ray's cluster schema", what, expected)


def _head_not_a_type(c: dict[str, Any]) -> None:
    c["head_node_type"] = "head_typo"


def _container_without_image(c: dict[str, Any]) -> None:
    c["docker"] = {"container_name": "raytrain"}


RAY_PREP_BREAKS: list[tuple[str, Edit, list[str]]] = [
    ("head type not defined", _head_not_a_type, ["head_node_type", "must be one of `available_node_types`"]),
    ("docker without image", _container_without_image, ["Must provide a container & image name"]),
]


@pytest.mark.parametrize("path", FILES, ids=IDS)
@pytest.mark.parametrize(("what", "edit", "expected"), RAY_PREP_BREAKS, ids=[b[0] for b in RAY_PREP_BREAKS])
def test_ray_preparation_rejects_broken_copy(path: Path, what: str, edit: Edit, expected: list[str]) -> None:
    cfg = broken(path, edit)
    jsonschema.validate(cfg, ray_schema())  # the schema alone lets these through
    assert_rejected(cfg, path, "rejected by Ray's config preparation", what, expected)


def _set(*keys: str, value: Any) -> Edit:
    def edit(c: dict[str, Any]) -> None:
        node = c
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def _drop_gpus(c: dict[str, Any]) -> None:
    for t in c["available_node_types"].values():
        t["resources"].pop("GPU", None)


def _drop_venv_exclude(c: dict[str, Any]) -> None:
    c["rsync_exclude"] = [x for x in c["rsync_exclude"] if x != "/.venv"]


RULE_BREAKS: list[tuple[str, Edit, list[str]]] = [
    ("head advertises CPUs", _set("available_node_types", "head", "resources", "CPU", value=8),
     ["available_node_types.head.resources.CPU", "CPU: 0"]),
    ("head advertises a GPU", _set("available_node_types", "head", "resources", "GPU", value=1),
     ["available_node_types.head.resources.GPU"]),
    ("GPU type kept warm", _set("available_node_types", "gpu_4x", "min_workers", value=1),
     ["available_node_types.gpu_4x.min_workers", "min_workers: 0"]),
    ("no GPU worker type", _drop_gpus, ["available_node_types: no worker type advertises a GPU"]),
    ("image of another Ray", _set("docker", "image", value="rayproject/ray:2.9.3-py311-gpu"),
     ["docker.image", "2.9.3", ray.__version__]),
    ("image with a longer version", _set("docker", "image", value=f"rayproject/ray:{ray.__version__}1-py311-gpu"),
     ["docker.image"]),
    ("install without constraints", _set("setup_commands", value=["cd ~/raytrain && pip install -e ."]),
     ["head_setup_commands", "worker_setup_commands", "-c constraints.txt"]),
    ("constraints but not the project", _set("setup_commands", value=["pip install -c constraints.txt numpy"]),
     ["worker_setup_commands"]),
    ("node type's own setup without constraints",
     _set("available_node_types", "gpu_1x", "worker_setup_commands", value=["cd ~/raytrain && pip install -e ."]),
     ["available_node_types.gpu_1x.worker_setup_commands"]),
    (".venv uploaded", _drop_venv_exclude, ["rsync_exclude", ".venv"]),
]


@pytest.mark.parametrize("path", FILES, ids=IDS)
@pytest.mark.parametrize(("what", "edit", "expected"), RULE_BREAKS, ids=[b[0] for b in RULE_BREAKS])
def test_raytrain_rules_reject_broken_copy(path: Path, what: str, edit: Edit, expected: list[str]) -> None:
    cfg = broken(path, edit)
    jsonschema.validate(cfg, ray_schema())  # Ray's schema does not catch these
    assert_rejected(cfg, path, "breaks raytrain's cluster rules", what, expected)


def test_whole_float_gpu_count_is_accepted() -> None:
    """The schema's 'integer' accepts 1.0 (JSON has one number type); Ray reads it as 1 GPU."""
    cfg = broken(AWS, _set("available_node_types", "gpu_1x", "resources", "GPU", value=1.0))
    assert validate_cluster_config(cfg)["available_node_types"]["gpu_1x"]["resources"]["GPU"] == 1


def test_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad_cluster.yaml"
    bad.write_text(AWS.read_text().replace("min_workers: 0\n    max_workers: 2", "min_workers: 0\n    max_worker: 2"))
    with pytest.raises(ValueError, match=r"bad_cluster\.yaml: .*\n.*'max_worker' was unexpected"):
        validate_cluster_config(bad)


# --- the local autoscaling config (tests/integration/test_autoscaler.py) ---------------------


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_local_autoscaling_config_keeps_the_node_types_and_shrinks_them(path: Path) -> None:
    cfg = load_cluster_yaml(path)
    provider = {"type": "external", "module": "some.module.Provider"}
    local = local_autoscaling_config(cfg, provider=provider, idle_timeout_minutes=0.1, cpu_divisor=8,
                                     max_workers_per_type=2, object_store_memory=100 * 2**20)
    assert schema_errors(local) == []
    assert local["provider"] == provider and local["idle_timeout_minutes"] == 0.1
    assert local["head_node_type"] == cfg["head_node_type"] and local["cluster_name"] == cfg["cluster_name"]
    assert local["upscaling_speed"] == cfg["upscaling_speed"]
    types, src = local["available_node_types"], cfg["available_node_types"]
    assert list(types) == list(src)
    head = cfg["head_node_type"]
    assert types[head] == {"node_config": {}, "resources": {"CPU": 0}, "max_workers": 0}
    for name, t in types.items():
        want = dict(src[name]["resources"])
        want["CPU"] = -(-want["CPU"] // 8)  # 8 -> 1, 48 -> 6, 32 -> 4: rounded up, 0 stays 0
        if name != head:
            want["object_store_memory"] = 100 * 2**20
            assert t["min_workers"] == src[name]["min_workers"] == 0
            assert t["max_workers"] == min(src[name]["max_workers"], 2)
        assert t["resources"] == want and t["node_config"] == {}
    assert local["max_workers"] == 2 * (len(types) - 1)
    assert not local["setup_commands"] and not local["head_start_ray_commands"] and local["docker"] == {}


def test_local_autoscaling_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="idle_timeout_minutes"):
        local_autoscaling_config(load_cluster_yaml(AWS), provider={"type": "x"}, idle_timeout_minutes=0)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_cluster_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster-check", str(AWS), str(GCP)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: 3 node types in ") == 2
    assert f"{GCP}" in out and "provider.project_id" in out  # placeholders left to edit are listed


def test_cli_cluster_check_fails_on_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "cluster.yaml"
    bad.write_text(AWS.read_text().replace('{"CPU": 8, "GPU": 1}', '{"CPU": 8, "GPU": 0.5}'))
    assert main(["cluster-check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "available_node_types.gpu_1x.resources.GPU: 0.5 is not of type 'integer'" in err
    assert str(bad) in err
