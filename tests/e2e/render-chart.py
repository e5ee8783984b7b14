#!/usr/bin/env python3
"""Renders the Helm chart as `helm template` does (Helm's own engine, through the
helm-python-sdk of tests/manifests/requirements.txt), with the RBD controller, its Secret and
StorageClass enabled for the e2e guest's one-node Ceph. The cephx key is only known once that
Ceph runs in the guest: the Secret carries the placeholder @CEPHX_USER_KEY@, which
tests/e2e/scenarios.sh fills in.

Usage: render-chart.py OUT.yaml
"""
import os
import sys

import helm_python as helm  # type: ignore[import-not-found]

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "charts", "vduse-csi")
VALUES = {
    "rbd": {
        "enabled": True,
        "clusters": [{"clusterID": "ceph", "monitors": ["127.0.0.1:6789"]}],
        "secret": {"create": True, "userID": "kubernetes", "userKey": "@CEPHX_USER_KEY@"},
        "storageClass": {"create": True},
    },
}


def main() -> None:
    (out,) = sys.argv[1:]
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(VALUES, name="vduse-csi", namespace="vduse-csi", is_install=True)
    with open(out, "w") as f:
        for path, text in sorted(rendered.items()):
            if path.endswith(".yaml") and text.strip():
                f.write(f"---\n# Source: {path}\n{text.strip()}\n")


if __name__ == "__main__":
    main()
