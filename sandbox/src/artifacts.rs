//! The guest kernel and initramfs a sandbox boots by default, looked up in the cache
//! (`$SHOJI_CACHE`, default `~/.cache/shoji`) that `shoji setup` fills. Nothing is built here:
//! the shim and other users of this library run from anywhere, without the source tree, and
//! a missing artifact is an error naming `shoji setup`.
//!
//! Cache layout (written by kernel-config/build.sh and rootfs/build.sh, which `shoji setup`
//! runs):
//! - `kernel/<key>/vmlinux`: `<key>` hashes the kernel's recipe, embedded here at compile time
//!   and hashed as the script hashes it, so the kernel this build expects is found directly.
//! - `rootfs/<key>/initramfs.cpio`: `<key>` also hashes the static agent binary, which only a
//!   build has, so the initramfs is found through `rootfs/current`, a one-line record naming
//!   the key of the latest build (replaced by rename, so readers see the old or the new one).
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The kernel's recipe, (file name, contents) in the order kernel-config/build.sh hashes them.
pub const KERNEL_RECIPE: &[(&str, &str)] = &[
    ("shoji.config", include_str!("../../kernel-config/shoji.config")),
    ("pvm-guest.patch", include_str!("../../kernel-config/pvm-guest.patch")),
    ("build.sh", include_str!("../../kernel-config/build.sh")),
];

/// The record naming the current initramfs's key, relative to the cache directory.
pub const ROOTFS_RECORD: &str = "rootfs/current";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("no cache directory for the guest {what}: set SHOJI_CACHE or HOME, then run `shoji setup`")]
    NoCache { what: &'static str },
    /// One line, so the shim's error to containerd (and `crictl`) says what to do.
    #[error("no guest {what} in {}{detail}: run `shoji setup`", cache.display())]
    Missing {
        what: &'static str,
        cache: PathBuf,
        /// Empty, or " (why)" when a record was found but does not lead to the file.
        detail: String,
    },
}

pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SHOJI_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("shoji"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/shoji"))
}

/// A cache key as the scripts print it: the first 16 hex digits of the SHA-256 of the files
/// concatenated, then `extra` (the initramfs's agent binary).
pub fn key(files: &[(&str, &str)], extra: &[u8]) -> String {
    let mut h = Sha256::new();
    for (_, body) in files {
        h.update(body.as_bytes());
    }
    h.update(extra);
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` has a key's form, so a record never leads outside `rootfs/`.
pub fn is_key(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where the kernel of this build's recipe is (or goes) in `cache`.
pub fn kernel_path(cache: &Path) -> PathBuf {
    cache.join("kernel").join(key(KERNEL_RECIPE, b"")).join("vmlinux")
}

/// Where the initramfs with key `key` is (or goes) in `cache`.
pub fn initramfs_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("rootfs").join(key).join("initramfs.cpio")
}

fn cache(what: &'static str) -> Result<PathBuf, ArtifactError> {
    cache_dir().ok_or(ArtifactError::NoCache { what })
}

/// The kernel in `cache`, if it has been built.
pub fn kernel_in(cache: &Path) -> Result<PathBuf, ArtifactError> {
    let p = kernel_path(cache);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ArtifactError::Missing { what: "kernel", cache: cache.to_path_buf(), detail: String::new() })
    }
}

/// The initramfs `rootfs/current` names in `cache`.
pub fn initramfs_in(cache: &Path) -> Result<PathBuf, ArtifactError> {
    let missing = |detail: String| ArtifactError::Missing { what: "initramfs", cache: cache.to_path_buf(), detail };
    let record = cache.join(ROOTFS_RECORD);
    let text = match std::fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing(String::new())),
        Err(e) => return Err(missing(format!(" ({ROOTFS_RECORD}: {e})"))),
    };
    let key = text.trim();
    if !is_key(key) {
        return Err(missing(format!(
            " ({ROOTFS_RECORD} holds {:?}, not a cache key)",
            key.chars().take(40).collect::<String>()
        )));
    }
    let p = initramfs_path(cache, key);
    if p.is_file() {
        Ok(p)
    } else {
        Err(missing(format!(" ({ROOTFS_RECORD} names {key}, which is gone)")))
    }
}

/// The default kernel, from the cache `shoji setup` filled.
pub fn kernel() -> Result<PathBuf, ArtifactError> {
    kernel_in(&cache("kernel")?)
}

/// The default initramfs (the agent as /init), from the cache `shoji setup` filled.
pub fn initramfs() -> Result<PathBuf, ArtifactError> {
    initramfs_in(&cache("initramfs")?)
}

/// The cached default kernel, if it has been built.
pub fn kernel_cached() -> Option<PathBuf> {
    kernel().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_key_matches_the_script() {
        // kernel-config/build.sh: `cat shoji.config pvm-guest.patch build.sh | sha256sum | cut -c1-16`.
        let k = key(KERNEL_RECIPE, b"");
        assert!(is_key(&k), "{k}");
        let cat: Vec<u8> = KERNEL_RECIPE.iter().flat_map(|(_, b)| b.bytes()).collect();
        let full: String = Sha256::digest(&cat).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(k, full[..16]);
        let script = KERNEL_RECIPE.iter().find(|(n, _)| *n == "build.sh").map(|(_, b)| *b).unwrap_or_default();
        assert!(script.contains(r#"cat "$here/shoji.config" "$here/pvm-guest.patch" "$here/build.sh""#));
    }

    fn assert_one_line_naming_setup(e: &ArtifactError, what: &str, cache: &Path) {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "one line: {msg:?}");
        assert!(msg.contains("run `shoji setup`"), "{msg}");
        assert!(msg.contains(what) && msg.contains(&cache.display().to_string()), "{msg}");
    }

    #[test]
    fn an_empty_cache_fails_with_one_line_naming_shoji_setup() {
        let dir = tempfile::tempdir().unwrap();
        let e = kernel_in(dir.path()).unwrap_err();
        assert_one_line_naming_setup(&e, "no guest kernel", dir.path());
        let e = initramfs_in(dir.path()).unwrap_err();
        assert_one_line_naming_setup(&e, "no guest initramfs", dir.path());
    }

    #[test]
    fn the_initramfs_is_found_through_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        std::fs::create_dir_all(c.join("rootfs")).unwrap();
        let key = "0123456789abcdef";
        let record = c.join(ROOTFS_RECORD);

        // A record naming a build that is gone, or something that is not a key: still one line.
        std::fs::write(&record, format!("{key}\n")).unwrap();
        assert_one_line_naming_setup(&initramfs_in(c).unwrap_err(), "gone", c);
        std::fs::write(&record, "../../etc\nmore\n").unwrap();
        assert_one_line_naming_setup(&initramfs_in(c).unwrap_err(), "not a cache key", c);

        let p = initramfs_path(c, key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"cpio").unwrap();
        std::fs::write(&record, format!("{key}\n")).unwrap();
        assert_eq!(initramfs_in(c).unwrap(), p);

        let k = kernel_path(c);
        std::fs::create_dir_all(k.parent().unwrap()).unwrap();
        std::fs::write(&k, b"elf").unwrap();
        assert_eq!(kernel_in(c).unwrap(), k);
    }
}
