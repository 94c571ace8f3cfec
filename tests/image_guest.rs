//! `shoji run --image` on the real guest with a `FROM scratch` image: one static binary, no
//! `/proc`, `/dev` or `/sys` to mount on (issue 11). The container's root is writable (an
//! overlay in the guest), and the unpacked image in the cache, shared by every run, is not.
use sha2::{Digest, Sha256};
use shoji_tests::{guest_artifacts, require_kvm, shoji_bin};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The one file of the image: Debian's static busybox (what the built-in rootfs uses too).
const BUSYBOX: &str = "/bin/busybox";

/// Writes a blob into the layout; its digest.
fn put_blob(layout: &Path, data: &[u8]) -> String {
    let hex = format!("{:x}", Sha256::digest(data));
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

/// An OCI image layout whose only layer holds `/busybox` (no directories at all) and whose
/// config runs `cmd`; the manifest digest.
fn scratch_image(layout: &Path, busybox: &[u8], cmd: &[&str]) -> String {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(busybox.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "busybox", busybox).unwrap();
    let layer = b.into_inner().unwrap();
    let diff_id = put_blob(layout, &layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = config.to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put_blob(layout, config.as_bytes()), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": diff_id, "size": layer.len()}],
    })
    .to_string();
    let digest = put_blob(layout, manifest.as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len(),
        "platform": {"architecture": "amd64", "os": "linux"}}]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digest
}

/// Every path below `dir` (relative, sorted), with a file's contents hashed.
fn tree(dir: &Path) -> Vec<(PathBuf, Option<String>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let hash = meta.is_file().then(|| format!("{:x}", Sha256::digest(std::fs::read(&p).unwrap())));
            if meta.is_dir() {
                todo.push(p.clone());
            }
            out.push((p.strip_prefix(dir).unwrap().to_path_buf(), hash));
        }
    }
    out.sort();
    out
}

#[test]
fn scratch_image_runs_with_a_writable_root_and_the_cached_image_is_unchanged() {
    require_kvm();
    let (kernel, _) = guest_artifacts();
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| panic!("{BUSYBOX} (apt-get install busybox-static): {e}"));
    let dir = tempfile::Builder::new().prefix("shoji-image-guest-").tempdir().unwrap();
    // A cache of its own for the unpacked image, with the guest kernel and initramfs of the
    // real one.
    let real_cache = kernel.ancestors().nth(3).expect("<cache>/kernel/<key>/vmlinux");
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    for sub in ["kernel", "rootfs"] {
        std::os::unix::fs::symlink(real_cache.join(sub), cache.join(sub)).unwrap();
    }
    let layout = dir.path().join("layout");
    // Writes to /, reads it back, and checks the runtime could mount /proc (no mount point in
    // the image); busybox's sh runs the rest as builtins.
    let script = "echo written > /new-file && read x < /new-file && echo \"hello from scratch: $x\" \
                  && test -d /proc/1 && test -d /dev && test -d /sys && exit 7";
    let digest = scratch_image(&layout, &busybox, &["/busybox", "sh", "-c", script]);

    let start = Instant::now();
    let out = Command::new(shoji_bin())
        .args(["run", "--timeout", "900", "--image"])
        .arg(&layout)
        .env("SHOJI_CACHE", &cache)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run shoji run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("shoji run --image took {:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}", start.elapsed());
    assert_eq!(out.status.code(), Some(7), "the command's exit status");
    assert_eq!(stdout, "hello from scratch: written\n");
    assert_eq!(stderr, "", "nothing from shoji");

    // The unpacked image, shared by every run: exactly the layer, nothing the run wrote.
    let hex = digest.trim_start_matches("sha256:");
    let images = cache.join("images");
    let names: Vec<_> = std::fs::read_dir(&images).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [&hex[..16]], "one unpacked image, no leftovers");
    let want = vec![(PathBuf::from("busybox"), Some(format!("{:x}", Sha256::digest(&busybox))))];
    assert_eq!(tree(&images.join(&hex[..16]).join("rootfs")), want, "the cached image is unchanged");
}
