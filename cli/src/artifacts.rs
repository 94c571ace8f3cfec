//! Builds the guest kernel and initramfs into the cache the sandbox library and the shim look
//! them up in (`shoji_sandbox::artifacts`): `shoji setup`, and on first use `shoji boot`,
//! `shoji run` and the benches. The only place that builds them at run time.
//!
//! The recipes' scripts and inputs are embedded in this binary, so the kernel and the
//! initramfs's C parts build from any directory; the cache keys are the scripts' own. The
//! static guest agent is built from the source tree this `shoji` was built from (or taken from
//! `$SHOJI_AGENT`); without either, an initramfs already recorded in the cache is used.
use anyhow::{anyhow, bail, Context, Result};
use shoji_sandbox::artifacts as lookup;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The initramfs's recipe, in the order rootfs/build.sh hashes it (then the agent binary).
const ROOTFS_RECIPE: &[(&str, &str)] = &[
    ("init.c", include_str!("../../rootfs/init.c")),
    ("mkcpio.c", include_str!("../../rootfs/mkcpio.c")),
    ("build.sh", include_str!("../../rootfs/build.sh")),
];

/// Where a build reports its progress, so the CLI can show a spinner instead of the raw build
/// log. Without one, the build script's stderr goes straight to ours.
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

fn cache() -> Result<PathBuf> {
    lookup::cache_dir().ok_or_else(|| anyhow!("no cache directory for the guest artifacts: set SHOJI_CACHE or HOME"))
}

/// The kernel and the initramfs, each built first if it is not cached.
pub fn ensure() -> Result<(PathBuf, PathBuf)> {
    Ok((ensure_kernel()?, ensure_rootfs()?))
}

/// The default kernel, built first if it is not cached (about 13 min on 2 cores).
pub fn ensure_kernel() -> Result<PathBuf> {
    let cache = cache()?;
    if let Ok(p) = lookup::kernel_in(&cache) {
        return Ok(p);
    }
    run_recipe("kernel", lookup::KERNEL_RECIPE, &cache, None)?;
    lookup::kernel_in(&cache).context("the kernel build finished")
}

/// The default initramfs (the agent as /init), built first if it is not cached (seconds, plus
/// the agent's first build), and recorded as the current one for the sandbox library and shim.
pub fn ensure_rootfs() -> Result<PathBuf> {
    let cache = cache()?;
    let agent = match agent_binary()? {
        Some(a) => a,
        // An installed `shoji` without the source tree: what `shoji setup` recorded earlier.
        None => {
            return lookup::initramfs_in(&cache).map_err(|e| {
                anyhow!("{e} from a source checkout, or set SHOJI_AGENT to a static shoji-agent binary (the agent's source is not here)")
            })
        }
    };
    let bytes = std::fs::read(&agent).with_context(|| format!("agent: {}", agent.display()))?;
    let key = lookup::key(ROOTFS_RECIPE, &bytes);
    let path = lookup::initramfs_path(&cache, &key);
    if path.is_file() {
        record_rootfs(&cache, &key)?;
    } else {
        // The script records it itself.
        run_recipe("rootfs", ROOTFS_RECIPE, &cache, Some(&agent))?;
    }
    if !path.is_file() {
        bail!("rootfs: the build finished but {} is missing", path.display());
    }
    Ok(path)
}

/// Makes `key` the current initramfs: a new record renamed over the old one, so a reader sees
/// either, whole (rootfs/build.sh does the same).
fn record_rootfs(cache: &Path, key: &str) -> Result<()> {
    let record = cache.join(lookup::ROOTFS_RECORD);
    let tmp = record.with_file_name(format!(".current.{}", std::process::id()));
    std::fs::write(&tmp, format!("{key}\n"))
        .and_then(|()| std::fs::rename(&tmp, &record))
        .with_context(|| format!("recording the initramfs in {}", record.display()))
}

/// The static guest agent: `$SHOJI_AGENT`, or built from the source tree this `shoji` was built
/// from by `guest-agent/build-static.sh`, the one build path of the agent (no AVX in its Rust
/// code; incremental: a no-op when nothing changed). None when neither is here.
fn agent_binary() -> Result<Option<PathBuf>> {
    if let Some(p) = std::env::var_os("SHOJI_AGENT").filter(|p| !p.is_empty()) {
        return Ok(Some(PathBuf::from(p)));
    }
    // The CLI is the build tool: it may know its checkout (the library and the shim may not).
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    let script = ws.join("guest-agent/build-static.sh");
    if !script.is_file() {
        tracing::debug!("agent: {} is not here", script.display());
        return Ok(None);
    }
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("agent: cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!("agent: {} failed ({}); its output is above", script.display(), out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned();
    if path.is_empty() {
        bail!("agent: {} printed no path", script.display());
    }
    Ok(Some(PathBuf::from(path)))
}

/// Runs an embedded recipe's build.sh (from a scratch copy) into `cache`.
fn run_recipe(what: &str, files: &[(&str, &str)], cache: &Path, agent: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(cache).with_context(|| format!("{what}: creating {}", cache.display()))?;
    let dir = cache.join(format!(".{what}-src-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("{what}: creating {}", dir.display()))?;
    let result = run_script(what, files, &dir, cache, agent);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_script(what: &str, files: &[(&str, &str)], dir: &Path, cache: &Path, agent: Option<&Path>) -> Result<()> {
    for (name, body) in files {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("{what}: writing {}", p.display()))?;
    }
    let progress = PROGRESS.get();
    match progress {
        Some(p) => p.start(what, cache),
        None => eprintln!("shoji: building the guest {what} (first use; cached in {})", cache.display()),
    }
    let mut cmd = Command::new("bash");
    if let Some(a) = agent {
        cmd.env("SHOJI_AGENT", a);
    }
    cmd.arg(dir.join("build.sh")).env("SHOJI_CACHE", cache).stdout(Stdio::null());
    if progress.is_some() {
        cmd.stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().with_context(|| format!("{what}: cannot run {}", dir.join("build.sh").display()))?;
    if let (Some(p), Some(err)) = (progress, child.stderr.take()) {
        // Read to the end (whatever the bytes), so the script never blocks on a full pipe.
        let mut err = std::io::BufReader::new(err);
        let mut line = Vec::new();
        while matches!(err.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            p.line(what, String::from_utf8_lossy(&line).trim_end());
            line.clear();
        }
    }
    let status = child.wait().with_context(|| format!("{what}: waiting for its build"))?;
    if let Some(p) = progress {
        p.finish(what, status.success());
    }
    if !status.success() {
        bail!("{what}: build script failed ({status}); its output is above");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded rootfs/build.sh, run with a stand-in agent, puts the initramfs where the
    /// Rust key says and records it where the sandbox library looks (needs gcc, seconds).
    #[test]
    fn the_rootfs_script_and_the_lookup_agree_on_key_and_record() {
        let cache = tempfile::tempdir().unwrap();
        let agent = cache.path().join("agent");
        std::fs::write(&agent, b"#!/bin/sh\n# a stand-in: the key hashes its bytes\n").unwrap();
        run_recipe("rootfs", ROOTFS_RECIPE, cache.path(), Some(&agent)).unwrap();
        let key = lookup::key(ROOTFS_RECIPE, &std::fs::read(&agent).unwrap());
        let want = lookup::initramfs_path(cache.path(), &key);
        assert!(want.is_file(), "{} built", want.display());
        assert_eq!(lookup::initramfs_in(cache.path()).unwrap(), want);

        // Another agent: a new key, recorded by the Rust side this time, over the script's.
        let other = "fedcba9876543210";
        let p = lookup::initramfs_path(cache.path(), other);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"cpio").unwrap();
        record_rootfs(cache.path(), other).unwrap();
        assert_eq!(lookup::initramfs_in(cache.path()).unwrap(), p);
        // No temporary record left behind.
        let names: Vec<_> =
            std::fs::read_dir(cache.path().join("rootfs")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().starts_with(".current")), "{names:?}");
    }
}
