//! A container's output in the runtime tests (included by the tests that create containers).
use shoji_agent::runtime::{ContainerRuntime, LinuxRuntime};
use std::time::Duration;

/// How long one read may wait before the test calls it hung.
const READ_LIMIT: Duration = Duration::from_secs(20);

/// Everything on stdout (or stderr) of a container or one of its execs until end of stream.
pub async fn read_all(rt: &LinuxRuntime, id: &str, exec_id: &str, stderr: bool) -> String {
    let mut out = Vec::new();
    loop {
        let chunk = tokio::time::timeout(READ_LIMIT, async {
            if stderr {
                rt.read_stderr(id, exec_id, 4096).await
            } else {
                rt.read_stdout(id, exec_id, 4096).await
            }
        })
        .await
        .expect("read hangs")
        .unwrap();
        if chunk.is_empty() {
            return String::from_utf8_lossy(&out).into_owned();
        }
        out.extend(chunk);
    }
}
