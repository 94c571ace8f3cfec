#!/usr/bin/env python3
"""Build a tiny OCI image (busybox-static) with no network, stdlib only.

Usage: make-busybox-image.py OUT.tar [REF] [BUSYBOX] [CMD_JSON]
  OUT.tar   OCI image-layout tarball, importable with `ctr image import`
  REF       image name (default docker.io/library/busybox:test)
  BUSYBOX   static busybox binary (default /bin/busybox, from Debian's busybox-static)
  CMD_JSON  image Cmd as a JSON list (default ["/bin/sh"]); e.g. a CRI sandbox
            ("pause") image: '["/bin/sleep","2147483647"]'

The tarball holds: oci-layout, index.json (with the
org.opencontainers.image.ref.name annotation that ctr uses to name the image),
blobs/sha256/{layer tar.gz, config json, manifest json}.
"""
import gzip
import hashlib
import io
import json
import sys
import tarfile

out = sys.argv[1] if len(sys.argv) > 1 else "busybox-oci.tar"
ref = sys.argv[2] if len(sys.argv) > 2 else "docker.io/library/busybox:test"
busybox = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else "/bin/busybox"
cmd = json.loads(sys.argv[4]) if len(sys.argv) > 4 else ["/bin/sh"]

APPLETS = ["sh", "echo", "cat", "ls", "sleep", "true", "false", "env", "id",
           "ps", "kill", "mkdir", "rm", "cp", "mv", "touch", "head", "tail",
           "grep", "wc", "date", "hostname", "uname", "pwd", "mount", "test",
           "printf", "yes", "dd", "seq", "stat", "sync", "ip", "ifconfig",
           "wget", "nc", "vi", "top", "free", "df", "du", "find", "sed", "awk"]
MTIME = 0  # fixed timestamps -> reproducible digests


def tarinfo(name, **kw):
    ti = tarfile.TarInfo(name)
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


# ---- layer: uncompressed tar first (its digest is the diff_id) ----
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "run"]:
        t.addfile(tarinfo(d + "/", type=tarfile.DIRTYPE,
                          mode=0o1777 if d == "tmp" else 0o755))
    data = open(busybox, "rb").read()
    if b"ld-linux" in data[:8192]:  # has a PT_INTERP: dynamically linked
        sys.exit(f"{busybox} is not static: apt-get install busybox-static")
    t.addfile(tarinfo("bin/busybox", size=len(data), mode=0o755), io.BytesIO(data))
    for a in APPLETS:
        t.addfile(tarinfo("bin/" + a, type=tarfile.SYMTYPE, linkname="busybox",
                          mode=0o777))
    for name, body in [("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                       ("etc/group", "root:x:0:\n"),
                       ("etc/hostname", "busybox\n")]:
        b = body.encode()
        t.addfile(tarinfo(name, size=len(b), mode=0o644), io.BytesIO(b))
layer_tar = raw.getvalue()
diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
layer_gz = gzip.compress(layer_tar, mtime=0)

config = {
    "architecture": "amd64",
    "os": "linux",
    "created": "1970-01-01T00:00:00Z",
    "config": {
        "Env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
        "Cmd": cmd,
        "WorkingDir": "/",
    },
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created": "1970-01-01T00:00:00Z",
                 "created_by": "make-busybox-image.py"}],
}
config_b = json.dumps(config, separators=(",", ":")).encode()


def desc(media_type, blob, **extra):
    d = {"mediaType": media_type,
         "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
         "size": len(blob)}
    d.update(extra)
    return d


manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": desc("application/vnd.oci.image.config.v1+json", config_b),
    "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", layer_gz)],
}
manifest_b = json.dumps(manifest, separators=(",", ":")).encode()

index = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [desc("application/vnd.oci.image.manifest.v1+json", manifest_b,
                       platform={"architecture": "amd64", "os": "linux"},
                       annotations={"org.opencontainers.image.ref.name": ref,
                                    "io.containerd.image.name": ref})],
}
index_b = json.dumps(index, separators=(",", ":")).encode()

with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
    def add(name, blob):
        t.addfile(tarinfo(name, size=len(blob), mode=0o644), io.BytesIO(blob))
    t.addfile(tarinfo("blobs/", type=tarfile.DIRTYPE, mode=0o755))
    t.addfile(tarinfo("blobs/sha256/", type=tarfile.DIRTYPE, mode=0o755))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index_b)
    for blob in (layer_gz, config_b, manifest_b):
        add("blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)

print(f"wrote {out}: {ref} manifest sha256:{hashlib.sha256(manifest_b).hexdigest()}")
