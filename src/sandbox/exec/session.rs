//! Driving a started exec to its end: input to its stdin, its output pumped to the client in
//! bounded chunks, signals, timeouts and the client going away, then the exit after every byte.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::error::Error;
use crate::sandbox::observe::Observer;
use crate::sys;

use super::{
    ExecEvent, ExecInput, ExecSession, ExitInfo, EXEC_CHUNK, EXEC_COALESCE, EXEC_OUTPUT_GRACE,
};

impl ExecSession {
    /// Drives the process to its end: input from `input`, output and the final exit to `output`.
    /// A closed `output` (client gone) kills the process. Always cleans up the FIFOs and deletes
    /// the process from the task.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<ExecInput>,
        output: mpsc::Sender<ExecEvent>,
    ) {
        let span = tracing::info_span!("exec", sandbox_id = %self.sandbox, exec_id = %self.exec_id);
        async move {
            let cd = self.manager.backend().clone();
            let (sandbox, exec_id) = (self.sandbox.clone(), self.exec_id.clone());
            let first = Arc::new(std::sync::Once::new());
            let at = self.requested_at;
            // Set once every byte is known to be in the pipes: the pumps then stop at empty.
            let (finish_tx, finish) = tokio::sync::watch::channel(false);
            let observer = self.manager.observer.clone();
            let out_pump = tokio::spawn(pump(self.io.stdout, output.clone(), ExecEvent::Stdout, first.clone(), at, finish.clone(), observer.clone()));
            let err_pump = self.io.stderr.take().map(|rx| tokio::spawn(pump(rx, output.clone(), ExecEvent::Stderr, first.clone(), at, finish, observer)));
            let wait = &mut self.wait;
            let timeout = async {
                match self.spec.timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(timeout);
            let mut stdin = self.io.stdin.take();
            let mut timed_out = false;
            let mut input_open = true;
            let mut client_gone = false;
            let wait_result = loop {
                tokio::select! {
                    res = &mut *wait => break res,
                    _ = &mut timeout, if !timed_out => {
                        timed_out = true;
                        tracing::info!("exec timed out; killing it");
                        kill_tree(self.pid, libc::SIGKILL);
                    }
                    _ = output.closed(), if !client_gone => {
                        tracing::info!("client went away; killing the exec");
                        kill_tree(self.pid, libc::SIGKILL);
                        client_gone = true;
                        input_open = false;
                    }
                    msg = input.recv(), if input_open => match msg {
                        Some(ExecInput::Stdin(data)) => {
                            if let Some(w) = stdin.as_mut() {
                                self.manager.observer.exec_input(data.len());
                                if w.write_all(&data).await.is_err() {
                                    stdin = None;
                                }
                            }
                        }
                        Some(ExecInput::CloseStdin) => {
                            if stdin.take().is_some() {
                                close_stdin(cd.as_ref(), &sandbox, &exec_id).await;
                            }
                        }
                        Some(ExecInput::Resize(rows, cols)) => {
                            if self.spec.tty {
                                let _ = self.manager.resize(&sandbox, &exec_id, rows, cols).await;
                            }
                        }
                        Some(ExecInput::Signal(sig)) => {
                            let _ = cd.kill(&sandbox, Some(&exec_id), sig as u32, false).await;
                        }
                        Some(ExecInput::Cancel) => {
                            tracing::info!("client cancelled; killing the exec");
                            kill_tree(self.pid, libc::SIGKILL);
                            input_open = false;
                        }
                        None => {
                            // The client half-closed: that ends its input.
                            input_open = false;
                            if stdin.take().is_some() {
                                close_stdin(cd.as_ref(), &sandbox, &exec_id).await;
                            }
                        }
                    },
                }
            };
            drop(stdin);
            // Without containerd the exit cannot be known: the process is killed (a client that
            // retries must not find the first attempt still running) and the call fails.
            let lost = match &wait_result {
                Ok(Err(e)) if e.is_unavailable() => {
                    tracing::warn!(error = %e, "containerd went away while waiting for the exec; killing it");
                    kill_tree(self.pid, libc::SIGKILL);
                    true
                }
                _ => false,
            };
            let status = match wait_result {
                Ok(Ok(Some(exit))) => exit.status,
                Ok(Ok(None)) => {
                    tracing::warn!("the exec process was gone before its exit was seen");
                    255
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "waiting for the exec failed");
                    255
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the wait task failed");
                    255
                }
            };
            let delete = async {
                if let Err(e) = cd.delete_process(&sandbox, &exec_id).await {
                    if e.is_unavailable() {
                        forget_later(cd.clone(), sandbox.clone(), exec_id.clone());
                    } else {
                        tracing::warn!(error = %e, "deleting the exec process failed");
                    }
                }
            };
            tokio::pin!(delete);
            // Every byte before the exit. The shim closes its ends of the FIFOs when the process's
            // pipes reach EOF, usually by the time Wait returns: then `exited` goes out at once
            // and the process is deleted after it. When a child still holds the pipes, deleting
            // the process is what closes them; the drain is then bounded by the grace period.
            // Relayed pipes reach EOF only at the delete (the shim holds their write ends), but
            // a dead process has written all it will: unless something left in the sandbox holds
            // them, what is in the pipes now is everything, and `exited` need not wait.
            let pumps: Vec<_> = std::iter::once(out_pump).chain(err_pump).collect();
            let aborts: Vec<_> = pumps.iter().map(|p| p.abort_handle()).collect();
            let drain = futures::future::join_all(pumps);
            tokio::pin!(drain);
            let deleted = if self.io.eof_after_delete {
                let (manager, inodes) = (self.manager.clone(), std::mem::take(&mut self.io.pipe_inodes));
                let id = sandbox.clone();
                let held = sys::blocking(move || Ok(manager.sandbox_holds_pipes(&id, &inodes))).await.unwrap_or(true);
                if held {
                    (&mut delete).await;
                    true
                } else {
                    let _ = finish_tx.send(true);
                    (&mut drain).await;
                    false
                }
            } else {
                tokio::select! {
                    _ = &mut drain => false,
                    () = &mut delete => true,
                }
            };
            if deleted && tokio::time::timeout(EXEC_OUTPUT_GRACE, &mut drain).await.is_err() {
                tracing::info!("output still open {EXEC_OUTPUT_GRACE:?} after exit (a child holds it); closing");
                aborts.iter().for_each(|a| a.abort());
            }
            let signal = if status > 128 && status <= 128 + 64 { status as i32 - 128 } else { 0 };
            let oom_killed = signal == libc::SIGKILL && !timed_out && self.manager.oom_kills(&self.spec.sandbox_id) > self.oom_before;
            let info = ExitInfo { exit_code: status as i32, signal, timed_out, oom_killed };
            let last = if lost {
                ExecEvent::Failed(Error::Unavailable {
                    op: "tasks.wait",
                    message: "the connection to containerd was lost while the exec ran; the process was killed".into(),
                })
            } else {
                ExecEvent::Exited(info)
            };
            let _ = output.send(last).await;
            if !deleted {
                delete.await;
            }
            drop((self.io._dir, self.io._relay));
        }
        .instrument(span)
        .await
    }
}

/// Ends the process's input. The shim holds a writer of the stdin FIFO until told to close it,
/// so a lost CloseIO leaves the process waiting for EOF: it is tried again once, and a failure
/// is logged (the exec's timeout, the client or a delete still end it).
async fn close_stdin(cd: &dyn crate::runtime::Backend, sandbox: &str, exec_id: &str) {
    if let Err(first) = cd.close_stdin(sandbox, exec_id).await {
        tracing::info!(error = %first, "closing the exec's stdin failed; trying again");
        if let Err(e) = cd.close_stdin(sandbox, exec_id).await {
            tracing::warn!(error = %e, "closing the exec's stdin failed: it gets no end of input");
        }
    }
}

/// How long a process whose delete met no containerd is retried for, and how often.
const FORGET_FOR: std::time::Duration = std::time::Duration::from_secs(600);
const FORGET_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Deletes an exec process from its task once containerd answers again, so the shim does not
/// keep it (and its exit status) forever. Gives up after [`FORGET_FOR`]: the shim forgets it
/// with the task at the latest.
fn forget_later(cd: Arc<dyn crate::runtime::Backend>, sandbox: String, exec_id: String) {
    tokio::spawn(async move {
        let give_up = tokio::time::Instant::now() + FORGET_FOR;
        while tokio::time::Instant::now() < give_up {
            tokio::time::sleep(FORGET_EVERY).await;
            match cd.delete_process(&sandbox, &exec_id).await {
                Err(e) if e.is_unavailable() => continue,
                Err(e) => {
                    tracing::warn!(sandbox_id = %sandbox, %exec_id, error = %e, "deleting the exec process failed");
                    return;
                }
                Ok(()) => return,
            }
        }
    });
}

/// Copies one pipe into the output channel until EOF, or until it is empty once `finish` is
/// set; stops reading while the channel is full.
///
/// Output after a quiet spell goes out at once. During a burst (the previous chunk left less
/// than [`EXEC_COALESCE`] ago) reads gather into one chunk until it is full or its first byte is
/// that old: a program writing 4 KiB at a time would otherwise cost one message per write.
pub(super) async fn pump(
    mut rx: pipe::Receiver,
    output: mpsc::Sender<ExecEvent>,
    wrap: fn(Bytes) -> ExecEvent,
    first_byte: Arc<std::sync::Once>,
    requested_at: std::time::Instant,
    mut finish: tokio::sync::watch::Receiver<bool>,
    observer: Arc<dyn Observer>,
) {
    let mut buf = bytes::BytesMut::new();
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        buf.reserve(EXEC_CHUNK);
        let mut eof = !read_more(&mut rx, &mut buf, &mut finish).await;
        if !eof && last_sent.is_some_and(|t| t.elapsed() < EXEC_COALESCE) {
            let until = tokio::time::Instant::now() + EXEC_COALESCE;
            while buf.len() < EXEC_CHUNK {
                match tokio::time::timeout_at(until, read_more(&mut rx, &mut buf, &mut finish))
                    .await
                {
                    Err(_) => break,
                    Ok(false) => {
                        eof = true;
                        break;
                    }
                    Ok(true) => {}
                }
            }
        }
        if !buf.is_empty() {
            first_byte.call_once(|| observer.exec_first_output(requested_at.elapsed()));
            observer.exec_output(buf.len());
            if output.send(wrap(buf.split().freeze())).await.is_err() {
                return;
            }
            last_sent = Some(tokio::time::Instant::now());
        }
        if eof {
            return;
        }
    }
}

/// Reads into `buf` (straight into the buffer the message will carry: no copy on our side), up
/// to [`EXEC_CHUNK`] in all. False at the end: EOF, an error, or an empty pipe once `finish` is
/// set. A full buffer returns at once.
async fn read_more(
    rx: &mut pipe::Receiver,
    buf: &mut bytes::BytesMut,
    finish: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let room = EXEC_CHUNK.saturating_sub(buf.len());
    if room == 0 {
        return true;
    }
    if *finish.borrow() {
        return matches!(read_now(rx, buf, room), Ok(n) if n > 0);
    }
    let mut limited = (&mut *buf).limit(room);
    tokio::select! {
        read = rx.read_buf(&mut limited) => matches!(read, Ok(n) if n > 0),
        // Re-checked above on the next call: the pipe is then drained without waiting.
        _ = finish.wait_for(|f| *f) => true,
    }
}

/// One read(2) of what the pipe holds now, into `buf`'s spare room. Not tokio's `try_read`:
/// that trusts the reactor's last readiness event and can answer "would block" for a pipe whose
/// data arrived after it, which here would drop a dead process's last output.
fn read_now(rx: &pipe::Receiver, buf: &mut bytes::BytesMut, room: usize) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    let len = room.min(spare.len());
    // SAFETY: read(2) writes at most `len` bytes into `spare`, memory `buf` owns and nothing
    // else borrows; the pipe's fd stays open for the call (`rx` is borrowed).
    let got = unsafe { libc::read(rx.as_raw_fd(), spare.as_mut_ptr().cast(), len) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: read(2) initialised exactly `got` bytes after the current length.
    unsafe { buf.set_len(buf.len() + got as usize) };
    Ok(got as usize)
}

/// Sends `signal` to `pid` and every descendant (host pids), children first seen first killed.
pub(super) fn kill_tree(pid: u32, signal: i32) {
    let mut pids = vec![pid as i32];
    let mut i = 0;
    let all = sys::process_parents();
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    for p in pids {
        // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only yields ESRCH.
        unsafe {
            libc::kill(p, signal);
        }
    }
}
