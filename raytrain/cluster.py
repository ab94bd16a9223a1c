"""Offline checks of a Ray cluster-launcher YAML (`cluster.yaml`, `configs/clusters/*.yaml`).

`validate_cluster_config` runs, without contacting any cloud:

1. the JSON schema shipped in the Ray wheel (`ray/autoscaler/ray-schema.json`): unknown keys,
   missing `node_config` / `resources`, non-integer resource counts;
2. Ray's own offline preparation, as `ray up` does before it talks to the provider: defaults
   of the provider merged in, setup commands merged, docker section and per-type worker
   bounds checked, then Ray's `validate_config` on the result;
3. raytrain's rules: the head advertises no CPU/GPU (no training there), at least one GPU
   worker type, GPU types scale from zero, whole GPU counts, the docker image is of the
   installed Ray version, the project is installed with `-c constraints.txt`, `.venv` is
   not uploaded.

Every failure is a `ValueError` whose message names the file and the key path.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER = "EDIT_ME"
# `pip install ... -c constraints.txt ... -e <project>` (options in any order)
_PROJECT_INSTALL = re.compile(r"\bpip install\b(?=.*\s(?:-c|--constraint)[ =]?\S*constraints\.txt\b)"
                              r"(?=.*\s(?:-e|--editable)[ =]?\S+)")


def ray_schema() -> dict[str, Any]:
    """The cluster-config JSON schema that ships with the installed Ray."""
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    with open(path, encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def load_cluster_yaml(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a cluster config must be a YAML mapping, got {type(data).__name__}")
    return data


def _key_path(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def schema_errors(config: Mapping[str, Any]) -> list[str]:
    """Every violation of Ray's schema, as 'key.path: message', sorted by key path."""
    import jsonschema

    schema = ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_key_path(e.absolute_path)}: {e.message}" for e in errors]


def _ray_prepare(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's offline part of `ray up`: fill defaults, merge setup commands, check, validate."""
    from ray.autoscaler._private import util
    from ray.autoscaler._private.util import prepare_config, validate_config

    log = logging.getLogger(util.__name__)  # quiet its INFO lines ("setting max workers ...")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        prepared: dict[str, Any] = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    finally:
        log.setLevel(level)
    return prepared


def _images(config: Mapping[str, Any]) -> dict[str, str]:
    """key path -> docker image, for every image the config names."""
    out: dict[str, str] = {}
    docker = config.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            out[f"docker.{key}"] = docker[key]
    for name, spec in (config.get("available_node_types") or {}).items():
        image = (spec.get("docker") or {}).get("worker_image")
        if image:
            out[f"available_node_types.{name}.docker.worker_image"] = image
    return out


def _image_has_version(image: str, version: str) -> bool:
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    return tag == version or tag.startswith(version + "-")


def project_errors(config: Mapping[str, Any], ray_version: str) -> list[str]:
    """raytrain's rules on a config that Ray accepted (after Ray's preparation)."""
    errors: list[str] = []
    types: Mapping[str, Any] = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    for name, spec in types.items():
        res = spec.get("resources") or {}
        at = f"available_node_types.{name}"
        gpus = res.get("GPU", 0)
        if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus != int(gpus) or gpus < 0:
            errors.append(f"{at}.resources.GPU: {gpus!r} is not a whole number of GPUs")
            continue
        if name == head:
            if res.get("CPU") != 0:
                errors.append(f"{at}.resources.CPU: the head must advertise CPU: 0 (got {res.get('CPU')!r}) "
                              "so that no training worker or data task lands on it")
            if gpus:
                errors.append(f"{at}.resources.GPU: the head must advertise no GPU (got {gpus!r})")
        elif gpus and spec.get("min_workers", 0) != 0:
            errors.append(f"{at}.min_workers: GPU node types must scale from zero (min_workers: 0), "
                          f"got {spec['min_workers']!r}: idle GPU nodes are billed")
    if not any(name != head and (spec.get("resources") or {}).get("GPU") for name, spec in types.items()):
        errors.append("available_node_types: no worker type advertises a GPU")

    images = _images(config)
    if not images:
        errors.append("docker.image: no docker image set (use rayproject/ray:<ray version>-py311-gpu)")
    for at, image in images.items():
        if not _image_has_version(image, ray_version):
            errors.append(f"{at}: image {image!r} is not tagged with the installed Ray version {ray_version}")

    # After Ray's merge_setup_commands, head_ and worker_setup_commands hold the common ones too;
    # a node type's own worker_setup_commands replace them for that type.
    lists = {"head_setup_commands": config.get("head_setup_commands") or [],
             "worker_setup_commands": config.get("worker_setup_commands") or []}
    for name, spec in types.items():
        if "worker_setup_commands" in spec and name != head:
            lists[f"available_node_types.{name}.worker_setup_commands"] = spec["worker_setup_commands"]
    for at, cmds in lists.items():
        if not any(_PROJECT_INSTALL.search(c) for c in cmds):
            errors.append(f"{at}: no command installs the project with `pip install -c constraints.txt -e <project>`")

    excludes = {str(x).strip("/") for x in config.get("rsync_exclude") or []}
    if config.get("file_mounts") and ".venv" not in excludes:
        errors.append("rsync_exclude: must exclude .venv (several GB) from the file mounts")
    return errors


def placeholders(config: Any, at: tuple[Any, ...] = ()) -> list[str]:
    """Key paths of string values still holding the EDIT_ME marker (to edit before `ray up`)."""
    if isinstance(config, Mapping):
        return [p for k, v in config.items() for p in placeholders(v, (*at, k))]
    if isinstance(config, list):
        return [p for i, v in enumerate(config) for p in placeholders(v, (*at, i))]
    return [_key_path(at)] if isinstance(config, str) and PLACEHOLDER in config else []


def validate_cluster_config(source: str | Path | Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """Check a cluster-launcher config offline; return it as Ray prepares it for `ray up`.

    `source` is a YAML path or an already loaded mapping (`name` labels it in messages).
    Raises ValueError naming the file and every failing key path.
    """
    import ray

    if isinstance(source, Mapping):
        label = name or "<cluster config>"
        raw = copy.deepcopy(dict(source))
    else:
        label = name or str(source)
        raw = load_cluster_yaml(source)

    def fail(problems: list[str], what: str) -> ValueError:
        lines = "\n".join(f"  {p}" for p in problems)
        return ValueError(f"{label}: {what}:\n{lines}")

    errs = schema_errors(raw)
    if errs:
        raise fail(errs, "does not match Ray's cluster schema (ray/autoscaler/ray-schema.json)")
    try:
        prepared = _ray_prepare(raw)
    except Exception as exc:  # Ray raises ValueError, AssertionError, RuntimeError or a schema error
        raise fail([f"{type(exc).__name__}: {exc}"], "rejected by Ray's config preparation") from None
    errs = project_errors(prepared, ray.__version__)
    if errs:
        raise fail(errs, "breaks raytrain's cluster rules")
    return prepared


def local_autoscaling_config(config: Mapping[str, Any], *, provider: Mapping[str, Any], idle_timeout_minutes: float,
                             cpu_divisor: int = 8, max_workers_per_type: int = 2,
                             object_store_memory: int | None = None) -> dict[str, Any]:
    """The autoscaling part of a cluster-launcher config, shrunk so that one small machine can run it under a
    local node provider (Ray's fake multi-node provider starts every "node" as raylet processes on this host).

    Kept from `config`: the cluster name, the node-type names, the head type, each type's GPU count and other
    custom resources, its `min_workers`, `upscaling_speed`. Shrunk: CPU counts are divided by `cpu_divisor`
    (rounded up; a CPU: 0 head stays 0), each type's `max_workers` is capped at `max_workers_per_type` and the
    cluster's at their sum, `idle_timeout_minutes` is replaced (a float: fractions of a minute). Dropped: all
    that only a cloud needs (node_config, docker, auth, setup and start commands, file mounts). With
    `object_store_memory` (bytes) every worker type gets a small object store instead of 30% of the RAM.
    """
    if cpu_divisor < 1 or max_workers_per_type < 0 or idle_timeout_minutes <= 0:
        raise ValueError("local_autoscaling_config: cpu_divisor >= 1, max_workers_per_type >= 0 and "
                         "idle_timeout_minutes > 0 are required")
    head = config["head_node_type"]
    types: dict[str, Any] = {}
    for name, spec in config["available_node_types"].items():
        resources = dict(spec.get("resources") or {})
        if "CPU" in resources:
            resources["CPU"] = -(-int(resources["CPU"]) // cpu_divisor)
        node: dict[str, Any] = {"node_config": {}, "resources": resources}
        if name == head:
            node["max_workers"] = 0
        else:
            if object_store_memory is not None:
                resources["object_store_memory"] = int(object_store_memory)
            node["min_workers"] = int(spec.get("min_workers", 0))
            node["max_workers"] = min(int(spec.get("max_workers", max_workers_per_type)), max_workers_per_type)
        types[name] = node
    workers = sum(t["max_workers"] for n, t in types.items() if n != head)
    return {
        "cluster_name": config.get("cluster_name", "default"),
        "max_workers": min(int(config.get("max_workers", workers)), workers),
        "upscaling_speed": config.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": float(idle_timeout_minutes),
        "provider": dict(provider),
        "auth": {},
        "docker": {},
        "available_node_types": types,
        "head_node_type": head,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
