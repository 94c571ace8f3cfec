//! Log files a guest fills (the serial console, a detached command's output) with a size cap:
//! past the cap the file becomes a ring that overwrites its oldest bytes, so a chatty guest
//! cannot fill `/run` and the newest output is always kept.
//!
//! The writer only ever calls `write` and `lseek` on the fd it was given (the vCPU threads that
//! write the console are seccomp-confined to little more). Until the cap is reached the file is
//! plain text. Once it wraps, its first [`HEADER`] bytes say where the newest byte ends
//! (`\0shoji-ring <pos>`); the bytes from there to the end of the file are the older part,
//! those between the header and `pos` the newer part. [`read`] and [`tail`] put them back in
//! order.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The cap on the serial console log (`console.log`).
pub const CONSOLE_LOG_MAX: u64 = 4 << 20;
/// The cap on a detached sandbox's command output (`output.log`).
pub const OUTPUT_LOG_MAX: u64 = 64 << 20;
/// Size of the header of a wrapped log.
pub const HEADER: u64 = 32;
const MAGIC: &[u8] = b"\0shoji-ring ";

/// A log file capped at `cap` bytes (see the module doc).
#[derive(Debug)]
pub struct CappedLog {
    file: File,
    cap: u64,
    /// Where the next byte goes.
    pos: u64,
    wrapped: bool,
}

impl CappedLog {
    /// Creates (or empties) `path`, private to its owner (0600).
    pub fn create(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        Ok(CappedLog::new(file, cap))
    }

    /// A capped log on an open, empty file.
    pub fn new(file: File, cap: u64) -> CappedLog {
        CappedLog { file, cap: cap.max(HEADER * 4), pos: 0, wrapped: false }
    }

    /// The log shared by several writers (a command's stdout and stderr).
    pub fn shared(self) -> SharedLog {
        SharedLog(Arc::new(Mutex::new(self)))
    }
}

impl Write for CappedLog {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.pos >= self.cap {
            // Wrap: the oldest bytes (just past the header) are overwritten next.
            self.file.seek(SeekFrom::Start(HEADER))?;
            self.pos = HEADER;
            self.wrapped = true;
        }
        let room = usize::try_from(self.cap - self.pos).unwrap_or(usize::MAX);
        let n = self.file.write(&data[..data.len().min(room)])?;
        self.pos += n as u64;
        Ok(n)
    }

    /// Records the ring's position in the header (once wrapped).
    fn flush(&mut self) -> std::io::Result<()> {
        if self.wrapped {
            let mut h = [b' '; HEADER as usize];
            let text = format!("{}{:019}", String::from_utf8_lossy(MAGIC), self.pos);
            h[..text.len()].copy_from_slice(text.as_bytes());
            h[HEADER as usize - 1] = b'\n';
            self.file.seek(SeekFrom::Start(0))?;
            self.file.write_all(&h)?;
            self.file.seek(SeekFrom::Start(self.pos))?;
        }
        Ok(())
    }
}

impl Drop for CappedLog {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// A [`CappedLog`] several writers share; each `write_all` + `flush` is one chunk.
#[derive(Debug, Clone)]
pub struct SharedLog(Arc<Mutex<CappedLog>>);

impl Write for SharedLog {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(data)
    }

    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write_all(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// Where a log's parts are: (older part, newer part) as byte ranges of the file.
fn layout(f: &mut File) -> std::io::Result<(std::ops::Range<u64>, std::ops::Range<u64>)> {
    let len = f.metadata()?.len();
    let mut h = [0u8; HEADER as usize];
    let wrapped = len >= HEADER && {
        f.seek(SeekFrom::Start(0))?;
        f.read_exact(&mut h)?;
        h.starts_with(MAGIC)
    };
    let pos = wrapped
        .then(|| std::str::from_utf8(&h[MAGIC.len()..HEADER as usize - 1]).ok()?.trim().parse::<u64>().ok())
        .flatten();
    Ok(match pos {
        Some(pos) => {
            let pos = pos.clamp(HEADER, len);
            (pos..len, HEADER..pos)
        }
        None => (0..0, 0..len),
    })
}

fn read_range(f: &mut File, r: std::ops::Range<u64>, out: &mut Vec<u8>) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(r.start))?;
    f.take(r.end - r.start).read_to_end(out)?;
    Ok(())
}

/// A log's text in order (the older part starts at a line boundary).
pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    tail(path, u64::MAX)
}

/// The last `max` bytes of a log (at most, from a line boundary when it had more or has wrapped),
/// read from its end: never the whole file.
pub fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let (older, newer) = layout(&mut f)?;
    let wrapped = newer.start == HEADER;
    // One byte more than asked: whether the window starts at a line boundary.
    let want = max.saturating_add(1);
    let from_newer = (newer.end - newer.start).min(want);
    let from_older = (older.end - older.start).min(want - from_newer);
    let mut out = Vec::new();
    read_range(&mut f, older.end - from_older..older.end, &mut out)?;
    read_range(&mut f, newer.end - from_newer..newer.end, &mut out)?;
    let cut_short = from_older + from_newer > max;
    if cut_short || (wrapped && from_older == older.end - older.start) {
        // The first line is cut (by `max`, or overwritten by the ring): it is left out.
        let cut = out.iter().position(|&b| b == b'\n').map_or(out.len(), |i| i + 1);
        out.drain(..cut);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: u64) -> String {
        format!("line {i:08}\n")
    }

    #[test]
    fn under_the_cap_it_is_a_plain_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let mut w = CappedLog::create(&p, 4096).unwrap();
        w.write_all(b"hello\nworld\n").unwrap();
        w.flush().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello\nworld\n");
        assert_eq!(read(&p).unwrap(), b"hello\nworld\n");
        assert_eq!(tail(&p, 6).unwrap(), b"world\n");
        assert_eq!(tail(&p, 8).unwrap(), b"world\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn past_the_cap_the_newest_lines_are_kept_in_order() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let mut w = CappedLog::create(&p, 1000).unwrap();
        for i in 0..1000 {
            w.write_all(line(i).as_bytes()).unwrap();
            w.flush().unwrap();
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1000);
        let text = String::from_utf8(read(&p).unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last().copied(), Some("line 00000999"));
        let n: Vec<u64> = lines.iter().map(|l| l.trim_start_matches("line ").parse().unwrap()).collect();
        assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "out of order: {n:?}");
        assert!(n.len() > 60, "{}", n.len());
        assert_eq!(tail(&p, 2 * 14 + 5).unwrap(), (line(998) + &line(999)).as_bytes());
    }
}
