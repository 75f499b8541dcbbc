//! The exec output relay: an exec's stdout and stderr read straight from the process's pipes.
//!
//! Through FIFOs the shim copies every byte of a process's pipe into the FIFO in 4 KiB steps,
//! which bounds exec output near 200 MiB/s on a small node whatever the service does. containerd's
//! shim can instead hand a process's pipes to a logging binary (stdout URI `binary:///path?k=v`):
//! it starts the binary with the read ends as fds 3 and 4 and a "ready" pipe as fd 5, and copies
//! nothing. Our binary is sandboxd itself in [`RELAY_ARG`] mode ([`helper_main`]): it passes the
//! two read ends to the server over a unix socket (SCM_RIGHTS), closes the ready pipe, and stays
//! until the server closes the connection (the exec is over) or the shim sends SIGTERM (the exec
//! is deleted). The server then reads the process's pipes itself.
//!
//! Two consequences the exec session handles: the shim keeps its copies of the write ends until
//! the exec is deleted, so output reaches EOF only after DeleteProcess; and the shim gives such a
//! process no stdin, so execs with stdin or a terminal keep the FIFOs. A shim that cannot run the
//! binary (sandboxd in a pod, containerd on the node) fails the exec's start: the manager then
//! turns the relay off and uses FIFOs from then on.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::sync::oneshot;

/// The first argument that makes the sandboxd binary the relay helper (the key of the
/// `binary://` URI's query, which the shim passes as arguments).
pub const RELAY_ARG: &str = "exec-io-relay";
/// How long a started exec's pipes may take to arrive (the shim hands them over before its
/// start returns, so this only bounds a helper that could not reach us).
pub const RELAY_HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);
/// Capacity asked for the relayed pipes: fewer, larger reads than the default 64 KiB.
pub const RELAY_PIPE_SIZE: i32 = 1 << 20;
/// Largest exec id a helper may send.
const MAX_ID_LEN: usize = 256;

/// The process's read ends, handed over by the helper.
#[derive(Debug)]
pub struct RelayedIo {
    /// stdout's read end.
    pub stdout: OwnedFd,
    /// stderr's read end.
    pub stderr: OwnedFd,
    /// The helper waits until this closes; dropped when the exec session ends.
    pub conn: UnixStream,
}

/// The server side: a listening socket and the execs waiting for their pipes.
#[derive(Debug)]
pub struct ExecRelay {
    uri: String,
    pending: Mutex<HashMap<String, oneshot::Sender<RelayedIo>>>,
    off: AtomicBool,
}

/// A registration for one exec's pipes; unregisters when dropped.
pub struct Pending {
    relay: Arc<ExecRelay>,
    exec_id: String,
    rx: oneshot::Receiver<RelayedIo>,
}

impl Pending {
    /// Waits for the helper to hand over the pipes; None if it does not within
    /// [`RELAY_HANDOFF_TIMEOUT`].
    pub async fn wait_for_pipes(mut self) -> Option<RelayedIo> {
        tokio::time::timeout(RELAY_HANDOFF_TIMEOUT, &mut self.rx)
            .await
            .ok()?
            .ok()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.relay.lock().remove(&self.exec_id);
    }
}

impl ExecRelay {
    /// Listens on `socket` (replacing a stale one) for helpers started as `binary`.
    pub fn start(binary: &Path, socket: &Path) -> std::io::Result<Arc<ExecRelay>> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        let relay = Arc::new(ExecRelay {
            uri: relay_uri(binary, socket),
            pending: Mutex::new(HashMap::new()),
            off: AtomicBool::new(false),
        });
        tokio::spawn(accept_loop(listener, Arc::downgrade(&relay)));
        Ok(relay)
    }

    /// Whether execs should try the relay.
    pub fn usable(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }

    /// Turns the relay off for good (the shim cannot run the helper).
    pub fn disable(&self, why: &str) {
        if !self.off.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                reason = why,
                "exec output relay unusable; execs use FIFOs from now on"
            );
        }
    }

    /// The stdout/stderr URI that makes the shim start the helper.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Registers `exec_id` as waiting for its pipes; call before its exec is created, so that
    /// the helper's handoff finds it.
    pub fn register(self: &Arc<Self>, exec_id: &str) -> Pending {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(exec_id.to_string(), tx);
        Pending {
            relay: self.clone(),
            exec_id: exec_id.to_string(),
            rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<RelayedIo>>> {
        // A panic while holding the map cannot leave it inconsistent: use it anyway.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, exec_id: &str, io: RelayedIo) {
        match self.lock().remove(exec_id) {
            Some(tx) => {
                // A receiver that gave up drops the pipes, which is all there is to undo.
                let _ = tx.send(io);
            }
            None => tracing::debug!(exec_id, "relayed pipes for no waiting exec; dropped"),
        }
    }
}

/// `binary://<binary>?exec-io-relay=<socket>`, percent-encoding anything a URL would misread.
fn relay_uri(binary: &Path, socket: &Path) -> String {
    fn enc(p: &Path) -> String {
        use std::os::unix::ffi::OsStrExt;
        p.as_os_str()
            .as_bytes()
            .iter()
            .map(|&b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    format!("binary://{}?{RELAY_ARG}={}", enc(binary), enc(socket))
}

async fn accept_loop(listener: tokio::net::UnixListener, relay: Weak<ExecRelay>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "exec relay accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(relay) = relay.upgrade() else { return };
        // Only our own user (root, the shim's) may hand pipes to execs.
        match stream.peer_cred() {
            Ok(c) if c.uid() == nix::unistd::geteuid().as_raw() => {}
            _ => {
                tracing::warn!("exec relay connection from another user refused");
                continue;
            }
        }
        tokio::spawn(async move {
            if let Err(e) = receive(stream, &relay).await {
                tracing::warn!(error = %e, "exec relay handoff failed");
            }
        });
    }
}

async fn receive(stream: tokio::net::UnixStream, relay: &ExecRelay) -> std::io::Result<()> {
    let (exec_id, fds) = tokio::time::timeout(RELAY_HANDOFF_TIMEOUT, async {
        loop {
            stream.readable().await?;
            match stream.try_io(Interest::READABLE, || recv_fds(stream.as_raw_fd())) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::other("the helper sent nothing"))??;
    let [stdout, stderr]: [OwnedFd; 2] = fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| std::io::Error::other(format!("{} fds, not 2", v.len())))?;
    let conn = stream.into_std()?;
    relay.deliver(
        &exec_id,
        RelayedIo {
            stdout,
            stderr,
            conn,
        },
    );
    Ok(())
}

/// One message: the exec id as bytes and its two fds.
fn recv_fds(fd: RawFd) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = [0u8; MAX_ID_LEN];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut fds = Vec::new();
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS just installed these descriptors in this process; nothing
                // else refers to them, so each gets exactly one owner here.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
    }
    let n = msg.bytes;
    if truncated {
        return Err(std::io::Error::other("control message truncated"));
    }
    let id = std::str::from_utf8(&buf[..n])
        .map_err(|_| std::io::Error::other("exec id is not UTF-8"))?
        .to_string();
    Ok((id, fds))
}

/// Raises a pipe's capacity (best effort: the default still works, only slower).
pub fn enlarge_pipe(fd: &OwnedFd) {
    // SAFETY: F_SETPIPE_SZ on a descriptor we own; failure leaves the pipe as it was.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, RELAY_PIPE_SIZE);
    }
}

/// The helper: run by containerd's shim as `sandboxd exec-io-relay SOCKET`, with the exec's
/// stdout and stderr read ends as fds 3 and 4, the ready pipe as fd 5, and the exec id in
/// `CONTAINER_ID`.
pub fn helper_main(socket: &OsStr) -> std::process::ExitCode {
    match helper(Path::new(socket)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandboxd {RELAY_ARG}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn helper(socket: &Path) -> std::io::Result<()> {
    for fd in 3..=5 {
        // SAFETY: F_GETFD only reads descriptor flags; it fails for a descriptor not open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(std::io::Error::other(
                "fds 3-5 are not open: this mode is only for containerd's shim",
            ));
        }
    }
    // SAFETY: the shim's binary logging protocol gives us fds 3 (stdout), 4 (stderr) and 5
    // (ready), checked open above; nothing else in this process uses them.
    let (stdout, stderr, ready) = unsafe {
        (
            OwnedFd::from_raw_fd(3),
            OwnedFd::from_raw_fd(4),
            OwnedFd::from_raw_fd(5),
        )
    };
    let exec_id = std::env::var("CONTAINER_ID").unwrap_or_default();
    let conn = UnixStream::connect(socket)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
    socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(exec_id.as_bytes())],
        &[ControlMessage::ScmRights(&[
            stdout.as_raw_fd(),
            stderr.as_raw_fd(),
        ])],
        MsgFlags::empty(),
        None,
    )?;
    drop((stdout, stderr));
    // Closing the ready pipe lets the shim start the process.
    drop(ready);
    // Stay while the server holds the connection: the shim stops us with SIGTERM when the exec
    // is deleted and must not signal a pid that was reused.
    let _ = (&conn).read(&mut [0u8; 1]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_uri_names_the_binary_and_socket_percent_encoded() {
        assert_eq!(
            relay_uri(
                Path::new("/usr/bin/sandboxd"),
                Path::new("/var/lib/x y/r.sock")
            ),
            "binary:///usr/bin/sandboxd?exec-io-relay=/var/lib/x%20y/r.sock"
        );
    }

    #[tokio::test]
    async fn pipes_sent_over_the_socket_reach_the_waiting_exec() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("relay.sock");
        let relay = ExecRelay::start(Path::new("/bin/true"), &sock).unwrap();
        let pending = relay.register("exec-1");
        let (r1, w1) = nix::unistd::pipe().unwrap();
        let (r2, _w2) = nix::unistd::pipe().unwrap();
        let conn = UnixStream::connect(&sock).unwrap();
        socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(b"exec-1")],
            &[ControlMessage::ScmRights(&[r1.as_raw_fd(), r2.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop((r1, r2));
        let io = pending.wait_for_pipes().await.expect("pipes delivered");
        nix::unistd::write(&w1, b"hello").unwrap();
        let mut got = [0u8; 5];
        std::fs::File::from(io.stdout).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert!(relay.lock().is_empty());
    }
}
