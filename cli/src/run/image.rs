//! `shoji run --image`: an OCI image layout (a directory, or a tar of one, as `docker save`-like
//! tools and `skopeo copy oci-archive:` write) unpacked into a cached rootfs.
//!
//! Every blob is checked against its sha256 digest before use, and its size against a cap
//! ([`MAX_META_BYTES`] for the index, manifests and config, [`MAX_LAYER_BYTES`] for a layer).
//! Layers (tar, tar+gzip) are applied in order with the OCI whiteouts by
//! [`shoji_cli::layer`], which resolves every entry beneath the rootfs by fd (never through a
//! symlink) and caps what an image unpacks to. The result is cached by manifest digest under
//! `<cache>/images/` (0700: images may hold setuid files), shared read-only with the sandbox
//! like the built-in rootfs.
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use shoji_cli::layer;
use shoji_sandbox::Storage;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The most bytes `index.json`, a manifest or a config may have (they are JSON read whole).
pub const MAX_META_BYTES: u64 = 4 << 20;
/// The most bytes one layer blob may have (compressed; see [`layer::MAX_UNPACKED_BYTES`] for
/// what all of them may unpack to).
pub const MAX_LAYER_BYTES: u64 = 8 << 30;

/// What the image says about running it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    /// Entrypoint followed by Cmd.
    pub command: Vec<String>,
    pub workdir: Option<String>,
}

/// An image layout, checked: its manifest, layers and config. Serialisable for a detached
/// sandbox's saved plan (the temp dir of a tar stays the opener's: its clones share it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    /// The layout directory (a temp dir when the image came as a tar).
    layout: PathBuf,
    #[serde(skip)]
    _unpacked: Option<std::sync::Arc<tempfile::TempDir>>,
    manifest_digest: String,
    layers: Vec<(String, String)>,
    pub config: ImageConfig,
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| anyhow!("image: digest {digest:?} is not sha256"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("image: digest {digest:?} is malformed");
    }
    Ok(layout.join("blobs/sha256").join(hex))
}

/// A blob's open file, checked: a regular file of at most `max` bytes that hashes to `digest`.
/// The file is positioned at its start.
fn open_blob(layout: &Path, digest: &str, max: u64) -> Result<std::fs::File> {
    let path = blob_path(layout, digest)?;
    let mut f = std::fs::File::open(&path).map_err(|e| anyhow!("image: blob {digest}: {e}"))?;
    let meta = f.metadata().map_err(|e| anyhow!("image: blob {digest}: {e}"))?;
    if !meta.is_file() {
        bail!("image: blob {digest} is not a regular file");
    }
    if meta.len() > max {
        bail!("image: blob {digest} is {} bytes, over the cap of {max}", meta.len());
    }
    let mut h = Sha256::new();
    let n = std::io::copy(&mut (&mut f).take(max + 1), &mut h).map_err(|e| anyhow!("image: blob {digest}: {e}"))?;
    if n > max {
        bail!("image: blob {digest} grew past the cap of {max} bytes while read");
    }
    let got = format!("sha256:{:x}", h.finalize());
    if got != digest {
        bail!("image: blob {digest} does not match its digest (it hashes to {got})");
    }
    f.seek(SeekFrom::Start(0)).map_err(|e| anyhow!("image: blob {digest}: {e}"))?;
    Ok(f)
}

/// A metadata blob's bytes (at most [`MAX_META_BYTES`]), after checking them against `digest`.
/// (Read again after the check: a layout someone rewrites meanwhile fails the parse or later
/// checks at worst; the unpacking itself does not trust any of it.)
fn read_blob(layout: &Path, digest: &str) -> Result<Vec<u8>> {
    let f = open_blob(layout, digest, MAX_META_BYTES)?;
    let mut data = Vec::new();
    f.take(MAX_META_BYTES).read_to_end(&mut data).map_err(|e| anyhow!("image: blob {digest}: {e}"))?;
    let got = format!("sha256:{:x}", Sha256::digest(&data));
    if got != digest {
        bail!("image: blob {digest} changed while read (it now hashes to {got})");
    }
    Ok(data)
}

fn json(data: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(data).map_err(|e| anyhow!("image: {what}: not JSON: {e}"))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// The linux/amd64 manifest descriptor of an index (or its only one).
fn pick_manifest(index: &Value) -> Result<String> {
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("image: index.json has no manifests"))?;
    let amd64 = |m: &&Value| {
        m.get("platform").is_none_or(|p| {
            p.get("architecture").and_then(Value::as_str) == Some("amd64")
                && p.get("os").and_then(Value::as_str) == Some("linux")
        })
    };
    let m = manifests.iter().find(amd64).ok_or_else(|| anyhow!("image: no linux/amd64 manifest in the index"))?;
    m.get("digest").and_then(Value::as_str).map(String::from).ok_or_else(|| anyhow!("image: a manifest has no digest"))
}

impl Image {
    /// Opens and checks an image layout directory or tar: index, manifest, config (not the layers).
    pub fn open(src: &Path) -> Result<Image> {
        let meta = std::fs::metadata(src).map_err(|e| anyhow!("image: {}: {e}", src.display()))?;
        let (layout, unpacked) = if meta.is_dir() {
            (src.to_path_buf(), None)
        } else {
            let tmp = tempfile::Builder::new().prefix("shoji-image-").tempdir().context("image: temp dir")?;
            let f = std::fs::File::open(src).map_err(|e| anyhow!("image: {}: {e}", src.display()))?;
            unpack_layout(f, tmp.path())
                .map_err(|e| anyhow!("image: {}: not a tar of an image layout: {e}", src.display()))?;
            (tmp.path().to_path_buf(), Some(std::sync::Arc::new(tmp)))
        };
        let index = read_capped(&layout.join("index.json"))
            .map_err(|e| anyhow!("image: {}: no OCI image layout (index.json: {e})", src.display()))?;
        let mut digest = pick_manifest(&json(&index, "index.json")?)?;
        let mut manifest = json(&read_blob(&layout, &digest)?, "manifest")?;
        // A nested index (multi-platform image): one level down.
        if manifest.get("manifests").is_some() {
            digest = pick_manifest(&manifest)?;
            manifest = json(&read_blob(&layout, &digest)?, "manifest")?;
        }
        let config_digest = manifest
            .pointer("/config/digest")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("image: the manifest has no config"))?;
        let config = json(&read_blob(&layout, config_digest)?, "config")?;
        let layers = manifest
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("image: the manifest has no layers"))?
            .iter()
            .map(|l| {
                let d =
                    l.get("digest").and_then(Value::as_str).ok_or_else(|| anyhow!("image: a layer has no digest"))?;
                let t = l.get("mediaType").and_then(Value::as_str).unwrap_or("");
                Ok((d.to_string(), t.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let c = config.get("config");
        let mut command = strings(c.and_then(|c| c.get("Entrypoint")));
        command.extend(strings(c.and_then(|c| c.get("Cmd"))));
        let workdir =
            c.and_then(|c| c.get("WorkingDir")).and_then(Value::as_str).filter(|w| !w.is_empty()).map(String::from);
        let config = ImageConfig { env: strings(c.and_then(|c| c.get("Env"))), command, workdir };
        Ok(Image { layout, _unpacked: unpacked, manifest_digest: digest, layers, config })
    }

    /// The unpacked rootfs, cached under `cache/images/` by manifest digest.
    pub fn rootfs(&self, cache: &Path) -> Result<PathBuf> {
        let hex = self.manifest_digest.trim_start_matches("sha256:");
        let dir = cache.join("images").join(&hex[..16.min(hex.len())]);
        let root = dir.join("rootfs");
        if root.is_dir() {
            return Ok(root);
        }
        let images = cache.join("images");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&images).context("image: cache dir")?;
        let tmp = tempfile::Builder::new().prefix(".unpack-").tempdir_in(&images).context("image: temp dir")?;
        let troot = tmp.path().join("rootfs");
        std::fs::create_dir(&troot).context("image: rootfs dir")?;
        let target = layer::Rootfs::open(&troot).context("image: rootfs dir")?;
        let mut budget = layer::Budget::default();
        for (i, (digest, media)) in self.layers.iter().enumerate() {
            if media.ends_with("+zstd") {
                bail!("image: layer {} ({digest}): {media}: zstd layers are not supported (gzip or plain tar)", i + 1);
            }
            let mut blob = open_blob(&self.layout, digest, MAX_LAYER_BYTES)?;
            layer::apply(&target, &mut blob, &mut budget)
                .map_err(|e| anyhow!("image: layer {} ({digest}): {e}", i + 1))?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(tmp.path(), &dir).context("image: moving the rootfs into the cache")?;
        Ok(root)
    }
}

/// The agent storages that give an image's container a writable root while the cached rootfs
/// (shared by every run) stays unmodified: the share with tag `lower_tag`, mounted read-only at
/// [`image_mount_point`]`(guest_root)`, then an overlay of it at `guest_root`, the container
/// root. The overlay's upper directory is a tmpfs in the guest, so writes go with the sandbox;
/// images without `/proc`, `/dev` or `/sys` (`FROM scratch`) get their mount points there.
pub fn rootfs_storages(at: &shoji_sandbox::Placement, lower_tag: &str, guest_root: &str) -> Vec<Storage> {
    let lower = image_mount_point(guest_root);
    vec![
        at.share_storage(lower_tag, &lower, true),
        Storage {
            driver: "overlay".into(),
            source: lower_tag.into(),
            fstype: "overlay".into(),
            options: vec![format!("lowerdir={lower}")],
            mount_point: guest_root.into(),
            ..Default::default()
        },
    ]
}

/// Where [`rootfs_storages`] mounts the read-only image in the guest: `<guest_root>.image`.
pub fn image_mount_point(guest_root: &str) -> String {
    format!("{}.image", guest_root.trim_end_matches('/'))
}

/// `index.json` (or a layout tar's entry) read whole, at most [`MAX_META_BYTES`].
fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    std::fs::File::open(path)?.take(MAX_META_BYTES + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_META_BYTES {
        return Err(std::io::Error::other(format!("over {MAX_META_BYTES} bytes")));
    }
    Ok(data)
}

/// Unpacks a tar of an image layout: its directories and regular files only (a layout has no
/// links; the tar crate keeps each entry inside `dest`).
fn unpack_layout(f: std::fs::File, dest: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(f);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if !(kind.is_dir() || kind.is_file()) {
            continue;
        }
        let path = entry.path()?.into_owned();
        if !entry.unpack_in(dest).with_context(|| format!("entry {}", path.display()))? {
            bail!("entry {}: outside the layout", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, body) in entries {
            let mut h = tar::Header::new_gnu();
            match body {
                Some(body) => {
                    h.set_size(body.len() as u64);
                    h.set_mode(0o644);
                    h.set_entry_type(tar::EntryType::Regular);
                    b.append_data(&mut h, path, body.as_bytes()).unwrap();
                }
                None => {
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn put_blob(layout: &Path, data: &[u8]) -> String {
        let d = format!("sha256:{:x}", Sha256::digest(data));
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(blob_path(layout, &d).unwrap(), data).unwrap();
        d
    }

    /// An image layout with two layers: the second deletes a file and empties a directory.
    fn layout(dir: &Path) {
        let l1 = gz(&layer(&[
            ("bin/", None),
            ("bin/sh", Some("shell")),
            ("etc/", None),
            ("etc/gone", Some("x")),
            ("var/", None),
            ("var/old", Some("y")),
        ]));
        let l2 = layer(&[("etc/.wh.gone", Some("")), ("var/.wh..wh..opq", Some("")), ("var/new", Some("z"))]);
        let (d1, d2) = (put_blob(dir, &l1), put_blob(dir, &l2));
        let config = serde_json::json!({"config": {"Env": ["PATH=/bin", "A=1"], "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "WorkingDir": "/etc"},
            "rootfs": {"type": "layers", "diff_ids": []}});
        let c = put_blob(dir, config.to_string().as_bytes());
        let manifest = serde_json::json!({"schemaVersion": 2, "config": {"digest": c},
            "layers": [{"digest": d1, "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}, {"digest": d2, "mediaType": "application/vnd.oci.image.layer.v1.tar"}]});
        let m = put_blob(dir, manifest.to_string().as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": m, "platform": {"architecture": "amd64", "os": "linux"}}]});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_the_config_is_read() {
        let d = tempfile::tempdir().unwrap();
        let lay = d.path().join("layout");
        layout(&lay);
        let img = Image::open(&lay).unwrap();
        assert_eq!(img.config.command, ["/bin/sh", "-c", "true"]);
        assert_eq!(img.config.env, ["PATH=/bin", "A=1"]);
        assert_eq!(img.config.workdir.as_deref(), Some("/etc"));
        let cache = d.path().join("cache");
        let root = img.rootfs(&cache).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("bin/sh")).unwrap(), "shell");
        assert!(!root.join("etc/gone").exists() && root.join("etc").is_dir());
        assert!(!root.join("var/old").exists());
        assert_eq!(std::fs::read_to_string(root.join("var/new")).unwrap(), "z");
        assert!(!root.join("etc/.wh.gone").exists());
        // Cached: a second open unpacks nothing (the layers may even be gone).
        std::fs::remove_dir_all(lay.join("blobs")).unwrap();
        layout(&lay);
        assert_eq!(Image::open(&lay).unwrap().rootfs(&cache).unwrap(), root);

        // The same layout as a tar.
        let tarball = d.path().join("image.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
        b.append_dir_all(".", &lay).unwrap();
        b.finish().unwrap();
        assert_eq!(Image::open(&tarball).unwrap().config.command[0], "/bin/sh");
    }

    #[test]
    fn a_corrupt_blob_or_an_escaping_entry_is_refused() {
        let d = tempfile::tempdir().unwrap();
        layout(d.path());
        let img = Image::open(d.path()).unwrap();
        let (digest, _) = &img.layers[0];
        std::fs::write(blob_path(d.path(), digest).unwrap(), b"tampered").unwrap();
        let e = format!("{:#}", img.rootfs(&d.path().join("cache")).unwrap_err());
        assert!(e.contains("does not match its digest"), "{e}");

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let rootfs = layer::Rootfs::open(&root).unwrap();
        let tar = b.into_inner().unwrap();
        let e = layer::apply(&rootfs, &mut std::io::Cursor::new(tar), &mut layer::Budget::default()).unwrap_err();
        assert_eq!(e.to_string(), "entry ../escape: `..` in the name");
        assert!(!d.path().join("escape").exists());
    }

    // ---- malicious layouts: each tries to reach a host directory outside the rootfs ----------

    /// A raw tar entry (names the tar crate's builder would refuse: `..`, `.wh..`).
    fn raw(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, link: Option<&str>, body: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
        h.set_entry_type(kind);
        let g = h.as_gnu_mut().unwrap();
        g.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            g.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, body).unwrap();
    }

    type Entry<'a> = (tar::EntryType, &'a str, Option<&'a str>, &'a [u8]);

    fn tar_of(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link, body) in entries {
            raw(&mut b, *kind, name, *link, body);
        }
        b.into_inner().unwrap()
    }

    /// A layout of these layers (plain tar) in `dir`; their digests.
    fn layout_of(dir: &Path, layers: &[Vec<u8>]) -> Vec<String> {
        let digests: Vec<String> = layers.iter().map(|l| put_blob(dir, l)).collect();
        let config = serde_json::json!({"config": {"Cmd": ["true"]}});
        let c = put_blob(dir, config.to_string().as_bytes());
        let layers: Vec<Value> = digests
            .iter()
            .map(|d| serde_json::json!({"digest": d, "mediaType": "application/vnd.oci.image.layer.v1.tar"}))
            .collect();
        let manifest = serde_json::json!({"schemaVersion": 2, "config": {"digest": c}, "layers": layers});
        let m = put_blob(dir, manifest.to_string().as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": m}]});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        digests
    }

    /// A host directory beside the image with one file, `precious`, the attacks aim at.
    struct Victim {
        _tmp: tempfile::TempDir,
        top: PathBuf,
        dir: PathBuf,
    }

    impl Victim {
        fn new() -> Victim {
            let tmp = tempfile::tempdir().unwrap();
            let top = tmp.path().to_path_buf();
            let dir = top.join("victim");
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("precious"), "keep me").unwrap();
            Victim { _tmp: tmp, top, dir }
        }

        fn path(&self) -> &str {
            self.dir.to_str().unwrap()
        }

        /// The victim as it was: one file, same contents, one link, nothing added.
        fn assert_untouched(&self) {
            let names: Vec<_> = std::fs::read_dir(&self.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, ["precious"], "the victim directory changed");
            assert_eq!(std::fs::read_to_string(self.dir.join("precious")).unwrap(), "keep me");
            use std::os::unix::fs::MetadataExt;
            assert_eq!(std::fs::metadata(self.dir.join("precious")).unwrap().nlink(), 1, "hard-linked from the rootfs");
        }

        /// Unpacks `layers` as an image; the error (one line, formatted with its causes).
        fn unpack(&self, layers: &[Vec<u8>]) -> (Vec<String>, String) {
            let lay = self.top.join("layout");
            let digests = layout_of(&lay, layers);
            let r = Image::open(&lay).unwrap().rootfs(&self.top.join("cache"));
            self.assert_untouched();
            let e = format!("{:#}", r.expect_err("a malicious image was unpacked"));
            assert!(!e.contains('\n'), "not one line: {e}");
            eprintln!("{e}");
            (digests, e)
        }
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn benign_links_modes_and_replacements() {
        let d = tempfile::tempdir().unwrap();
        let lay = d.path().join("layout");
        let l1 = tar_of(&[
            (D, "./", None, b""),
            (D, "usr/bin/", None, b""),
            (F, "usr/bin/busybox", None, b"bb"),
            (S, "bin", Some("usr/bin"), b""),
            (S, "usr/bin/sh", Some("/bin/busybox"), b""),
            (H, "usr/bin/ls", Some("usr/bin/busybox"), b""),
            (D, "etc/", None, b""),
            (F, "etc/conf", None, b"old"),
            (D, "opt/tree/a/b/", None, b""),
            (F, "opt/tree/a/b/f", None, b"f"),
        ]);
        let l2 = tar_of(&[
            (F, "etc/conf", None, b"new"),
            (F, "usr/bin/sh", None, b"a real sh"),
            (F, ".wh.opt", None, b""),
            (F, "new/deep/file", None, b"parents made"),
        ]);
        layout_of(&lay, &[l1, l2]);
        let root = Image::open(&lay).unwrap().rootfs(&d.path().join("cache")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(std::fs::read_link(root.join("bin")).unwrap(), Path::new("usr/bin"));
        let (bb, ls) = (
            std::fs::metadata(root.join("usr/bin/busybox")).unwrap(),
            std::fs::metadata(root.join("usr/bin/ls")).unwrap(),
        );
        assert_eq!((bb.ino(), bb.nlink()), (ls.ino(), 2));
        assert_eq!(std::fs::read_to_string(root.join("usr/bin/sh")).unwrap(), "a real sh");
        assert_eq!(std::fs::read_to_string(root.join("etc/conf")).unwrap(), "new");
        assert!(!root.join("opt").exists());
        assert_eq!(std::fs::read_to_string(root.join("new/deep/file")).unwrap(), "parents made");
        assert_eq!(bb.permissions().mode() & 0o7777, 0o644);
        assert_eq!(std::fs::metadata(root.join("etc")).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::metadata(d.path().join("cache/images")).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn attack_symlink_then_whiteout_through_it() {
        let v = Victim::new();
        let l1 = tar_of(&[(S, "x", Some(v.path()), b"")]);
        let l2 = tar_of(&[(F, "x/.wh.precious", None, b"")]);
        let (d, e) = v.unpack(&[l1, l2]);
        v.assert_untouched();
        assert!(e.contains("layer 2") && e.contains(&d[1]) && e.contains("x/.wh.precious"), "{e}");
    }

    #[test]
    fn attack_symlink_then_opaque_whiteout_through_it() {
        let v = Victim::new();
        let l1 = tar_of(&[(S, "x", Some(v.path()), b"")]);
        let l2 = tar_of(&[(F, "x/.wh..wh..opq", None, b"")]);
        let (d, e) = v.unpack(&[l1, l2]);
        v.assert_untouched();
        assert!(e.contains("layer 2") && e.contains(&d[1]) && e.contains("x/.wh..wh..opq"), "{e}");
    }

    #[test]
    fn attack_symlink_then_file_written_through_it() {
        let v = Victim::new();
        let l1 = tar_of(&[(S, "x", Some(v.path()), b"")]);
        let l2 = tar_of(&[(F, "x/evil", None, b"owned"), (F, "x/precious", None, b"owned")]);
        let (d, e) = v.unpack(&[l1, l2]);
        v.assert_untouched();
        assert!(e.contains("layer 2") && e.contains(&d[1]) && e.contains("x/evil"), "{e}");
    }

    #[test]
    fn attack_symlink_and_file_through_it_in_one_layer() {
        let v = Victim::new();
        let l1 = tar_of(&[(S, "x", Some(v.path()), b""), (D, "x/sub/", None, b""), (F, "x/evil", None, b"owned")]);
        let (d, e) = v.unpack(&[l1]);
        v.assert_untouched();
        assert!(e.contains("layer 1") && e.contains(&d[0]) && e.contains("x/sub"), "{e}");
    }

    #[test]
    fn attack_hardlink_to_a_host_absolute_path() {
        let v = Victim::new();
        let target = format!("{}/precious", v.path());
        let l1 = tar_of(&[(H, "stolen", Some(&target), b"")]);
        let (d, e) = v.unpack(&[l1]);
        v.assert_untouched();
        assert!(e.contains("layer 1") && e.contains(&d[0]) && e.contains("stolen"), "{e}");
    }

    #[test]
    fn attack_hardlink_up_and_out() {
        let v = Victim::new();
        // The rootfs is <top>/cache/images/<tmp>/rootfs: four levels up is <top>.
        let l1 = tar_of(&[(H, "stolen", Some("../../../../victim/precious"), b"")]);
        let (d, e) = v.unpack(&[l1]);
        v.assert_untouched();
        assert!(e.contains("layer 1") && e.contains(&d[0]) && e.contains("stolen"), "{e}");
    }

    #[test]
    fn attack_hardlink_through_a_symlink() {
        let v = Victim::new();
        let l1 = tar_of(&[(S, "x", Some(v.path()), b"")]);
        let l2 = tar_of(&[(H, "stolen", Some("x/precious"), b"")]);
        let (d, e) = v.unpack(&[l1, l2]);
        v.assert_untouched();
        assert!(e.contains("layer 2") && e.contains(&d[1]) && e.contains("stolen"), "{e}");
    }

    #[test]
    fn attack_dot_dot_whiteouts() {
        for name in ["x/.wh..", "x/.wh...", "x/y/../.wh.z"] {
            let v = Victim::new();
            let l1 = tar_of(&[(D, "x/", None, b""), (D, "x/y/", None, b""), (F, "x/keep", None, b"k")]);
            let l2 = tar_of(&[(F, name, None, b"")]);
            let (d, e) = v.unpack(&[l1, l2]);
            v.assert_untouched();
            assert!(e.contains("layer 2") && e.contains(&d[1]) && e.contains(name), "{name}: {e}");
        }
    }

    #[test]
    fn image_roots_are_an_overlay_over_the_read_only_share() {
        let st = rootfs_storages(&shoji_sandbox::Placement::default(), "rootfs", "/run/shoji/rootfs");
        let got: Vec<_> = st
            .iter()
            .map(|s| {
                (s.driver.as_str(), s.source.as_str(), s.fstype.as_str(), s.options.clone(), s.mount_point.as_str())
            })
            .collect();
        assert_eq!(
            got,
            [
                ("virtio-fs", "rootfs", "virtiofs", vec!["ro".to_string()], "/run/shoji/rootfs.image"),
                (
                    "overlay",
                    "rootfs",
                    "overlay",
                    vec!["lowerdir=/run/shoji/rootfs.image".to_string()],
                    "/run/shoji/rootfs"
                ),
            ]
        );
        assert_eq!(image_mount_point("/run/x/"), "/run/x.image");
    }

    #[test]
    fn not_an_image() {
        let d = tempfile::tempdir().unwrap();
        assert!(Image::open(d.path()).unwrap_err().to_string().contains("no OCI image layout"));
        assert!(Image::open(&d.path().join("missing")).unwrap_err().to_string().starts_with("image: "));
        let f = d.path().join("junk.tar");
        std::fs::write(&f, b"not a tar at all, not at all").unwrap();
        assert!(Image::open(&f).is_err());
    }
}
