//! Where the client finds the server (`--server`), how it proves who it is (`--token`, a
//! client certificate) and the gRPC channel to it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::ClientFiles;

/// How long one connection attempt may take before the call fails with UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The port of an `https://` URL that names none.
const HTTPS_PORT: u16 = 443;

/// A sandboxd server address: an HTTP/2 URL, plaintext or TLS, or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// `http://HOST:PORT` (a bare `HOST:PORT` gets `http://` prepended).
    Http(Uri),
    /// `https://HOST:PORT`: TLS, the server's certificate checked against `--tls-ca` (else
    /// the system's roots) for HOST.
    Https(Uri),
    /// `unix:/path/to.sock`.
    Unix(PathBuf),
}

/// What the client proves itself with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
    /// The CA to trust and the client certificate, for `https://`.
    pub tls: ClientFiles,
}

/// The channel every command talks over: each call carries the bearer token, if any.
#[derive(Clone, Debug)]
pub struct Transport {
    channel: Channel,
    authorization: Option<http::HeaderValue>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Transport {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        tower::Service::call(&mut self.channel, req)
    }
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
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("the scheme must be http://, https:// or unix:".into()),
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err("the URL has no host".into());
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err("the URL must not have a path".into());
        }
        Ok(if https {
            Server::Https(uri)
        } else {
            Server::Http(uri)
        })
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Server::Http(uri) | Server::Https(uri) => {
                let s = uri.to_string();
                f.write_str(s.strip_suffix('/').unwrap_or(&s))
            }
            Server::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Server {
    /// A channel that connects on first use, so an unreachable server shows up as UNAVAILABLE
    /// from the first call, and that sends `credentials` on every call. TLS files for a
    /// server that is not `https://` are a mistake, not something to ignore.
    pub fn channel(&self, credentials: &Credentials) -> Result<Transport, String> {
        let authorization = match &credentials.token {
            None => None,
            Some(token) => {
                let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| "the token must be printable ASCII".to_string())?;
                // Never put it in an HPACK table a proxy could read back.
                value.set_sensitive(true);
                Some(value)
            }
        };
        let tls_given = credentials.tls != ClientFiles::default();
        let channel = match self {
            Server::Http(_) | Server::Unix(_) if tls_given => {
                return Err(format!(
                    "--tls-ca, --tls-cert and --tls-key need an https:// server, not {self}"
                ))
            }
            Server::Http(uri) => Endpoint::from(uri.clone())
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_lazy(),
            Server::Https(uri) => {
                let config = Arc::new(crate::tls::client_config(&credentials.tls)?);
                let host = uri.host().unwrap_or_default();
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host)
                    .to_string();
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
                let port = uri.port_u16().unwrap_or(HTTPS_PORT);
                Endpoint::from(uri.clone())
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                        let (config, name, host) = (config.clone(), name.clone(), host.clone());
                        async move {
                            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                            let _ = tcp.set_nodelay(true);
                            let tls = tokio_rustls::TlsConnector::from(config)
                                .connect(name, tcp)
                                .await?;
                            Ok::<_, std::io::Error>(TokioIo::new(tls))
                        }
                    }))
            }
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
        };
        Ok(Transport {
            channel,
            authorization,
        })
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
            http("https://sandboxd.example:7443"),
            "https://sandboxd.example:7443"
        );
        assert!(matches!(
            "https://127.0.0.1:7443".parse::<Server>().unwrap(),
            Server::Https(_)
        ));
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
            "https://h:1/x",
            "ftp://h:1",
            "http://h:1/x",
            "a b",
            "",
        ] {
            assert!(bad.parse::<Server>().is_err(), "{bad:?} was accepted");
        }
    }

    #[tokio::test]
    async fn tls_files_need_an_https_server_and_a_token_must_be_ascii() {
        let tls = Credentials {
            token: None,
            tls: ClientFiles {
                ca: Some("/ca.pem".into()),
                identity: None,
            },
        };
        for server in ["http://127.0.0.1:1", "unix:/run/s.sock"] {
            let err = server.parse::<Server>().unwrap().channel(&tls).unwrap_err();
            assert!(err.contains("https://"), "{err}");
        }
        let err = "https://127.0.0.1:1"
            .parse::<Server>()
            .unwrap()
            .channel(&tls)
            .unwrap_err();
        assert!(err.contains("/ca.pem"), "{err}");
        let bad_token = Credentials {
            token: Some("a\nb".into()),
            ..Credentials::default()
        };
        let err = "http://127.0.0.1:1"
            .parse::<Server>()
            .unwrap()
            .channel(&bad_token)
            .unwrap_err();
        assert!(err.contains("token"), "{err}");
        assert!(!err.contains("a\nb"), "{err}");
    }
}
