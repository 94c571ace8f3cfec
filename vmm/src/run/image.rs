//! `shoji run --image`: an OCI image layout (a directory, or a tar of one, as `docker save`-like
//! tools and `skopeo copy oci-archive:` write) unpacked into a cached rootfs.
//!
//! Every blob is checked against its sha256 digest before use. Layers (tar, tar+gzip) are
//! applied in order with the OCI whiteouts (`.wh.NAME` removes NAME from the layers below,
//! `.wh..wh..opq` empties its directory); entries that would land outside the rootfs are refused
//! by the tar crate's `unpack_in`. The result is cached by manifest digest under
//! `<cache>/images/`, shared read-only with the sandbox like the built-in rootfs.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// What the image says about running it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    /// Entrypoint followed by Cmd.
    pub command: Vec<String>,
    pub workdir: Option<String>,
}

/// An image layout, checked: its manifest, layers and config.
#[derive(Debug)]
pub struct Image {
    /// The layout directory (a temp dir when the image came as a tar).
    layout: PathBuf,
    _unpacked: Option<tempfile::TempDir>,
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

/// A blob's bytes, after checking them against `digest`.
fn read_blob(layout: &Path, digest: &str) -> Result<Vec<u8>> {
    let path = blob_path(layout, digest)?;
    let data = std::fs::read(&path).map_err(|e| anyhow!("image: blob {digest}: {e}"))?;
    let got = format!("sha256:{:x}", Sha256::digest(&data));
    if got != digest {
        bail!("image: blob {digest} does not match its digest (it hashes to {got})");
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
            tar::Archive::new(f)
                .unpack(tmp.path())
                .map_err(|e| anyhow!("image: {}: not a tar of an image layout: {e}", src.display()))?;
            (tmp.path().to_path_buf(), Some(tmp))
        };
        let index = std::fs::read(layout.join("index.json"))
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
        std::fs::create_dir_all(cache.join("images")).context("image: cache dir")?;
        let tmp =
            tempfile::Builder::new().prefix(".unpack-").tempdir_in(cache.join("images")).context("image: temp dir")?;
        let troot = tmp.path().join("rootfs");
        std::fs::create_dir(&troot).context("image: rootfs dir")?;
        for (digest, media) in &self.layers {
            let blob = read_blob(&self.layout, digest)?;
            apply_layer(&troot, &blob, media).with_context(|| format!("image: layer {digest}"))?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(tmp.path(), &dir).context("image: moving the rootfs into the cache")?;
        Ok(root)
    }
}

/// The layer's tar stream, decompressed by its media type.
fn layer_reader<'a>(blob: &'a [u8], media: &str) -> Result<Box<dyn Read + 'a>> {
    if media.ends_with("+zstd") {
        bail!("{media}: zstd layers are not supported (gzip or plain tar)");
    }
    // Media types lie often enough (docker's own types): trust the gzip magic.
    if blob.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::GzDecoder::new(blob)))
    } else {
        Ok(Box::new(blob))
    }
}

/// A layer entry's path, relative and without `..` (None: refused).
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Applies one layer: its whiteouts first (they act on the layers below), then its files.
pub fn apply_layer(root: &Path, blob: &[u8], media: &str) -> Result<()> {
    let mut archive = tar::Archive::new(layer_reader(blob, media)?);
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(rel) = clean(&path) else { bail!("entry {}: outside the rootfs", path.display()) };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(hidden) = name.strip_prefix(".wh.") else { continue };
        let dir = root.join(rel.parent().unwrap_or(Path::new("")));
        if hidden == ".wh..opq" {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    remove(&e.path());
                }
            }
        } else {
            remove(&dir.join(hidden));
        }
    }
    let mut archive = tar::Archive::new(layer_reader(blob, media)?);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".wh.")) {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            continue; // device nodes come from the container's /dev, never from an image
        }
        if !entry.unpack_in(root).with_context(|| format!("entry {}", path.display()))? {
            bail!("entry {}: outside the rootfs", path.display());
        }
    }
    Ok(())
}

fn remove(p: &Path) {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => return,
    };
    if let Err(e) = r {
        tracing::warn!("image: whiteout of {}: {e}", p.display());
    }
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
        let e = apply_layer(&root, &b.into_inner().unwrap(), "").unwrap_err().to_string();
        assert!(e.contains("outside the rootfs"), "{e}");
        assert!(!d.path().join("escape").exists());
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
