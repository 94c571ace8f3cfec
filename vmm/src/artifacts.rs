//! The guest kernel and initramfs Shoji boots by default, built on first use and cached by
//! content hash under `$SHOJI_CACHE` (default `~/.cache/shoji`), outside `target/`.
//!
//! The build scripts and their inputs are embedded in the binary, so `shoji boot` works from
//! any directory; the cache key is computed exactly as the scripts compute it.
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Recipe {
    what: &'static str,
    /// (file name, contents) in the order the script hashes them.
    files: &'static [(&'static str, &'static str)],
    output: &'static str,
}

const KERNEL: Recipe = Recipe {
    what: "kernel",
    files: &[
        ("shoji.config", include_str!("../../kernel-config/shoji.config")),
        ("pvm-guest.patch", include_str!("../../kernel-config/pvm-guest.patch")),
        ("build.sh", include_str!("../../kernel-config/build.sh")),
    ],
    output: "vmlinux",
};

const ROOTFS: Recipe = Recipe {
    what: "rootfs",
    files: &[
        ("init.c", include_str!("../../rootfs/init.c")),
        ("mkcpio.c", include_str!("../../rootfs/mkcpio.c")),
        ("build.sh", include_str!("../../rootfs/build.sh")),
    ],
    output: "initramfs.cpio",
};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{what}: no cache directory: set SHOJI_CACHE or HOME")]
    NoCache { what: &'static str },
    #[error("{what}: cannot prepare the build in {dir}: {err}")]
    Prepare { what: &'static str, dir: PathBuf, err: std::io::Error },
    #[error("{what}: build script failed ({status}); its output is above")]
    Build { what: &'static str, status: String },
    #[error("{what}: build finished but {0} is missing", path.display())]
    Missing { what: &'static str, path: PathBuf },
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

fn key(r: &Recipe) -> String {
    let mut h = Sha256::new();
    for (_, body) in r.files {
        h.update(body.as_bytes());
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn path_in(cache: &Path, r: &Recipe) -> PathBuf {
    cache.join(r.what).join(key(r)).join(r.output)
}

/// Where the default kernel is (or will be) cached.
pub fn kernel_path() -> Option<PathBuf> {
    cache_dir().map(|c| path_in(&c, &KERNEL))
}

/// Where the default initramfs is (or will be) cached.
pub fn rootfs_path() -> Option<PathBuf> {
    cache_dir().map(|c| path_in(&c, &ROOTFS))
}

fn ensure(r: &Recipe) -> Result<PathBuf, ArtifactError> {
    let cache = cache_dir().ok_or(ArtifactError::NoCache { what: r.what })?;
    let out = path_in(&cache, r);
    if out.is_file() {
        return Ok(out);
    }
    let prep = |err, dir: &Path| ArtifactError::Prepare { what: r.what, dir: dir.to_path_buf(), err };
    std::fs::create_dir_all(&cache).map_err(|e| prep(e, &cache))?;
    let dir = cache.join(format!(".{}-src-{}", r.what, std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| prep(e, &dir))?;
    let result = (|| {
        for (name, body) in r.files {
            std::fs::write(dir.join(name), body).map_err(|e| prep(e, &dir))?;
        }
        eprintln!("shoji: building the guest {} (first use; cached in {})", r.what, cache.display());
        let status = Command::new("bash")
            .arg(dir.join("build.sh"))
            .env("SHOJI_CACHE", &cache)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| prep(e, &dir))?;
        if !status.success() {
            return Err(ArtifactError::Build { what: r.what, status: status.to_string() });
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    if out.is_file() {
        Ok(out)
    } else {
        Err(ArtifactError::Missing { what: r.what, path: out })
    }
}

/// The default kernel, built first if it is not cached (about 13 min on 2 cores).
pub fn ensure_kernel() -> Result<PathBuf, ArtifactError> {
    ensure(&KERNEL)
}

/// The default initramfs, built first if it is not cached (seconds).
pub fn ensure_rootfs() -> Result<PathBuf, ArtifactError> {
    ensure(&ROOTFS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_scripts() {
        // The scripts hash `cat file1 file2 build.sh | sha256sum | cut -c1-16`.
        for r in [&KERNEL, &ROOTFS] {
            let k = key(r);
            assert_eq!(k.len(), 16);
            let mut cat = Vec::new();
            for (_, b) in r.files {
                cat.extend_from_slice(b.as_bytes());
            }
            let full: String = Sha256::digest(&cat).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(k, full[..16]);
        }
    }
}
