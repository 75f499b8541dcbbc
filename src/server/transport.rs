//! Accepted connections: plain TCP, TLS over TCP, or the unix socket, each one [`Conn`] that
//! tells the server what it proved about its peer (a [`Peer`], which tonic puts into every
//! request's extensions).
//!
//! TLS handshakes run on a task each, bounded by [`HANDSHAKE_TIMEOUT`], so a client that
//! connects and says nothing holds up no one else's accept. Each handshake takes the
//! certificate in force at that moment: after a rotation new connections get the new one and
//! established connections keep their session and streams.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

use super::authority::NormalizeAuthority;
use crate::caller::Peer;
use crate::tls::ServerTls;

/// How long a TLS client has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Mode of the unix socket: owner and group may connect, nobody else.
pub const SOCKET_MODE: u32 = 0o660;

/// One accepted connection and what it proved about its peer.
pub struct Conn {
    io: Io,
    peer: Peer,
}

enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Unix(NormalizeAuthority<UnixStream>),
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Plain TCP connections from `listener`.
pub fn tcp(listener: TcpListener) -> impl Stream<Item = io::Result<Conn>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        // Small gRPC frames (exec input, acks) must not wait for Nagle.
        let _ = s.set_nodelay(true);
        Ok(Conn {
            peer: Peer {
                remote: s.peer_addr().ok(),
                client_certificate: None,
            },
            io: Io::Tcp(s),
        })
    })
}

/// TLS connections from `listener`, handshaken with the certificate in force at each accept.
/// The accept task ends when the returned stream is dropped (the server stopped accepting),
/// which closes the listening socket.
pub fn tls(listener: TcpListener, tls: Arc<ServerTls>) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(peer = %remote, "TLS handshake timed out");
                            return;
                        }
                    };
                // Present only when the client CA is configured, and then already verified.
                let client_certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(crate::tls::subject_tenant);
                let conn = Conn {
                    io: Io::Tls(Box::new(stream)),
                    peer: Peer {
                        remote: Some(remote),
                        client_certificate,
                    },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Connections on the unix socket. Their clients often send the socket's path as
/// `:authority`, which h2 rejects; each connection gets a valid one in its place.
pub fn unix(listener: UnixListener) -> impl Stream<Item = io::Result<Conn>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|s| {
        Ok(Conn {
            io: Io::Unix(NormalizeAuthority::new(s?)),
            peer: Peer::default(),
        })
    })
}

/// Binds the unix socket at `path` with mode [`SOCKET_MODE`]. It is bound under a temporary
/// name, given its mode, then renamed into place (replacing a stale socket): it never exists
/// at `path` with a wider mode, whatever the umask.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_created_0660_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        std::fs::write(&path, "stale").unwrap();
        let listener = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.sock")]);
        let (client, accepted) = tokio::join!(UnixStream::connect(&path), listener.accept());
        client.unwrap();
        accepted.unwrap();
    }
}
