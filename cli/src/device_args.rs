//! `--disk` and `--share` values of `shoji boot` (and `--disk` of `shoji run`), checked so a
//! typo is an error, not a silently different device.
use anyhow::{anyhow, Result};
use shoji_vmm::{DiskConfig, ShareConfig};
use std::path::PathBuf;

/// "PATH[,ro|,rw]" -> disk config; options are checked so a typo is not silently a rw disk.
pub fn parse_disk(spec: &str) -> Result<DiskConfig> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| anyhow!("disk: empty path in {spec:?}"))?;
    let mut read_only = false;
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            o => return Err(anyhow!("disk: unknown option {o:?} in {spec:?} (expected ro or rw)")),
        }
    }
    Ok(DiskConfig { path: PathBuf::from(path), read_only })
}

/// "DIR[,tag=T][,ro|,rw]" -> share config.
pub fn parse_share(spec: &str, index: usize) -> Result<ShareConfig> {
    let mut parts = spec.split(',');
    let dir = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| anyhow!("share: empty directory in {spec:?}"))?;
    let mut share =
        ShareConfig { dir: PathBuf::from(dir), tag: shoji_devices::model::share_tag(index), read_only: false };
    for opt in parts {
        match opt.split_once('=') {
            Some(("tag", t)) => share.tag = t.to_string(),
            None if opt == "ro" => share.read_only = true,
            None if opt == "rw" => share.read_only = false,
            _ => return Err(anyhow!("share: unknown option {opt:?} in {spec:?} (expected tag=T, ro or rw)")),
        }
    }
    Ok(share)
}
