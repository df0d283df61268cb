"""deploy/kuberay/*.yaml validate strictly against KubeRay's CRD schemas, offline.

The CRDs (ray.io v1, KubeRay commit feeaf72) sit outside the repository, in
/work/shared/data/kuberay/crd/ (see its README.md); without them the schema tests skip. Strict:
the API server silently prunes fields its schema does not list, so a misspelled or misplaced
field would deploy as if absent; here every object schema that lists ``properties`` (and does
not preserve unknown fields) rejects any other key.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT.parent / "shared" / "data" / "kuberay" / "crd"
MANIFEST_DIR = ROOT / "deploy" / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
MANIFESTS = sorted(MANIFEST_DIR.glob("*.yaml"))
# The C loader reads the three CRDs (3.3 MB) in about a second; the pure-Python one takes ~10.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_manifest(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The ``v1`` openAPIV3Schema of ``kind``'s CRD, as the API server checks it."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}")
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=YAML_LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` in which every object schema listing ``properties`` (and not marked
    ``x-kubernetes-preserve-unknown-fields``) allows no other key."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "not", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(sub) for sub in schema[key]]
    return out


@functools.cache
def strict_validator(kind: str) -> Draft7Validator:
    return Draft7Validator(strict(crd_schema(kind)))


def schema_errors(manifest: dict[str, Any], validator: Draft7Validator) -> list[str]:
    """Each error as "<path>: <message>", in path order."""
    errors = sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.path])
    return ["/".join(str(p) for p in e.path) + f": {e.message}" for e in errors]


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService."""
    spec = manifest["spec"]
    return {
        "RayCluster": lambda: spec,
        "RayJob": lambda: spec["rayClusterSpec"],
        "RayService": lambda: spec["rayClusterConfig"],
    }[manifest["kind"]]()


# --- The manifests validate ---------------------------------------------------------------------


def test_every_kind_has_a_manifest():
    kinds = {load_manifest(path)["kind"] for path in MANIFESTS}
    assert kinds == set(CRD_FILES), [path.name for path in MANIFESTS]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly_against_its_crd(path: Path):
    manifest = load_manifest(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert schema_errors(manifest, strict_validator(manifest["kind"])) == []


# --- ... and the validation can fail ------------------------------------------------------------


def misspell_group_field(spec: dict[str, Any]) -> str:
    group = spec["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    return "'rayStartParam' was unexpected"


def misspell_container_field(spec: dict[str, Any]) -> str:
    container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["imgae"] = container.pop("image")
    return "'imgae' was unexpected"


def misplace_group_field(spec: dict[str, Any]) -> str:
    # rayStartParams is a worker group's, not the pod's; moved, the group is still valid.
    group = spec["workerGroupSpecs"][0]
    group["template"]["spec"]["rayStartParams"] = group.pop("rayStartParams")
    return "'rayStartParams' was unexpected"


def misplace_autoscaler_field(spec: dict[str, Any]) -> str:
    spec["headGroupSpec"]["enableInTreeAutoscaling"] = spec.pop("enableInTreeAutoscaling")
    return "'enableInTreeAutoscaling' was unexpected"


@pytest.mark.parametrize(
    "break_it",
    [
        misspell_group_field,
        misspell_container_field,
        misplace_group_field,
        misplace_autoscaler_field,
    ],
)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_a_misspelled_or_misplaced_field_fails(path: Path, break_it):
    broken = copy.deepcopy(load_manifest(path))
    unexpected = break_it(cluster_spec(broken))
    errors = schema_errors(broken, strict_validator(broken["kind"]))
    assert len(errors) == 1 and unexpected in errors[0], errors
    # The CRD as published accepts it (the API server would prune the field): strictness is
    # what catches it.
    assert schema_errors(broken, Draft7Validator(crd_schema(broken["kind"]))) == []


def test_a_wrong_type_fails_even_without_strictness():
    broken = copy.deepcopy(load_manifest(MANIFEST_DIR / "raycluster.yaml"))
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    errors = schema_errors(broken, Draft7Validator(crd_schema("RayCluster")))
    assert errors == ["spec/workerGroupSpecs/0/maxReplicas: 'eight' is not of type 'integer'"]


# --- The RayService's Serve application ---------------------------------------------------------


def serve_applications() -> list[dict[str, Any]]:
    service = load_manifest(MANIFEST_DIR / "rayservice.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert isinstance(serve_config, dict), "serveConfigV2 must hold a YAML mapping"
    return serve_config["applications"]


def test_serve_config_names_a_module_of_the_package():
    applications = serve_applications()
    assert [app["name"] for app in applications] == ["raycake-openai"]
    for app in applications:
        module, _, attribute = app["import_path"].partition(":")
        assert module.startswith("raycake.") and attribute, app["import_path"]
        assert importlib.util.find_spec(module) is not None, module
        # The cluster config it serves is the repository's, at the image's working directory.
        config = Path(app["args"]["config"])
        assert config.is_relative_to("/home/ray/raycake")
        assert (ROOT / config.relative_to("/home/ray/raycake")).is_file(), config


def test_serve_config_names_a_one_argument_builder():
    # Read from the source, not imported: importing the module starts no Ray, but costs seconds.
    for app in serve_applications():
        module, _, attribute = app["import_path"].partition(":")
        source = Path(importlib.util.find_spec(module).origin).read_text()
        functions = {
            node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
        }
        assert attribute in functions, f"{module} defines no function {attribute!r}"
        assert len(functions[attribute].args.args) == 1  # Serve passes the args dict only
