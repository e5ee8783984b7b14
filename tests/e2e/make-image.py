#!/usr/bin/env python3
"""Writes a one-layer container image as a docker-archive tarball (what `ctr images import`
loads) from files on this host, so the kubelet end-to-end test needs no registry.

Usage: make-image.py OUT.tar NAME:TAG ENTRYPOINT_JSON SRC=DEST [SRC=DEST ...] [LINK->TARGET ...]
  SRC=DEST      copy the host file SRC into the image at DEST (mode kept)
  LINK->TARGET  a symlink LINK in the image pointing at TARGET
"""
import hashlib
import io
import json
import sys
import tarfile


def main() -> None:
    out, ref, entrypoint, *entries = sys.argv[1:]
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = set()
        for entry in entries:
            dest = entry.split("->")[0] if "->" in entry else entry.split("=", 1)[1]
            parts = dest.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            if "->" in entry:
                link, target = entry.split("->", 1)
                info = tarfile.TarInfo(link.strip("/"))
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                src, dest = entry.split("=", 1)
                tar.add(src, arcname=dest.strip("/"), recursive=False)
        for d in ("tmp", "dev", "proc", "sys", "etc"):
            if d not in dirs:
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
                tar.addfile(info)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": json.loads(entrypoint), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]
    with tarfile.open(out, mode="w") as tar:
        for name, data in (("layer.tar", layer_bytes), (config_name, config_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
