//! The guest kernel and initramfs Shoji boots by default, built on first use and cached by
//! content hash under `$SHOJI_CACHE` (default `~/.cache/shoji`), outside `target/`.
//!
//! The build scripts and their inputs are embedded in the binary, so `shoji boot` works from
//! any directory; the cache key is computed exactly as the scripts compute it. The initramfs
//! also carries the static guest agent, which is built from this source tree (or taken from
//! `$SHOJI_AGENT`) and is part of the initramfs's key.
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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
    #[error("agent: {0}")]
    Agent(String),
}

/// Where a first-use build reports its progress, so the CLI can show a spinner instead of the
/// raw build log. Without one, the build script's stderr goes straight to ours.
pub trait BuildProgress: Send + Sync {
    /// A build of the guest `what` ("kernel", "rootfs") starts, to be cached in `cache`.
    fn start(&self, what: &str, cache: &Path);
    /// One line the build script wrote on stderr (its current step).
    fn line(&self, what: &str, line: &str);
    /// The build ended; `ok` when the script succeeded.
    fn finish(&self, what: &str, ok: bool);
}

static PROGRESS: OnceLock<Box<dyn BuildProgress>> = OnceLock::new();

/// Installs the process's build progress reporter; false if one was already installed.
pub fn set_progress(p: Box<dyn BuildProgress>) -> bool {
    PROGRESS.set(p).is_ok()
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

/// `extra` is hashed after the files, as the script appends the agent binary.
fn key(r: &Recipe, extra: &[u8]) -> String {
    let mut h = Sha256::new();
    for (_, body) in r.files {
        h.update(body.as_bytes());
    }
    h.update(extra);
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn path_in(cache: &Path, r: &Recipe, extra: &[u8]) -> PathBuf {
    cache.join(r.what).join(key(r, extra)).join(r.output)
}

/// The cached default kernel, if it has been built.
pub fn kernel_cached() -> Option<PathBuf> {
    cache_dir().map(|c| path_in(&c, &KERNEL, b"")).filter(|p| p.is_file())
}

/// The static guest agent: `$SHOJI_AGENT`, or built from the source tree this `shoji` was built
/// from by `guest-agent/build-static.sh`, the one build path of the agent (no AVX in its Rust
/// code; incremental: a no-op when nothing changed). Its own target dir keeps the nested cargo
/// from waiting on the lock of a `cargo test` that runs us.
pub fn agent_binary() -> Result<PathBuf, ArtifactError> {
    if let Some(p) = std::env::var_os("SHOJI_AGENT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    let script = ws.join("guest-agent/build-static.sh");
    if !script.is_file() {
        return Err(ArtifactError::Agent(format!(
            "the agent's source ({}) is not here; set SHOJI_AGENT to a static shoji-agent binary",
            ws.display()
        )));
    }
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| ArtifactError::Agent(format!("cannot run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(ArtifactError::Agent(format!("{} failed ({}); its output is above", script.display(), out.status)));
    }
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned();
    if path.is_empty() {
        return Err(ArtifactError::Agent(format!("{} printed no path", script.display())));
    }
    Ok(PathBuf::from(path))
}

fn ensure(r: &Recipe) -> Result<PathBuf, ArtifactError> {
    ensure_with(r, None)
}

fn ensure_with(r: &Recipe, agent: Option<(&Path, &[u8])>) -> Result<PathBuf, ArtifactError> {
    let cache = cache_dir().ok_or(ArtifactError::NoCache { what: r.what })?;
    let out = path_in(&cache, r, agent.map(|a| a.1).unwrap_or_default());
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
        let progress = PROGRESS.get();
        match progress {
            Some(p) => p.start(r.what, &cache),
            None => eprintln!("shoji: building the guest {} (first use; cached in {})", r.what, cache.display()),
        }
        let mut cmd = Command::new("bash");
        if let Some((path, _)) = agent {
            cmd.env("SHOJI_AGENT", path);
        }
        cmd.arg(dir.join("build.sh")).env("SHOJI_CACHE", &cache).stdout(std::process::Stdio::null());
        if progress.is_some() {
            cmd.stderr(std::process::Stdio::piped());
        }
        let mut child = cmd.spawn().map_err(|e| prep(e, &dir))?;
        if let (Some(p), Some(err)) = (progress, child.stderr.take()) {
            // Read to the end (whatever the bytes), so the script never blocks on a full pipe.
            let mut err = std::io::BufReader::new(err);
            let mut line = Vec::new();
            while matches!(err.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                p.line(r.what, String::from_utf8_lossy(&line).trim_end());
                line.clear();
            }
        }
        let status = child.wait().map_err(|e| prep(e, &dir))?;
        if let Some(p) = progress {
            p.finish(r.what, status.success());
        }
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

/// The default initramfs (the agent as /init), built first if it is not cached: seconds, plus
/// the agent's first build.
pub fn ensure_rootfs() -> Result<PathBuf, ArtifactError> {
    let agent = agent_binary()?;
    let bytes = std::fs::read(&agent).map_err(|e| ArtifactError::Agent(format!("{}: {e}", agent.display())))?;
    ensure_with(&ROOTFS, Some((&agent, &bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_scripts() {
        // The scripts hash `cat file1 file2 build.sh | sha256sum | cut -c1-16`.
        for r in [&KERNEL, &ROOTFS] {
            let k = key(r, b"");
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
