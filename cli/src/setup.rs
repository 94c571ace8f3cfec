//! `shoji setup`: builds (or finds) the cached guest kernel, initramfs and `shoji run`'s
//! built-in rootfs ahead of first use, and the progress display every first-use build shares:
//! on a terminal a spinner with the elapsed time and the build's current step (the last line
//! its script wrote on stderr); otherwise the script's lines as they come.
use crate::artifacts::{self, BuildProgress};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines kept to print when a build fails behind the spinner.
const TAIL: usize = 30;

struct Build {
    bar: Option<ProgressBar>,
    tail: VecDeque<String>,
    started: Instant,
}

/// The reporter behind every first-use build of this process.
struct Reporter {
    tty: bool,
    current: Mutex<Option<Build>>,
    /// What was built in this process (setup says "cached" for the rest).
    built: Mutex<Vec<String>>,
}

impl BuildProgress for Reporter {
    fn start(&self, what: &str, cache: &Path) {
        let bar = self.tty.then(|| {
            let bar = ProgressBar::new_spinner();
            let style =
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] building the guest {prefix}: {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.set_prefix(what.to_string());
            bar.set_message(format!("first use; cached in {}", cache.display()));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if !self.tty {
            eprintln!("shoji: building the guest {what} (first use; cached in {})", cache.display());
        }
        *lock(&self.current) = Some(Build { bar, tail: VecDeque::new(), started: Instant::now() });
    }

    fn line(&self, _what: &str, line: &str) {
        let mut cur = lock(&self.current);
        let Some(b) = cur.as_mut() else { return };
        match &b.bar {
            Some(bar) => {
                if !line.trim().is_empty() {
                    bar.set_message(line.trim().to_string());
                }
                if b.tail.len() == TAIL {
                    b.tail.pop_front();
                }
                b.tail.push_back(line.to_string());
            }
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self, what: &str, ok: bool) {
        let Some(b) = lock(&self.current).take() else { return };
        if let Some(bar) = &b.bar {
            bar.finish_and_clear();
            // The error says the build's output is above: put it there.
            if !ok {
                for l in &b.tail {
                    eprintln!("{l}");
                }
            }
        }
        if ok {
            eprintln!("shoji: built the guest {what} in {}", elapsed(b.started.elapsed()));
            lock(&self.built).push(what.to_string());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

static REPORTER: std::sync::OnceLock<&'static Reporter> = std::sync::OnceLock::new();

/// Routes this process's first-use builds through the progress display.
pub fn install_progress() {
    let r: &'static Reporter = REPORTER.get_or_init(|| {
        Box::leak(Box::new(Reporter {
            tty: std::io::stderr().is_terminal(),
            current: Mutex::new(None),
            built: Mutex::new(Vec::new()),
        }))
    });
    artifacts::set_progress(Box::new(Forward(r)));
}

/// The installed reporter, shared with `setup` (which asks what was built).
struct Forward(&'static Reporter);

impl BuildProgress for Forward {
    fn start(&self, what: &str, cache: &Path) {
        self.0.start(what, cache)
    }
    fn line(&self, what: &str, line: &str) {
        self.0.line(what, line)
    }
    fn finish(&self, what: &str, ok: bool) {
        self.0.finish(what, ok)
    }
}

fn was_built(what: &str) -> bool {
    REPORTER.get().is_some_and(|r| lock(&r.built).iter().any(|w| w == what))
}

/// Finds or builds each artifact and prints one line per artifact: its path, and whether it
/// was cached or how long it took.
pub fn main() -> Result<()> {
    let line = |name: &str, what: &str, path: &Path, t: Instant| {
        let how = if was_built(what) { format!("built in {}", elapsed(t.elapsed())) } else { "cached".to_string() };
        println!("{name:<10} {} ({how})", path.display());
    };
    let t = Instant::now();
    let kernel = artifacts::ensure_kernel()?;
    line("kernel", "kernel", &kernel, t);
    // The initramfs carries the static guest agent, which cargo brings up to date first.
    let t = Instant::now();
    let initrd = artifacts::ensure_rootfs()?;
    line("initramfs", "rootfs", &initrd, t);
    let (t, wall) = (Instant::now(), std::time::SystemTime::now());
    let rootfs = crate::run::rootfs::ensure()?;
    // Built now: renamed into place (its mtime) after we started.
    let built = std::fs::metadata(&rootfs).and_then(|m| m.modified()).is_ok_and(|m| m >= wall);
    let how = if built { format!("built in {}", elapsed(t.elapsed())) } else { "cached".to_string() };
    println!("{:<10} {} ({how}; `shoji run`'s built-in busybox rootfs)", "run rootfs", rootfs.display());
    Ok(())
}
