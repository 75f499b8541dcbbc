//! Registry credentials as users have them (Docker's `config.json`, the content of a Kubernetes
//! `kubernetes.io/dockerconfigjson` Secret) and the registry's `WWW-Authenticate` challenges.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;

use super::settings::normalize_host;

/// What sandboxd presents to one registry host.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (or access token used as one): Basic, or traded for a bearer
    /// token at the realm.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken`), traded for a bearer token at the realm.
    IdentityToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never a secret in a log line.
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username:?}, ***)"),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(***)"),
        }
    }
}

/// Credentials by registry host, read from a Docker `config.json`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthFile {
    by_host: HashMap<String, Credential>,
}

impl fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<&String> = self.by_host.keys().collect();
        hosts.sort();
        f.debug_struct("AuthFile").field("hosts", &hosts).finish()
    }
}

impl AuthFile {
    /// Parses a Docker `config.json`: `auths` maps a registry (a host, or a URL such as Docker
    /// Hub's `https://index.docker.io/v1/`) to `auth` (base64 of `user:password`), or
    /// `username` and `password`, or `identitytoken`. Other keys are ignored.
    pub fn parse(bytes: &[u8]) -> Result<AuthFile, String> {
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: Option<String>,
            #[serde(default)]
            username: Option<String>,
            #[serde(default)]
            password: Option<String>,
            #[serde(default)]
            identitytoken: Option<String>,
        }
        let file: File =
            serde_json::from_slice(bytes).map_err(|e| format!("not a Docker config.json ({e})"))?;
        let mut by_host = HashMap::new();
        for (key, entry) in file.auths {
            let host = host_of_key(&key)?;
            let credential = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Credential::IdentityToken(token)
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(|| format!("auths.{key:?}.auth is not base64 of user:password"))?;
                let (username, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{key:?}.auth is not base64 of user:password"))?;
                Credential::Basic {
                    username: username.to_string(),
                    password: password.to_string(),
                }
            } else if let (Some(username), Some(password)) = (entry.username, entry.password) {
                Credential::Basic { username, password }
            } else {
                // An entry with nothing usable (a credential helper's placeholder): anonymous.
                continue;
            };
            by_host.insert(host, credential);
        }
        Ok(AuthFile { by_host })
    }

    /// The credential for registry `host` (in normal form), if any.
    pub fn get(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(host)
    }

    /// How many hosts have credentials.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// Whether no host has credentials.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// The host an `auths` key names: `registry.example.com`, `https://registry.example.com/v2/`.
fn host_of_key(key: &str) -> Result<String, String> {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or_default();
    normalize_host(host).map_err(|e| format!("auths key {key:?}: {e}"))
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Challenge {
    /// Send the credential as HTTP Basic.
    Basic,
    /// Fetch a token at `realm` for `service` and `scope`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses the first Basic or Bearer challenge of a `WWW-Authenticate` value.
pub(super) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let params = parse_params(params);
            let realm = params.get("realm")?.clone();
            if realm.is_empty() {
                return None;
            }
            Some(Challenge::Bearer {
                realm,
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
            })
        }
        _ => None,
    }
}

/// `key="value", key2=value2` into a map with lowercase keys.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            // A quoted string: backslash escapes one character.
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            match end {
                Some(end) => (value, &quoted[end..]),
                // Unterminated: not a value we act on.
                None => break,
            }
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.entry(key).or_insert(value);
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// A token endpoint's answer: `token`, else `access_token`.
pub(super) fn parse_token(bytes: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        access_token: Option<String>,
    }
    let answer: Answer =
        serde_json::from_slice(bytes).map_err(|e| format!("the token answer is not JSON ({e})"))?;
    answer
        .token
        .filter(|t| !t.is_empty())
        .or(answer.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| "the token answer holds no token".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_json_in_all_three_forms() {
        let file = AuthFile::parse(
            br#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="},
                "Registry.Example.com:5000": {"username": "u", "password": "p"},
                "ghcr.io": {"identitytoken": "refresh"},
                "helper.example.com": {}
            }, "credsStore": "desktop"}"#,
        )
        .unwrap();
        assert_eq!(
            file.get("docker.io"),
            Some(&Credential::Basic {
                username: "user".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(
            file.get("registry.example.com:5000"),
            Some(&Credential::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(
            file.get("ghcr.io"),
            Some(&Credential::IdentityToken("refresh".into()))
        );
        assert_eq!(file.get("helper.example.com"), None);
        assert_eq!(file.len(), 3);
        assert!(!format!("{:?}", file.get("docker.io")).contains("pa:ss"));
    }

    #[test]
    fn malformed_config_json_is_refused_with_a_reason() {
        for bad in [
            &b"not json"[..],
            br#"{"auths": {"r": {"auth": "!!!"}}}"#,
            br#"{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}"#,
            br#"{"auths": {"a b": {"username": "u", "password": "p"}}}"#,
        ] {
            assert!(
                AuthFile::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(AuthFile::parse(b"{}").unwrap().is_empty());
    }

    #[test]
    fn challenges_parse_as_registries_send_them() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"bearer REALM="http://h/t", service=s"#),
            Some(Challenge::Bearer {
                realm: "http://h/t".into(),
                service: Some("s".into()),
                scope: None,
            })
        );
        for bad in [
            "",
            "Negotiate",
            "Bearer service=\"x\"",
            "Bearer realm=\"",
            "Bearer realm=\"\"",
        ] {
            assert_eq!(parse_challenge(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tokens_come_as_token_or_access_token() {
        assert_eq!(parse_token(br#"{"token":"a"}"#).unwrap(), "a");
        assert_eq!(parse_token(br#"{"access_token":"b"}"#).unwrap(), "b");
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"[]").is_err());
    }
}
