//! TLS for the server and the CLI, with rustls and the aws-lc-rs provider (the one the registry
//! client's reqwest already compiles in; nothing else is linked).
//!
//! The server's certificate, key and client CA are a [`ServerTls`]: read at start (a bad file
//! stops the start, naming it) and again whenever a file's content changes, so a rotated
//! certificate reaches the next handshake while established connections, and their streams,
//! keep the session they have. A client certificate, when the server asks for one, must chain
//! to the client CA; its Subject CN is the caller's tenant ([`subject_tenant`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::caller::Tenant;
use crate::config::TlsConfig;
use crate::watched::Watched;

/// The ALPN protocol gRPC runs on; clients such as grpc-go refuse a server without it.
const ALPN_H2: &[u8] = b"h2";

/// The crypto provider every TLS config here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file's content; an error if there is none or one is malformed.
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file's content (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!(
            "{}: no usable PEM private key in it (PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

/// A root store holding every certificate of a CA file's content.
fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The server's TLS settings, re-read when a file changes.
pub type ServerTls = Watched<ServerConfig>;

/// Reads the server's certificate, key and client CA; a problem names the file.
pub fn load_server(files: &TlsConfig) -> Result<ServerTls, String> {
    let mut paths = vec![files.cert.clone(), files.key.clone()];
    paths.extend(files.client_ca.clone());
    let files = files.clone();
    Watched::load(
        paths,
        Box::new(move |contents: &[Vec<u8>]| server_config(&files, contents)),
    )
}

/// A rustls server config from the files' contents (cert, key, then client CA if any).
fn server_config(files: &TlsConfig, contents: &[Vec<u8>]) -> Result<ServerConfig, String> {
    let chain = certificates(&files.cert, &contents[0])?;
    let key = private_key(&files.key, &contents[1])?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match (&files.client_ca, contents.get(2)) {
        (Some(path), Some(pem)) => {
            // A client without a certificate still completes the handshake: health needs no
            // credentials, and a bearer token may authenticate it instead. One that presents
            // a certificate not signed by the CA is refused here.
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(path, pem)?), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{} and {}: {e}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The tenant a verified client certificate names: its Subject CN.
pub fn subject_tenant(cert: &CertificateDer<'_>) -> Result<Tenant, String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let subject = &cert.tbs_certificate().subject();
    let mut names = subject
        .iter()
        .filter(|atv| atv.oid == x509_cert::der::oid::db::rfc4519::COMMON_NAME);
    let (Some(cn), None) = (names.next(), names.next()) else {
        return Err("its subject must have exactly one CN".into());
    };
    let cn = x509_cert::ext::pkix::name::DirectoryString::try_from(&cn.value)
        .map_err(|e| format!("its CN is not a string: {e}"))?;
    Tenant::new(&cn.value())
}

/// What the CLI connects with: the CA to trust (else the system's roots) and an optional
/// client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain) and its key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A rustls client config for gRPC from `files`.
pub fn client_config(files: &ClientFiles) -> Result<ClientConfig, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let roots = match &files.ca {
        Some(path) => roots(path, &read(path)?)?,
        None => {
            let native = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(
                    "no trusted CA certificates on this system: give the server's CA with --tls-ca"
                        .into(),
                );
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let mut config = match &files.identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates(cert, &read(cert)?)?,
                private_key(key, &read(key)?)?,
            )
            .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for CN=alice (EC P-256), made with
    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj /CN=alice`.
    const ALICE_PEM: &str = include_str!("tls/alice.pem");
    const ALICE_KEY: &str = include_str!("tls/alice.key");
    /// The same with the subject `/O=nobody` (no CN).
    const NO_CN_PEM: &str = include_str!("tls/no-cn.pem");

    fn files(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        }
    }

    #[test]
    fn the_subject_cn_names_the_tenant() {
        let cert = certificates(Path::new("alice.pem"), ALICE_PEM.as_bytes()).unwrap();
        assert_eq!(subject_tenant(&cert[0]).unwrap().as_str(), "alice");
        let cert = certificates(Path::new("no-cn.pem"), NO_CN_PEM.as_bytes()).unwrap();
        assert!(subject_tenant(&cert[0]).unwrap_err().contains("CN"));
        assert!(subject_tenant(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }

    #[test]
    fn a_certificate_and_its_key_load_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        std::fs::write(&f.cert, ALICE_PEM).unwrap();
        std::fs::write(&f.key, ALICE_KEY).unwrap();
        let tls = load_server(&f).unwrap();
        assert_eq!(tls.current().alpn_protocols, vec![b"h2".to_vec()]);
        // A key that is not the certificate's.
        std::fs::write(&f.cert, NO_CN_PEM).unwrap();
        let err = load_server(&f).unwrap_err();
        assert!(err.contains(&f.cert.display().to_string()), "{err}");
        std::fs::write(&f.cert, "not pem").unwrap();
        let err = load_server(&f).unwrap_err();
        assert!(
            err.starts_with(&f.cert.display().to_string()) && err.contains("no certificate"),
            "{err}"
        );
        std::fs::write(&f.cert, ALICE_PEM).unwrap();
        std::fs::write(&f.key, ALICE_PEM).unwrap();
        let err = load_server(&f).unwrap_err();
        assert!(
            err.starts_with(&f.key.display().to_string()) && err.contains("private key"),
            "{err}"
        );
        let with_ca = TlsConfig {
            client_ca: Some(dir.path().join("ca.pem")),
            ..f.clone()
        };
        std::fs::write(&f.key, ALICE_KEY).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "").unwrap();
        let err = load_server(&with_ca).unwrap_err();
        assert!(err.contains("ca.pem"), "{err}");
        std::fs::write(dir.path().join("ca.pem"), ALICE_PEM).unwrap();
        assert!(load_server(&with_ca).is_ok());
    }

    #[test]
    fn the_client_config_speaks_h2_and_names_a_bad_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ALICE_PEM).unwrap();
        let config = client_config(&ClientFiles {
            ca: Some(ca.clone()),
            identity: None,
        })
        .unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        std::fs::write(&ca, "junk").unwrap();
        let err = client_config(&ClientFiles {
            ca: Some(ca.clone()),
            identity: None,
        })
        .unwrap_err();
        assert!(err.contains("ca.pem"), "{err}");
    }
}
