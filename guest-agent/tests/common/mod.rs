//! Shared by the integration tests: can this machine give a test its own namespaces?

/// `None` when `unshare(1)` with `flags` works here (root, unshare present, namespaces
/// allowed); otherwise why not, for the skip message.
pub fn cannot_unshare(flags: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    match std::process::Command::new("unshare").args(flags).arg("true").output() {
        Err(e) => Some(format!("unshare(1): {e}")),
        Ok(out) if !out.status.success() => {
            Some(format!("unshare {}: {}", flags.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
        Ok(_) => None,
    }
}
