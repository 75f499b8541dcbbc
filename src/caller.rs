//! Who makes a call: the tenant that limits are counted by and that owns what it makes.
//!
//! A caller is decided in one place, [`Authenticator::identify`], which the server runs on every
//! request and whose answer travels in the request's extensions. Its inputs are what the
//! connection proved ([`Peer`]: the tenant a verified client certificate names, whether the peer
//! is on loopback) and what the request carries (`authorization: Bearer <token>`, and from a
//! trusted mesh sidecar Envoy's `x-forwarded-client-cert`). With no authentication configured
//! every caller is the [`Tenant::DEFAULT`] tenant's; with some, a call without valid credentials
//! is refused (UNAUTHENTICATED), and a message never echoes a token.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::error::Error;
use crate::tenants::{Quotas, Registry};

/// Longest tenant name; the same bound as a sandbox id, short enough for a containerd
/// namespace suffix or a label value.
pub const MAX_TENANT_NAME: usize = 63;

/// A tenant: whose calls share one set of limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    /// The name of the tenant of every caller when no authentication is configured.
    pub const DEFAULT: &'static str = "default";

    /// A tenant named `name`: ASCII letters and digits, in runs joined by single `.`, `_` or
    /// `-`, at most [`MAX_TENANT_NAME`] bytes (containerd's identifier rule, so a tenant can
    /// name a namespace).
    pub fn new(name: &str) -> Result<Tenant, String> {
        let valid = !name.is_empty()
            && name.len() <= MAX_TENANT_NAME
            && name
                .split(['.', '_', '-'])
                .all(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_alphanumeric()));
        if valid {
            Ok(Tenant(name.to_string()))
        } else {
            Err(format!(
                "{:?} is not a tenant name: 1-{MAX_TENANT_NAME} ASCII letters and digits, \
                 in runs joined by single '.', '_' or '-'",
                name
            ))
        }
    }

    /// The default tenant.
    pub fn default_tenant() -> Tenant {
        Tenant(Tenant::DEFAULT.to_string())
    }

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// It did not: no authentication is configured (or the call is a health check).
    Anonymous,
    /// A client certificate verified by the TLS handshake (`--tls-client-ca`); its CN.
    ClientCertificate,
    /// `authorization: Bearer <token>`, a token of the tenants file.
    BearerToken,
    /// The URI SAN (SPIFFE ID) in a loopback mesh sidecar's `x-forwarded-client-cert`.
    ForwardedCertificate,
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    tenant: Tenant,
    method: Method,
    quotas: Quotas,
    registry_auth: Option<std::path::PathBuf>,
}

impl Caller {
    /// A caller that did not authenticate: the default tenant's.
    pub fn anonymous() -> Caller {
        Caller {
            tenant: Tenant::default_tenant(),
            method: Method::Anonymous,
            quotas: Quotas::default(),
            registry_auth: None,
        }
    }

    /// The caller the server recorded in a request's `extensions`; anonymous when none was
    /// (a request that did not come through the server, as in tests).
    pub fn of(extensions: &http::Extensions) -> Caller {
        extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous)
    }

    /// The caller's tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// How the caller authenticated.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The quotas of the caller's tenant in the tenants file (none when it has no entry),
    /// as they were when the call arrived.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The caller's tenant's own registry credentials file (the tenants file's
    /// `registry_auth`), if it has one.
    pub fn registry_auth(&self) -> Option<&std::path::Path> {
        self.registry_auth.as_deref()
    }
}

/// What the connection a request came on proved about its peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The TCP peer; `None` on the unix socket.
    pub remote: Option<SocketAddr>,
    /// The tenant the client certificate's Subject CN names, when the client presented one
    /// (the handshake verified it against `--tls-client-ca`), or why it names none.
    pub client_certificate: Option<Result<Tenant, String>>,
}

impl Peer {
    /// Whether the peer is a TCP connection from a loopback address.
    pub fn is_loopback(&self) -> bool {
        self.remote.is_some_and(|a| a.ip().is_loopback())
    }
}

/// The header a mesh sidecar (Envoy) puts the client's certificate details in.
pub const FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";

/// Decides every request's [`Caller`] from its credentials.
#[derive(Debug, Default)]
pub struct Authenticator {
    /// The tenants file (`--tenants`): bearer tokens, SPIFFE IDs, quotas.
    tenants: Option<Arc<Registry>>,
    /// Whether client certificates are verified (`--tls-client-ca`).
    client_certificates: bool,
    /// Whether a loopback peer's `x-forwarded-client-cert` is believed.
    trust_forwarded: bool,
}

impl Authenticator {
    /// No authentication: every caller is the default tenant.
    pub fn open() -> Authenticator {
        Authenticator::default()
    }

    /// Authenticates with whichever of tokens (and SPIFFE IDs) from `tenants` and verified
    /// client certificates are given. `trust_forwarded` needs `tenants` (it maps SPIFFE IDs).
    pub fn new(
        tenants: Option<Arc<Registry>>,
        client_certificates: bool,
        trust_forwarded: bool,
    ) -> Authenticator {
        Authenticator {
            trust_forwarded: trust_forwarded && tenants.is_some(),
            tenants,
            client_certificates,
        }
    }

    /// Whether callers must authenticate (any way of authenticating is configured).
    pub fn required(&self) -> bool {
        self.tenants.is_some() || self.client_certificates
    }

    /// The tenants file, when one is configured.
    pub fn tenants(&self) -> Option<&Arc<Registry>> {
        self.tenants.as_ref()
    }

    /// Whether verified client certificates authenticate callers.
    pub fn client_certificates(&self) -> bool {
        self.client_certificates
    }

    /// Decides who sent a request with `headers` over a connection that proved `peer`.
    ///
    /// Every credential presented must be valid, and all of them must name one tenant: a
    /// wrong token next to a good certificate is still refused.
    pub fn identify(&self, headers: &http::HeaderMap, peer: &Peer) -> Result<Caller, Error> {
        if !self.required() {
            return Ok(Caller::anonymous());
        }
        let tenants = self.tenants.as_ref().map(|r| r.current());
        let mut found: Vec<(Method, Tenant)> = Vec::new();
        if self.client_certificates {
            match &peer.client_certificate {
                Some(Ok(tenant)) => found.push((Method::ClientCertificate, tenant.clone())),
                Some(Err(why)) => {
                    return Err(unauthenticated(format!(
                        "the client certificate names no tenant: {why}"
                    )))
                }
                None => {}
            }
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = bearer_token(value)?;
            let Some(tenants) = &tenants else {
                return Err(unauthenticated(
                    "bearer tokens are not accepted here (the server has no --tenants file); \
                     authenticate with a client certificate"
                        .into(),
                ));
            };
            match tenants.by_token(token) {
                Some(tenant) => found.push((Method::BearerToken, tenant.clone())),
                None => return Err(unauthenticated("the bearer token is not valid".into())),
            }
        }
        if self.trust_forwarded && peer.is_loopback() {
            if let (Some(value), Some(tenants)) = (headers.get(FORWARDED_CLIENT_CERT), &tenants) {
                let uris = value
                    .to_str()
                    .ok()
                    .map(forwarded_uri_sans)
                    .unwrap_or_default();
                match uris.iter().find_map(|uri| tenants.by_spiffe_id(uri)) {
                    Some(tenant) => found.push((Method::ForwardedCertificate, tenant.clone())),
                    None => {
                        return Err(unauthenticated(format!(
                            "no tenant has the SPIFFE ID of the forwarded client certificate \
                             ({})",
                            if uris.is_empty() {
                                "it has no URI SAN".to_string()
                            } else {
                                uris.iter()
                                    .map(|u| format!("{u:?}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        )))
                    }
                }
            }
        }
        let Some((method, tenant)) = found.first().cloned() else {
            return Err(unauthenticated(self.missing_credentials()));
        };
        if found.iter().any(|(_, t)| *t != tenant) {
            return Err(unauthenticated(
                "the credentials presented name different tenants".into(),
            ));
        }
        let quotas = tenants
            .as_ref()
            .map(|t| t.quotas(&tenant).clone())
            .unwrap_or_default();
        let registry_auth =
            tenants.and_then(|t| t.registry_auth(&tenant).map(std::path::Path::to_path_buf));
        Ok(Caller {
            tenant,
            method,
            quotas,
            registry_auth,
        })
    }

    /// What a call without credentials is told to send.
    fn missing_credentials(&self) -> String {
        let mut ways = Vec::new();
        if self.tenants.is_some() {
            ways.push("an `authorization: Bearer <token>` header");
        }
        if self.client_certificates {
            ways.push("a client certificate");
        }
        format!("this call needs credentials: send {}", ways.join(" or "))
    }
}

fn unauthenticated(message: String) -> Error {
    Error::Unauthenticated(message)
}

/// The token of an `authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer_token(value: &http::HeaderValue) -> Result<&str, Error> {
    let malformed = || unauthenticated("the authorization header must be `Bearer <token>`".into());
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}

/// The URI SANs (`URI=` keys) of the last element of an Envoy `x-forwarded-client-cert` value:
/// the certificate of the client that connected to the sidecar (earlier elements are hops
/// before it, appended by proxies in front).
///
/// The value is a comma-separated list of elements, each a `;`-separated list of `key=value`
/// pairs; a value may be double-quoted, with `\"` inside.
pub fn forwarded_uri_sans(value: &str) -> Vec<String> {
    let elements = split_unquoted(value, ',');
    let Some(last) = elements.last() else {
        return Vec::new();
    };
    split_unquoted(last, ';')
        .into_iter()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            key.trim()
                .eq_ignore_ascii_case("uri")
                .then(|| unquote(value.trim()))
        })
        .filter(|uri| !uri.is_empty())
        .collect()
}

/// `s` split at each `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A value without its surrounding double quotes and with `\"` and `\\` unescaped.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::Tenants;

    const ALICE_TOKEN: &str = "alice-secret";
    const BOB_TOKEN: &str = "bob-secret";

    fn sha(token: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    }

    fn registry() -> Arc<Registry> {
        let text = format!(
            "[tenants.alice]\ntokens_sha256 = [\"{}\"]\nmax_sandboxes = 3\n\
             spiffe_ids = [\"spiffe://cluster.local/ns/a/sa/alice\"]\n\
             [tenants.bob]\ntokens_sha256 = [\"{}\"]\n",
            sha(ALICE_TOKEN),
            sha(BOB_TOKEN)
        );
        Arc::new(Registry::fixed(Tenants::parse(&text).unwrap()))
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn loopback() -> Peer {
        Peer {
            remote: Some("127.0.0.1:4000".parse().unwrap()),
            client_certificate: None,
        }
    }

    fn code_and_message(r: Result<Caller, Error>) -> (tonic::Code, String) {
        let status = tonic::Status::from(r.unwrap_err());
        (status.code(), status.message().to_string())
    }

    #[test]
    fn every_caller_is_the_default_tenant_without_authentication() {
        let auth = Authenticator::open();
        let caller = auth
            .identify(&headers(&[("authorization", "Bearer x")]), &Peer::default())
            .unwrap();
        assert_eq!(caller.tenant().as_str(), "default");
        assert_eq!(caller.method(), Method::Anonymous);
        let mut ext = http::Extensions::new();
        assert_eq!(Caller::of(&ext), caller);
        ext.insert(caller.clone());
        assert_eq!(Caller::of(&ext), caller);
    }

    #[test]
    fn a_bearer_token_names_its_tenant_and_carries_its_quotas() {
        let auth = Authenticator::new(Some(registry()), false, false);
        let caller = auth
            .identify(
                &headers(&[("authorization", &format!("Bearer {ALICE_TOKEN}"))]),
                &loopback(),
            )
            .unwrap();
        assert_eq!(caller.tenant().as_str(), "alice");
        assert_eq!(caller.method(), Method::BearerToken);
        assert_eq!(caller.quotas().max_sandboxes, Some(3));
        assert_eq!(caller.quotas().max_memory_bytes, None);
        let bob = auth
            .identify(
                &headers(&[("authorization", &format!("bearer {BOB_TOKEN}"))]),
                &loopback(),
            )
            .unwrap();
        assert_eq!(bob.tenant().as_str(), "bob");
    }

    #[test]
    fn missing_or_wrong_credentials_are_unauthenticated_and_never_echo_the_token() {
        let auth = Authenticator::new(Some(registry()), true, false);
        let (code, message) = code_and_message(auth.identify(&headers(&[]), &loopback()));
        assert_eq!(code, tonic::Code::Unauthenticated);
        assert!(message.contains("Bearer") && message.contains("client certificate"));
        for value in [
            "Bearer not-a-token-we-know",
            "Basic not-a-token-we-know",
            "not-a-token-we-know",
            "Bearer ",
        ] {
            let (code, message) =
                code_and_message(auth.identify(&headers(&[("authorization", value)]), &loopback()));
            assert_eq!(code, tonic::Code::Unauthenticated, "{value}");
            assert!(!message.contains("not-a-token-we-know"), "{message}");
        }
    }

    #[test]
    fn a_client_certificate_names_its_tenant_and_must_agree_with_a_token() {
        let auth = Authenticator::new(Some(registry()), true, false);
        let peer = Peer {
            client_certificate: Some(Ok(Tenant::new("alice").unwrap())),
            ..loopback()
        };
        let caller = auth.identify(&headers(&[]), &peer).unwrap();
        assert_eq!(
            (caller.tenant().as_str(), caller.method()),
            ("alice", Method::ClientCertificate)
        );
        // The quotas of the file's entry of the same name apply.
        assert_eq!(caller.quotas().max_sandboxes, Some(3));
        let same = auth.identify(
            &headers(&[("authorization", &format!("Bearer {ALICE_TOKEN}"))]),
            &peer,
        );
        assert_eq!(same.unwrap().tenant().as_str(), "alice");
        let (code, _) = code_and_message(auth.identify(
            &headers(&[("authorization", &format!("Bearer {BOB_TOKEN}"))]),
            &peer,
        ));
        assert_eq!(code, tonic::Code::Unauthenticated);
        // A certificate whose CN is no tenant name authenticates nobody.
        let bad = Peer {
            client_certificate: Some(Err("no CN".into())),
            ..loopback()
        };
        let (code, _) = code_and_message(auth.identify(&headers(&[]), &bad));
        assert_eq!(code, tonic::Code::Unauthenticated);
        // An mTLS tenant need not be in the file at all.
        let carol = Peer {
            client_certificate: Some(Ok(Tenant::new("carol").unwrap())),
            ..loopback()
        };
        let caller = Authenticator::new(None, true, false)
            .identify(&headers(&[]), &carol)
            .unwrap();
        assert_eq!(caller.tenant().as_str(), "carol");
        assert_eq!(caller.quotas(), &Quotas::default());
    }

    #[test]
    fn a_forwarded_certificate_counts_only_from_loopback_and_only_when_trusted() {
        let xfcc = "By=spiffe://cluster.local/ns/s/sa/sandboxd;Hash=abc;\
                    Subject=\"CN=x,O=y\";URI=spiffe://cluster.local/ns/a/sa/alice";
        let with_xfcc = headers(&[(FORWARDED_CLIENT_CERT, xfcc)]);
        let trusting = Authenticator::new(Some(registry()), false, true);
        let caller = trusting.identify(&with_xfcc, &loopback()).unwrap();
        assert_eq!(
            (caller.tenant().as_str(), caller.method()),
            ("alice", Method::ForwardedCertificate)
        );
        // From anywhere else the header is ignored: no credentials.
        let remote = Peer {
            remote: Some("10.1.2.3:5000".parse().unwrap()),
            client_certificate: None,
        };
        for (auth, peer) in [
            (&trusting, &remote),
            (&trusting, &Peer::default()),
            (
                &Authenticator::new(Some(registry()), false, false),
                &loopback(),
            ),
        ] {
            let (code, message) = code_and_message(auth.identify(&with_xfcc, peer));
            assert_eq!(code, tonic::Code::Unauthenticated);
            assert!(message.contains("needs credentials"), "{message}");
        }
        // An unknown SPIFFE ID is refused, not ignored.
        let stranger = headers(&[(FORWARDED_CLIENT_CERT, "URI=spiffe://elsewhere/x")]);
        let (code, message) = code_and_message(trusting.identify(&stranger, &loopback()));
        assert_eq!(code, tonic::Code::Unauthenticated);
        assert!(message.contains("spiffe://elsewhere/x"), "{message}");
    }

    #[test]
    fn forwarded_client_cert_values_parse_as_envoy_writes_them() {
        assert_eq!(
            forwarded_uri_sans("Hash=1;URI=spiffe://a/b"),
            vec!["spiffe://a/b"]
        );
        // The last element is the client that reached the sidecar.
        assert_eq!(
            forwarded_uri_sans("URI=spiffe://first;By=x,By=y;URI=spiffe://last"),
            vec!["spiffe://last"]
        );
        // Quoted values may hold the separators.
        assert_eq!(
            forwarded_uri_sans(
                "Subject=\"CN=a, O=b; c\";URI=\"spiffe://q/\\\"x\\\"\";URI=spiffe://second"
            ),
            vec!["spiffe://q/\"x\"", "spiffe://second"]
        );
        assert!(forwarded_uri_sans("Hash=1;Subject=\"CN=a\"").is_empty());
        assert!(forwarded_uri_sans("").is_empty());
    }

    #[test]
    fn tenant_names_follow_containerds_identifier_rule() {
        for good in ["default", "alice", "team-a.prod", "A_1", &"a".repeat(63)] {
            assert!(Tenant::new(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "ä", "a/b", &"a".repeat(64)] {
            assert!(Tenant::new(bad).is_err(), "{bad}");
        }
    }
}
