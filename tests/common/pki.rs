//! TLS material made in the test with the `openssl` CLI: certificate authorities, a server
//! certificate for 127.0.0.1 and localhost, client certificates whose CN names a tenant. Keys
//! are EC P-256; everything lives in a temp dir removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::host;

/// How long the certificates are valid: long enough for any test run.
const DAYS: &str = "2";

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// A certificate authority: its certificate and key.
#[derive(Debug, Clone)]
pub struct Ca {
    /// PEM CA certificate (what clients and servers trust).
    pub cert: PathBuf,
    key: PathBuf,
    serial: PathBuf,
}

/// A directory of TLS material.
pub struct Pki {
    dir: TempDir,
}

fn openssl(args: &[&str]) {
    let out = Command::new(host::binary("openssl"))
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

impl Pki {
    /// An empty directory for certificates.
    pub fn new() -> Pki {
        Pki {
            dir: tempfile::Builder::new()
                .prefix("sandboxd-pki-")
                .tempdir()
                .expect("create pki dir"),
        }
    }

    /// The directory (to write more files next to the certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn key(&self, name: &str) -> PathBuf {
        let key = self.dir.path().join(format!("{name}.key"));
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            path_str(&key),
        ]);
        key
    }

    /// A self-signed CA named `name`.
    pub fn ca(&self, name: &str) -> Ca {
        let key = self.key(name);
        let cert = self.dir.path().join(format!("{name}.pem"));
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            path_str(&key),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            DAYS,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            path_str(&cert),
        ]);
        Ca {
            serial: self.dir.path().join(format!("{name}.srl")),
            cert,
            key,
        }
    }

    /// A certificate for `/CN=cn` signed by `ca`, with `extensions` (an openssl extension
    /// file's lines).
    fn issue(&self, ca: &Ca, name: &str, cn: &str, extensions: &str) -> Issued {
        let key = self.key(name);
        let csr = self.dir.path().join(format!("{name}.csr"));
        let ext = self.dir.path().join(format!("{name}.ext"));
        let cert = self.dir.path().join(format!("{name}.pem"));
        std::fs::write(&ext, extensions).expect("write extension file");
        openssl(&[
            "req",
            "-new",
            "-key",
            path_str(&key),
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            path_str(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr),
            "-CA",
            path_str(&ca.cert),
            "-CAkey",
            path_str(&ca.key),
            "-CAserial",
            path_str(&ca.serial),
            "-CAcreateserial",
            "-days",
            DAYS,
            "-extfile",
            path_str(&ext),
            "-out",
            path_str(&cert),
        ]);
        Issued { cert, key }
    }

    /// A server certificate for 127.0.0.1, ::1 and localhost, signed by `ca`.
    pub fn server(&self, ca: &Ca, name: &str) -> Issued {
        self.issue(
            ca,
            name,
            "sandboxd",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n",
        )
    }

    /// A client certificate whose CN is `cn` (the tenant), signed by `ca`.
    pub fn client(&self, ca: &Ca, name: &str, cn: &str) -> Issued {
        self.issue(
            ca,
            name,
            cn,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// The hex SHA-256 of `token`, as the tenants file lists it.
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A tenants file's text: each tenant with its tokens (hashed here) and extra TOML lines.
pub fn tenants_toml(tenants: &[(&str, &[&str], &str)]) -> String {
    let mut out = String::new();
    for (name, tokens, extra) in tenants {
        let hashes: Vec<String> = tokens
            .iter()
            .map(|t| format!("\"{}\"", token_sha256(t)))
            .collect();
        out.push_str(&format!(
            "[tenants.{name}]\ntokens_sha256 = [{}]\n{extra}\n",
            hashes.join(", ")
        ));
    }
    out
}
