//! Volumes as block devices: a spec mount whose source is a host block device or a raw image
//! file, with a filesystem type (`ctr run --mount type=ext4,src=/dev/loop3,dst=/data`, a CRI
//! mount of a block volume), is hot-plugged as virtio-blk and mounted by the agent, which finds
//! the disk by its PCI path; the container gets a bind of that mount. Nothing of it goes
//! through virtio-fs, and the host never mounts the filesystem (a hostile image stays in the
//! guest's kernel).
//!
//! Which mounts: not a bind, an absolute source, and a filesystem type; the source must then be
//! a block device or a regular file (anything else fails Create naming the mount). Mounts of
//! pseudo filesystems (`proc`, `tmpfs`, ...) have no absolute source and are left alone.
//! "ro" in the options plugs the disk read-only as well.
use serde_json::Value;
use shoji_devices::model::mount::{MountOptions, MS_RDONLY};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

/// Where the agent mounts a container's volumes in the guest: `<this>/<id>/<index>`.
pub const GUEST_VOLUMES: &str = "/run/shoji/volumes";

/// One mount to carry as a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockVolume {
    /// Its index in `mounts` (for messages and the guest mount point).
    pub index: usize,
    pub destination: String,
    pub source: PathBuf,
    pub fstype: String,
    /// The mount's options, for the agent's mount of the filesystem.
    pub options: Vec<String>,
    pub read_only: bool,
}

impl BlockVolume {
    /// The agent's mount point of it.
    pub fn guest_mount_point(&self, id: &str) -> String {
        format!("{GUEST_VOLUMES}/{id}/{}", self.index)
    }

    /// How logs and errors name it.
    pub fn what(&self) -> String {
        format!("mounts[{}] {}", self.index, self.destination)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("mounts[{index}].options: {why}")]
    Options { index: usize, why: String },
    #[error("mounts[{index}].source: {path}: {why}")]
    Source { index: usize, path: String, why: String },
}

fn str_field<'a>(m: &'a Value, k: &str) -> &'a str {
    m.get(k).and_then(Value::as_str).unwrap_or_default()
}

fn options(m: &Value) -> Vec<String> {
    m.get("options")
        .and_then(Value::as_array)
        .map(|o| o.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// The spec's mounts that could be volumes (pure: the host is not looked at). A bind never is.
pub fn candidates(spec: &Value) -> Result<Vec<BlockVolume>, VolumeError> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for (index, m) in mounts.iter().enumerate() {
        let (fstype, source) = (str_field(m, "type"), str_field(m, "source"));
        let options = options(m);
        if fstype.is_empty() || fstype == "bind" || !source.starts_with('/') {
            continue;
        }
        let parsed = MountOptions::parse(&options).map_err(|e| VolumeError::Options { index, why: e.to_string() })?;
        if parsed.bind {
            continue;
        }
        out.push(BlockVolume {
            index,
            destination: str_field(m, "destination").to_string(),
            source: PathBuf::from(source),
            fstype: fstype.to_string(),
            options,
            read_only: parsed.flags & MS_RDONLY != 0,
        });
    }
    Ok(out)
}

/// A volume's source, held open (O_PATH) from the check to the plug.
#[derive(Debug)]
pub struct OpenSource {
    file: File,
}

impl OpenSource {
    /// A path that reopens exactly this file (the VMM opens it through it).
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// Opens `v`'s source and checks it is a block device or a regular file; a directory source
/// is not a volume (`Ok(None)`: the mount stays as the spec has it).
pub fn open_source(v: &BlockVolume) -> Result<Option<OpenSource>, VolumeError> {
    let err = |why: String| VolumeError::Source { index: v.index, path: v.source.display().to_string(), why };
    // The spec is containerd's or the user's (trusted): links such as /dev/disk/by-id are followed.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(&v.source)
        .map_err(|e| err(e.to_string()))?;
    let ft = file.metadata().map_err(|e| err(e.to_string()))?.file_type();
    if ft.is_dir() {
        return Ok(None);
    }
    if !(ft.is_block_device() || ft.is_file()) {
        return Err(err(format!("not a block device or an image file (a {} mount is carried as a disk)", v.fstype)));
    }
    Ok(Some(OpenSource { file }))
}

/// The spec mount becomes a bind of the agent's mount of the disk.
pub fn rewrite(spec: &mut Value, v: &BlockVolume, guest_mount_point: &str) {
    if let Some(m) = spec.get_mut("mounts").and_then(|m| m.get_mut(v.index)) {
        m["type"] = Value::String("bind".into());
        m["source"] = Value::String(guest_mount_point.into());
        let mut options = vec![Value::String("rbind".into())];
        if v.read_only {
            options.push(Value::String("ro".into()));
        }
        m["options"] = Value::Array(options);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    /// What `ctr run --mount type=ext4,src=/dev/loop3,dst=/data,options=rw` and containerd's
    /// defaults put in the spec.
    fn spec() -> Value {
        json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
            {"destination": "/data", "type": "ext4", "source": "/dev/loop3", "options": ["rw"]},
            {"destination": "/host", "type": "bind", "source": "/srv", "options": ["rbind", "ro"]},
            {"destination": "/other", "type": "none", "source": "/srv", "options": ["bind"]},
            {"destination": "/img", "type": "xfs", "source": "/var/img.raw", "options": ["ro", "noexec"]}
        ]})
    }

    #[test]
    fn only_mounts_of_a_filesystem_from_an_absolute_source_are_candidates() {
        let c = candidates(&spec()).unwrap();
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!((c[0].index, c[0].destination.as_str(), c[0].fstype.as_str()), (2, "/data", "ext4"));
        assert!(!c[0].read_only);
        assert_eq!((c[1].index, c[1].source.as_path(), c[1].read_only), (5, Path::new("/var/img.raw"), true));
        assert_eq!(c[1].options, ["ro", "noexec"]);
        assert_eq!(c[1].what(), "mounts[5] /img");
    }

    #[test]
    fn a_bad_option_names_the_mount() {
        let s = json!({"mounts": [{"destination": "/d", "type": "ext4", "source": "/dev/x", "options": ["a\u{0}b"]}]});
        assert!(candidates(&s).unwrap_err().to_string().starts_with("mounts[0].options: "));
    }

    #[test]
    fn the_mount_becomes_a_bind_of_the_guest_mount_point() {
        let mut s = spec();
        let c = candidates(&s).unwrap();
        let at = c[1].guest_mount_point("ctr1");
        assert_eq!(at, "/run/shoji/volumes/ctr1/5");
        rewrite(&mut s, &c[1], &at);
        assert_eq!(
            s["mounts"][5],
            json!({"destination": "/img", "type": "bind", "source": "/run/shoji/volumes/ctr1/5", "options": ["rbind", "ro"]})
        );
        assert_eq!(s["mounts"][2]["source"], "/dev/loop3", "others are untouched");
    }

    #[test]
    fn sources_are_checked_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let v = |source: &Path| BlockVolume {
            index: 1,
            destination: "/d".into(),
            source: source.into(),
            fstype: "ext4".into(),
            options: vec![],
            read_only: false,
        };
        let img = dir.path().join("img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let open = open_source(&v(&img)).unwrap().expect("an image file is a volume");
        assert!(open.fd_path().starts_with("/proc/self/fd/"));
        assert!(open_source(&v(dir.path())).unwrap().is_none(), "a directory is not");
        let e = open_source(&v(Path::new("/dev/null"))).unwrap_err().to_string();
        assert_eq!(
            e,
            "mounts[1].source: /dev/null: not a block device or an image file (a ext4 mount is carried as a disk)"
        );
        let e = open_source(&v(&dir.path().join("missing"))).unwrap_err().to_string();
        assert!(e.starts_with("mounts[1].source: ") && e.contains("No such file"), "{e}");
    }
}
