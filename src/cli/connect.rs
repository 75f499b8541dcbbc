//! Where the client finds the server (`--server`) and the gRPC channel to it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one connection attempt may take before the call fails with UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A sandboxd server address: a plaintext HTTP/2 URL or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// `http://HOST:PORT` (a bare `HOST:PORT` gets `http://` prepended).
    Http(Uri),
    /// `unix:/path/to.sock`.
    Unix(PathBuf),
}

impl FromStr for Server {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            // Accept both `unix:/p` (as `serve --listen` does) and the URL form `unix:///p`.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("a unix socket address needs a path: unix:/path/to.sock".into());
            }
            return Ok(Server::Unix(PathBuf::from(path)));
        }
        let url = if s.contains("://") {
            s.to_string()
        } else {
            format!("http://{s}")
        };
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err("https is not supported; use http://HOST:PORT or unix:/path".into())
            }
            _ => return Err("the scheme must be http:// or unix:".into()),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err("the URL has no host".into());
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err("the URL must not have a path".into());
        }
        Ok(Server::Http(uri))
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Server::Http(uri) => {
                let s = uri.to_string();
                f.write_str(s.strip_suffix('/').unwrap_or(&s))
            }
            Server::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Server {
    /// A channel that connects on first use, so an unreachable server shows up as UNAVAILABLE
    /// from the first call.
    pub fn channel(&self) -> Channel {
        match self {
            Server::Http(uri) => Endpoint::from(uri.clone())
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_lazy(),
            Server::Unix(path) => {
                let path = path.clone();
                // The URI only fills the :authority header; every connection goes to the socket.
                Endpoint::from_static("http://localhost")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_parse_in_every_accepted_form() {
        let http = |s: &str| s.parse::<Server>().unwrap().to_string();
        assert_eq!(http("http://127.0.0.1:7878"), "http://127.0.0.1:7878");
        assert_eq!(http("127.0.0.1:7878"), "http://127.0.0.1:7878");
        assert_eq!(http("localhost:9000"), "http://localhost:9000");
        assert_eq!(http("http://[::1]:7878/"), "http://[::1]:7878");
        assert_eq!(
            "unix:/run/sandboxd.sock".parse::<Server>().unwrap(),
            Server::Unix("/run/sandboxd.sock".into())
        );
        assert_eq!(
            "unix:///run/sandboxd.sock".parse::<Server>().unwrap(),
            Server::Unix("/run/sandboxd.sock".into())
        );
    }

    #[test]
    fn bad_server_addresses_are_rejected_with_a_reason() {
        for bad in [
            "unix:",
            "https://h:1",
            "ftp://h:1",
            "http://h:1/x",
            "a b",
            "",
        ] {
            assert!(bad.parse::<Server>().is_err(), "{bad:?} was accepted");
        }
    }
}
