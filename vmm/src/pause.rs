//! Pausing a running VM: its vCPU threads park between two KVM_RUNs until resumed (what a
//! containerd Pause of a sandbox task means here, Kata's semantics: the guest stops, its memory
//! and devices stay). The device thread keeps running: a paused guest posts no new requests,
//! and what the host sends it (vsock) waits in the queues.
//!
//! A vCPU checks the gate before each KVM_RUN; [`crate::vm::VmControl::pause`] closes it and
//! kicks the threads out of KVM_RUN (the kick signal) until every one is parked.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a pause did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is not running")]
    NotRunning,
    #[error("only {parked} of {total} vCPUs stopped within {timeout:?}; the VM runs on")]
    Timeout { parked: usize, total: usize, timeout: Duration },
}

#[derive(Default)]
struct State {
    paused: bool,
    /// vCPU threads parked now.
    parked: usize,
}

/// The gate the vCPU threads of one VM pass before each KVM_RUN.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<State>,
    changed: Condvar,
    /// `state.paused`, readable without the lock: the vCPU loop checks it on every exit.
    closed: AtomicBool,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On a vCPU thread: returns at once unless the VM is paused; then parks until it is
    /// resumed or `stop` is set (teardown releases the gate too).
    pub fn pass(&self, stop: &AtomicBool) {
        // The common case costs one load: a close that races with it kicks this thread out of
        // the KVM_RUN it is about to enter, and the next pass sees it.
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        if !s.paused {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.paused && !stop.load(Ordering::Acquire) {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
        self.changed.notify_all();
    }

    /// Closes the gate and waits until `n` threads are parked, calling `kick` (which knocks
    /// them out of KVM_RUN) between waits. Reopens it and fails when they are not all parked by
    /// `timeout` (a thread stuck in the kernel).
    pub fn close(&self, n: usize, timeout: Duration, mut kick: impl FnMut()) -> Result<(), usize> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        s.paused = true;
        self.closed.store(true, Ordering::Release);
        while s.parked < n {
            let now = Instant::now();
            if now >= deadline {
                let parked = s.parked;
                s.paused = false;
                self.closed.store(false, Ordering::Release);
                self.changed.notify_all();
                return Err(parked);
            }
            drop(s);
            kick();
            s = self.lock();
            let wait = (deadline - now).min(Duration::from_millis(5));
            s = self.changed.wait_timeout(s, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(())
    }

    /// Reopens the gate: parked threads go back to KVM_RUN.
    pub fn open(&self) {
        let mut s = self.lock();
        s.paused = false;
        self.closed.store(false, Ordering::Release);
        drop(s);
        self.changed.notify_all();
    }

    /// The lock-free check a vCPU makes before [`PauseGate::pass`]: a pause is on its way.
    pub fn is_closing(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.lock().paused
    }

    /// Wakes parked threads to look at their stop flag (teardown; set it first). Under the
    /// lock, so a thread between its check of the flag and its wait cannot miss it.
    pub fn release(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Threads that pass the gate in a loop, counting their passes.
    fn spin(
        gate: &Arc<PauseGate>,
        stop: &Arc<AtomicBool>,
        n: usize,
    ) -> (Arc<AtomicUsize>, Vec<std::thread::JoinHandle<()>>) {
        let passes = Arc::new(AtomicUsize::new(0));
        let threads = (0..n)
            .map(|_| {
                let (gate, stop, passes) = (gate.clone(), stop.clone(), passes.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        gate.pass(&stop);
                        passes.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
            })
            .collect();
        (passes, threads)
    }

    #[test]
    fn close_parks_every_thread_and_open_lets_them_go() {
        let (gate, stop) = (Arc::new(PauseGate::default()), Arc::new(AtomicBool::new(false)));
        let (passes, threads) = spin(&gate, &stop, 3);
        gate.close(3, Duration::from_secs(10), || {}).unwrap();
        assert!(gate.is_closed());
        let frozen = passes.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(passes.load(Ordering::Relaxed), frozen, "a parked thread ran");
        gate.open();
        std::thread::sleep(Duration::from_millis(50));
        assert!(passes.load(Ordering::Relaxed) > frozen, "resumed threads run again");
        // Teardown while paused: stop releases them.
        gate.close(3, Duration::from_secs(10), || {}).unwrap();
        stop.store(true, Ordering::Release);
        gate.release();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_thread_that_never_parks_fails_the_close_and_reopens_the_gate() {
        let (gate, stop) = (Arc::new(PauseGate::default()), Arc::new(AtomicBool::new(false)));
        let (_, threads) = spin(&gate, &stop, 1);
        let mut kicks = 0;
        assert_eq!(gate.close(2, Duration::from_millis(100), || kicks += 1), Err(1));
        assert!(kicks > 0, "it kicked while waiting");
        assert!(!gate.is_closed());
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
    }
}
